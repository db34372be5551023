"""``RopeConfig``: the frozen description of one rotary embedding.

Everything downstream (tables, modules, kernels) is a pure function of a ``RopeConfig``
and the positions it is asked about.

Shape vocabulary used across ropekit: ``b`` batch, ``s`` sequence, ``h`` heads, ``d`` head
dim, ``r`` rotary dim (``r <= d``, even), ``t`` packed tokens.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import TYPE_CHECKING, Any, Hashable, Mapping, Optional

import torch

from ._checks import integer, real
from ._errors import fail

if TYPE_CHECKING:  # pragma: no cover
    from .scaling import Scaling

__all__ = ["RopeConfig", "LAYOUTS"]

#: The two pairings of rotary dimensions. ``"half"`` pairs ``(i, i + r/2)`` (GPT-NeoX,
#: HF Llama/Qwen/Mistral); ``"interleaved"`` pairs ``(2i, 2i + 1)`` (RoFormer, GPT-J,
#: Meta llama's complex code).
LAYOUTS = ("half", "interleaved")

#: Largest accepted ``head_dim``: far above any real attention head (<= 1024), low enough
#: that a typo such as ``head_dim=10**12`` is a RopeError instead of an allocator failure.
MAX_HEAD_DIM = 1 << 16

#: Frequency tensors are computed here (float64, exact). Named explicitly so that they do
#: not land on whatever ``torch.device(...)`` context or default device is active, e.g.
#: ``with torch.device("meta"):`` model construction.
CPU = torch.device("cpu")


def check_layout(layout: Any) -> str:
    if layout not in LAYOUTS:
        raise fail(
            f"layout in {LAYOUTS}",
            repr(layout),
            'use "half" for GPT-NeoX/HF-Llama style checkpoints (pairs i, i+r/2) or '
            '"interleaved" for RoFormer/GPT-J/Meta-llama style (pairs 2i, 2i+1)',
        )
    return layout


#: Largest position whose float64 value (and so the angle ``m·θ``) is exact: 2**53.
MAX_EXACT_POSITION = 1 << 53


def check_seq_len(seq_len: Any) -> Optional[int]:
    """``None`` or an int in ``[0, 2**53]`` (the total length read by length-dependent scaling)."""
    if seq_len is None:
        return None
    return integer(
        "seq_len", seq_len, minimum=0, maximum=MAX_EXACT_POSITION,
        fix="pass the total sequence length (prompt + generated tokens), or None",
    )


def check_head_width(cfg: Any, **tensors: Any) -> None:
    """RopeError unless every tensor's last dim equals ``cfg.head_dim`` (``q=..., k=...``; ``cfg``
    is a RopeConfig or any object with a ``head_dim``, e.g. AxialRope, RopeMixed).

    A wider head would have only its first ``rotary_dim`` dims rotated and a narrower one
    would not hold the rotary pairs: either way the config is not this model's.
    """
    for name, t in tensors.items():
        width = t.shape[-1] if isinstance(t, torch.Tensor) and t.dim() else None
        if width != cfg.head_dim:
            got = f"{name} of head width {width} (shape {tuple(t.shape)})" if width is not None else f"{name} {type(t).__name__}"
            raise fail(
                f"{name} with the config's head width cfg.head_dim = {cfg.head_dim}",
                got,
                f"build the RopeConfig with head_dim={width} (and rotary_dim for partial rotary), "
                "or check the [..., heads, head_dim] reshape of q/k" if width is not None else f"pass {name} as a tensor",
            )


#: The Hugging Face config reader (set by ropekit.hf on import; see RopeConfig.from_hf).
_HF_READER: list = []


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Frozen, validated settings of a rotary position embedding.

    Args:
        head_dim: ``d``, the size of one attention head.
        base: ``θ`` base of the frequencies, ``θ_i = base^(-2i/r)``, ``i = 0 .. r/2-1``
            (RoFormer eq. 15 with ``base = 10000``).
        rotary_dim: ``r``, how many leading dims of each head rotate (even, ``<= d``);
            ``None`` means all of them. The remaining ``d - r`` dims pass through.
        layout: ``"half"`` or ``"interleaved"`` (see :data:`LAYOUTS`).
        scaling: a scheme from :mod:`ropekit.scaling` (``Linear``, ``NTK``, ``YaRN``...),
            or ``None`` for plain RoPE.
        rotary_offset: first rotating dim of the head: dims ``[rotary_offset, rotary_offset
            + r)`` rotate, the others pass through. ``0`` (the default) is the usual leading
            block; multi-head latent attention (DeepSeek-V2/V3, Kimi, Mistral 4, ...) rotates
            the *last* ``qk_rope_head_dim`` dims of its ``qk_nope_head_dim +
            qk_rope_head_dim`` head, i.e. ``rotary_offset = qk_nope_head_dim``.
        direction: ``+1`` rotates pair ``(a, b)`` by ``+m·θ`` (``a' = a·cos - b·sin``,
            ``b' = b·cos + a·sin``, RoFormer); ``-1`` by ``-m·θ`` (``a' = a·cos + b·sin``,
            NanoChat). Attention scores depend on ``direction·(m - n)``.

    After construction ``rotary_dim`` is always an ``int``.

    Example:
        >>> cfg = RopeConfig(head_dim=64, base=10000.0)
        >>> cfg.inv_freq().shape, cfg.inv_freq().dtype
        (torch.Size([32]), torch.float64)
        >>> cfg.attention_factor
        1.0
    """

    head_dim: int
    base: float = 10000.0
    rotary_dim: Optional[int] = None
    layout: str = "half"
    scaling: Optional["Scaling"] = None
    rotary_offset: int = 0
    direction: int = 1

    def __post_init__(self) -> None:
        hd = integer(
            "head_dim", self.head_dim, maximum=MAX_HEAD_DIM, fix="pass the size of one attention head, e.g. 128"
        )
        object.__setattr__(self, "head_dim", hd)
        base = real("base", self.base, above=1, fix="pass the model's rope_theta, e.g. 10000.0")
        object.__setattr__(self, "base", base)
        if self.rotary_dim is None:
            r = hd
        else:
            r = integer(
                "rotary_dim", self.rotary_dim, minimum=0, fix="pass e.g. rotary_dim=head_dim // 2, or None for all dims"
            )
        if r <= 0 or r % 2 or r > hd:
            raise fail(
                f"rotary_dim even and in [2, head_dim={hd}]",
                f"rotary_dim={r}",
                "rotary dims come in pairs; round to an even number no larger than head_dim",
            )
        object.__setattr__(self, "rotary_dim", r)
        off = self.rotary_offset
        if isinstance(off, bool) or not isinstance(off, int) or off < 0 or off + r > hd:
            raise fail(
                f"rotary_offset an int in [0, head_dim - rotary_dim = {hd - r}]",
                f"rotary_offset={off!r} (head_dim={hd}, rotary_dim={r})",
                "the rotating dims [rotary_offset, rotary_offset + rotary_dim) must lie inside the head; "
                "for MLA heads pass head_dim=qk_nope_head_dim + qk_rope_head_dim, rotary_offset=qk_nope_head_dim",
            )
        dr = self.direction  # a real number (a tensor's truth value would be ambiguous), not a bool
        if isinstance(dr, bool) or not isinstance(dr, numbers.Real) or dr not in (1, -1):
            raise fail(
                "direction 1 or -1",
                repr(dr),
                "use 1 to rotate by +m·θ (RoFormer, Llama, ...) or -1 to rotate by -m·θ (NanoChat)",
            )
        object.__setattr__(self, "direction", int(dr))
        check_layout(self.layout)
        if self.scaling is not None:
            from .scaling import Scaling

            if not isinstance(self.scaling, Scaling):
                raise fail(
                    "scaling a ropekit.scaling scheme (Linear, NTK, YaRN, ...) or None",
                    type(self.scaling).__name__,
                    "build it with e.g. ropekit.scaling.Linear(factor=4.0), or use RopeConfig.from_hf(...)",
                )
            self.scaling.validate(self)

    # ------------------------------------------------------------------ frequencies
    @property
    def n_pairs(self) -> int:
        """``r/2``, the number of rotary pairs (= frequencies)."""
        return self.rotary_dim // 2  # type: ignore[operator]

    def base_inv_freq(self, base: Optional[float] = None, denominator: Optional[int] = None) -> torch.Tensor:
        """Unscaled frequencies ``θ_i = base^(-2i/denominator)``, float64 ``[r/2]`` on CPU.

        ``denominator`` defaults to ``r`` (the rotary dim); Gemma-4-style proportional rotary
        uses ``d`` instead. Exact in float64: the exponent ``2i/denominator`` is a ratio of
        small integers, so the only rounding is in ``pow``.
        """
        base = self.base if base is None else float(base)
        den = self.rotary_dim if denominator is None else int(denominator)
        i2 = torch.arange(0, self.rotary_dim, 2, dtype=torch.float64, device=CPU)  # [r/2]
        return 1.0 / torch.pow(torch.tensor(base, dtype=torch.float64, device=CPU), i2 / den)

    def inv_freq(self, seq_len: Optional[int] = None) -> torch.Tensor:
        """Frequencies after scaling, float64 ``[r/2]`` on CPU.

        Always on CPU, whatever ``torch.device(...)`` context or default device is active
        (inside ``with torch.device("meta"):`` too): callers move them where they need them.

        Args:
            seq_len: total sequence length; only schemes that depend on it (dynamic NTK,
                LongRoPE) read it. ``None`` means "within the original context".
        """
        seq_len = check_seq_len(seq_len)
        if self.scaling is None:
            return self.base_inv_freq()
        return self.scaling.inv_freq(self, seq_len)

    @property
    def attention_factor(self) -> float:
        """Factor folded into cos/sin (YaRN's ``mscale``, LongRoPE's factor); 1.0 without scaling."""
        if self.scaling is None:
            return 1.0
        return float(self.scaling.attention_factor(self))

    def table_key(self, seq_len: Optional[int] = None) -> Hashable:
        """A hashable that changes exactly when ``inv_freq(seq_len)`` changes.

        ``None`` for schemes whose frequencies do not depend on the sequence length, so a
        table built once serves every position.
        """
        seq_len = check_seq_len(seq_len)
        if self.scaling is None:
            return None
        return self.scaling.table_key(self, seq_len)

    # ------------------------------------------------------------------ conversions
    def replace(self, **changes: Any) -> "RopeConfig":
        """A copy with some fields changed (validated again)."""
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise fail(f"fields among {fields}", repr(unknown), "remove the unknown keyword arguments")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain-data form (JSON-serialisable); inverse of :meth:`from_dict`.

        ``rotary_offset`` and ``direction`` appear only when they differ from their
        defaults (0 and 1), so plain configs keep their short form.
        """
        out = {
            "head_dim": self.head_dim,
            "base": self.base,
            "rotary_dim": self.rotary_dim,
            "layout": self.layout,
            "scaling": None if self.scaling is None else self.scaling.to_dict(),
        }
        if self.rotary_offset:
            out["rotary_offset"] = self.rotary_offset
        if self.direction != 1:
            out["direction"] = self.direction
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RopeConfig":
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, Mapping):
            raise fail("a dict with keys head_dim, base, rotary_dim, layout, scaling", type(data).__name__, "pass RopeConfig.to_dict()'s output")
        data = dict(data)
        sc = data.pop("scaling", None)
        if sc is not None:
            from .scaling import Scaling

            sc = Scaling.from_dict(sc)
        if "head_dim" not in data:
            raise fail("a dict with head_dim (RopeConfig.to_dict()'s output)", f"keys {sorted(data)}",
                       "add head_dim (the attention head width), e.g. {'head_dim': 128, 'base': 10000.0}")
        try:
            return cls(scaling=sc, **data)
        except TypeError as e:
            raise fail(
                "keys head_dim, base, rotary_dim, layout, scaling, rotary_offset, direction", repr(sorted(data)), f"remove unknown keys ({e})"
            ) from None

    @property
    def rotary_slice(self) -> slice:
        """The dims of the head that rotate: ``slice(rotary_offset, rotary_offset + r)``."""
        return slice(self.rotary_offset, self.rotary_offset + self.rotary_dim)  # type: ignore[operator]

    @classmethod
    def from_hf(cls, obj: Any, **overrides: Any) -> Any:
        """Build from a Hugging Face config (``PretrainedConfig``, dict or path to ``config.json``).

        See :func:`ropekit.hf.rope_config_from_hf` for the accepted attribute names, the
        per-layer-type and per-component results, and ``component=``. (The reader lives in
        the layer above, :mod:`ropekit.hf`, which registers it here when it loads — it is
        imported with ``ropekit`` — so this layer imports nothing above it.)
        """
        return _HF_READER[0](obj, **overrides)
