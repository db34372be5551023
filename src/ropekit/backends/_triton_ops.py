"""The Triton kernels as the CUDA implementations of ``torch.ops.ropekit.*``.

One Python function per op, with the op's schema (``csrc/ops.cpp``, ``TORCH_LIBRARY``);
:func:`register_cuda_kernels` registers each at the ``CUDA`` dispatch key
(``torch.library.impl``), beside the C++ CPU kernel of the same op. Autograd is the op's own
(C++, registered at the device-generic Autograd key: backward = the same op conjugated,
the fused norm's backward = ``qk_norm_rotary_bwd``), so nothing here knows about gradients.

Each impl first runs the op's validator, ``ropekit.ops.check("<op>", *schema args)``, then launches the kernels of
:mod:`ropekit.backends.triton` (imported lazily: ``import ropekit`` needs torch only).

CPU tensors under ``TRITON_INTERPRET=1``: :func:`on_triton` (:mod:`._triton_mode`, a leaf
module, so the launcher module can use it without importing this one) routes the ops on CPU
tensors to the same functions (a ``TorchDispatchMode`` below autograd), which is how
``backend="triton"`` and the tests run the Triton kernels without a GPU.

Example:
    >>> import torch, ropekit
    >>> from ropekit.backends import _triton_ops
    >>> sorted(_triton_ops.IMPLS)[:3]
    ['qk_norm_rotary', 'qk_norm_rotary_', 'qk_norm_rotary_bwd']
"""

from __future__ import annotations

from typing import Callable

import torch

from ._triton_mode import IMPLS, _OnTriton, on_triton, register_cuda  # noqa: F401  (the table the mode routes to)

__all__ = ["IMPLS", "register_cuda_kernels", "on_triton"]


def _impl(fn: Callable) -> Callable:
    IMPLS[fn.__name__] = fn
    return fn


def _tb():
    from . import triton as tb  # imports triton (lazily: only when a kernel runs)

    return tb


def _check(name: str, *args) -> None:
    """The op's one validator (``ropekit.ops.check``: the C++ rules the CPU kernel runs)."""
    from .. import ops

    ops.check(name, *args)


def _new_out(x: torch.Tensor) -> torch.Tensor:
    """The ops' output rule (``new_out`` in csrc/ops.cpp): x's layout when its last stride is 1."""
    keep = x.shape[-1] <= 1 or x.stride(-1) == 1
    return torch.empty_like(x, memory_format=torch.preserve_format if keep else torch.contiguous_format)


# --- rotation ------------------------------------------------------------------------------


@_impl
def rotary(x, cos, sin, layout="half", conjugate=False):
    _check("rotary", x, cos, sin, layout, conjugate)
    out = _new_out(x)
    _tb().rotate(x, cos, sin, layout, conjugate, out)
    return out


@_impl
def rotary_(x, cos, sin, layout="half", conjugate=False):
    _check("rotary_", x, cos, sin, layout, conjugate)
    _tb().rotate(x, cos, sin, layout, conjugate, x)


@_impl
def rotary_out(x, cos, sin, layout="half", conjugate=False, *, out):
    _check("rotary_out", x, cos, sin, layout, conjugate, out)
    same = out.data_ptr() == x.data_ptr() and out.stride() == x.stride()
    _tb().rotate(x, cos, sin, layout, conjugate, x if same else out)


@_impl
def rotary_qk(q, k, cos, sin, layout="half", conjugate=False):
    _check("rotary_qk", q, k, cos, sin, layout, conjugate)
    return _tb().rotate_qk(q, k, cos, sin, layout, False, conjugate)


@_impl
def rotary_qk_(q, k, cos, sin, layout="half", conjugate=False):
    _check("rotary_qk_", q, k, cos, sin, layout, conjugate)
    _tb().rotate_qk(q, k, cos, sin, layout, True, conjugate)


