"""The CUDA kernel of ``ropekit::rotary_cache_`` (RoPE fused with the KV-cache write), in Triton.

:func:`rotary_cache_` has the op's schema (``csrc/ops.cpp``); :func:`register_cuda_kernels`
registers it at the ``CUDA`` dispatch key beside the C++ CPU kernel (called from
``ropekit.backends`` next to the other Triton ops). It runs the op's one validator
(``ropekit.ops.check("rotary_cache_", ...)``), then one launch of
:mod:`ropekit.backends._triton_cache_kernels` (Triton imported only then). The op's autograd
(C++, device-generic) refuses inputs that require grad, so nothing here knows about gradients.

Values: on CUDA, a position outside the table or a slot past the cache fails a device-side
assert in the kernel, and a slot given twice fails ``torch._assert_async`` — no host sync
(CUDA-graph safe). CPU tensors (``TRITON_INTERPRET=1``, the tests) are checked on the host
with the CPU op's RopeErrors. Bits: float32/float16/bfloat16/float64 results equal the CPU
op's (``enable_fp_fusion=False``; bf16 rounded to nearest even in the kernel).

Example:
    >>> from ropekit.backends import _triton_cache
    >>> sorted(_triton_cache.IMPLS)
    ['rotary_cache_']
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional

import torch

from .._errors import fail
from ._triton_mode import register_cuda

__all__ = ["IMPLS", "register_cuda_kernels", "rotary_cache_"]

IMPLS: Dict[str, Callable] = {}
_BH_MAX = 16  # heads per program (they share one cos/sin row load)


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _launch_kernel(grid, device: torch.device, *args, **kwargs) -> None:
    """``rope_cache_kernel[grid](...)`` with FMA contraction off (the CPU op's rounding); the
    CUDA device guard only for CUDA tensors. tests/test_triton_cache.py replaces this to
    record launches for the ahead-of-time compile."""
    from . import _triton_cache_kernels as K

    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        K.rope_cache_kernel[grid](*args, enable_fp_fusion=False, **kwargs)


def _device_side_checks(t: torch.Tensor) -> bool:
    """Values checked on the device (CUDA) instead of on the host (interpreter on CPU)."""
    return t.is_cuda


def _check_values_host(pos: torch.Tensor, sl: torch.Tensor, n: int, nslots: int) -> None:
    """The CPU op's value checks (RopeError), for CPU tensors under the interpreter."""
    if pos.numel():
        lo, hi = (int(x) for x in torch.aminmax(pos))
        if lo < 0 or hi >= n:
            raise fail(f"positions in [0, {n}) (the table length)", f"positions from {lo} to {hi}",
                       "grow the tables (RotaryEmbedding.tables(max_position + 1)) or fix the positions")
    if sl.numel():
        big = (sl >= nslots).nonzero()
        if big.numel():
            t = int(big[0, 0])
            raise fail(f"slots below num_blocks * block_size = {nslots} (negative: not written)",
                       f"slot {int(sl[t])} for token {t}", "allocate more blocks or fix the block table")
        used = torch.sort(sl[sl >= 0]).values
        dup = (used[1:] == used[:-1]).nonzero()
        if dup.numel():
            raise fail("slots that differ within one call (each token its own cache slot)",
                       f"slot {int(used[int(dup[0, 0])])} twice",
                       "give every written token its own slot (padding tokens: slot -1)")


def _check_values_device(sl: torch.Tensor) -> None:
    """A slot given twice fails an asynchronous device assert (no host sync)."""
    if sl.numel() > 1:
        used = torch.sort(sl).values
        torch._assert_async(~((used[1:] == used[:-1]) & (used[1:] >= 0)).any(), "ropekit: a cache slot given twice")


def _tokens(x: torch.Tensor, staged: list) -> torch.Tensor:
    """``x [..., h, d]`` as a ``[t, h, d]`` view with unit last stride, else a contiguous copy
    (recorded in ``staged`` to be copied back when ``x`` is written)."""
    t = 1
    for n in x.shape[:-2]:
        t *= n
    try:
        v = x.view(t, *x.shape[-2:])
        if v.shape[-1] <= 1 or v.stride(-1) == 1:
            return v
    except RuntimeError:
        pass
    c = x.reshape(t, *x.shape[-2:]).contiguous()
    staged.append((c, x))
    return c


def _cache_strides(c: Optional[torch.Tensor], hnd: bool):
    """(block, offset, head) strides of a cache."""
    if c is None:
        return 0, 0, 0
    s = c.stride()
    return (s[0], s[2], s[1]) if hnd else (s[0], s[1], s[2])


def _launch(q, k, ct, st, pos, kc, sl, v, vc, ko, hnd, interleaved, heads_q=True, heads_k=True):
    T, hq, d = q.shape
    hk = k.shape[1]
    hq, hk = (hq if heads_q else 0), (hk if heads_k else 0)
    hv = 0 if v is None or not heads_k else v.shape[1]
    if T == 0 or hq + hk + hv == 0:
        return
    f64 = (q if heads_q else k).dtype == torch.float64
    cdt = torch.float64 if f64 else torch.float32
    ct, st = ct.to(cdt).contiguous(), st.to(cdt).contiguous()  # [n, r/2]: the CPU op's compute tables
    r2 = ct.shape[1]
    bs = kc.shape[2 if hnd else 1]
    bh = min(_pow2(max(hq, hk, hv)), _BH_MAX)
    nbq, nbk, nbv = -(-hq // bh), -(-hk // bh), -(-hv // bh)
    tail = d - 2 * r2
    dv = v.shape[2] if hv else 1
    check = _device_side_checks(q)
    dbg = {"debug": True, "sanitize_overflow": False} if check else {}
    _launch_kernel(
        (T, nbq + nbk + nbv), q.device,
        # an unused q/k pointer (no heads of it in this launch) is given the other tensor: never dereferenced
        q if hq else k, k if hk else q, v if hv else None, kc, vc if hv else None,
        ko if (ko is not None and hk) else None, ct, st, pos, sl,
        hq, hk, hv, nbq, nbk, bs, kc.shape[0] * bs, ct.shape[0],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0) if hv else 0, v.stride(1) if hv else 0,
        *_cache_strides(kc, hnd), *_cache_strides(vc if hv else None, hnd),
        ko.stride(0) if ko is not None else 0, ko.stride(1) if ko is not None else 0,
        R2=r2, D=d, DV=dv, R2P=_pow2(r2), TAIL=_pow2(tail) if tail > 0 else 0, DVP=_pow2(dv), BH=bh,
        INTERLEAVED=interleaved, F64=f64, HAS_V=hv > 0, HAS_KO=ko is not None and hk > 0, CHECK=check,
        **dbg,
    )  # fmt: skip


def _impl(fn: Callable) -> Callable:
    IMPLS[fn.__name__] = fn
    return fn


@_impl
def rotary_cache_(q, k, cos_table, sin_table, positions, k_cache, slots, v=None, v_cache=None, k_out=None,
                  cache_layout="nhd", layout="half"):
    from .. import ops

    ops.check("rotary_cache_", q, k, cos_table, sin_table, positions, k_cache, slots, v, v_cache, k_out, cache_layout,
              layout)
    hnd = cache_layout == "hnd"
    pos = positions.reshape(-1).to(torch.int64).contiguous()  # [t]
    sl = slots.reshape(-1).to(torch.int64).contiguous()  # [t]
    nslots = k_cache.shape[0] * k_cache.shape[2 if hnd else 1]
    if _device_side_checks(q):
        _check_values_device(sl)
    else:
        _check_values_host(pos, sl, cos_table.shape[0], nslots)
    staged: list = []
    q3, k3 = _tokens(q, staged), _tokens(k, [])
    v3 = _tokens(v, []) if v is not None else None
    ko3 = _tokens(k_out, staged) if k_out is not None else None
    il = layout == "interleaved"
    if (q.dtype == torch.float64) == (k.dtype == torch.float64):
        _launch(q3, k3, cos_table, sin_table, pos, k_cache, sl, v3, v_cache, ko3, hnd, il)
    else:  # q and k of different compute dtypes: one launch each
        _launch(q3, k3, cos_table, sin_table, pos, k_cache, sl, v3, v_cache, ko3, hnd, il, heads_k=False)
        _launch(q3, k3, cos_table, sin_table, pos, k_cache, sl, v3, v_cache, ko3, hnd, il, heads_q=False)
    for c, x in staged:
        x.copy_(c.view(x.shape))


def register_cuda_kernels() -> None:
    """Register :data:`IMPLS` as the CUDA kernels of ``ropekit::<name>`` (once per process)."""
    register_cuda(IMPLS)
