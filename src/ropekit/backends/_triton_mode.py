"""The table of the Triton op impls and the dispatch mode that runs them on CPU tensors.

A leaf module (torch only): :mod:`ropekit.backends._triton_ops` fills :data:`IMPLS` with its
impls (one per ``torch.ops.ropekit`` op, registered at the CUDA key there), and the backend's
entry points (:mod:`ropekit.backends.triton`) enter :func:`on_triton` so that the ops on CPU
tensors run those impls under ``TRITON_INTERPRET=1``. Kept apart so that neither of those two
modules imports the other's users (no import cycle).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["IMPLS", "on_triton"]

IMPLS: Dict[str, Callable] = {}  # op name -> Triton impl (filled by ropekit.backends._triton_ops)


class _OnTriton(TorchDispatchMode):
    """``torch.ops.ropekit.*`` on CPU tensors run the Triton impls (TRITON_INTERPRET=1) instead
    of the C++ CPU kernel. Below autograd: the ops' own autograd runs first, as on CUDA."""

    supports_higher_order_operators = True  # auto_functionalized (opcheck's aot test) passes through

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        ns, _, name = func.name().partition("::")
        impl = IMPLS.get(name) if ns == "ropekit" else None
        # plain CPU tensors only: fake/functional tensors (opcheck, graphs) take the op's own path
        if impl is not None and all(type(a) is torch.Tensor and a.device.type == "cpu"
                                    for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)):
            return impl(*args, **kwargs)
        return func(*args, **kwargs)


def on_triton(*tensors):
    """A context in which ropekit's ops on these CPU tensors run the Triton kernels (under the
    interpreter); a no-op for CUDA tensors (already theirs), in graphs and when already active."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    if torch.compiler.is_compiling() or not any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors):
        return contextlib.nullcontext()
    if any(isinstance(m, _OnTriton) for m in _get_current_dispatch_mode_stack()):
        return contextlib.nullcontext()
    return _OnTriton()


_CUDA_REGISTERED: set = set()


def register_cuda(impls: Dict[str, Callable]) -> None:
    """Register each ``impls[name]`` as the CUDA kernel of ``ropekit::<name>``, once per process
    (the ops must be defined: ``ropekit.ops`` loads them)."""
    for name, fn in impls.items():
        if name not in _CUDA_REGISTERED:
            torch.library.impl(f"ropekit::{name}", "CUDA", fn)
            _CUDA_REGISTERED.add(name)
