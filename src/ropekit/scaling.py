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

import collections.abc
import dataclasses
import inspect
import math
from typing import TYPE_CHECKING, Any, ClassVar, Dict, Hashable, Mapping, Optional, Tuple, Type

import torch

from ._checks import integer, real
from ._errors import fail

if TYPE_CHECKING:  # pragma: no cover
    from .config import RopeConfig

__all__ = ["Scaling", "Linear", "NTK", "DynamicNTK", "YaRN", "LongRoPE", "Llama3", "Proportional", "SCHEMES"]

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
        # only a class that names its own rope_type registers: a user subclass that inherits
        # one (e.g. class MyYaRN(YaRN)) must not replace the built-in scheme
        if "rope_type" in cls.__dict__ and cls.rope_type and cls.rope_type not in _REGISTRY:
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
        """Inverse of :meth:`to_dict`: ``{"rope_type": ..., <the scheme's fields>}``.

        Every field without a default must be present (e.g. YaRN's ``factor``): a missing
        one is a RopeError naming it, never a silent default.
        """
        if not isinstance(data, Mapping):
            raise fail("scaling a dict with rope_type and the scheme's fields", type(data).__name__, "pass Scaling.to_dict()'s output")
        data = dict(data)
        kind = data.pop("rope_type", None)
        if not isinstance(kind, str) or kind not in _REGISTRY:
            raise fail(f"rope_type in {sorted(_REGISTRY)}", repr(kind), "use one of the known scheme names")
        cls = _REGISTRY[kind]
        sig = inspect.signature(cls).parameters.values()
        params = [p for p in sig if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        missing = [p.name for p in params if p.default is p.empty and p.name not in data]
        # a scheme taking **legacy keys judges unknown ones itself
        takes_more = any(p.kind is p.VAR_KEYWORD for p in sig)
        unknown = [] if takes_more else [k for k in data if k not in {p.name for p in params}]
        if missing or unknown:
            raise fail(
                f"{cls.__name__} keys {[p.name for p in params]} (required: {[p.name for p in params if p.default is p.empty]})",
                f"keys {sorted(data)}" + (f", missing {missing}" if missing else "") + (f", unknown {unknown}" if unknown else ""),
                f"add the missing keys / remove the unknown ones (see ropekit.scaling.{cls.__name__})",
            )
        return cls(**data)


def _check_factor(name: str, value: Any, minimum: float = 1.0) -> float:
    return real(name, value, minimum=minimum)


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


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    # a context length: at most 2**53 (positions beyond it are not exact in float64)
    return integer(name, value, minimum=minimum, maximum=1 << 53, fix=f"pass the checkpoint's {name}, e.g. 4096")


def _check_positive(name: str, value: Any) -> float:
    return real(name, value, above=0)


def _ntk_base(base: float, scale: float, r: int, what: str = "NTK") -> float:
    """``base · scale^(r/(r-2))`` in float64 (bloc97's NTK-aware base change).

    RopeError when the new base is not a finite float64 (e.g. ``factor=1e200`` with a small
    rotary dim, or a dynamic-NTK length far past the trained context).
    """
    try:
        out = base * scale ** (r / (r - 2))
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise fail(
            f"a {what} base base·scale^(r/(r-2)) that fits in float64",
            f"base={base:g}, scale={scale:g}, r={r}: {out}",
            "check factor (and for dynamic NTK the sequence length): real checkpoints use factors below 1000",
        )
    return out


def _check_ntk_dim(cfg: "RopeConfig", scheme: str) -> None:
    if cfg.rotary_dim <= 2:  # type: ignore[operator]
        raise fail(
            f"rotary_dim > 2 for {scheme} (the exponent r/(r-2) is undefined at r=2)",
            f"rotary_dim={cfg.rotary_dim}",
            "use Linear scaling for a single rotary pair",
        )


@dataclasses.dataclass(frozen=True)
class NTK(Scaling):
    """Static NTK-aware scaling (bloc97, 2023): the base grows, frequencies do not depend on length.

    ``base' = base · factor^(r/(r-2))``, ``θ_i' = base'^(-2i/r)``. With this exponent the
    lowest frequency is divided by exactly ``factor`` while the highest is unchanged.

    HunYuan's ``alpha`` (transformers' ``ntk_alpha``; its checkpoints say
    ``{"type": "dynamic", "alpha": 1000.0}``) is the same formula with ``factor = alpha``;
    :func:`ropekit.hf.rope_config_from_hf` maps it here. ``rope_type`` ``"ntk"`` is ropekit's
    own name: transformers has no static NTK type.

    Example:
        >>> from ropekit import RopeConfig
        >>> cfg = RopeConfig(head_dim=8, scaling=NTK(factor=4.0))
        >>> round(float(cfg.inv_freq()[-1] / RopeConfig(head_dim=8).inv_freq()[-1]), 12)
        0.25
    """

    factor: float
    rope_type: ClassVar[str] = "ntk"

    def __post_init__(self) -> None:
        object.__setattr__(self, "factor", _check_factor("factor", self.factor))

    def validate(self, cfg: "RopeConfig") -> None:
        _check_ntk_dim(cfg, "NTK")
        _ntk_base(cfg.base, self.factor, cfg.rotary_dim)  # type: ignore[arg-type]

    def inv_freq(self, cfg: "RopeConfig", seq_len: Optional[int]) -> torch.Tensor:
        return cfg.base_inv_freq(base=_ntk_base(cfg.base, self.factor, cfg.rotary_dim))  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class DynamicNTK(Scaling):
    """Dynamic NTK scaling (emozilla, 2023) with transformers' ``"dynamic"`` semantics.

    For a total length ``L = seq_len`` and ``M = max_position``::

        L <= M:  θ_i' = θ_i                                   (original frequencies)
        L >  M:  base' = base · (factor·L/M − (factor − 1))^(r/(r-2)),  θ_i' = base'^(-2i/r)

    ``static=True`` freezes the frequencies at ``L = factor·M`` for every length, which is
    what serving engines do (vLLM's ``DynamicNTKScalingRotaryEmbedding`` builds one table
    for ``factor·M`` positions).

    Why the two disagree: a KV cache stores keys *after* rotation. Under the dynamic rule
    the base changes as the sequence grows past ``M``, so cached keys were rotated with an
    older base than the new queries, and relative positions no longer match what a fresh
    forward pass over the whole sequence computes. Use ``static=True`` (or recompute the
    cache) when decoding beyond ``M``. ropekit is stateless: ``inv_freq(seq_len)`` is a
    function of the length only; transformers' module additionally keeps the largest
    length seen so far until the length drops below ``M``.
    """

    factor: float
    max_position: int
    static: bool = False
    rope_type: ClassVar[str] = "dynamic"
    length_dependent: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "factor", _check_factor("factor", self.factor))
        object.__setattr__(self, "max_position", _check_int("max_position", self.max_position))
        if not isinstance(self.static, bool):
            raise fail("static a bool", repr(self.static), "pass static=True for a length-independent table")

    def validate(self, cfg: "RopeConfig") -> None:
        _check_ntk_dim(cfg, "DynamicNTK")
        if self.static:
            _ntk_base(cfg.base, self.factor * self.factor - (self.factor - 1), cfg.rotary_dim, "DynamicNTK")  # type: ignore[arg-type]

    def _length(self, seq_len: Optional[int]) -> Optional[int]:
        if self.static:
            return None
        if seq_len is None or seq_len <= self.max_position:
            return None
        return int(seq_len)

    def inv_freq(self, cfg: "RopeConfig", seq_len: Optional[int]) -> torch.Tensor:
        if self.static:
            length = self.factor * self.max_position
        else:
            length = self._length(seq_len)
            if length is None:
                return cfg.base_inv_freq()
        scale = self.factor * length / self.max_position - (self.factor - 1)
        return cfg.base_inv_freq(base=_ntk_base(cfg.base, scale, cfg.rotary_dim, "DynamicNTK"))  # type: ignore[arg-type]

    def table_key(self, cfg: "RopeConfig", seq_len: Optional[int]) -> Hashable:
        return self._length(seq_len)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    # YaRN paper eq. (22) generalised by DeepSeek: 0.1·mscale·ln(s) + 1 (1 for s <= 1).
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


