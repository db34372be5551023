"""Entry points for backends written as a rotate-into-``out`` primitive (``eager``, ``complex``,
``reference``, ``triton``): autograd, graphs and in-place handling around it, shared by all.

A backend whose ops handle all of this themselves (the compiled ``cpu`` operators) does not
use this module.

Backward of a rotation is the rotation by ``-θ`` (RoPE is orthogonal per pair), so no
activations are saved: only ``cos``/``sin`` (and ``x`` only when the tables themselves
require grad, e.g. learnable frequencies).
"""

from __future__ import annotations

from types import ModuleType

import torch

from .._tensor_checks import tracing

__all__ = ["apply", "apply_qk", "apply_gather", "rotate_functional"]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (fp16/bf16 included)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def pair_views(t: torch.Tensor, r: int, layout: str):
    """The two lanes ``(t1, t2)`` of the rotary pairs, as views ``[..., r/2]``."""
    if layout == "half":
        return t[..., : r // 2], t[..., r // 2 : r]
    tv = t[..., :r].unflatten(-1, (r // 2, 2))  # [..., r/2, 2]
    return tv[..., 0], tv[..., 1]


def rotate_functional(x, cos, sin, layout: str, conjugate: bool) -> torch.Tensor:
    """The eager backend's formula without writes into buffers (graphs trace and differentiate it).

    float32 products (float64 for float64 ``x``), one cast to ``x.dtype``; a new tensor.
    """
    r = 2 * cos.shape[-1]
    cdt = compute_dtype(x)
    c, s = cos.to(cdt), sin.to(cdt)
    if conjugate:
        s = -s
    x1, x2 = (t.to(cdt) for t in pair_views(x, r, layout))  # [..., r/2] each
    y1 = x1 * c - x2 * s
    y2 = x2 * c + x1 * s
    if layout == "half":
        y = torch.cat((y1, y2), dim=-1)  # [..., r]
    else:
        y = torch.stack((y1, y2), dim=-1).flatten(-2)  # [..., r/2, 2] -> [..., r]
    y = y.to(x.dtype)
    if x.shape[-1] > r:
        y = torch.cat((y, x[..., r:]), dim=-1)  # [..., d]
    return y


_OPAQUE: dict = {}  # NAME -> module of each non-traceable backend (filled when the registry loads it)


@torch.library.custom_op("ropekit::generic_rotate", mutates_args=())
def _rotate_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, conjugate: bool, backend: str) -> torch.Tensor:
    """An opaque (non-traceable) backend as one graph node: ``rot(x)`` into a fresh tensor."""
    return _OPAQUE[backend].rotate(x, cos, sin, layout, conjugate, torch.empty_like(x))


@_rotate_op.register_fake
def _(x, cos, sin, layout, conjugate, backend):
    return torch.empty_like(x)


def _rotate_op_setup(ctx, inputs, output):
    _, cos, sin, layout, conjugate, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.layout, ctx.conjugate, ctx.backend = layout, conjugate, backend


def _rotate_op_backward(ctx, g):
    cos, sin = ctx.saved_tensors
    # d/dx R(θ)x = R(-θ): the same op, conjugated (tables that need grad never take this path)
    return _rotate_op(g, cos, sin, ctx.layout, not ctx.conjugate, ctx.backend), None, None, None, None, None


_rotate_op.register_autograd(_rotate_op_backward, setup_context=_rotate_op_setup)


def _rotate_traced(be: ModuleType, x, cos, sin, layout: str, conjugate: bool) -> torch.Tensor:
    """Rotation for graphs: ``reference`` traces its float64 matrix, ``eager``/``complex`` the eager
    formula written functionally (inductor fuses it); a backend that is not ``TRACEABLE`` is the
    opaque custom op above (tables that require grad take the traced formula instead)."""
    if be.DIFFERENTIABLE:
        return be.apply_matrix(x, cos, sin, layout, conjugate).to(x.dtype)
    if not be.TRACEABLE and not (cos.requires_grad or sin.requires_grad):
        return _rotate_op(x, cos, sin, layout, conjugate, be.NAME)
    return rotate_functional(x, cos, sin, layout, conjugate)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, layout, backend, inplace):  # type: ignore[override]
        dst = x if inplace else torch.empty_like(x)
        backend.rotate(x, cos, sin, layout, False, dst)
        need_tables_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        if need_tables_grad:
            # x itself is needed only for d/dcos, d/dsin (learnable frequencies)
            ctx.save_for_backward(cos, sin, x.clone() if inplace else x)
        else:
            ctx.save_for_backward(cos, sin)
        ctx.layout, ctx.backend, ctx.cos_shape = layout, backend, cos.shape
        if inplace:
            ctx.mark_dirty(x)
        return dst

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        saved = ctx.saved_tensors
        cos, sin = saved[0], saved[1]
        dx = dcos = dsin = None
        if ctx.needs_input_grad[0]:
            # d/dx of R(θ)x is R(θ)ᵀ = R(-θ): the forward with sin -> -sin
            dx = ctx.backend.rotate(g, cos, sin, ctx.layout, True, torch.empty_like(g))
        if len(saved) == 3:
            x = saved[2]
            r = 2 * cos.shape[-1]
            cdt = compute_dtype(x)
            x1, x2 = (t.to(cdt) for t in pair_views(x, r, ctx.layout))
            g1, g2 = (t.to(cdt) for t in pair_views(g, r, ctx.layout))
            # y1 = x1 c - x2 s, y2 = x2 c + x1 s
            if ctx.needs_input_grad[1]:
                dcos = (g1 * x1 + g2 * x2).sum_to_size(ctx.cos_shape).to(cos.dtype)
            if ctx.needs_input_grad[2]:
                dsin = (g2 * x1 - g1 * x2).sum_to_size(ctx.cos_shape).to(sin.dtype)
        return dx, dcos, dsin, None, None, None


def apply(be: ModuleType, x, cos, sin, layout: str, conjugate: bool, inplace: bool, out) -> torch.Tensor:
    """``rot(x)`` through ``be.rotate`` with autograd (inputs already validated by the caller)."""
    grad = torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad)
    if x.numel() == 0:
        return x if inplace else (out if out is not None else x.clone())
    if tracing():
        y = _rotate_traced(be, x, cos, sin, layout, conjugate)
        if inplace:
            return x.copy_(y)
        return out.copy_(y) if out is not None else y
    if be.DIFFERENTIABLE:
        y = be.apply_matrix(x, cos, sin, layout, conjugate).to(x.dtype)
        if inplace:
            return x.copy_(y)
        return out.copy_(y) if out is not None else y
    if out is not None or not grad:
        with torch.no_grad():
            dst = x if inplace else (out if out is not None else torch.empty_like(x))
            return be.rotate(x, cos, sin, layout, conjugate, dst)
    if conjugate:
        sin = -sin
    return _Rotary.apply(x, cos, sin, layout, be, inplace)


