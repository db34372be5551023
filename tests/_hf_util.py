"""Helpers shared by the transformers family tests (imported after ``pytest.importorskip``)."""

from __future__ import annotations

import pytest
import transformers


@pytest.fixture(autouse=True)
def quiet_transformers():
    """transformers' logging at error level for the test (its warnings about tiny configs)."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


def need(model_type: str) -> None:
    """Skip the test where the installed transformers has no ``model_type``."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"no {model_type} in transformers {transformers.__version__}")