@dataclasses.dataclass(frozen=True)
class YaRN(Scaling):
    """YaRN (Peng et al. 2023, arXiv 2309.00071): NTK-by-parts interpolation + attention factor.

    With ``L = original_max_position``, ``s = factor`` and the correction dims
    ``d(β) = r·ln(L / (2π·β)) / (2·ln base)``::

        low  = max(floor(d(beta_fast)), 0),  high = min(ceil(d(beta_slow)), r - 1)
        (no floor/ceil when truncate=False, the GPT-OSS form)
        ramp_i = clamp((i − low) / (high − low), 0, 1)          (high += 0.001 if equal)
        θ_i'   = θ_i/s · ramp_i + θ_i · (1 − ramp_i)

    Attention factor (folded into cos/sin): ``attention_factor`` if given; else, when both
    ``mscale`` and ``mscale_all_dim`` are non-zero (DeepSeek-V2/V3),
    ``m(s, mscale) / m(s, mscale_all_dim)``; else ``m(s, 1)``, with
    ``m(s, k) = 0.1·k·ln s + 1``. This is transformers' ``_compute_yarn_parameters``
    exactly (note: a lone ``mscale`` without ``mscale_all_dim`` is ignored there too).
    DeepSeek additionally multiplies the softmax scale by ``m(s, mscale_all_dim)²``; that is
    an attention-side setting, not part of the rotary tables.

    Example:
        >>> from ropekit import RopeConfig
        >>> y = YaRN(factor=4.0, original_max_position=32768)
        >>> cfg = RopeConfig(head_dim=128, base=1e6, scaling=y)
        >>> round(cfg.attention_factor, 6)
        1.138629
    """

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor_override: Optional[float] = dataclasses.field(default=None)
    truncate: bool = True
    rope_type: ClassVar[str] = "yarn"

    def __init__(
        self,
        factor: float,
        original_max_position: int,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        mscale: float = 1.0,
        mscale_all_dim: float = 0.0,
        attention_factor: Optional[float] = None,
        truncate: bool = True,
        **legacy: Any,
    ) -> None:
        # ``attention_factor`` is both a constructor argument (the HF key) and the
        # interface method, so the value is stored as ``attention_factor_override``.
        if "attention_factor_override" in legacy:
            attention_factor = legacy.pop("attention_factor_override")
        if legacy:
            raise fail(
                "YaRN keys factor, original_max_position, beta_fast, beta_slow, mscale, mscale_all_dim, "
                "attention_factor, truncate",
                repr(sorted(legacy)),
                "remove the unknown keys",
            )
        s = object.__setattr__
        s(self, "factor", _check_factor("factor", factor))
        s(self, "original_max_position", _check_int("original_max_position", original_max_position))
        s(self, "beta_fast", _check_positive("beta_fast", beta_fast))
        s(self, "beta_slow", _check_positive("beta_slow", beta_slow))
        if self.beta_fast < self.beta_slow:
            raise fail(
                "beta_fast >= beta_slow (beta_fast bounds the high-frequency end of the ramp)",
                f"beta_fast={beta_fast}, beta_slow={beta_slow}",
                "swap them; the paper's defaults are beta_fast=32, beta_slow=1",
            )
        for name, v in (("mscale", mscale), ("mscale_all_dim", mscale_all_dim)):
            s(self, name, real(name, v, minimum=0, fix=f"pass the checkpoint's {name} (0 to disable)"))
        if attention_factor is not None:
            attention_factor = _check_positive("attention_factor", attention_factor)
        s(self, "attention_factor_override", attention_factor)
        if not isinstance(truncate, bool):
            raise fail("truncate a bool", repr(truncate), "pass truncate=False for the GPT-OSS form")
        s(self, "truncate", truncate)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["attention_factor"] = d.pop("attention_factor_override")
        return d

    def correction_range(self, cfg: "RopeConfig") -> Tuple[float, float]:
        """``(low, high)`` pair indices of the ramp (floats when ``truncate=False``)."""
        r = cfg.rotary_dim
        L = self.original_max_position

        def dim(beta: float) -> float:
            return (r * math.log(L / (beta * 2 * math.pi))) / (2 * math.log(cfg.base))

        low, high = dim(self.beta_fast), dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, r - 1)  # type: ignore[operator]

    def inv_freq(self, cfg: "RopeConfig", seq_len: Optional[int]) -> torch.Tensor:
        theta = cfg.base_inv_freq()  # [r/2] float64
        low, high = self.correction_range(cfg)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        i = torch.arange(cfg.n_pairs, dtype=torch.float64, device=theta.device)
        ramp = ((i - low) / (high - low)).clamp(0, 1)  # 0: keep θ_i (extrapolate), 1: θ_i/s
        return theta / self.factor * ramp + theta * (1 - ramp)

    def attention_factor(self, cfg: "RopeConfig") -> float:
        if self.attention_factor_override is not None:
            return self.attention_factor_override
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim)
        return _yarn_mscale(self.factor)


