"""Fast CPU backend ``"cpu"``: ropekit's compiled operators (``torch.ops.ropekit.*``).

The operators (``csrc/ops.cpp``, built when the package is installed; see
:mod:`ropekit.ops`) live in PyTorch's dispatcher: the CPU kernel, a Meta kernel (FakeTensor,
``torch.compile``, ``torch.export``), version counters for the in-place variants and
autograd (backward = the same op conjugated) are all registered there, so
``torch.jit.trace``, compiled graphs and autograd see one ``ropekit::*`` op per call.
Inputs are checked in C++; :mod:`ropekit.functional` explains a refusal as a RopeError.

One pass over ``x``: each row of ``d`` elements is read once and written once, both lanes
of every pair are loaded before either is stored (so in place is safe), the half-width
cos/sin row is shared by all heads of a token, and the rows of q and k are split over
torch's own thread pool (``at::parallel_for``) for inputs above ~1 MB.

Precision: float32, bfloat16 and float16 inputs are computed in float32 — products
rounded separately, no FMA contraction — and rounded once to the input dtype
(round-to-nearest-even); float64 inputs are computed in float64. Every instruction-set
level gives the same bits.

Strides: any strides on the leading dims (a ``bshd`` view of ``bhsd`` memory is used as
is, broadcast tables keep their zero strides); a non-unit last-dim stride costs a compact
copy. Tables that require grad (learnable frequencies) go to the ``eager`` formula, which
differentiates them.

In place with q and k that share memory: a RopeError, except for disjoint views of one
buffer (e.g. the q and k heads of a fused qkv projection), which are rotated once each.

Example:
    >>> import torch, ropekit
    >>> q = torch.randn(1, 6, 4, 64)                                   # [b, s, h, d]
    >>> cos, sin = ropekit.cos_sin(ropekit.RopeConfig(64), torch.arange(6))  # [s, r/2]
    >>> if "cpu" in ropekit.backends.available():
    ...     y = ropekit.apply_rotary(q, cos[:, None], sin[:, None], backend="cpu")
    ...     ref = ropekit.apply_rotary(q, cos[:, None], sin[:, None], backend="reference")
    ...     assert torch.allclose(y, ref, atol=1e-5)
"""

from __future__ import annotations

import torch

from .. import ops as _ops
from .._tensor_checks import dual, tracing
from . import _generic
from . import eager as _eager

NAME = "cpu"
CHECKS = True  # the operators check their inputs in C++
QK_NORM = True  # ropekit::qk_norm_rotary: per-head RMSNorm + rotation in one pass

