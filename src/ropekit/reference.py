"""The oracle: the dense block-diagonal rotation matrix ``R^d_{Θ,m}`` of RoFormer eq. 15.

``f(x, m) = R_{Θ,m} x`` with ``R`` made of ``r/2`` 2x2 rotations

    [[cos mθ_i, -sin mθ_i],
     [sin mθ_i,  cos mθ_i]]

placed on the pairs of the layout (``(2i, 2i+1)`` interleaved — literally block
diagonal — or ``(i, i+r/2)`` half, the same matrix with rows and columns permuted).
Everything here is float64 and differentiated by torch itself, so it checks the other
backends' hand-written backward rather than sharing it. It is slow and memory-hungry
(``r x r`` per position) by design: use it for tests.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .config import RopeConfig, check_layout

NAME = "reference"
DIFFERENTIABLE = True

__all__ = ["rotation_matrix", "block_matrix", "apply"]


def available() -> bool:
    return True


def supports(x: torch.Tensor) -> bool:
    return True


def _pair_index(r: int, layout: str):
    i = torch.arange(r // 2)
    if layout == "half":
        return i, i + r // 2
    return 2 * i, 2 * i + 1


def block_matrix(cos: torch.Tensor, sin: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """Rotation matrices from half-width tables: ``[..., r/2]`` -> float64 ``[..., r, r]``.

    Row ``a`` / column ``b`` of each pair ``(a, b)`` hold ``[[cos, -sin], [sin, cos]]``.
    Entries equal the given table values (times any attention factor folded into them).
    """
    check_layout(layout)
    cos = cos.to(torch.float64)
    sin = sin.to(torch.float64)
    r = 2 * cos.shape[-1]
    a, b = _pair_index(r, layout)
    a, b = a.to(cos.device), b.to(cos.device)
    R = cos.new_zeros(*cos.shape[:-1], r, r)  # [..., r, r]
    R[..., a, a] = cos
    R[..., a, b] = -sin
    R[..., b, a] = sin
    R[..., b, b] = cos
    return R


def rotation_matrix(
    cfg: RopeConfig,
    position: Union[int, torch.Tensor],
    *,
    seq_len: Optional[int] = None,
    attention_scaling: bool = False,
) -> torch.Tensor:
    """``R_{Θ,m}`` for ``cfg`` at integer ``position``: float64 ``[r, r]`` (or ``[*position.shape, r, r]``).

    Pairs follow ``cfg.layout``. By default this is a pure rotation (orthogonal);
    ``attention_scaling=True`` folds ``cfg.attention_factor`` in, as the tables do.

    Example:
        >>> R = rotation_matrix(RopeConfig(head_dim=4, layout="interleaved"), 0)
        >>> torch.equal(R, torch.eye(4, dtype=torch.float64))
        True
    """
    from .tables import cos_sin

    cos, sin = cos_sin(cfg, position, dtype=torch.float64, seq_len=seq_len, attention_scaling=attention_scaling)
    return block_matrix(cos, sin, cfg.layout)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, conjugate: bool = False) -> torch.Tensor:
    """``y = R x`` on the first ``r`` dims (``Rᵀ x`` if ``conjugate``), in float64; other dims pass.

    Returns a float64 tensor of ``x``'s shape; differentiable w.r.t. ``x``, ``cos`` and ``sin``.
    """
    r = 2 * cos.shape[-1]
    R = block_matrix(cos, sin, layout)  # [..., r, r]
    if conjugate:
        R = R.transpose(-1, -2)
    x64 = x.to(torch.float64)
    # y_i = sum_j R_ij x_j over the matrix's structural nonzeros only: a matmul would also add
    # the 0 * x_j terms, and 0 * NaN / 0 * inf = NaN would spread one non-finite x_j to every
    # rotary dim of its token. Each y_i is then the same two-product sum (exact zeros added).
    a, b = _pair_index(r, layout)
    mask = torch.zeros(r, r, dtype=torch.bool, device=x.device)
    mask[a, a] = mask[a, b] = mask[b, a] = mask[b, b] = True
    prod = R * x64[..., :r].unsqueeze(-2)  # [..., r, r]: R_ij x_j
    y = torch.where(mask, prod, torch.zeros((), dtype=torch.float64, device=x.device)).sum(-1)  # [..., r]
    return torch.cat((y, x64[..., r:]), dim=-1)


def rotate(x, cos, sin, layout, conjugate, out):
    out.copy_(apply(x, cos, sin, layout, conjugate))
    return out