def _factor_tuple(name: str, value: Any) -> Tuple[float, ...]:
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta" or value.dim() != 1:
            raise fail(f"{name} a list of numbers (or a 1-D tensor with values)", f"tensor of shape {tuple(value.shape)} on {value.device}", f"pass the checkpoint's {name} list")
        value = value.tolist()
    if isinstance(value, (str, bytes, collections.abc.Mapping, collections.abc.Set)) or not hasattr(value, "__len__") or \
            not hasattr(value, "__iter__"):  # (a dict's keys or a set's order would be taken silently)
        got = "null (None)" if value is None else type(value).__name__
        raise fail(f"{name} a list of numbers", got, f"pass the checkpoint's {name} list (one factor per rotary pair)")
    return tuple(real(f"{name} entries", v, above=0, fix=f"check the checkpoint's {name}") for v in value)


@dataclasses.dataclass(frozen=True)
class LongRoPE(Scaling):
    """LongRoPE (Ding et al. 2024, arXiv 2402.13753), as used by Phi-3/3.5/4-mini.

    ``θ_i' = θ_i / ext_i`` with ``ext = long_factor`` when the total sequence length
    ``seq_len > original_max_position`` and ``short_factor`` otherwise (also for
    ``seq_len=None``). The choice is made once per sequence: pass the *final* length of a
    generation as ``seq_len`` so the factors never switch mid-generation (switching would
    leave cached keys rotated with the other set).

    Attention factor: ``attention_factor`` if given; else ``1`` if ``factor <= 1``, else
    ``sqrt(1 + ln(factor) / ln(original_max_position))`` (transformers'
    ``_compute_longrope_parameters``; there ``factor`` defaults to
    ``max_position_embeddings / original_max_position_embeddings``, which
    :func:`ropekit.hf.rope_config_from_hf` fills in). One of ``factor`` or
    ``attention_factor`` is required, so a hand-built config cannot silently lose the scale.
    """

    short_factor: Tuple[float, ...]
    long_factor: Tuple[float, ...]
    original_max_position: int
    factor: Optional[float] = None
    attention_factor_override: Optional[float] = None
    rope_type: ClassVar[str] = "longrope"
    length_dependent: ClassVar[bool] = True

    def __init__(
        self,
        short_factor: Any,
        long_factor: Any,
        original_max_position: int,
        factor: Optional[float] = None,
        attention_factor: Optional[float] = None,
        **legacy: Any,
    ) -> None:
        if "attention_factor_override" in legacy:
            attention_factor = legacy.pop("attention_factor_override")
        if legacy:
            raise fail(
                "LongRoPE keys short_factor, long_factor, original_max_position, factor, attention_factor",
                repr(sorted(legacy)),
                "remove the unknown keys",
            )
        s = object.__setattr__
        s(self, "short_factor", _factor_tuple("short_factor", short_factor))
        s(self, "long_factor", _factor_tuple("long_factor", long_factor))
        # >= 2: the attention factor divides by ln(original_max_position)
        s(self, "original_max_position", _check_int("original_max_position", original_max_position, minimum=2))
        if factor is not None:
            factor = _check_factor("factor", factor)
        if attention_factor is not None:
            attention_factor = _check_positive("attention_factor", attention_factor)
        if factor is None and attention_factor is None:
            raise fail(
                "LongRoPE factor or attention_factor",
                "neither",
                "pass factor=max_position/original_max_position (e.g. 131072/4096 = 32.0 for Phi-3.5-mini) "
                "or an explicit attention_factor",
            )
        s(self, "factor", factor)
        s(self, "attention_factor_override", attention_factor)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["attention_factor"] = d.pop("attention_factor_override")
        return d

    def validate(self, cfg: "RopeConfig") -> None:
        for name in ("short_factor", "long_factor"):
            n = len(getattr(self, name))
            if n != cfg.n_pairs:
                raise fail(
                    f"{name} of length rotary_dim/2 = {cfg.n_pairs}",
                    f"length {n}",
                    "check rotary_dim / partial_rotary_factor against the checkpoint's factor lists",
                )

    def is_long(self, seq_len: Optional[int]) -> bool:
        """Whether ``long_factor`` applies to a sequence of total length ``seq_len``."""
        return seq_len is not None and seq_len > self.original_max_position

    def inv_freq(self, cfg: "RopeConfig", seq_len: Optional[int]) -> torch.Tensor:
        ext = self.long_factor if self.is_long(seq_len) else self.short_factor
        theta = cfg.base_inv_freq()
        return theta / torch.tensor(ext, dtype=torch.float64, device=theta.device)

    def attention_factor(self, cfg: "RopeConfig") -> float:
        if self.attention_factor_override is not None:
            return self.attention_factor_override
        f = self.factor
        if f is None or f <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(f) / math.log(self.original_max_position))

    def table_key(self, cfg: "RopeConfig", seq_len: Optional[int]) -> Hashable:
        return "long" if self.is_long(seq_len) else "short"