__all__ = ["NAME", "CHECKS", "QK_NORM", "available", "supports", "apply", "apply_qk", "apply_gather", "apply_qk_norm"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_OPS = torch.ops.ropekit if _ops.LOADED else None
_C_module_gather = _ops._C.module_gather if _ops.LOADED else None


def available() -> bool:
    """Whether the compiled operators were built and loaded (:data:`ropekit.ops.LOADED`)."""
    return _ops.LOADED


def supports(x: torch.Tensor) -> bool:
    """CPU (and meta) tensors of float16/bfloat16/float32/float64."""
    return x.device.type in ("cpu", "meta") and x.dtype in _DTYPES


def _learnable(tables, xs=()) -> bool:
    """Tables that require grad, a functorch transform (torch.func.grad/vjp/jacrev: C++
    autograd Functions cannot run under them), or a forward-mode AD tangent on any input
    (``torch.autograd.forward_ad``: the operators have no forward derivative and refuse dual
    tensors): the eager formula, which torch differentiates."""
    for t in tables:
        if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
            return True
    if dual(*tables, *xs):
        return True
    return torch._C._are_functorch_transforms_active()


def apply(x, cos, sin, layout, conjugate, inplace, out):
    """``rot(x)``: ``ropekit::rotary`` (``rotary_`` in place, ``rotary_out`` into ``out``).
    Learnable tables (requiring grad) take the eager formula, which torch differentiates."""
    if _learnable((cos, sin), (x, out)):
        return _generic.apply(_eager, x, cos, sin, layout, conjugate, inplace, out)
    tr = tracing()
    if tr:  # a refusal raised by the graph as the RopeError (ops.refusal), not the op's ValueError
        dst = x if inplace else out
        bad = _ops.refusal("rotary_" if inplace else "rotary" if out is None else "rotary_out",
                           (x, cos, sin, layout, conjugate) + (() if out is None or inplace else (out,)),
                           (x if dst is None else dst,))
        if bad is not None:
            return bad[0] if dst is None else dst.copy_(bad[0])
    if inplace:
        if tr:
            return x.copy_(_OPS.rotary(x, cos, sin, layout, conjugate))
        _OPS.rotary_(x, cos, sin, layout, conjugate)
        return x
    if out is not None:
        if tr:
            return out.copy_(_OPS.rotary(x, cos, sin, layout, conjugate))
        _OPS.rotary_out(x, cos, sin, layout, conjugate, out=out)
        return out
    return _OPS.rotary(x, cos, sin, layout, conjugate)


def apply_qk(q, k, cos, sin, layout, conjugate, inplace):
    """``(rot(q), rot(k))`` in one pass: ``ropekit::rotary_qk`` (``rotary_qk_`` in place)."""
    if _learnable((cos, sin), (q, k)):
        return _generic.apply_qk(_eager, q, k, cos, sin, layout, conjugate, inplace)
    tr = tracing()
    if tr:
        bad = _ops.refusal("rotary_qk_" if inplace else "rotary_qk", (q, k, cos, sin, layout, conjugate), (q, k))
        if bad is not None:
            return (q.copy_(bad[0]), k.copy_(bad[1])) if inplace else bad
    if inplace:
        if tr:
            qo, ko = _OPS.rotary_qk(q, k, cos, sin, layout, conjugate)
            return q.copy_(qo), k.copy_(ko)
        _OPS.rotary_qk_(q, k, cos, sin, layout, conjugate)
        return q, k
    return _OPS.rotary_qk(q, k, cos, sin, layout, conjugate)


def apply_gather(q, k, cos_table, sin_table, positions, fmt, layout, conjugate, inplace):
    """``(rot(q), rot(k))`` with table rows picked by position inside the kernel:
    ``ropekit::rotary_gather`` (``rotary_gather_`` in place). Positions outside
    ``[0, n)`` are refused before anything is written."""
    if _learnable((cos_table, sin_table), (q, k)):
        return _generic.apply_gather(_eager, q, k, cos_table, sin_table, positions, fmt, layout, conjugate, inplace)
    tr = tracing()
    if tr:
        bad = _ops.refusal("rotary_gather_" if inplace else "rotary_gather",
                           (q, k, cos_table, sin_table, positions, fmt, layout, conjugate), (q, k))
        if bad is not None:
            return (q.copy_(bad[0]), k.copy_(bad[1])) if inplace else bad
        # the range as the eager call words it (a RopeError, not the kernel's ValueError)
        positions = _generic.checked_positions(positions, cos_table.shape[0])
    if inplace:
        if tr:
            qo, ko = _OPS.rotary_gather(q, k, cos_table, sin_table, positions, fmt, layout, conjugate)
            return q.copy_(qo), k.copy_(ko)
        _OPS.rotary_gather_(q, k, cos_table, sin_table, positions, fmt, layout, conjugate)
        return q, k
    return _OPS.rotary_gather(q, k, cos_table, sin_table, positions, fmt, layout, conjugate)


def apply_offsets(q, k, cos_table, sin_table, offsets, head_dim, fmt, layout, conjugate, inplace):
    """``RotaryEmbedding``'s step with ``[b]`` int64 offsets on 4-D q/k (``fmt``: ``bshd``,
    ``bhsd`` or ``sbhd``) of ``head_dim``
    (decode, chunked prefill): :func:`apply_gather` at positions ``offsets[i] + 0 .. s-1``,
    the range read and checked in C++ before ``rotary_gather(_)`` is dispatched. ``None``
    when the call is one for the general path (a position past the table, a traced graph,
    a dispatch or torch-function mode, a functorch transform, tables requiring grad,
    another shape or kind of tensor)."""
    return _C_module_gather(q, k, cos_table, sin_table, offsets, head_dim, fmt, layout, conjugate, inplace)


def apply_qk_norm(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout, inplace):
    """Per-head RMSNorm then rotation of q and k in one pass: ``ropekit::qk_norm_rotary``
    (``qk_norm_rotary_`` in place). Learnable tables take the float32 composition with the
    eager formula (which differentiates them)."""
    if _learnable((cos, sin), (q, k, q_weight, k_weight)):
        return _generic.apply_qk_norm(_eager, q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout, inplace)
    tr = tracing()
    if tr:
        bad = _ops.refusal("qk_norm_rotary_" if inplace else "qk_norm_rotary",
                           (q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout), (q, k))
        if bad is not None:
            return (q.copy_(bad[0]), k.copy_(bad[1])) if inplace else bad
    if inplace:
        if tr:  # graphs: out of place, then copied back; the op saves its inputs, so a copy of them
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, q_weight, k_weight))
            src_q, src_k = (q.clone(), k.clone()) if grad else (q, k)
            qo, ko = _OPS.qk_norm_rotary(src_q, src_k, q_weight, k_weight, cos, sin, eps, weight_offset, layout)
            return q.copy_(qo), k.copy_(ko)
        _OPS.qk_norm_rotary_(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout)
        return q, k
    return _OPS.qk_norm_rotary(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout)
