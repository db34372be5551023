"""Regression tests for robustness defects whose fix belongs to modules.py, functional.py
or hf.py. Each is marked ``xfail(strict=True)`` with the file to change: it fails today, and
the marker must be removed when the fix lands (a pass then fails the suite as XPASS).

Every test checks the behaviour a user sees, through the public API.
"""

from __future__ import annotations

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RopeError, RotaryEmbedding
from ropekit.hf import rope_config_from_hf

HF = {"model_type": "llama", "hidden_size": 512, "num_attention_heads": 8, "max_position_embeddings": 4096}


def _pending(where: str):
    return pytest.mark.xfail(strict=True, reason=where)


# ------------------------------------------------------------------ modules.py / functional.py
def test_head_wider_than_config_is_a_rope_error_naming_both_widths():
    rope = RotaryEmbedding(RopeConfig(64))
    q = torch.randn(1, 4, 2, 80)
    with pytest.raises(RopeError, match=r"(?s)(64.*80|80.*64)"):
        rope(q, q)


def test_head_narrower_than_config_is_a_rope_error_naming_both_widths():
    rope = RotaryEmbedding(RopeConfig(64))
    q = torch.randn(1, 4, 2, 48)
    with pytest.raises(RopeError) as e:
        rope(q, q)
    msg = str(e.value)
    assert "head_dim" in msg and "64" in msg and "48" in msg and "cos_table" not in msg


def test_float64_q_k_get_float64_tables():
    cfg = RopeConfig(64, base=1e4)
    q = torch.randn(2, 50, 3, 64, dtype=torch.float64)
    out, _ = RotaryEmbedding(cfg)(q, q, offsets=10**5)
    cos, sin = ropekit.cos_sin(cfg, torch.arange(10**5, 10**5 + 50), dtype=torch.float64)
    want = ropekit.apply_rotary(q, cos[:, None], sin[:, None], backend="reference")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)


def test_rotary_embedding_transformers_angles_bit_parity():
    cfg = RopeConfig(64, base=5e5)
    rope = RotaryEmbedding(cfg, angles="transformers")
    q = torch.randn(1, 40, 2, 64)
    pos = torch.arange(3000, 3040)
    cos, sin = ropekit.cos_sin(cfg, pos, angles="transformers")
    want = ropekit.apply_rotary(q, cos[:, None], sin[:, None])
    assert torch.equal(rope(q, q, positions=pos)[0], want)
    with pytest.raises(RopeError, match=r"angles"):
        RotaryEmbedding(cfg, angles="float32")


def test_rotary_embedding_of_a_per_layer_dict_names_the_layer_types():
    from pathlib import Path

    cfgs = RopeConfig.from_hf(Path(__file__).parent / "data" / "gemma-3-4b-it.json")
    assert isinstance(cfgs, dict)
    with pytest.raises(RopeError) as e:
        RotaryEmbedding(cfgs)
    msg = str(e.value)
    assert "full_attention" in msg and "sliding_attention" in msg  # which keys to pick from
    assert "RopeConfig.from_hf" not in msg.split("Fix:")[1]


def test_absurd_max_position_is_a_rope_error():
    rope = RotaryEmbedding(RopeConfig(64), max_position=2**45)
    with pytest.raises(RopeError, match=r"table"):
        rope.rope_init()


@pytest.mark.parametrize(
    "kw", [dict(attention_scaling="no"), dict(table_dtype=torch.int32), dict(backend="nope")], ids=str
)
def test_rotary_embedding_checks_its_arguments_when_built(kw):
    with pytest.raises(RopeError):
        RotaryEmbedding(RopeConfig(64), **kw)


# ------------------------------------------------------------------ hf.py
@pytest.mark.parametrize("extra", [{}, {"original_max_position_embeddings": 1024}], ids=["no-original", "with-original"])
def test_yarn_without_factor_is_a_rope_error(extra):
    with pytest.raises(RopeError, match=r"factor"):
        rope_config_from_hf({**HF, "rope_scaling": {"rope_type": "yarn", **extra}})


@pytest.mark.parametrize(
    "change",
    [
        {"rope_theta": "10000"},
        {"rope_theta": "abc"},
        {"num_attention_heads": "8"},
        {"num_attention_heads": 0},
        {"max_position_embeddings": "4k"},
        {"partial_rotary_factor": "0.5"},
        {"hidden_size": 512.5},
    ],
    ids=str,
)
def test_string_and_bad_numbers_in_config_json_are_rope_errors(change):
    with pytest.raises(RopeError) as e:
        rope_config_from_hf({**HF, **change})
    assert type(e.value) is RopeError


def test_null_short_factor_is_named_null():
    scaling = {"rope_type": "longrope", "short_factor": None, "long_factor": [1.0] * 32,
               "original_max_position_embeddings": 1024}  # fmt: skip
    with pytest.raises(RopeError, match=r"short_factor.*null"):
        rope_config_from_hf({**HF, "rope_scaling": scaling})


def test_string_flag_in_config_is_a_rope_error():
    with pytest.raises(RopeError, match=r"truncate"):
        rope_config_from_hf({**HF, "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "truncate": "false"}})
