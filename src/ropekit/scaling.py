"""Frequency scaling schemes: one small frozen dataclass per scheme.

A scheme maps the base frequencies of a :class:`~ropekit.RopeConfig` (and, for
length-dependent schemes, the total sequence length) to scaled frequencies and an
attention factor. Everything is computed in float64.

Interface every scheme implements (see :class:`Scaling`):

- ``inv_freq(cfg, seq_len) -> float64 [r/2]``
- ``attention_factor(cfg) -> float``
- ``table_key(cfg, seq_len) -> Hashable`` — changes exactly when ``inv_freq`` does
- ``validate(cfg)`` — RopeError for parameters that do not fit ``cfg``
- class attribute ``length_dependent`` — True when ``inv_freq`` reads ``seq_len``
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, ClassVar, Dict, Hashable, Optional, Type

import torch

from ._errors import RopeError, fail

if TYPE_CHECKING:  # pragma: no cover
    from .config import RopeConfig

__all__ = ["Scaling", "Linear"]

_REGISTRY: Dict[str, Type["Scaling"]] = {}


class Scaling:
    """Base class of the scaling schemes. Subclasses are frozen dataclasses."""

    #: The Hugging Face ``rope_type`` this scheme implements.
    rope_type: ClassVar[str] = ""
    #: True when ``inv_freq`` depends on ``seq_len`` (dynamic NTK, LongRoPE); tables are
    #: then keyed by :meth:`table_key` and ``seq_len`` defaults to ``max(position) + 1``.
    length_dependent: ClassVar[bool] = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.rope_type:
            _REGISTRY[cls.rope_type] = cls

    # -- interface --------------------------------------------------------------
    def inv_freq(self, cfg: "RopeConfig", seq_len: Optional[int]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def attention_factor(self, cfg: "RopeConfig") -> float:
        return 1.0

    def table_key(self, cfg: "RopeConfig", seq_len: Optional[int]) -> Hashable:
        return None

    def validate(self, cfg: "RopeConfig") -> None:
        pass

    # -- plain data -------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"rope_type": self.rope_type}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    @staticmethod
    def from_dict(data: dict) -> "Scaling":
        data = dict(data)
        kind = data.pop("rope_type", None)
        if kind not in _REGISTRY:
            raise fail(f"rope_type in {sorted(_REGISTRY)}", repr(kind), "use one of the known scheme names")
        return _REGISTRY[kind](**data)


def _check_factor(name: str, value: Any, minimum: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise fail(f"{name} a finite number >= {minimum}", repr(value), f"pass the checkpoint's {name}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Linear(Scaling):
    """Position interpolation (Chen et al. 2023, arXiv 2306.15595): ``θ_i' = θ_i / factor``.

    Equivalent to dividing every position by ``factor``; transformers' ``"linear"`` rope type.
    """

    factor: float
    rope_type: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "factor", _check_factor("factor", self.factor))

    def inv_freq(self, cfg: "RopeConfig", seq_len: Optional[int]) -> torch.Tensor:
        return cfg.base_inv_freq() / self.factor
