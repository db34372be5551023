"""The training-free context-extension schemes compared by the study.

Each scheme is a function of the evaluation length ``L`` and the training length ``M``
(= the model's ``ctx``) returning a :class:`~ropekit.RopeConfig` for the trained model.
Static schemes are built with ``factor = L / M``, so at ``L = M`` every scheme is plain
RoPE (factor 1); dynamic NTK is one fixed configuration whose frequencies follow the
``seq_len`` it is given.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

from .._errors import fail
from ..config import RopeConfig
from .. import scaling as S

__all__ = ["SCHEMES", "FINETUNE_SCHEMES", "scheme_config", "describe_scheme"]

#: Schemes of the extrapolation table, in report order.
SCHEMES = ("none", "linear", "ntk", "dynamic", "yarn", "llama3")
#: Schemes that the optional fine-tuning step supports (``none`` is the control: the same
#: fine-tuning at the longer length without any scaling).
FINETUNE_SCHEMES = ("none", "linear", "yarn")

_DESCRIPTIONS: Dict[str, str] = {
    "none": "plain RoPE, original frequencies",
    "linear": "position interpolation (PI, arXiv 2306.15595), factor L/M",
    "ntk": "static NTK-aware base change, factor L/M",
    "dynamic": "dynamic NTK (transformers 'dynamic'), factor {dyn}, max_position M, seq_len = window length",
    "yarn": "YaRN (arXiv 2309.00071) factor L/M, beta_fast 32, beta_slow 1, attention factor 0.1 ln(L/M) + 1",
    "llama3": "Llama-3.1 bands, factor L/M, low_freq_factor 1, high_freq_factor 4, original M",
}


def describe_scheme(name: str, dynamic_factor: float = 2.0) -> str:
    return _DESCRIPTIONS[name].format(dyn=dynamic_factor)


def scheme_config(
    name: str, base_cfg: RopeConfig, length: int, train_len: int, *, dynamic_factor: float = 2.0
) -> RopeConfig:
    """``base_cfg`` with scheme ``name`` set up for windows of ``length`` tokens.

    Args:
        name: one of :data:`SCHEMES`.
        base_cfg: the trained model's config (no scaling).
        length: evaluation window length ``L``.
        train_len: training context ``M``.
        dynamic_factor: the ``factor`` of dynamic NTK (transformers' ``rope_scaling.factor``).

    Example:
        >>> cfg = RopeConfig(head_dim=32)
        >>> round(scheme_config("yarn", cfg, 512, 128).attention_factor, 6)  # 0.1 ln 4 + 1
        1.138629
        >>> scheme_config("linear", cfg, 128, 128).inv_freq().equal(cfg.inv_freq())
        True
    """
    if length < train_len or length % train_len:
        raise fail(f"a length that is a multiple of the training length {train_len}", repr(length), "use 1x, 2x, 4x, 8x")
    f = float(length // train_len)
    builders: Dict[str, Callable[[], Optional[S.Scaling]]] = {
        "none": lambda: None,
        "linear": lambda: S.Linear(factor=f),
        "ntk": lambda: S.NTK(factor=f),
        "dynamic": lambda: S.DynamicNTK(factor=dynamic_factor, max_position=train_len),
        "yarn": lambda: S.YaRN(factor=f, original_max_position=train_len),
        "llama3": lambda: S.Llama3(factor=f, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=train_len),
    }
    if name not in builders:
        raise fail(f"a scheme in {SCHEMES}", repr(name), "pick one of them")
    return base_cfg.replace(scaling=builders[name]())
