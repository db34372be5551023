"""Independent oracles shared by the tests (kept tiny and obviously correct)."""

from __future__ import annotations

import math
from typing import Optional

import torch


def inv_freq64(r: int, base: float = 10000.0) -> torch.Tensor:
    """θ_i = base^(-2i/r), i = 0 .. r/2-1, straight from RoFormer eq. 15, in float64."""
    return torch.tensor([base ** (-2.0 * i / r) for i in range(r // 2)], dtype=torch.float64)


def rope_token(x: torch.Tensor, pos: int, r: int, layout: str, base: float = 10000.0) -> torch.Tensor:
    """Rotate one vector ``x [d]`` at integer ``pos`` with Python-float math per pair (float64)."""
    x = x.double().clone()
    y = x.clone()
    for i in range(r // 2):
        a, b = (i, i + r // 2) if layout == "half" else (2 * i, 2 * i + 1)
        ang = pos * base ** (-2.0 * i / r)
        c, s = math.cos(ang), math.sin(ang)
        y[a] = x[a] * c - x[b] * s
        y[b] = x[a] * s + x[b] * c
    return y


def rope_bshd(x: torch.Tensor, pos: torch.Tensor, r: int, layout: str, base: float = 10000.0) -> torch.Tensor:
    """Oracle for ``x [b, s, h, d]`` with positions ``[b, s]``: float64 result."""
    out = torch.empty(x.shape, dtype=torch.float64)
    b, s, h, _ = x.shape
    inv = inv_freq64(r, base)
    for bi in range(b):
        for si in range(s):
            ang = float(pos[bi, si]) * inv  # [r/2]
            c, sn = torch.cos(ang), torch.sin(ang)
            xv = x[bi, si].double()  # [h, d]
            if layout == "half":
                i1, i2 = torch.arange(r // 2), torch.arange(r // 2) + r // 2
            else:
                i1, i2 = torch.arange(0, r, 2), torch.arange(1, r, 2)
            y = xv.clone()
            y[:, i1] = xv[:, i1] * c - xv[:, i2] * sn
            y[:, i2] = xv[:, i1] * sn + xv[:, i2] * c
            out[bi, si] = y
    return out


def backward_for_mode(mode: str, qo: torch.Tensor, ko: torch.Tensor, gq: torch.Tensor, gk: torch.Tensor, q, k):
    """Run the backward of one of the fused-gather gradient cases and return the upstream
    gradients ``(want_q, want_k)`` that reached the rotation (``None``: no gradient for k).

    ``"q_only"``: only q's output is used; ``"both_sum"``: ``.sum()`` of both (expanded,
    zero-stride gradients); otherwise random gradients with k not requiring grad.
    """
    if mode == "q_only":
        qo.sum().backward()
        return torch.ones_like(q), None
    if mode == "both_sum":
        (qo.sum() + ko.sum()).backward()
        return torch.ones_like(q), torch.ones_like(k)
    ((qo * gq).sum() + (ko * gk).sum()).backward()
    return gq, None


def triton_on_cpu(dev: str, test_name: str):
    """On CPU the ops' own kernel is C++: a context in which the ops on CPU tensors run the Triton
    impls instead, under the interpreter (the CUDA dispatch key's functions,
    ropekit.backends._triton_ops), backward included. On CUDA they are the registered kernels;
    graphs (tests named ``*torch_compile*``) run the op's CPU kernel on CPU."""
    import contextlib

    if dev != "cpu" or "torch_compile" in test_name:
        return contextlib.nullcontext()
    from ropekit.backends import _triton_ops

    return _triton_ops._OnTriton()


def run_at_level(code: str, level: str, timeout: int = 600, env: Optional[dict] = None) -> dict:
    """Run ``code`` (a script whose last stdout line is JSON) in a fresh Python process with
    ``ROPEKIT_CPU_CAPABILITY=level`` (and the variables in ``env``); returns that JSON."""
    import json
    import os
    import subprocess
    import sys

    full = dict(os.environ, ROPEKIT_CPU_CAPABILITY=level, **(env or {}))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
