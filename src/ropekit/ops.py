"""ropekit's compiled operators, ``torch.ops.ropekit.*`` (built from ``csrc/`` at install).

Loading this module registers the ops with PyTorch's dispatcher when the package was
installed with its extension (``pip install --no-build-isolation -e .`` with torch already
present and a C++ compiler). Without it, :data:`LOADED` is ``False``, :data:`REASON` says
why, and the ``cpu`` backend is not available (``backend="auto"`` warns once and runs
``eager``).

The ops (schemas in ``csrc/ops.cpp``), for CPU and Meta tensors, differentiable in ``x``/
``q``/``k`` (backward: the same op with the rotation conjugated)::

    rotary(x, cos, sin, layout="half", conjugate=False) -> Tensor
    rotary_(x!, cos, sin, layout, conjugate) -> ()               # in place
    rotary_out(x, cos, sin, layout, conjugate, *, out!) -> ()
    rotary_qk(q, k, cos, sin, layout, conjugate) -> (Tensor, Tensor)
    rotary_qk_(q!, k!, cos, sin, layout, conjugate) -> ()
    rotary_gather(q, k, cos_table, sin_table, positions, format, layout, conjugate) -> (Tensor, Tensor)
        # positions [s], [b, s] ([1, s]), [t] for thd, or [b] when s == 1 (one token per sample)
    rotary_gather_(q!, k!, cos_table, sin_table, positions, format, layout, conjugate) -> ()
    qk_norm_rotary(q, k, q_weight, k_weight, cos, sin, eps=1e-6, weight_offset=0.0, layout="half")
        -> (Tensor, Tensor)       # per-head RMSNorm then rotation, differentiable in q, k and both weights
    qk_norm_rotary_(q!, k!, q_weight, k_weight, cos, sin, eps, weight_offset, layout) -> ()
    qk_norm_rotary_fwd(...) -> (q', k', q_rstd, k_rstd)          # the forward with its saved inverse RMS
    qk_norm_rotary_fwd_(q!, k!, ...) -> (q_rstd, k_rstd)
    qk_norm_rotary_bwd(grad_q, grad_k, q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin, weight_offset, layout)
        -> (dq, dk, dq_weight, dk_weight)
    cpu_capability() -> str                                     # "default", "avx2" or "avx512"

The kernel is compiled for several instruction-set levels and the best one the CPU runs is
picked when the library loads; ``ROPEKIT_CPU_CAPABILITY=default|avx2|avx512`` (set before
the first call) forces a lower one. Every level gives the same bits.

Example:
    >>> import torch, ropekit
    >>> from ropekit import ops
    >>> if ops.LOADED:
    ...     q = torch.randn(1, 4, 2, 8)
    ...     cos, sin = ropekit.cos_sin(ropekit.RopeConfig(8), torch.arange(4))
    ...     y = torch.ops.ropekit.rotary(q, cos[:, None], sin[:, None])
    ...     assert y.shape == q.shape
"""

from __future__ import annotations

from typing import Optional

__all__ = ["LOADED", "REASON", "capability"]

try:
    from . import _C  # noqa: F401  (its static initialisers register torch.ops.ropekit.*)

    LOADED = True
    REASON: Optional[str] = None
except ImportError as e:  # installed without the extension (no compiler, or no torch at build time)
    LOADED = False
    REASON = f"ropekit._C was not built ({e})"


def _new_out(x):
    """The CPU kernel's output rule (``new_out`` in ``csrc/ops.cpp``)."""
    import torch

    keep = x.shape[-1] <= 1 or x.stride(-1) == 1
    return torch.empty_like(x, memory_format=torch.preserve_format if keep else torch.contiguous_format)


def _register_fakes() -> None:
    """Fake (Meta) kernels: the Python checks of the call, then empty outputs by the kernel's
    rule. In Python so that symbolic shapes (torch.compile with dynamic shapes, export) stay
    symbolic; they serve meta tensors too."""
    import torch

    from ._tensor_checks import check_apply, check_gather_fake, check_qk, check_qk_norm

    def rotary(x, cos, sin, layout="half", conjugate=False):
        check_apply(x, cos, sin, layout, False, None)
        return _new_out(x)

    def rotary_(x, cos, sin, layout="half", conjugate=False):
        check_apply(x, cos, sin, layout, False, None)

    def rotary_out(x, cos, sin, layout="half", conjugate=False, *, out):
        check_apply(x, cos, sin, layout, False, out)

    def rotary_qk(q, k, cos, sin, layout="half", conjugate=False):
        check_qk(q, k, cos, sin, layout, False)
        return _new_out(q), _new_out(k)

    def rotary_qk_(q, k, cos, sin, layout="half", conjugate=False):
        check_qk(q, k, cos, sin, layout, False)

    def rotary_gather(q, k, cos_table, sin_table, positions, format="bshd", layout="half", conjugate=False):
        check_gather_fake(q, k, cos_table, sin_table, positions, format, layout)
        return _new_out(q), _new_out(k)

    def rotary_gather_(q, k, cos_table, sin_table, positions, format="bshd", layout="half", conjugate=False):
        check_gather_fake(q, k, cos_table, sin_table, positions, format, layout)

    def _rstd(x):  # one inverse RMS per row, in the compute dtype
        return x.new_empty(x.shape[:-1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)

    def qk_norm_rotary(q, k, q_weight, k_weight, cos, sin, eps=1e-6, weight_offset=0.0, layout="half"):
        check_qk_norm(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout, False)
        return _new_out(q), _new_out(k)

    def qk_norm_rotary_(q, k, q_weight, k_weight, cos, sin, eps=1e-6, weight_offset=0.0, layout="half"):
        check_qk_norm(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout, False)

    def qk_norm_rotary_fwd(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout):
        check_qk_norm(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout, False)
        return _new_out(q), _new_out(k), _rstd(q), _rstd(k)

    def qk_norm_rotary_fwd_(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout):
        check_qk_norm(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout, False)
        return _rstd(q), _rstd(k)

    def qk_norm_rotary_bwd(grad_q, grad_k, q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin, weight_offset, layout):
        return _new_out(grad_q), _new_out(grad_k), q_weight.new_empty(q_weight.shape), k_weight.new_empty(k_weight.shape)

    for fn in (rotary, rotary_, rotary_out, rotary_qk, rotary_qk_, rotary_gather, rotary_gather_, qk_norm_rotary,
               qk_norm_rotary_, qk_norm_rotary_fwd, qk_norm_rotary_fwd_, qk_norm_rotary_bwd):
        torch.library.register_fake(f"ropekit::{fn.__name__}", fn)


if LOADED:
    _register_fakes()


def capability() -> Optional[str]:
    """The instruction-set level the CPU kernel runs at (``None`` without the extension)."""
    if not LOADED:
        return None
    import torch

    return torch.ops.ropekit.cpu_capability()
