"""What the public API checks of its arguments before an op sees them: Python types, flags,
the numbers of the fused norm, and the error conversion of an op's refusal.

The rules for tensors (dtypes, devices, shapes, strides, aliasing) are not here: each op has
one validator (``csrc/ops.cpp``, reached from Python through :func:`ropekit.ops.check`) that
every path applies — the compiled kernels, the fake kernels, and the torch-only backends.
"""

from __future__ import annotations

import math

import torch
from torch.autograd import forward_ad as _fwad

from ._checks import flag
from ._errors import RopeError, fail

__all__ = ["tracing", "tensors", "flags", "check_norm_scalars", "to_rope_error"]


def tracing() -> bool:
    """True while torch.compile / torch.export trace the caller (then no host syncs)."""
    return torch.compiler.is_compiling()


def dual(*ts) -> bool:
    """Whether any of ``ts`` is a forward-mode AD dual tensor (``torch.autograd.forward_ad``):
    ~70 ns outside a ``dual_level`` (a module global), the tangents looked up inside one."""
    if _fwad._current_level < 0:
        return False
    return any(isinstance(t, torch.Tensor) and _fwad.unpack_dual(t).tangent is not None for t in ts)


def host_readable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read on the host now: not while torch.compile /
    torch.export trace, not under ``make_fx``'s proxy or fake tensors (``torch.func.linearize``),
    not a tensor ``torch.func.vmap`` batches. (Only at the few places that read positions:
    ~0.3 µs; the hot paths check :func:`tracing` alone.)"""
    if tracing() or t.device.type == "meta":
        return False
    F = torch._C._functorch
    u = t
    while F.is_functorch_wrapped_tensor(u):
        if F.is_batchedtensor(u):
            return False
        u = F.get_unwrapped(u)
    K = torch._C._TorchDispatchModeKey
    return torch._C._get_dispatch_mode(K.PROXY) is None and torch._C._get_dispatch_mode(K.FAKE) is None


def tensors(**named) -> None:
    """Each named argument is a ``torch.Tensor`` (RopeError otherwise: a list is not a tensor)."""
    for nm, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise fail(f"{nm} a torch.Tensor", type(t).__name__, f"convert {nm} with torch.as_tensor")


def flags(**named) -> None:
    """Each named flag is a bool (``"false"`` is not False; NumPy bools pass)."""
    for nm, v in named.items():
        if v is not True and v is not False:
            flag(nm, v)


def check_norm_scalars(eps, weight_offset):
    """``(eps, weight_offset)`` as floats: eps finite and >= 0, the offset finite (RopeError
    otherwise: a bool or a string is not a number). Plain floats pass without a call."""
    if type(eps) is float and type(weight_offset) is float and 0.0 <= eps < _INF and -_INF < weight_offset < _INF:
        return eps, weight_offset
    from ._checks import real

    if not (type(eps) is float and 0.0 <= eps < _INF):
        eps = real("eps", eps, minimum=0.0, fix="pass the norm's epsilon, e.g. eps=1e-6")
    if not (type(weight_offset) is float and -_INF < weight_offset < _INF):
        weight_offset = real("weight_offset", weight_offset, fix="pass 0.0 (y = x̂·w) or 1.0 (Gemma: y = x̂·(1 + w))")
    return eps, weight_offset


_INF = math.inf


def to_rope_error(err: Exception) -> Exception:
    """The RopeError for an op's refusal (``ValueError("ropekit: expected ..., got .... Fix:
    ...")``) or an allocation torch could not make; any other exception is returned as is
    (a bug, not bad input)."""
    if isinstance(err, RopeError):
        return err
    if isinstance(err, ValueError):
        from .ops import rope_error

        return rope_error(err)
    msg = str(err)
    if isinstance(err, RuntimeError) and ("alloc" in msg.lower() or "out of memory" in msg.lower()):
        return fail("an output that fits in memory", msg.split("\n")[0],
                    "pass smaller tensors, or write in place (inplace=True) instead of allocating")
    return err
