"""A small decoder-only byte-level transformer whose position encoding is a parameter.

Pre-norm blocks (LayerNorm, causal ``scaled_dot_product_attention``, GELU MLP), tied input
and output embeddings. The position encoding is one of :data:`POSITION_ENCODINGS`:

- ``"rope"``: ropekit's :class:`~ropekit.RotaryEmbedding` on q and k in every layer;
  swap its :class:`~ropekit.RopeConfig` with :meth:`TinyLM.set_rope` (e.g. a scaling scheme
  for longer inputs) — the tables are not parameters, so the weights stay valid.
- ``"nope"``: no position information at all (causal masking only).
- ``"learned"``: a learned absolute embedding ``[ctx, d_model]`` added to the input.
- ``"sinusoidal"``: the fixed sinusoids of Vaswani et al. (2017) added to the input
  (token embeddings multiplied by ``sqrt(d_model)`` first, as in the paper).
- ``"xpos"``, ``"p-rope"``: rotary variants from :mod:`ropekit.variants` when that
  module provides them (see :func:`available_encodings`).

Shapes: ``b`` batch, ``s`` sequence, ``h`` heads, ``d`` head dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from .._errors import fail
from ..config import RopeConfig
from ..modules import RotaryEmbedding

__all__ = ["ModelConfig", "TinyLM", "POSITION_ENCODINGS", "available_encodings", "sinusoidal_table"]

#: Every position encoding the harness knows; ``available_encodings()`` says which can run.
POSITION_ENCODINGS = ("rope", "nope", "learned", "sinusoidal", "xpos", "p-rope")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Size of the model.

    Args:
        n_layer, d_model, n_head: depth, width and heads (head dim ``d = d_model / n_head``).
        ctx: training context length (the learned absolute table has this many rows).
        rope_base: base of the rotary frequencies.
        mlp_ratio: MLP hidden size / ``d_model``.
    """

    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    ctx: int = 128
    rope_base: float = 10000.0
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for name in ("n_layer", "d_model", "n_head", "ctx", "mlp_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise fail(f"{name} a positive int", repr(v), f"pass e.g. {name}=4")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise fail(
                "d_model divisible by n_head with an even head dim",
                f"d_model={self.d_model}, n_head={self.n_head}",
                "pick e.g. d_model=128, n_head=4 (head dim 32)",
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def rope_config(self, scaling=None) -> RopeConfig:
        """The model's :class:`~ropekit.RopeConfig` (optionally with a scaling scheme)."""
        return RopeConfig(head_dim=self.head_dim, base=self.rope_base, scaling=scaling)


def sinusoidal_table(n: int, dim: int) -> torch.Tensor:
    """Vaswani et al. (2017) absolute encodings, float32 ``[n, dim]``: ``sin(p ω_i)`` in even
    columns, ``cos(p ω_i)`` in odd ones, ``ω_i = 10000^(-2i/dim)``; angles in float64."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]  # [n, 1]
    w = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # [dim/2]
    ang = pos * w  # [n, dim/2]
    out = torch.stack((torch.sin(ang), torch.cos(ang)), dim=-1).reshape(n, dim)  # [n, dim]
    return out.float()


# ---------------------------------------------------------------------------------------
# Rotary variants from ropekit.variants. Each module has RotaryEmbedding's call signature
# ``(q, k, *, format="bshd", seq_len=None) -> (q, k)`` for positions 0 .. s-1.

#: p of p-RoPE (Barbero et al. 2024, arXiv 2410.06205): the fraction of frequencies that rotate.
P_ROPE_P = 0.75


class _TableRope(nn.Module):
    """Positions ``0 .. s-1`` in ``bshd``; tables cached per ``s`` (float32 ``[s, 1, r/2]``)."""

    def __init__(self, cfg: RopeConfig, backend: str) -> None:
        super().__init__()
        self.cfg, self.backend = cfg, backend
        self._cache: Dict[int, Tuple[torch.Tensor, ...]] = {}

    def _tables(self, s: int) -> Tuple[torch.Tensor, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, q, k, *, format: str = "bshd", seq_len: Optional[int] = None):
        if format != "bshd":
            raise fail('format "bshd"', repr(format), "transpose q and k to [b, s, h, d]")
        s = q.shape[1]
        t = self._cache.get(s)
        if t is None:
            t = self._cache[s] = tuple(x[:, None, :] for x in self._tables(s))  # each [s, 1, r/2]
        return self._apply(q, k, t)


class XPosRope(_TableRope):
    """xPos (Sun et al. 2022) via :func:`ropekit.variants.xpos_cos_sin` (γ 0.4, scale base 512)."""

    def _tables(self, s):
        from ..variants import xpos_cos_sin

        return tuple(xpos_cos_sin(self.cfg, torch.arange(s)))

    def _apply(self, q, k, t):
        from ..variants import XPosTables, apply_xpos

        return apply_xpos(q, k, XPosTables(*t), layout=self.cfg.layout, backend=self.backend)


class PRope(_TableRope):
    """p-RoPE (Barbero et al. 2024) via :func:`ropekit.variants.p_rope_cos_sin`, ``p = P_ROPE_P``."""

    def _tables(self, s):
        from ..variants import p_rope_cos_sin

        return p_rope_cos_sin(self.cfg, torch.arange(s), P_ROPE_P)

    def _apply(self, q, k, t):
        from ..functional import apply_rotary_qk

        return apply_rotary_qk(q, k, t[0], t[1], layout=self.cfg.layout, backend=self.backend)


def _variant_factory(name: str) -> Optional[Callable[["ModelConfig", str], nn.Module]]:
    try:
        from .. import variants
    except ImportError:
        return None
    if name == "xpos" and hasattr(variants, "xpos_cos_sin") and hasattr(variants, "apply_xpos"):
        return lambda mc, backend: XPosRope(mc.rope_config(), backend)
    if name == "p-rope" and hasattr(variants, "p_rope_cos_sin"):
        return lambda mc, backend: PRope(mc.rope_config(), backend)
    return None


def available_encodings() -> List[str]:
    """The position encodings that can run with the ropekit modules installed now."""
    return [n for n in POSITION_ENCODINGS if n not in ("xpos", "p-rope") or _variant_factory(n) is not None]


class Attention(nn.Module):
    def __init__(self, mc: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = mc.n_head, mc.head_dim
        self.qkv = nn.Linear(mc.d_model, 3 * mc.d_model, bias=False)
        self.proj = nn.Linear(mc.d_model, mc.d_model, bias=False)

    def forward(self, x: torch.Tensor, rope: Optional[nn.Module], seq_len: Optional[int]) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_head, self.head_dim).unbind(2)  # 3 x [b, s, h, d]
        if rope is not None:
            q, k = rope(q, k, format="bshd", seq_len=seq_len)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, h, s, d]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [b, h, s, d]
        return self.proj(y.transpose(1, 2).reshape(b, s, -1))  # [b, s, d_model]


class Block(nn.Module):
    def __init__(self, mc: ModelConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(mc.d_model), nn.LayerNorm(mc.d_model)
        self.attn = Attention(mc)
        self.mlp = nn.Sequential(
            nn.Linear(mc.d_model, mc.mlp_ratio * mc.d_model), nn.GELU(), nn.Linear(mc.mlp_ratio * mc.d_model, mc.d_model)
        )

    def forward(self, x, rope, seq_len):
        x = x + self.attn(self.ln1(x), rope, seq_len)
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Byte-level decoder-only transformer.

    Args:
        mc: sizes (:class:`ModelConfig`).
        pe: position encoding, one of :data:`POSITION_ENCODINGS`.
        rope_backend: ropekit apply backend for the rotary encodings (``"eager"`` default:
            deterministic and available everywhere).

    ``forward(idx [b, s] int64, seq_len=None) -> logits [b, s, 256]`` (float32). ``seq_len``
    is passed to the rotary embedding (length-dependent scaling such as dynamic NTK);
    ``None`` means ``s``.

    Example:
        >>> m = TinyLM(ModelConfig(n_layer=1, d_model=32, n_head=2, ctx=16), "rope")
        >>> m(torch.zeros(2, 16, dtype=torch.long)).shape
        torch.Size([2, 16, 256])
    """

    def __init__(self, mc: ModelConfig, pe: str = "rope", *, rope_backend: str = "eager") -> None:
        super().__init__()
        if pe not in POSITION_ENCODINGS:
            raise fail(f"pe in {POSITION_ENCODINGS}", repr(pe), "pick one of them")
        self.mc, self.pe, self.rope_backend = mc, pe, rope_backend
        self.tok = nn.Embedding(256, mc.d_model)
        self.blocks = nn.ModuleList(Block(mc) for _ in range(mc.n_layer))
        self.ln_f = nn.LayerNorm(mc.d_model)
        self.pos: Optional[nn.Module] = None
        self.rope: Optional[nn.Module] = None
        if pe == "learned":
            self.pos = nn.Embedding(mc.ctx, mc.d_model)
        elif pe == "sinusoidal":
            self.register_buffer("sin_table", sinusoidal_table(mc.ctx, mc.d_model), persistent=False)
        elif pe == "rope":
            self.rope = RotaryEmbedding(mc.rope_config(), backend=rope_backend)
        elif pe in ("xpos", "p-rope"):
            factory = _variant_factory(pe)
            if factory is None:
                raise fail(
                    f"ropekit.variants providing {pe!r}",
                    "it is not available in this ropekit",
                    f"choose from {available_encodings()}",
                )
            self.rope = factory(mc, rope_backend)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def set_rope(self, cfg: RopeConfig) -> None:
        """Use ``cfg`` (e.g. with a scaling scheme) for every layer's rotary embedding."""
        if self.pe != "rope":
            raise fail("a model with pe='rope'", f"pe={self.pe!r}", "scaling schemes apply to the RoPE model only")
        self.rope = RotaryEmbedding(cfg, backend=self.rope_backend)

    def forward(self, idx: torch.Tensor, seq_len: Optional[int] = None) -> torch.Tensor:
        b, s = idx.shape
        x = self.tok(idx)  # [b, s, d_model]
        if self.pe in ("learned", "sinusoidal"):
            if s > self.mc.ctx:
                raise fail(
                    f"at most ctx={self.mc.ctx} positions for an absolute encoding",
                    f"s={s}",
                    "absolute tables end at the training length; use a rotary or NoPE model",
                )
            if self.pe == "learned":
                x = x + self.pos.weight[:s]
            else:
                # Vaswani et al. 2017 (sec. 3.4) multiply the embeddings by sqrt(d_model): without
                # it the unit-amplitude sinusoids swamp the 0.02-scale token embeddings
                x = x * math.sqrt(self.mc.d_model) + self.sin_table[:s]
        for blk in self.blocks:
            x = blk(x, self.rope, seq_len if seq_len is not None else s)
        return F.linear(self.ln_f(x), self.tok.weight)  # [b, s, 256]
