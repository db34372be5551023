"""Linear attention with RoPE (RoFormer, Su et al. 2021, arXiv 2104.09864, sec. 3.3, eq. 19).

    Attention(Q, K, V)_m = Σ_n (R_m φ(q_m))ᵀ (R_n φ(k_n)) v_n  /  Σ_n φ(q_m)ᵀ φ(k_n)

``φ`` is a non-negative feature map (``elu(x) + 1`` by default, Katharopoulos et al. 2020),
``R_m`` the rotary rotation of position ``m``. The rotation is applied to the features in
the numerator only; the denominator stays unrotated so it remains positive (the rotated
products can be negative). Sums run over all ``n`` (non-causal) or ``n <= m`` (causal).

Cost: ``O(s·d·e)`` time and ``O(s·(d + e) + d·e)`` memory per batch and head (``e`` the
value dim): the non-causal form contracts ``Σ_n R_n φ(k_n) v_nᵀ`` once; the causal form
walks the sequence in chunks of ``chunk_size`` tokens, carrying the running sums
``S = Σ_{n<start} R_n φ(k_n) v_nᵀ`` (``[d, e]``) and ``z = Σ_{n<start} φ(k_n)`` (``[d]``)
and doing the within-chunk part exactly (``chunk_size²`` scores). No ``[s, s]`` matrix is
ever formed.

Shapes: ``b`` batch, ``s`` sequence, ``h`` heads, ``d`` head dim, ``e`` value dim,
``r`` rotary dim.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F

from ._checks import flag
from ._errors import fail
from .config import check_layout

__all__ = ["linear_attention", "elu_feature_map"]


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """``φ(x) = elu(x) + 1`` (positive everywhere; Katharopoulos et al. 2020)."""
    return F.elu(x) + 1.0


_FEATURE_MAPS = {"elu": elu_feature_map}


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    layout: str = "half",
    causal: bool = False,
    feature_map: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "elu",
    chunk_size: int = 64,
    backend: str = "auto",
) -> torch.Tensor:
    """RoPE linear attention, RoFormer eq. 19 (see the module docstring).

    Args:
        q, k: ``[b, s, h, d]``.
        v: ``[b, s, h, e]``.
        cos, sin: half-width tables for the positions of q/k, broadcastable to
            ``[b, s, h, r/2]`` (e.g. ``[s, 1, r/2]`` from ``ropekit.cos_sin(cfg, arange(s))[:, None]``).
            Queries and keys share positions, as in self-attention.
        layout: rotary pair layout of q/k.
        causal: sum over ``n <= m`` only.
        feature_map: ``"elu"`` (``elu(x) + 1``) or a callable ``[..., d] -> [..., d]``
            returning non-negative features.
        chunk_size: tokens per chunk of the causal scan (memory ``chunk_size²`` per head).
        backend: apply backend for the rotations (:func:`ropekit.apply_rotary`).

    Returns:
        ``[b, s, h, e]`` in ``v``'s dtype.

    Precision: features, rotations and sums in float32 (float64 for float64 inputs); one
    cast at the end. Differentiable (autograd through the chunked scan).

    Example:
        >>> import ropekit
        >>> q, k, v = torch.randn(2, 10, 4, 16), torch.randn(2, 10, 4, 16), torch.randn(2, 10, 4, 8)
        >>> cos, sin = ropekit.cos_sin(ropekit.RopeConfig(16), torch.arange(10))   # [s, r/2]
        >>> linear_attention(q, k, v, cos[:, None], sin[:, None], causal=True).shape
        torch.Size([2, 10, 4, 8])
    """
    from .functional import apply_rotary

    check_layout(layout)
    causal = flag("causal", causal)  # a real bool: causal="no" is not False
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.dtype.is_floating_point:
            got = f"shape {tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise fail(f"{name} a floating tensor [b, s, h, {'e' if name == 'v' else 'd'}]", got, "pass bshd tensors")
    if q.shape != k.shape:
        raise fail("q and k of one shape [b, s, h, d]", f"{tuple(q.shape)} and {tuple(k.shape)}", "repeat k's heads for GQA first")
    if v.shape[:3] != q.shape[:3]:
        raise fail(f"v of shape [b, s, h, e] = {tuple(q.shape[:3])} + (e,)", f"{tuple(v.shape)}", "match v's batch/seq/heads to q")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise fail("chunk_size a positive int", repr(chunk_size), "64 is a good default")
    if isinstance(feature_map, str):
        if feature_map not in _FEATURE_MAPS:
            raise fail(f"feature_map in {tuple(_FEATURE_MAPS)} or a callable", repr(feature_map), 'use "elu" (elu(x) + 1)')
        phi = _FEATURE_MAPS[feature_map]
    elif callable(feature_map):
        phi = feature_map
    else:
        raise fail("feature_map a name or a callable", type(feature_map).__name__, 'use "elu"')

    cdt = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    fq = phi(q.to(cdt))  # [b, s, h, d]
    fk = phi(k.to(cdt))
    vv = v.to(cdt)  # [b, s, h, e]
    rq = apply_rotary(fq, cos, sin, layout=layout, backend=backend)  # R_m φ(q_m)
    rk = apply_rotary(fk, cos, sin, layout=layout, backend=backend)  # R_n φ(k_n)

    if not causal:
        kv = torch.einsum("bnhd,bnhe->bhde", rk, vv)  # Σ_n R_n φ(k_n) v_nᵀ   [b, h, d, e]
        num = torch.einsum("bmhd,bhde->bmhe", rq, kv)  # [b, s, h, e]
        den = torch.einsum("bmhd,bhd->bmh", fq, fk.sum(dim=1))  # [b, s, h]
        return (num / den.unsqueeze(-1)).to(v.dtype)

    b, s, h, d = q.shape
    e = v.shape[-1]
    if s == 0:  # no token: the empty output, as the non-causal form gives
        return vv[:, :0].to(v.dtype, copy=True)  # [b, 0, h, e]
    state = vv.new_zeros(b, h, d, e)  # Σ_{n < chunk start} R_n φ(k_n) v_nᵀ
    zsum = vv.new_zeros(b, h, d)  # Σ_{n < chunk start} φ(k_n)
    outs = []
    for start in range(0, s, chunk_size):
        sl = slice(start, min(start + chunk_size, s))
        c = sl.stop - sl.start
        mask = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()  # n <= m within the chunk
        a = torch.einsum("bmhd,bnhd->bhmn", rq[:, sl], rk[:, sl]).masked_fill(~mask, 0.0)  # [b, h, c, c]
        num = torch.einsum("bhmn,bnhe->bmhe", a, vv[:, sl]) + torch.einsum("bmhd,bhde->bmhe", rq[:, sl], state)
        dd = torch.einsum("bmhd,bnhd->bhmn", fq[:, sl], fk[:, sl]).masked_fill(~mask, 0.0)  # [b, h, c, c]
        den = dd.sum(-1).transpose(1, 2) + torch.einsum("bmhd,bhd->bmh", fq[:, sl], zsum)  # [b, c, h]
        outs.append(num / den.unsqueeze(-1))  # [b, c, h, e]
        state = state + torch.einsum("bnhd,bnhe->bhde", rk[:, sl], vv[:, sl])
        zsum = zsum + fk[:, sl].sum(dim=1)
    return torch.cat(outs, dim=1).to(v.dtype)  # [b, s, h, e]
