"""Complex backend: Euler's form, pairs as complex numbers times ``e^{i·m·θ}``.

``(x1 + i·x2)·(cos + i·sin) = (x1·cos - x2·sin) + i·(x1·sin + x2·cos)`` — the rotation of
RoFormer eq. 13/14 written as Meta llama's ``apply_rotary_emb`` does (``view_as_complex``).
Arithmetic in complex64 (complex128 for float64 x), one cast into ``out``.
"""

from __future__ import annotations

import torch

from ._generic import compute_dtype, pair_views

NAME = "complex"
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
    s = sin.to(cdt)
    rot = torch.complex(cos.to(cdt), -s if conjugate else s)  # [..., r/2] e^{±iθ}
    if layout == "interleaved":
        # neighbouring dims are (real, imag): Meta's view_as_complex
        xr = x[..., :r].to(cdt).unflatten(-1, (r // 2, 2)).contiguous()  # [..., r/2, 2]
        y = torch.view_as_real(torch.view_as_complex(xr) * rot)  # [..., r/2, 2]
        out[..., :r].unflatten(-1, (r // 2, 2)).copy_(y)
    else:
        x1, x2 = pair_views(x, r, layout)
        y = torch.complex(x1.to(cdt), x2.to(cdt)) * rot  # [..., r/2]
        o1, o2 = pair_views(out, r, layout)
        o1.copy_(y.real)
        o2.copy_(y.imag)
    if out is not x and x.shape[-1] > r:
        out[..., r:].copy_(x[..., r:])
    return out


def functional(x, cos, sin, layout, conjugate):
    """``rot(x)`` as a new tensor in plain torch complex ops (torch differentiates it, any order)."""
    r = 2 * cos.shape[-1]
    cdt = compute_dtype(x)
    s = sin.to(cdt)
    rot = torch.complex(cos.to(cdt), -s if conjugate else s)  # [..., r/2] e^{±iθ}
    x1, x2 = (t.to(cdt) for t in pair_views(x, r, layout))
    y = torch.complex(x1, x2) * rot  # [..., r/2]
    if layout == "half":
        yr = torch.cat((y.real, y.imag), dim=-1)
    else:
        yr = torch.view_as_real(y).flatten(-2)  # (real, imag) neighbours
    yr = yr.to(x.dtype)
    return torch.cat((yr, x[..., r:]), dim=-1) if x.shape[-1] > r else yr
