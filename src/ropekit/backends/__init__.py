"""Backend registry.

A backend is a module exposing::

    NAME: str
    available() -> bool                      # can it run on this machine at all
    supports(x: Tensor) -> bool              # can it run on this tensor (device, dtype)
    rotate(x, cos, sin, layout, conjugate, out) -> Tensor

``rotate`` writes ``rot(x)`` (or ``rot(-θ)(x)`` when ``conjugate``) into ``out`` and
returns it. ``out`` has ``x``'s shape and dtype and may *be* ``x`` (in place); a backend
must read both lanes of a pair before writing either. ``cos``/``sin`` are half width and
broadcast to ``x.shape[:-1] + (r/2,)``; dims past ``r`` are copied unchanged when ``out``
is not ``x``. Backends are called without autograd (``ropekit.functional`` wraps them),
except those with ``DIFFERENTIABLE = True`` (the reference), whose ops torch differentiates.

Backends are imported lazily so ``import ropekit`` needs torch only.
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
    "reference": "ropekit.reference",
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


def names() -> List[str]:
    """All registered backend names, available on this machine or not."""
    return list(_PATHS)


def get(name: str) -> ModuleType:
    """The backend module ``name``; RopeError if unknown or unavailable here."""
    if name not in _PATHS:
        raise fail(f'backend in {["auto", *_PATHS]}', repr(name), 'use backend="auto" to let ropekit choose')
    mod = _LOADED.get(name)
    if mod is None:
        try:
            mod = importlib.import_module(_PATHS[name])
        except ImportError as e:
            raise fail(
                f'backend "{name}" importable', f"ImportError: {e}", "install its extra (e.g. pip install ropekit[triton])"
            ) from None
        _LOADED[name] = mod
    if not mod.available():
        raise fail(f'backend "{name}" available on this machine', "not available", 'use backend="auto" or "eager"')
    return mod


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


def resolve(name: str, x: torch.Tensor) -> ModuleType:
    """Pick the backend for ``x``. ``"auto"``: triton on CUDA, the fast CPU path on CPU,
    else eager; each only when it is available and supports ``x``."""
    if name != "auto":
        mod = get(name)
        if not mod.supports(x):
            raise fail(
                f'a tensor backend "{name}" supports',
                f"{x.dtype} on {x.device}",
                'use backend="auto" (or "eager", which runs everywhere)',
            )
        return mod
    prefs = ("triton", "eager") if x.is_cuda else ("cpu", "eager") if x.device.type == "cpu" else ("eager",)
    for n in prefs:
        if n not in _PATHS:
            continue
        try:
            mod = get(n)
        except ValueError:
            continue
        if mod.supports(x):
            return mod
    return get("eager")
