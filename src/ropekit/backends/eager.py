"""Eager backend: element-wise torch, no ``cat``, float32 arithmetic (float64 for float64 x).

Per pair ``(x1, x2)``: ``y1 = x1·cos - x2·sin``, ``y2 = x2·cos + x1·sin``, computed in the
compute dtype and cast once into ``out``. Both results are computed before either is
written, so ``out`` may be ``x``. Runs on every device.
"""

from __future__ import annotations

import torch

from ._generic import compute_dtype, pair_views, rotate_functional

NAME = "eager"
CHECKS = False
DIFFERENTIABLE = False
TRACEABLE = True
FUSED_QK = False
GATHER = False


def available() -> bool:
    return True


def supports(x: torch.Tensor) -> bool:
    return True


def rotate(x, cos, sin, layout, conjugate, out):
    r = 2 * cos.shape[-1]
    cdt = compute_dtype(x)
    c = cos.to(cdt)
    s = sin.to(cdt)
    if conjugate:
        s = -s
    x1, x2 = pair_views(x, r, layout)
    o1, o2 = pair_views(out, r, layout)
    # float32 products; bf16/fp16 lanes are promoted exactly, one rounding at copy_
    y1 = x1 * c
    y1.addcmul_(x2.to(cdt), s, value=-1)  # [..., r/2]
    y2 = x2 * c
    y2.addcmul_(x1.to(cdt), s)
    o1.copy_(y1)
    o2.copy_(y2)
    if out is not x and x.shape[-1] > r:
        out[..., r:].copy_(x[..., r:])
    return out


def functional(x, cos, sin, layout, conjugate):
    """``rot(x)`` as a new tensor in plain torch ops (torch differentiates it, any order)."""
    return rotate_functional(x, cos, sin, layout, conjugate)
