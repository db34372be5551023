"""Backend registry.

A backend is a module declaring what it can do and exposing the same entry points::

    NAME: str
    CHECKS: bool          # its entry points are ropekit's ops, which validate their inputs
                          # (and position values) themselves; the torch-only backends call
                          # the same validator (ropekit.ops.check) before computing
    available() -> bool   # can it run on this machine at all
    supports(x) -> bool   # can it run on this tensor (device, dtype)
    apply(x, cos, sin, layout, conjugate, inplace, out) -> Tensor
    apply_qk(q, k, cos, sin, layout, conjugate, inplace) -> (Tensor, Tensor)
    apply_gather(q, k, cos_table, sin_table, positions, fmt, layout, conjugate, inplace) -> (Tensor, Tensor)
    apply_qk_norm(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout, inplace) -> (Tensor, Tensor)

and optionally, for :class:`ropekit.RotaryEmbedding`'s calls with ``[b]`` offsets (decode)::

    apply_offsets(q, k, cos_table, sin_table, offsets, head_dim, fmt, layout, conjugate, inplace)
        -> (Tensor, Tensor) or None   # apply_gather at offsets[i] + 0..s-1 in one step, or
                                      # None: the module's general path serves the call

The entry points handle autograd, graphs (torch.compile/export) and in place themselves:
the compiled ``cpu`` operators in C++ (``torch.ops.ropekit.*``). A backend that declares
only a primitive (``eager``, ``complex``, ``reference``, a registered plugin) gets them from
:mod:`ropekit.backends._generic` when the registry loads it, with these declarations::

    DIFFERENTIABLE: bool  # torch differentiates its ops (the reference's float64 matrix)
    TRACEABLE: bool       # graphs can trace its ops (else it is one opaque custom op there)
    FUSED_QK: bool        # has rotate_qk(q, k, cos, sin, layout, inplace)
    GATHER: bool          # has gather(xs, cos_table, sin_table, pos, fmt, layout, conjugate, inplace)
    QK_NORM: bool         # its apply_qk_norm is a fused kernel (else: the float32 norm in torch,
                          # then its apply_qk; see _generic.apply_qk_norm)
    rotate(x, cos, sin, layout, conjugate, out) -> Tensor

``rotate`` writes ``rot(x)`` (or ``rot(-θ)(x)`` when ``conjugate``) into ``out`` and
returns it. ``out`` has ``x``'s shape and dtype and may *be* ``x`` (in place); a backend
must read both lanes of a pair before writing either. ``cos``/``sin`` are half width and
broadcast to ``x.shape[:-1] + (r/2,)``; dims past ``r`` are copied unchanged when ``out``
is not ``x``.

Backends other than the torch-only ones (``eager``, ``cpu``, ``reference``, ``complex``) are
imported lazily, so ``import ropekit`` needs torch only.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, List

import torch

from .._errors import fail

__all__ = ["get", "names", "available", "resolve", "register"]

# name -> module path; imported on first use
_PATHS: Dict[str, str] = {
    "reference": "ropekit.backends.reference",
    "complex": "ropekit.backends.complex",
    "eager": "ropekit.backends.eager",
    "cpu": "ropekit.backends.cpu",
    "triton": "ropekit.backends.triton",
}
_LOADED: Dict[str, ModuleType] = {}


def register(name: str, module_path: str) -> None:
    """Register a backend by module path (imported on first use)."""
    _PATHS[name] = module_path
    _LOADED.pop(name, None)
    _AUTO.clear()


def names() -> List[str]:
    """All registered backend names, available on this machine or not."""
    return list(_PATHS)


def get(name: str) -> ModuleType:
    """The backend module ``name``; RopeError if unknown or unavailable here."""
    if not isinstance(name, str) or name not in _PATHS:
        raise fail(f'backend in {["auto", *_PATHS]}', repr(name), 'use backend="auto" to let ropekit choose')
    mod = _LOADED.get(name)
    if mod is None:
        try:
            mod = importlib.import_module(_PATHS[name])
        except ImportError as e:
            raise fail(
                f'backend "{name}" importable', f"ImportError: {e}", "install its extra (e.g. pip install ropekit[triton])"
            ) from None
        _complete(mod)
        _LOADED[name] = mod
    if not mod.available():
        raise fail(f'backend "{name}" available on this machine', "not available", 'use backend="auto" or "eager"')
    return mod


_DEFAULTS = {"CHECKS": False, "DIFFERENTIABLE": False, "TRACEABLE": False, "FUSED_QK": False, "GATHER": False,
             "QK_NORM": False}


def _complete(mod: ModuleType) -> None:
    """A registered backend that declares only the primitive (``NAME``, ``available``,
    ``supports``, ``rotate``) gets the defaults above and the shared entry points."""
    for key, value in _DEFAULTS.items():
        if not hasattr(mod, key):
            setattr(mod, key, value)
    from . import _generic

    if not mod.TRACEABLE:
        _generic._OPAQUE[mod.NAME] = mod  # graphs call it through one opaque custom op
    if not hasattr(mod, "apply"):
        mod.apply = lambda *a: _generic.apply(mod, *a)
        mod.apply_qk = lambda *a: _generic.apply_qk(mod, *a)
        mod.apply_gather = lambda *a: _generic.apply_gather(mod, *a)
    if not hasattr(mod, "apply_qk_norm"):
        mod.apply_qk_norm = lambda *a: _generic.apply_qk_norm(mod, *a)


# torch-only and light: loaded with the registry, so a first call inside a graph (torch.compile
# with fullgraph=True cannot trace an import) needs no import; triton stays lazy
for _n in ("eager", "cpu", "reference", "complex"):
    _LOADED[_n] = importlib.import_module(_PATHS[_n])
    _complete(_LOADED[_n])

from .. import ops as _ops  # noqa: E402

if _ops.LOADED:  # the Triton kernels as the CUDA kernels of torch.ops.ropekit.* (triton itself imported lazily)
    from . import _triton_ops  # noqa: E402

    _triton_ops.register_cuda_kernels()
    from . import _triton_cache  # noqa: E402  (rotary_cache_: RoPE fused with the KV-cache write)

    _triton_cache.register_cuda_kernels()


def available() -> List[str]:
    """Names of the backends that can run on this machine."""
    out = []
    for n in _PATHS:
        try:
            get(n)
        except ValueError:
            continue
        out.append(n)
    return out


_AUTO: Dict[tuple, ModuleType] = {}  # (device type, dtype) -> the "auto" choice
_WARNED: set = set()


def _auto(x: torch.Tensor) -> ModuleType:
    if torch.compiler.is_compiling():
        # a graph: no imports, no warnings; the modules loaded so far (eager and cpu always are)
        for n in (("triton",) if x.is_cuda else ("cpu",) if x.device.type in ("cpu", "meta") else ()) + ("eager",):
            mod = _LOADED.get(n)
            if mod is not None and mod.available() and mod.supports(x):
                return mod
        return _LOADED["eager"]
    prefs = ("triton", "eager") if x.is_cuda else ("cpu", "eager") if x.device.type in ("cpu", "meta") else ("eager",)
    for n in prefs:
        if n not in _PATHS:
            continue
        try:
            mod = get(n)
        except ValueError as e:
            if n == "cpu" and n not in _WARNED:
                _WARNED.add(n)
                import warnings

                warnings.warn(
                    f"ropekit: the compiled cpu operators are not available ({e}); CPU tensors run the eager "
                    "backend (same results up to float32 rounding, slower). Reinstall with a C++ compiler: "
                    "pip install --no-build-isolation -e .",
                    RuntimeWarning,
                    stacklevel=4,
                )
            continue
        if mod.supports(x):
            return mod
    return get("eager")


def resolve(name: str, x: torch.Tensor) -> ModuleType:
    """Pick the backend for ``x``. ``"auto"``: triton on CUDA, the compiled ``cpu`` operators
    on CPU, else eager; each only when it is available and supports ``x`` (the choice is
    made once per device type and dtype)."""
    if name == "auto":
        key = ("cpu" if x.is_cpu else x.device.type, x.dtype)  # is_cpu: ~60 ns, device.type: ~380
        mod = _AUTO.get(key)
        if mod is None:
            mod = _auto(x)
            if not torch.compiler.is_compiling():
                _AUTO[key] = mod
        return mod
    mod = get(name)
    if not mod.supports(x):
        raise fail(
            f'a tensor backend "{name}" supports',
            f"{x.dtype} on {x.device}",
            'use backend="auto" (or "eager", which runs everywhere)',
        )
    return mod
