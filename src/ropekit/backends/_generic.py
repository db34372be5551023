"""Entry points for backends without a ropekit kernel (``eager``, ``complex``, ``reference``,
registered plugins): plain torch code that torch itself differentiates (any order), traces
and compiles. They are the oracles of the kernels and the fallback for devices ropekit has
no kernel for.

Inputs are validated by the op's one validator (:func:`ropekit.ops.check`, the rules of the
compiled operators) before anything runs; while torch.compile traces them, on the fake tensors
(:func:`ropekit.ops.refusal`: a refused call compiles to a graph that raises the RopeError).
Every tensor a call writes is checked for what autograd and inference mode refuse
(:func:`writable`) before any is written. A backend's ``functional`` form (a new tensor,
differentiable) computes every result, with or without autograd (so both give the same
bits), and is copied into the destination for ``inplace=True`` / ``out=``: torch records
the in-place write itself. A plugin with only a ``rotate`` primitive writes into the
destination directly when nothing needs a gradient.

A plugin backend that has only the ``rotate`` primitive runs as one opaque custom op
(``ropekit::generic_rotate``) whose backward is the same op conjugated: the one autograd
this module defines, for code torch cannot see into.
"""

from __future__ import annotations

from types import ModuleType

import torch

from .. import ops as _ops
from .._errors import fail
from .._tensor_checks import host_readable, tracing

__all__ = ["apply", "apply_qk", "apply_gather", "rotate_functional", "writable"]


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
    _ops.check("rotary", x, cos, sin, layout, conjugate)
    return torch.empty_like(x)


def _rotate_op_setup(ctx, inputs, output):
    _, cos, sin, layout, conjugate, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.layout, ctx.conjugate, ctx.backend = layout, conjugate, backend


def _rotate_op_backward(ctx, g):
    cos, sin = ctx.saved_tensors
    return _rotate_op(g, cos, sin, ctx.layout, not ctx.conjugate, ctx.backend), None, None, None, None, None


_rotate_op.register_autograd(_rotate_op_backward, setup_context=_rotate_op_setup)


def rotated(be: ModuleType, x, cos, sin, layout: str, conjugate: bool) -> torch.Tensor:
    """``rot(x)`` as a new tensor, differentiable: the reference's float64 matrix, a backend's
    ``functional`` form (plain torch), or the opaque op of a plugin's primitive."""
    if be.DIFFERENTIABLE:
        return be.apply_matrix(x, cos, sin, layout, conjugate).to(x.dtype)
    fn = getattr(be, "functional", None)
    if fn is not None:
        return fn(x, cos, sin, layout, conjugate)
    if cos.requires_grad or sin.requires_grad:  # learnable tables: the eager formula differentiates them
        return rotate_functional(x, cos, sin, layout, conjugate)
    return _rotate_op(x, cos, sin, layout, conjugate, be.NAME)


def _creation_meta(t: torch.Tensor) -> str:
    """How autograd records the view ``t`` was made (``"DEFAULT"``, ``"MULTI_OUTPUT_NODE"``
    for an output of unbind / split / chunk, ...): torch refuses in-place writes to some of
    them, after a fused kernel has written them. ``"DEFAULT"`` where torch cannot say."""
    try:
        return torch._C._autograd._get_creation_meta(t).name
    except (AttributeError, RuntimeError):
        return "DEFAULT"