@dataclasses.dataclass(frozen=True)
class Llama3(Scaling):
    """Llama 3.1 wavelength-band scaling (Meta's ``apply_scaling``; transformers' ``"llama3"``).

    With wavelength ``λ_i = 2π/θ_i``, ``L = original_max_position``,
    ``λ_hi = L/high_freq_factor`` and ``λ_lo = L/low_freq_factor``::

        λ_i < λ_hi:           θ_i' = θ_i                 (high frequencies kept)
        λ_i > λ_lo:           θ_i' = θ_i / factor        (low frequencies interpolated)
        otherwise:            g = (L/λ_i − low_freq_factor) / (high_freq_factor − low_freq_factor)
                              θ_i' = (1 − g)·θ_i/factor + g·θ_i

    When ``low_freq_factor == high_freq_factor`` (Llama 4) the middle band is the single
    wavelength ``λ_i == L/low_freq_factor``; ropekit keeps that frequency unscaled instead
    of dividing by zero (transformers would produce NaN for it; no real frequency hits it).

    Example:
        >>> from ropekit import RopeConfig
        >>> s = Llama3(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
        >>> cfg = RopeConfig(head_dim=128, base=500000.0, scaling=s)
        >>> float(cfg.inv_freq()[0]), float(cfg.inv_freq()[-1] * 8 / cfg.base_inv_freq()[-1])
        (1.0, 1.0)
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int
    rope_type: ClassVar[str] = "llama3"

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "factor", _check_factor("factor", self.factor))
        s(self, "low_freq_factor", _check_positive("low_freq_factor", self.low_freq_factor))
        s(self, "high_freq_factor", _check_positive("high_freq_factor", self.high_freq_factor))
        s(self, "original_max_position", _check_int("original_max_position", self.original_max_position))
        if self.high_freq_factor < self.low_freq_factor:
            raise fail(
                "high_freq_factor >= low_freq_factor",
                f"low_freq_factor={self.low_freq_factor}, high_freq_factor={self.high_freq_factor}",
                "swap them (Llama 3.1 uses low_freq_factor=1, high_freq_factor=4)",
            )

    def inv_freq(self, cfg: "RopeConfig", seq_len: Optional[int]) -> torch.Tensor:
        theta = cfg.base_inv_freq()  # [r/2] float64
        L = float(self.original_max_position)
        wavelen = 2 * math.pi / theta
        lo_wl, hi_wl = L / self.low_freq_factor, L / self.high_freq_factor
        out = torch.where(wavelen > lo_wl, theta / self.factor, theta)
        span = self.high_freq_factor - self.low_freq_factor
        if span > 0:
            g = (L / wavelen - self.low_freq_factor) / span
            smooth = (1 - g) * theta / self.factor + g * theta
            medium = (wavelen >= hi_wl) & (wavelen <= lo_wl)
            out = torch.where(medium, smooth, out)
        return out


@dataclasses.dataclass(frozen=True)
class Proportional(Scaling):
    """Gemma-4 "proportional" partial rotary (transformers 5.x ``"proportional"``).

    Only the first ``k = int(partial_rotary_factor · d // 2)`` frequencies rotate, and their
    exponent denominator is the *head dim* ``d``, not ``2k``::

        θ_i' = base^(-2i/d) / factor   for i < k,     θ_i' = 0   for k <= i < d/2

    Zero frequencies give ``cos = 1, sin = 0`` (identity), so the config keeps
    ``rotary_dim == head_dim``: in the ``"half"`` layout the rotating pairs are
    ``(i, i + d/2)`` for ``i < k``, which is *not* the same as ``rotary_dim = 2k`` (that
    would pair ``(i, i + k)``). Source: transformers 5.x
    ``modeling_rope_utils._compute_proportional_rope_parameters`` and the Gemma 4 config
    (full-attention layers: ``partial_rotary_factor=0.25``, ``rope_theta=1e6``, head dim
    ``global_head_dim``).

    Example:
        >>> from ropekit import RopeConfig
        >>> cfg = RopeConfig(head_dim=16, scaling=Proportional(partial_rotary_factor=0.25))
        >>> (cfg.inv_freq() > 0).tolist()
        [True, True, False, False, False, False, False, False]
    """

    partial_rotary_factor: float
    factor: float = 1.0
    rope_type: ClassVar[str] = "proportional"

    def __post_init__(self) -> None:
        p = real(
            "partial_rotary_factor", self.partial_rotary_factor, above=0, maximum=1,
            fix="pass the checkpoint's value, e.g. 0.25 for Gemma 4",
        )
        object.__setattr__(self, "partial_rotary_factor", p)
        object.__setattr__(self, "factor", _check_factor("factor", self.factor))

    def n_rotating(self, cfg: "RopeConfig") -> int:
        """``k``, the number of frequencies that rotate."""
        return int(self.partial_rotary_factor * cfg.head_dim // 2)

    def validate(self, cfg: "RopeConfig") -> None:
        if cfg.rotary_dim != cfg.head_dim:
            raise fail(
                f"rotary_dim == head_dim ({cfg.head_dim}) with Proportional scaling",
                f"rotary_dim={cfg.rotary_dim}",
                "leave rotary_dim=None; the non-rotating pairs get zero frequencies (identity)",
            )
        if self.n_rotating(cfg) < 1:
            raise fail(
                "partial_rotary_factor * head_dim >= 2",
                f"{self.partial_rotary_factor} * {cfg.head_dim}",
                "increase partial_rotary_factor",
            )

    def inv_freq(self, cfg: "RopeConfig", seq_len: Optional[int]) -> torch.Tensor:
        k = self.n_rotating(cfg)
        theta = cfg.base_inv_freq(denominator=cfg.head_dim)  # [d/2]: base^(-2i/d)
        out = torch.zeros_like(theta)
        out[:k] = theta[:k] / self.factor
        return out


#: HF ``rope_type`` -> scheme class (plus ropekit's own ``"ntk"``).
SCHEMES: Dict[str, Type[Scaling]] = _REGISTRY