class _RotaryQK(torch.autograd.Function):
    """q and k through a backend's fused ``rotate_qk`` (one pass forward, one pass backward).

    Backward: ``(dq, dk) = R(-θ)(gq, gk)``, again one fused call; only the tables are saved.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, layout, backend, inplace):  # type: ignore[override]
        qo, ko = backend.rotate_qk(q, k, cos, sin, layout, inplace)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no launch for it
        ctx.save_for_backward(cos, sin)
        ctx.layout, ctx.backend = layout, backend
        if inplace:
            ctx.mark_dirty(q, k)
        return qo, ko

    @staticmethod
    def backward(ctx, gq, gk):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        be, layout = ctx.backend, ctx.layout
        neg = -sin  # R(θ)ᵀ = R(-θ)
        if gq is not None and gk is not None:
            dq, dk = be.rotate_qk(gq, gk, cos, neg, layout, False)
        else:
            dq = None if gq is None else be.rotate(gq, cos, neg, layout, False, torch.empty_like(gq))
            dk = None if gk is None else be.rotate(gk, cos, neg, layout, False, torch.empty_like(gk))
        return dq, dk, None, None, None, None, None


class _Rotated(torch.autograd.Function):
    """The backward of an in-place rotation already applied to ``x`` (under no_grad): marks
    ``x`` modified and records ``backward_fn``. One single-output node per tensor, because
    autograd's view + in-place handling refuses a node that modifies views and returns more
    than one tensor (q and k as views of one projection output)."""

    @staticmethod
    def forward(ctx, x, backward_fn):  # type: ignore[override]
        ctx.mark_dirty(x)
        ctx.backward_fn = backward_fn
        return x

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return ctx.backward_fn(g), None


def _mark_rotated(ts, backward_fn) -> None:
    for t in ts:
        if t.requires_grad:
            _Rotated.apply(t, backward_fn)


def apply_qk(be: ModuleType, q, k, cos, sin, layout: str, conjugate: bool, inplace: bool):
    """``(rot(q), rot(k))``: one fused call when ``be.FUSED_QK`` (and nothing is traced or
    learnable), else :func:`apply` per tensor."""
    if be.FUSED_QK and not tracing() and not (cos.requires_grad or sin.requires_grad) and q.numel() and k.numel():
        if conjugate:
            sin = -sin  # r/2 values per position: small next to q and k
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        if grad and not inplace:
            return _RotaryQK.apply(q, k, cos, sin, layout, be, inplace)
        with torch.no_grad():
            qo, ko = be.rotate_qk(q, k, cos, sin, layout, inplace)
        if grad:  # in place: the backward R(-θ) per tensor
            _mark_rotated((q, k), lambda g: be.rotate(g, cos, sin, layout, True, torch.empty_like(g)))
        return qo, ko
    return apply(be, q, cos, sin, layout, conjugate, inplace, None), apply(be, k, cos, sin, layout, conjugate, inplace, None)


class _GatherQK(torch.autograd.Function):
    """Autograd of a backend's fused gather (``be.gather``: table rows picked by position).

    ``be.gather(xs, cos_table, sin_table, pos, fmt, layout, conjugate, inplace) -> list``
    rotates each tensor of ``xs`` (1 or 2, in format ``fmt``) by the rows ``pos`` of the
    ``[n, r/2]`` tables (by ``-θ`` when ``conjugate``); with ``conjugate=True, inplace=False``
    it takes gradients of any strides. Backward: the same hook conjugated on the gradients
    that exist; only the tables and positions are saved.
    """

    @staticmethod
    def forward(ctx, q, k, cos_table, sin_table, pos, fmt, layout, backend, inplace):  # type: ignore[override]
        qo, ko = backend.gather([q, k], cos_table, sin_table, pos, fmt, layout, False, inplace)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(cos_table, sin_table, pos)
        ctx.fmt, ctx.layout, ctx.backend = fmt, layout, backend
        if inplace:
            ctx.mark_dirty(q, k)
        return qo, ko

    @staticmethod
    def backward(ctx, gq, gk):  # type: ignore[override]
        cos_table, sin_table, pos = ctx.saved_tensors
        grads = [gq, gk]
        idx = [i for i in (0, 1) if grads[i] is not None and ctx.needs_input_grad[i]]
        out = [None, None]
        if idx:
            res = ctx.backend.gather([grads[i] for i in idx], cos_table, sin_table, pos, ctx.fmt, ctx.layout, True, False)
            for i, r in zip(idx, res):
                out[i] = r
        return out[0], out[1], None, None, None, None, None, None, None


def gather_views(cos_table, sin_table, pos, fmt):
    """Gathered tables viewed to broadcast against q/k in ``fmt``: ``[*pos.shape, r/2]`` rows."""
    from ..positions import table_view

    return table_view(cos_table[pos], fmt, pos.dim()), table_view(sin_table[pos], fmt, pos.dim())


def apply_gather(be: ModuleType, q, k, cos_table, sin_table, pos, fmt: str, layout: str, conjugate: bool, inplace: bool):
    """``(rot(q), rot(k))`` with the table rows ``pos``: the backend's fused gather when it has
    one (``be.GATHER``), else the gathered rows through :func:`apply_qk`. Positions are
    range-checked by the caller."""
    learn = cos_table.requires_grad or sin_table.requires_grad
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if be.GATHER and not learn and not tracing() and not (grad and conjugate):
        if grad and not inplace:
            return _GatherQK.apply(q, k, cos_table, sin_table, pos, fmt, layout, be, inplace)
        with torch.no_grad():
            qo, ko = be.gather([q, k], cos_table, sin_table, pos, fmt, layout, conjugate, inplace)
        if grad:  # in place: the backward R(-θ) per tensor
            _mark_rotated((q, k), lambda g: be.gather([g], cos_table, sin_table, pos, fmt, layout, True, False)[0])
        return qo, ko
    cos, sin = gather_views(cos_table, sin_table, pos, fmt)
    return apply_qk(be, q, k, cos, sin, layout, conjugate, inplace)


def rms_norm_functional(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float) -> torch.Tensor:
    """Per-head RMSNorm over the last dim in the compute dtype (float32; float64 for float64 x):
    ``x / sqrt(mean(x²) + eps) * (weight_offset + weight)``, *not* rounded to ``x.dtype``."""
    cdt = compute_dtype(x)
    xf = x.to(cdt)
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)  # [..., 1]: float32 mean of squares
    return xf * rstd * (weight.to(cdt) + weight_offset)


def apply_qk_norm(be: ModuleType, q, k, q_weight, k_weight, cos, sin, eps: float, weight_offset: float, layout: str,
                  inplace: bool):
    """Per-head RMSNorm then RoPE, composed: the norm in float32 (torch ops, differentiated
    by torch), the rotation through ``be.apply_qk`` on the float32 result, one rounding to
    ``q``/``k``'s dtype. For backends without a fused kernel (inputs already validated)."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, q_weight, k_weight))
    src_q, src_k = (q.clone(), k.clone()) if inplace and grad else (q, k)  # the norm's backward needs the input
    nq = rms_norm_functional(src_q, q_weight, eps, weight_offset)
    nk = rms_norm_functional(src_k, k_weight, eps, weight_offset)
    rq, rk = be.apply_qk(nq, nk, cos, sin, layout, False, False)
    if inplace:
        return q.copy_(rq), k.copy_(rk)
    return rq.to(q.dtype), rk.to(k.dtype)