def writable(name: str, t: torch.Tensor) -> None:
    """RopeError for a tensor the call would write (in place, ``out=``) that torch refuses to
    write: a leaf that requires grad or a view of one (grad mode on), an inference tensor
    outside ``torch.inference_mode()``. Checked for every written tensor before any is
    written (torch itself refuses some of them only after writing)."""
    if torch.is_grad_enabled() and t.requires_grad:
        if t.is_leaf:
            raise fail("inplace=True on a tensor autograd may modify", f"{name}: a leaf tensor that requires grad",
                       "use inplace=False, or apply to a non-leaf (e.g. the output of the projection)")
        if tracing():  # checks of eager calls: dynamo cannot trace _is_view() / is_inference()
            return
        if t._is_view() and t._base.is_leaf and t._base.requires_grad:
            raise fail(f"{name} not a view of a leaf tensor that requires grad (autograd refuses to write it)",
                       f"{name}: a view of a leaf of shape {list(t._base.shape)} that requires grad",
                       f"write into a copy ({name}.clone()), or run under torch.no_grad(), or use inplace=False")
        if t._is_view() and _creation_meta(t) == "MULTI_OUTPUT_NODE":
            raise fail(f"{name} a tensor autograd lets the call write in place",
                       f"{name}: one of several views returned by one call (unbind / split / chunk), which "
                       "autograd refuses to modify in place",
                       f"take the view by indexing (e.g. qkv[:, :, 0] instead of qkv.unbind(2)[0]), write into "
                       f"{name}.clone(), or use inplace=False")
    if not tracing() and t.is_inference() and not torch.is_inference_mode_enabled():
        raise fail(f"{name} a normal tensor (not an inference tensor) when writing in place outside "
                   "torch.inference_mode()", f"{name}: an inference tensor (created under torch.inference_mode())",
                   f"write into a copy ({name}.clone()), or run the call under torch.inference_mode()")


def _into(be: ModuleType, x, cos, sin, layout, conjugate, dst) -> torch.Tensor:
    """``dst = rot(x)``; ``dst`` may be ``x`` (checked by :func:`writable` first)."""
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad or dst.requires_grad) \
            or tracing() or be.DIFFERENTIABLE or hasattr(be, "functional"):
        # in place: the formula reads a copy, so no node saves a tensor the write changes
        src = x.clone() if dst is x and x.requires_grad and torch.is_grad_enabled() else x
        return dst.copy_(rotated(be, src, cos, sin, layout, conjugate))
    with torch.no_grad():
        return be.rotate(x, cos, sin, layout, conjugate, dst)


def apply(be: ModuleType, x, cos, sin, layout: str, conjugate: bool, inplace: bool, out,
          checked: bool = False) -> torch.Tensor:
    """``rot(x)`` (in place, into ``out`` or a new tensor), validated by the ``rotary`` op's rules
    (``checked``: the caller has applied :func:`writable` to ``x`` already)."""
    if inplace:
        bad = _ops.refusal("rotary_", (x, cos, sin, layout, conjugate), (x,))
        if bad is not None:  # traced: the graph raises the RopeError
            return x.copy_(bad[0])
        if not checked:
            writable("x", x)
        return _into(be, x, cos, sin, layout, conjugate, x) if x.numel() else x
    if out is not None:
        bad = _ops.refusal("rotary_out", (x, cos, sin, layout, conjugate, out), (out,))
        if bad is not None:
            return out.copy_(bad[0])
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, cos, sin, out)):
            from .._errors import fail

            raise fail("out= without autograd", "inputs that require grad", "drop out= (or run under torch.no_grad())")
        writable("out", out)
        return _into(be, x, cos, sin, layout, conjugate, out) if x.numel() else out
    bad = _ops.refusal("rotary", (x, cos, sin, layout, conjugate), (x,))
    if bad is not None:
        return bad[0]
    if x.numel() == 0:
        return x.clone()
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad) or tracing() \
            or be.DIFFERENTIABLE or hasattr(be, "functional"):
        return rotated(be, x, cos, sin, layout, conjugate)
    with torch.no_grad():
        return be.rotate(x, cos, sin, layout, conjugate, torch.empty_like(x))


def apply_qk(be: ModuleType, q, k, cos, sin, layout: str, conjugate: bool, inplace: bool):
    """``(rot(q), rot(k))``, validated by the ``rotary_qk`` op's rules, each through :func:`apply`
    (in place: both checked before either is written)."""
    bad = _ops.refusal("rotary_qk_" if inplace else "rotary_qk", (q, k, cos, sin, layout, conjugate), (q, k))
    if bad is not None:  # traced: the graph raises the RopeError
        return (q.copy_(bad[0]), k.copy_(bad[1])) if inplace else bad
    if inplace:
        writable("q", q)
        writable("k", k)
    return (apply(be, q, cos, sin, layout, conjugate, inplace, None, checked=True),
            apply(be, k, cos, sin, layout, conjugate, inplace, None, checked=True))


