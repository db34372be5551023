"""The Triton kernel of ``ropekit::rotary_cache_`` (imported only by
:mod:`ropekit.backends._triton_cache`, when a kernel runs: ``import ropekit`` needs torch only).

``rope_cache_kernel`` rotates q in place and k into the KV cache (and copies v) for one
token per program on grid axis 0 (not capped at 65535); axis 1 walks head blocks of q, then
of k, then of v, so no program mixes them:

    grid = (t, cdiv(hq, BH) + cdiv(hk, BH) + cdiv(hv, BH))

q/k/v are ``[t, h, d]`` views (any token/head strides, unit last stride); caches are
addressed by (block, offset, head) strides, so NHD and HND (and K/V halves of a packed
buffer) are the same kernel. Properties a reviewer can check by reading it:

1. the token index, slot and every offset are int64 before any stride multiply;
2. ``R2``/``D``/``DV`` are compile-time constants; rows are loaded contiguously;
3. interleaved pairs: one contiguous load of ``2*R2P`` columns reshaped to ``[BH, R2P, 2]``;
   half: two loads of the same shape;
4. both lanes are in registers before any store (q is rotated in place);
5. the cos/sin row of the token is loaded once per program and reused by ``BH`` heads;
6. float32 math (float64 for float64), one rounding at the store — bfloat16 rounded to
   nearest even explicitly (the same bits on the GPU and under ``TRITON_INTERPRET=1``, whose
   cast truncates) and computed NaNs stored as the canonical quiet NaN, as the CPU kernel;
7. column masks use the real ``R2``/``D``; the pass-through tail ``[r, d)`` of k is copied
   into the cache by the same program;
8. a negative slot masks the cache stores (padding); out-of-range positions/slots fail a
   device-side assert on CUDA (``CHECK``) and are never dereferenced;
9. launched with ``enable_fp_fusion=False``: no ``fma.rn`` (tests/test_triton_cache_aot.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_kernels import _to_cdt  # the compute dtype (float64 when F64, else float32)

__all__ = ["rope_cache_kernel"]


@triton.jit
def _cast_store(ptr, off, y, mask, F64: tl.constexpr):
    """Store compute-dtype ``y`` at ``ptr + off``, rounded once to the pointer's dtype
    (round to nearest even; NaN -> the canonical quiet NaN of that dtype)."""
    ty = ptr.dtype.element_ty
    if F64:
        y = tl.where(y != y, float("nan"), y)
        tl.store(ptr + off, y.to(ty), mask=mask)
    elif ty == tl.bfloat16:
        b = y.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(y != y, 0x7FC0, r)
        tl.store(ptr + off, r.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    elif ty == tl.float16:
        h = y.to(tl.float16).to(tl.uint16, bitcast=True)
        h = tl.where(y != y, 0x7E00, h.to(tl.uint32)).to(tl.uint16)
        tl.store(ptr + off, h.to(tl.float16, bitcast=True), mask=mask)
    else:
        b = tl.where(y != y, 0x7FC00000, y.to(tl.uint32, bitcast=True))
        tl.store(ptr + off, b.to(tl.float32, bitcast=True), mask=mask)


@triton.jit
def _load_pair(src, xrow, rows, R2: tl.constexpr, R2P: tl.constexpr, BH: tl.constexpr, INTERLEAVED: tl.constexpr,
               F64: tl.constexpr):
    """The two lanes ``[BH, R2P]`` of the rows at ``src + xrow`` [BH] (compute dtype)."""
    if INTERLEAVED:
        c2 = tl.arange(0, 2 * R2P)
        m2 = rows[:, None] & (c2 < 2 * R2)[None, :]
        x = _to_cdt(tl.load(src + xrow[:, None] + c2[None, :], mask=m2, other=0.0), F64)
        x1, x2 = tl.split(tl.reshape(x, (BH, R2P, 2)))  # [BH, R2P] each
    else:
        col = tl.arange(0, R2P)
        m = rows[:, None] & (col < R2)[None, :]
        xo = xrow[:, None] + col[None, :]
        x1 = _to_cdt(tl.load(src + xo, mask=m, other=0.0), F64)
        x2 = _to_cdt(tl.load(src + xo + R2, mask=m, other=0.0), F64)
    return x1, x2


@triton.jit
def _store_pair(dst, orow, rows, y1, y2, R2: tl.constexpr, R2P: tl.constexpr, BH: tl.constexpr,
                INTERLEAVED: tl.constexpr, F64: tl.constexpr):
    """Store the lanes of :func:`_load_pair` at ``dst + orow`` [BH] (real columns only)."""
    if INTERLEAVED:
        c2 = tl.arange(0, 2 * R2P)
        m2 = rows[:, None] & (c2 < 2 * R2)[None, :]
        _cast_store(dst, orow[:, None] + c2[None, :], tl.reshape(tl.join(y1, y2), (BH, 2 * R2P)), m2, F64)
    else:
        col = tl.arange(0, R2P)
        m = rows[:, None] & (col < R2)[None, :]
        oo = orow[:, None] + col[None, :]
        _cast_store(dst, oo, y1, m, F64)
        _cast_store(dst, oo + R2, y2, m, F64)


@triton.jit
def rope_cache_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, ko_ptr, ct_ptr, st_ptr, pos_ptr, slot_ptr,
    HQ, HK, HV, NBQ, NBK, BS, NSLOTS, NROWS,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,
    skc_b, skc_o, skc_h, svc_b, svc_o, svc_h, sko_t, sko_h,
    R2: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, R2P: tl.constexpr, TAIL: tl.constexpr,
    DVP: tl.constexpr, BH: tl.constexpr, INTERLEAVED: tl.constexpr, F64: tl.constexpr,
    HAS_V: tl.constexpr, HAS_KO: tl.constexpr, CHECK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)  # one token per program; int64 before any multiply
    pid = tl.program_id(1)
    p = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if CHECK:
        tl.device_assert((p >= 0) & (p < NROWS), "ropekit: a position outside the cos/sin table")
        tl.device_assert(slot < NSLOTS, "ropekit: a cache slot past num_blocks * block_size")
    p = tl.where((p >= 0) & (p < NROWS), p, 0)  # never read outside the table
    hh = tl.arange(0, BH).to(tl.int64)
    slot_b = hh * 0 + slot  # [BH]
    write = (slot_b >= 0) & (slot_b < NSLOTS)  # [BH]; a negative slot (padding) is not written
    sl = tl.where((slot >= 0) & (slot < NSLOTS), slot, 0)
    kc_row = kc_ptr + (sl // BS) * skc_b + (sl % BS) * skc_o
    col = tl.arange(0, R2P)
    cm = col < R2
    if pid < NBQ:  # q heads, rotated in place
        h = pid.to(tl.int64) * BH + hh
        rows = h < HQ
        c = _to_cdt(tl.load(ct_ptr + p * R2 + col, mask=cm, other=0.0), F64)[None, :]  # [1, R2P]: shared by BH heads
        s = _to_cdt(tl.load(st_ptr + p * R2 + col, mask=cm, other=0.0), F64)[None, :]
        src = q_ptr + t * sq_t
        x1, x2 = _load_pair(src, h * sq_h, rows, R2, R2P, BH, INTERLEAVED, F64)
        y1 = x1 * c - x2 * s  # both lanes loaded before the store (in place)
        y2 = x2 * c + x1 * s
        _store_pair(src, h * sq_h, rows, y1, y2, R2, R2P, BH, INTERLEAVED, F64)
    elif pid < NBQ + NBK:  # k heads, rotated into the cache slot (and k_out)
        h = (pid - NBQ).to(tl.int64) * BH + hh
        rows = h < HK
        c = _to_cdt(tl.load(ct_ptr + p * R2 + col, mask=cm, other=0.0), F64)[None, :]
        s = _to_cdt(tl.load(st_ptr + p * R2 + col, mask=cm, other=0.0), F64)[None, :]
        src = k_ptr + t * sk_t
        x1, x2 = _load_pair(src, h * sk_h, rows, R2, R2P, BH, INTERLEAVED, F64)
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
        _store_pair(kc_row, h * skc_h, rows & write, y1, y2, R2, R2P, BH, INTERLEAVED, F64)
        if HAS_KO:
            _store_pair(ko_ptr + t * sko_t, h * sko_h, rows, y1, y2, R2, R2P, BH, INTERLEAVED, F64)
        if TAIL > 0:  # pass-through dims [r, d), copied bit for bit by the same program
            tc = 2 * R2 + tl.arange(0, TAIL)
            tm = rows[:, None] & (tc < D)[None, :]
            tv = tl.load(src + (h * sk_h)[:, None] + tc[None, :], mask=tm)
            tl.store(kc_row + (h * skc_h)[:, None] + tc[None, :], tv, mask=tm & write[:, None])
            if HAS_KO:
                tl.store(ko_ptr + t * sko_t + (h * sko_h)[:, None] + tc[None, :], tv, mask=tm)
    else:
        if HAS_V:  # v heads, copied to the same slot
            h = (pid - NBQ - NBK).to(tl.int64) * BH + hh
            dc = tl.arange(0, DVP)
            vm = (h < HV)[:, None] & (dc < DV)[None, :]
            vv = tl.load(v_ptr + t * sv_t + (h * sv_h)[:, None] + dc[None, :], mask=vm)
            vc_row = vc_ptr + (sl // BS) * svc_b + (sl % BS) * svc_o
            tl.store(vc_row + (h * svc_h)[:, None] + dc[None, :], vv, mask=vm & write[:, None])