def _gather(q, k, cos_table, sin_table, positions, format, layout, conjugate, inplace):
    tb = _tb()
    pos = tb.gather_positions(q, positions, format)
    tb.check_range_host(pos, cos_table.shape[0])  # CPU tensors only; CUDA: in the kernel
    return tb.rotate_qk_gather(q, k, cos_table, sin_table, pos, format, layout, inplace, conjugate)


@_impl
def rotary_gather(q, k, cos_table, sin_table, positions, format="bshd", layout="half", conjugate=False):
    _check("rotary_gather", q, k, cos_table, sin_table, positions, format, layout, conjugate)
    return _gather(q, k, cos_table, sin_table, positions, format, layout, conjugate, False)


@_impl
def rotary_gather_(q, k, cos_table, sin_table, positions, format="bshd", layout="half", conjugate=False):
    _check("rotary_gather_", q, k, cos_table, sin_table, positions, format, layout, conjugate)
    _gather(q, k, cos_table, sin_table, positions, format, layout, conjugate, True)


# --- per-head RMSNorm + rotation -------------------------------------------------------------


def _norm(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout, inplace, save):
    """The fused forward; 1-D q/k ([d]) are rotated as one row ([1, d])."""
    flat = q.dim() == 1 or k.dim() == 1
    if flat:
        q2, k2 = (q if q.dim() > 1 else q[None]), (k if k.dim() > 1 else k[None])
        qo, ko, (rq, rk) = _tb().qk_norm_rotate(q2, k2, q_weight, k_weight, cos, sin, eps, weight_offset, layout,
                                                 inplace, save)
        fix = (lambda t, x: t.view(x.shape) if t.dim() > x.dim() else t) if not inplace else (lambda t, x: x)
        qo, ko = fix(qo, q), fix(ko, k)
        if save:
            rq, rk = rq.reshape(q.shape[:-1]), rk.reshape(k.shape[:-1])
        return qo, ko, (rq, rk)
    return _tb().qk_norm_rotate(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout, inplace, save)


@_impl
def qk_norm_rotary(q, k, q_weight, k_weight, cos, sin, eps=1e-6, weight_offset=0.0, layout="half"):
    _check("qk_norm_rotary", q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout)
    qo, ko, _ = _norm(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout, False, False)
    return qo, ko


@_impl
def qk_norm_rotary_(q, k, q_weight, k_weight, cos, sin, eps=1e-6, weight_offset=0.0, layout="half"):
    _check("qk_norm_rotary_", q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout)
    _norm(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout, True, False)


@_impl
def qk_norm_rotary_fwd(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout):
    _check("qk_norm_rotary_fwd", q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout)
    qo, ko, (rq, rk) = _norm(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout, False, True)
    return qo, ko, rq, rk


@_impl
def qk_norm_rotary_fwd_(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout):
    _check("qk_norm_rotary_fwd_", q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout)
    _, _, (rq, rk) = _norm(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout, True, True)
    return rq, rk


@_impl
def qk_norm_rotary_bwd(grad_q, grad_k, q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin, weight_offset, layout):
    _check("qk_norm_rotary_bwd", grad_q, grad_k, q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin, weight_offset,
           layout)
    xs = [q if q.dim() > 1 or q.numel() == 0 else q[None], k if k.dim() > 1 or k.numel() == 0 else k[None]]
    gs = [g.reshape(x.shape) for g, x in zip((grad_q, grad_k), xs)]
    dq, dk, dqw, dkw = _tb().qk_norm_backward(gs, xs, (q_weight, k_weight), (q_rstd, k_rstd), cos, sin, weight_offset,
                                              layout)
    return dq.view(grad_q.shape), dk.view(grad_k.shape), dqw, dkw


# --- registration ------------------------------------------------------------------------------

def register_cuda_kernels() -> None:
    """Register every function of :data:`IMPLS` as the CUDA kernel of ``ropekit::<name>``
    (once per process; the ops must be defined: ``ropekit.ops`` loads them)."""
    register_cuda(IMPLS)