def gather_views(cos_table, sin_table, pos, fmt):
    """Gathered tables viewed to broadcast against q/k in ``fmt``: ``[*pos.shape, r/2]`` rows."""
    from ..positions import table_view

    return table_view(cos_table[pos], fmt, pos.dim()), table_view(sin_table[pos], fmt, pos.dim())


def check_range(pos: torch.Tensor, n: int) -> None:
    """Positions in ``[0, n)`` (the table length): one host read, skipped while tracing and on
    meta tensors (the compiled operators check this inside their kernel)."""
    if pos.numel() == 0 or not host_readable(pos):  # traced, vmapped: the indexing checks
        return
    _range_error(pos, n)


def checked_positions(pos: torch.Tensor, n: int) -> torch.Tensor:
    """``pos``, range-checked when the graph runs: while torch.compile traces, the positions'
    values are unknown, and a torch-only gather would take a negative position as a row from
    the end (Python indexing) and abort the process on one past the table (inductor's
    bounds assert). The graph calls ``ropekit::positions_in_range``, whose kernel raises the
    eager call's RopeError. torch.export does not (its programs stay plain aten)."""
    if not tracing() or torch.compiler.is_exporting() or pos.numel() == 0:
        return pos
    return _positions_in_range(pos, n)


def _positions_in_range_impl(positions, n):
    _range_error(positions, n)
    return positions.clone()


# defined at import (Dynamo cannot trace a definition); the schema is given: this module's
# annotations are strings (``from __future__ import annotations``)
_positions_in_range = torch.library.custom_op(
    "ropekit::positions_in_range", _positions_in_range_impl, mutates_args=(), schema="(Tensor positions, int n) -> Tensor")
_positions_in_range.register_fake(lambda positions, n: torch.empty_like(positions))


def _range_error(pos: torch.Tensor, n: int) -> None:
    lo, hi = (int(v) for v in torch.aminmax(pos))
    if lo < 0 or hi >= n:
        from .._errors import fail

        raise fail(f"positions in [0, {n}) (the table length)", f"positions from {lo} to {hi}",
                   "grow the tables (build them for max_position + 1 rows) or fix the positions")


def apply_gather(be: ModuleType, q, k, cos_table, sin_table, pos, fmt: str, layout: str, conjugate: bool, inplace: bool):
    """``(rot(q), rot(k))`` with the table rows ``pos``, validated by the ``rotary_gather`` op's
    rules: the rows gathered in torch, then :func:`apply` per tensor (in place: both checked
    before either is written)."""
    bad = _ops.refusal("rotary_gather_" if inplace else "rotary_gather",
                       (q, k, cos_table, sin_table, pos, fmt, layout, conjugate), (q, k))
    if bad is not None:  # traced: the graph raises the RopeError
        return (q.copy_(bad[0]), k.copy_(bad[1])) if inplace else bad
    if inplace:
        writable("q", q)
        writable("k", k)
    check_range(pos, cos_table.shape[0])
    pos = checked_positions(pos, cos_table.shape[0])
    if pos.dim() == 1 and fmt != "thd" and pos.shape[0] != q.shape[{"bshd": 1, "bhsd": 2, "sbhd": 0}[fmt]]:
        pos = pos[:, None]  # [b] per sample (s == 1)
    cos, sin = gather_views(cos_table, sin_table, pos, fmt)
    return (apply(be, q, cos, sin, layout, conjugate, inplace, None, checked=True),
            apply(be, k, cos, sin, layout, conjugate, inplace, None, checked=True))


def rms_norm_functional(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float) -> torch.Tensor:
    """Per-head RMSNorm over the last dim in the compute dtype (float32; float64 for float64 x):
    ``x / sqrt(mean(x²) + eps) * (weight_offset + weight)``, *not* rounded to ``x.dtype``."""
    cdt = compute_dtype(x)
    xf = x.to(cdt)
    ms = sum_squares(xf) / x.shape[-1]
    rstd = 1.0 / _root(ms + eps)  # [..., 1]: correctly rounded division and root, as the kernels
    return xf * rstd * (weight.to(cdt) + weight_offset)


