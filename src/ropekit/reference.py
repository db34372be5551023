"""The oracle: the dense block-diagonal rotation matrix ``R^d_{Θ,m}`` of RoFormer eq. 15.

``f(x, m) = R_{Θ,m} x`` with ``R`` made of ``r/2`` 2x2 rotations

    [[cos mθ_i, -sin mθ_i],
     [sin mθ_i,  cos mθ_i]]

placed on the pairs of the layout (``(2i, 2i+1)`` interleaved — literally block
diagonal — or ``(i, i+r/2)`` half, the same matrix with rows and columns permuted).
Everything here is float64 and differentiated by torch itself, so it checks the other
backends' hand-written backward rather than sharing it. It is slow by design (a dense
``r x r`` matrix per position, float64): use it for tests. Its memory is per position,
not per row of ``x``: torchtune's test shape (batch 4, 2048 positions, 32 heads,
``d = 128``) needs about 0.3 GiB of matrices.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .config import RopeConfig, check_layout
from .tables import check_table

NAME = "reference"
DIFFERENTIABLE = True

__all__ = ["rotation_matrix", "block_matrix", "apply"]


def available() -> bool:
    return True


def supports(x: torch.Tensor) -> bool:
    return True


def _pair_index(r: int, layout: str):
    i = torch.arange(r // 2, device="cpu")  # explicit: never a torch.device("meta") context's
    if layout == "half":
        return i, i + r // 2
    return 2 * i, 2 * i + 1


def block_matrix(cos: torch.Tensor, sin: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """Rotation matrices from half-width tables: ``[..., r/2]`` -> float64 ``[..., r, r]``.

    Row ``a`` / column ``b`` of each pair ``(a, b)`` hold ``[[cos, -sin], [sin, cos]]``.
    Entries equal the given table values (times any attention factor folded into them).
    """
    check_layout(layout)
    check_table(cos)
    check_table(sin)
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

    Pairs follow ``cfg.layout``; the rotation is by ``cfg.direction·m·θ`` (``direction = -1``:
    ``R_{Θ,m}ᵀ``), the rotation the config's keys and queries get. By default this is a pure
    rotation (orthogonal); ``attention_scaling=True`` folds ``cfg.attention_factor`` in, as the
    tables do.

    Example:
        >>> R = rotation_matrix(RopeConfig(head_dim=4, layout="interleaved"), 0)
        >>> torch.equal(R, torch.eye(4, dtype=torch.float64))
        True
    """
    from .tables import cos_sin

    cos, sin = cos_sin(cfg, position, dtype=torch.float64, seq_len=seq_len, attention_scaling=attention_scaling)
    return block_matrix(cos, -sin if cfg.direction == -1 else sin, cfg.layout)


def _columns(r: int, layout: str, device: torch.device) -> torch.Tensor:
    """int64 ``[r, 2]``: row ``i`` of ``R`` has its structural nonzeros in columns ``(i, partner(i))``."""
    a, b = _pair_index(r, layout)
    partner = torch.empty(r, dtype=torch.int64, device="cpu")
    partner[a], partner[b] = b, a
    return torch.stack((torch.arange(r, device="cpu"), partner), dim=-1).to(device)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, conjugate: bool = False) -> torch.Tensor:
    """``y = R x`` on the first ``r`` dims (``Rᵀ x`` if ``conjugate``), in float64; other dims pass.

    Returns a float64 tensor of ``x``'s shape; differentiable w.r.t. ``x``, ``cos`` and ``sin``.

    ``R`` is built once per table entry (``[*cos.shape[:-1], r, r]``: per position for
    tables shaped like ``[s, 1, r/2]``), never per row of ``x``: broadcasting against the
    batch and heads happens on the gathered entries, so memory is ``O(positions · r²)`` plus
    ``O(x.numel())``, not ``O(x.numel() · r)``.
    """
    r = 2 * cos.shape[-1]
    R = block_matrix(cos, sin, layout)  # [T..., r, r], T = the tables' leading shape
    if conjugate:
        R = R.transpose(-1, -2)
    x64 = x.to(torch.float64)
    # y_i = sum_j R_ij x_j over the matrix's structural nonzeros only: a matmul would also add
    # the 0 * x_j terms, and 0 * NaN / 0 * inf = NaN would spread one non-finite x_j to every
    # rotary dim of its token. Row i's nonzeros sit in columns (i, partner(i)) (the same for
    # R and Rᵀ), read from the dense matrix itself.
    cols = _columns(r, layout, R.device)  # [r, 2]
    Rg = torch.gather(R, -1, cols.expand(*R.shape[:-2], r, 2))  # [T..., r, 2]: R_i,i and R_i,partner
    xg = x64[..., :r][..., cols.to(x.device)]  # [X..., r, 2]: x_i and x_partner
    y = (Rg * xg).sum(-1)  # [X..., r]
    return torch.cat((y, x64[..., r:]), dim=-1)


def rotate(x, cos, sin, layout, conjugate, out):
    out.copy_(apply(x, cos, sin, layout, conjugate))
    return out