def _root(v: torch.Tensor) -> torch.Tensor:
    """:func:`sqrt_rn`'s value with ``torch.sqrt``'s derivative (``frexp`` has none): ``r + (e -
    r)`` is ``e`` exactly (the two are at most an ulp apart, so ``e - r`` is exact)."""
    e = sqrt_rn(v.detach())
    if not torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active():
        return e
    r = torch.sqrt(v)
    return torch.where(torch.isfinite(e), r + (e - r.detach()), r)


def sqrt_rn(v: torch.Tensor) -> torch.Tensor:
    """The square root rounded to nearest, as the kernels' (IEEE) root. torch's own CPU
    ``sqrt`` is not: about 0.6% of float32 and 0.7% of float64 results are an ulp off (this
    torch build, measured against numpy's root on 10M values). float32: the float64 root,
    rounded (an error under one float64 ulp cannot move the float32 rounding of a root).
    float64: one Newton step with the exact residual (Veltkamp's split) on the mantissa
    scaled to [0.5, 2); it matched numpy's root on 20M random bit patterns, but unlike the
    float32 path it is not proven for the rare root whose corrected value is a tie."""
    if v.dtype != torch.float64:
        return torch.sqrt(v.double()).to(v.dtype)
    m, e = torch.frexp(v)  # v = m·2^e, m in [0.5, 1)
    odd = (e % 2) != 0
    m = torch.where(odd, m * 2.0, m)  # [0.5, 2), e even: no overflow or underflow below
    e = torch.where(odd, e - 1, e)
    r = torch.sqrt(m)
    t = r * 134217729.0  # 2^27 + 1
    rh = t - (t - r)
    rl = r - rh
    p = r * r
    err = ((rh * rh - p) + 2.0 * rh * rl) + rl * rl  # r·r = p + err exactly
    r = r + ((m - p) - err) / (2.0 * r)
    return torch.where(torch.isfinite(v) & (v > 0), torch.ldexp(r, e // 2), torch.sqrt(v))


def sum_squares(xf: torch.Tensor) -> torch.Tensor:
    """``sum(x²)`` over the last dim, ``[..., 1]``, in the fused kernels' order, so the
    composition has their bits: element ``i`` goes to lane ``i mod 16`` (the row zero-padded
    to a multiple of 16), each lane summed in order, then the lanes pairwise (``k + 8``,
    ``k + 4``, ``k + 2``, ``k + 1``). (``mean`` sums in its own order and multiplies by
    ``1/d``: other bits where the learnable-table or ``torch.func`` path replaced the kernel.)"""
    d = xf.shape[-1]
    sq = xf.square()
    if d % 16:
        sq = torch.nn.functional.pad(sq, (0, 16 - d % 16))
    sq = sq.unflatten(-1, (-1, 16))  # [..., n/16, 16]
    acc = sq[..., 0, :]
    for i in range(1, sq.shape[-2]):
        acc = acc + sq[..., i, :]
    for w in (8, 4, 2, 1):
        acc = acc[..., :w] + acc[..., w:2 * w]
    return acc  # [..., 1]


def apply_qk_norm(be: ModuleType, q, k, q_weight, k_weight, cos, sin, eps: float, weight_offset: float, layout: str,
                  inplace: bool):
    """Per-head RMSNorm then RoPE, composed: the norm in float32 (torch ops), the rotation of
    the float32 result by ``be``, one rounding to ``q``/``k``'s dtype. Validated by the
    ``qk_norm_rotary`` op's rules."""
    bad = _ops.refusal("qk_norm_rotary_" if inplace else "qk_norm_rotary",
                       (q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout), (q, k))
    if bad is not None:  # traced: the graph raises the RopeError
        return (q.copy_(bad[0]), k.copy_(bad[1])) if inplace else bad
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, q_weight, k_weight))
    if inplace:
        writable("q", q)
        writable("k", k)
    src_q, src_k = (q.clone(), k.clone()) if inplace and grad else (q, k)  # the norm's backward reads its input
    nq = rms_norm_functional(src_q, q_weight, eps, weight_offset)
    nk = rms_norm_functional(src_k, k_weight, eps, weight_offset)
    rq = apply(be, nq, cos, sin, layout, False, False, None)
    rk = apply(be, nk, cos, sin, layout, False, False, None)
    if inplace:
        return q.copy_(rq), k.copy_(rk)
    return rq.to(q.dtype), rk.to(k.dtype)
