"""The fused RoPE Triton kernels (imported only by :mod:`ropekit.backends.triton`).

``rope_kernel`` covers every rotation entry point (``rotate``, ``rotate_qk``,
``rotate_qk_gather`` and their backward); ``qk_norm_fwd_kernel`` / ``qk_norm_bwd_kernel``
(per-head RMSNorm + RoPE, at the end of this file) use the same views and grid. The
launcher hands ``rope_kernel`` canonical 4-D views

    x  [m0, m1, h, d]   any strides, last-dim stride 1
    cos/sin: either broadcast views [m0, m1, h|1, r/2] (GATHER=False)
             or tables [n, r/2] read at row ``pos[m0, m1]`` (GATHER=True)

with two tensor groups "a" (e.g. q, ``ha`` heads) and "b" (e.g. k, ``hb`` heads, or none):

    grid = (cdiv(m0 * m1, BT), cdiv(ha, BH) + cdiv(hb, BH))

Axis 0 walks token tiles (it is the only axis not capped at 65535); axis 1 walks head
blocks, those of q first, then those of k, so no tile mixes q and k. A program loads the
cos/sin rows of its ``BT`` tokens once (``r/2`` columns) and reuses them for ``BH`` heads.

Properties a reviewer can check by reading the kernel:
 1. token/head indices are int64 before any stride multiply;
 2. ``R2``/``D`` are compile-time constants, x rows are loaded contiguously (no strided gathers);
 3. interleaved: one contiguous load of ``2*R2P`` columns, reshaped to ``[.., R2P, 2]`` and split;
    half: two loads of the same shape;
 4. both lanes are loaded before the store (safe in place);
 5. cos/sin loaded once per (token tile, head block), ``BH`` up to 16 heads;
 6. arithmetic in float32 (float64 when ``F64``), one cast at the store;
 7. column masks use the real ``R2``/``D`` (padded lanes are never stored);
 10. the pass-through tail ``[r, d)`` is copied by the same program when out of place;
 14. no autotuning (the kernel may mutate its input);
 16. launched with ``enable_fp_fusion=False``: ``x1*c - x2*s`` rounds both products, as the
     CPU operator does (no ``fma.rn``), so float32/bf16/fp16 results are bit-identical to it
     (tests/test_triton_aot.py reads the PTX).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["rope_kernel", "qk_norm_fwd_kernel", "qk_norm_bwd_kernel"]


@triton.jit
def _rope_tile(
    x_ptr,
    o_ptr,
    sx0,
    sx1,
    sxh,
    so0,
    so1,
    soh,
    m0,
    m1,
    tmask,
    h0,
    H,
    c,
    s,
    R2: tl.constexpr,
    D: tl.constexpr,
    R2P: tl.constexpr,
    BT: tl.constexpr,
    BH: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    COPY_TAIL: tl.constexpr,
    TAIL_B: tl.constexpr,
    F64: tl.constexpr,
    INPLACE: tl.constexpr,
):
    """Rotate heads ``h0 .. h0+BH-1`` of the token tile ``(m0, m1)`` [BT] with c/s [BT, 1|BH, R2P]."""
    if INPLACE:
        dst = x_ptr  # o_ptr is None: the op never passes one tensor twice (torch.compile clones each)
    else:
        dst = o_ptr
    h = h0 + tl.arange(0, BH).to(tl.int64)  # [BH]
    rows = tmask[:, None] & (h < H)[None, :]  # [BT, BH]
    xrow = m0[:, None] * sx0 + m1[:, None] * sx1 + h[None, :] * sxh  # [BT, BH] int64
    orow = m0[:, None] * so0 + m1[:, None] * so1 + h[None, :] * soh  # [BT, BH] int64
    if INTERLEAVED:
        col = tl.arange(0, 2 * R2P)  # [2*R2P]
        mask = rows[:, :, None] & (col < 2 * R2)[None, None, :]  # [BT, BH, 2*R2P]
        v = tl.load(x_ptr + xrow[:, :, None] + col[None, None, :], mask=mask, other=0.0)
        if F64:
            v = v.to(tl.float64)
        else:
            v = v.to(tl.float32)
        v = tl.reshape(v, (BT, BH, R2P, 2))  # [BT, BH, R2P, 2]
        x1, x2 = tl.split(v)  # [BT, BH, R2P] each
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
        y = tl.reshape(tl.join(y1, y2), (BT, BH, 2 * R2P))  # [BT, BH, 2*R2P]
        tl.store(dst + orow[:, :, None] + col[None, None, :], y.to(dst.dtype.element_ty), mask=mask)
    else:
        col = tl.arange(0, R2P)  # [R2P]
        mask = rows[:, :, None] & (col < R2)[None, None, :]  # [BT, BH, R2P]
        xo = xrow[:, :, None] + col[None, None, :]
        x1 = tl.load(x_ptr + xo, mask=mask, other=0.0)
        x2 = tl.load(x_ptr + xo + R2, mask=mask, other=0.0)
        if F64:
            x1 = x1.to(tl.float64)
            x2 = x2.to(tl.float64)
        else:
            x1 = x1.to(tl.float32)
            x2 = x2.to(tl.float32)
        # both lanes are in registers before anything is stored (in place safe)
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
        oo = orow[:, :, None] + col[None, None, :]
        tl.store(dst + oo, y1.to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + oo + R2, y2.to(dst.dtype.element_ty), mask=mask)
    if COPY_TAIL:
        # pass-through dims [r, d): copied here, not by a second launch
        for c0 in range(2 * R2, D, TAIL_B):
            tcol = c0 + tl.arange(0, TAIL_B)  # [TAIL_B]
            tmsk = rows[:, :, None] & (tcol < D)[None, None, :]
            t = tl.load(x_ptr + xrow[:, :, None] + tcol[None, None, :], mask=tmsk)
            tl.store(dst + orow[:, :, None] + tcol[None, None, :], t.to(dst.dtype.element_ty), mask=tmsk)


@triton.jit
def _to_cdt(v, F64: tl.constexpr):
    """``v`` in the compute dtype (float64 when F64, else float32)."""
    if F64:
        out = v.to(tl.float64)
    else:
        out = v.to(tl.float32)
    return out


@triton.jit
def _tables(cos_ptr, sin_ptr, coff, soff, tmask, h0, H, sch, scr, ssh, ssr,
            R2: tl.constexpr, R2P: tl.constexpr, BH: tl.constexpr, COS_PER_HEAD: tl.constexpr, F64: tl.constexpr):
    """c, s ``[BT, 1|BH, R2P]`` (compute dtype) of ``BT`` tokens whose table rows start at
    ``coff``/``soff`` [BT] (int64), heads ``h0 .. h0 + BH`` (``COS_PER_HEAD``: one row per head)."""
    col = tl.arange(0, R2P)
    cmask = tmask[:, None] & (col < R2)[None, :]  # [BT, R2P]
    if COS_PER_HEAD:
        hh = h0 + tl.arange(0, BH).to(tl.int64)
        cm3 = cmask[:, None, :] & (hh < H)[None, :, None]
        c = tl.load(cos_ptr + (coff[:, None] + hh[None, :] * sch)[:, :, None] + col[None, None, :] * scr, mask=cm3, other=0.0)
        s = tl.load(sin_ptr + (soff[:, None] + hh[None, :] * ssh)[:, :, None] + col[None, None, :] * ssr, mask=cm3, other=0.0)
    else:
        c = tl.load(cos_ptr + coff[:, None] + col[None, :] * scr, mask=cmask, other=0.0)[:, None, :]  # [BT, 1, R2P]
        s = tl.load(sin_ptr + soff[:, None] + col[None, :] * ssr, mask=cmask, other=0.0)[:, None, :]
    return _to_cdt(c, F64), _to_cdt(s, F64)


@triton.jit
def rope_kernel(
    xa_ptr,
    oa_ptr,
    xb_ptr,
    ob_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    M,
    M1,
    HA,
    HB,
    NBA,
    sxa0,
    sxa1,
    sxah,
    soa0,
    soa1,
    soah,
    sxb0,
    sxb1,
    sxbh,
    sob0,
    sob1,
    sobh,
    sc0,
    sc1,
    sch,
    scr,
    ss0,
    ss1,
    ssh,
    ssr,
    sp0,
    sp1,
    NROWS,
    R2: tl.constexpr,
    D: tl.constexpr,
    R2P: tl.constexpr,
    BT: tl.constexpr,
    BH: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    CONJ: tl.constexpr,
    GATHER: tl.constexpr,
    COS_PER_HEAD: tl.constexpr,
    COPY_TAIL: tl.constexpr,
    TAIL_B: tl.constexpr,
    F64: tl.constexpr,
    INPLACE: tl.constexpr,
    HAS_B: tl.constexpr,
    CHECK_POS: tl.constexpr,
):
    """Rotate ``BT`` tokens x ``BH`` heads of group a (q) or b (k); see the module docstring.

    ``M = m0 * m1`` tokens; ``NBA = cdiv(HA, BH)`` head blocks belong to group a.
    INPLACE: ``oa_ptr``/``ob_ptr`` are None and results go to ``xa_ptr``/``xb_ptr``;
    not HAS_B: ``xb_ptr``/``ob_ptr`` are None and the grid has no group-b blocks.
    GATHER: ``sc0``/``ss0`` are the table row strides, ``scr``/``ssr`` the column strides,
    ``sp0``/``sp1`` the strides of ``pos [m0, m1]`` (0 when shared by the batch), ``NROWS``
    the table length. CHECK_POS: a position outside ``[0, NROWS)`` fails a device-side assert
    (compiled in with ``debug=True``; no host sync, CUDA-graph safe). Either way such a row
    is never read: the position is replaced by 0 for the loads.
    """
    # int64 before any multiply: b*s*h*d can exceed 2^31 (property 1 above)
    t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT).to(tl.int64)  # [BT]
    tmask = t < M
    m0 = t // M1
    m1 = t % M1
    pid_h = tl.program_id(1)
    is_b = pid_h >= NBA
    h0 = tl.where(is_b, pid_h - NBA, pid_h).to(tl.int64) * BH

    # cos/sin: r/2 columns per token, loaded once and reused by the BH heads of the tile
    # (per-head tables: single group only)
    if GATHER:
        p = tl.load(pos_ptr + m0 * sp0 + m1 * sp1, mask=tmask, other=0).to(tl.int64)  # [BT]
        inside = (p >= 0) & (p < NROWS)
        if CHECK_POS:
            tl.device_assert(inside, "ropekit: a position outside the cos/sin table", mask=tmask)
        p = tl.where(inside, p, 0)  # never read outside the table
        coff = p * sc0
        soff = p * ss0
    else:
        coff = m0 * sc0 + m1 * sc1
        soff = m0 * ss0 + m1 * ss1
    c, s = _tables(cos_ptr, sin_ptr, coff, soff, tmask, h0, HA, sch, scr, ssh, ssr, R2, R2P, BH, COS_PER_HEAD, F64)
    if CONJ:
        s = -s  # R(-θ): the backward / inverse rotation

    if HAS_B:
        if is_b:
            _rope_tile(
                xb_ptr, ob_ptr, sxb0, sxb1, sxbh, sob0, sob1, sobh, m0, m1, tmask, h0, HB, c, s,
                R2, D, R2P, BT, BH, INTERLEAVED, COPY_TAIL, TAIL_B, F64, INPLACE,
            )  # fmt: skip
        else:
            _rope_tile(
                xa_ptr, oa_ptr, sxa0, sxa1, sxah, soa0, soa1, soah, m0, m1, tmask, h0, HA, c, s,
                R2, D, R2P, BT, BH, INTERLEAVED, COPY_TAIL, TAIL_B, F64, INPLACE,
            )  # fmt: skip
    else:
        _rope_tile(
            xa_ptr, oa_ptr, sxa0, sxa1, sxah, soa0, soa1, soah, m0, m1, tmask, h0, HA, c, s,
            R2, D, R2P, BT, BH, INTERLEAVED, COPY_TAIL, TAIL_B, F64, INPLACE,
        )  # fmt: skip


# --------------------------------------------------------------------------------------
# per-head RMSNorm + RoPE (apply_qk_norm_rotary), forward and backward
# --------------------------------------------------------------------------------------
# Same canonical views and grid as rope_kernel (x [m0, m1, h, d], groups a = q and b = k,
# axis 0 token tiles, axis 1 head blocks of q then of k). A row is split into the two
# rotary lanes ``[.., R2P]`` (half: columns i and i + r/2; interleaved: 2i and 2i + 1,
# one contiguous load split in registers) and the pass-through tail ``[.., TP]`` (columns
# [r, d)); every lane is loaded before anything is stored (in place safe) and masked with
# the real R2 / D (no padded lane is ever stored).
#
# forward, per row x [d] (float32 math; float64 when F64), one rounding at the store:
#   rstd = 1 / sqrt(sum(x²) / d + eps)        (IEEE sqrt and divisions: sqrt_rn / div_rn)
#   y = x * rstd * w'                          (w' = weight_offset + w, once per program)
#   out = R(θ) y on the first r dims, y on the rest
# backward, per row, with g = dL/dout:
#   u = R(-θ) g (the rest pass), x̂ = x * rstd (rstd saved by the forward),
#   dw' += u * x̂, v = u * w', c = sum(v * x̂) / d, dx = rstd * (v - x̂ * c)
# The weight gradient is deterministic: axis 0 of the backward grid has a fixed number G
# of programs, program i sums tiles i, i + G, ... in registers and writes one row of a
# partial buffer [G * head blocks, d] (no atomics); the host sums the rows (torch.sum).


@triton.jit
def _div(a, b, F64: tl.constexpr):
    """IEEE ``a / b`` (float32: div_rn, not the approximate division)."""
    if F64:
        out = a / b
    else:
        out = tl.math.div_rn(a, b)
    return out


@triton.jit
def _rstd(ssq, eps, rows, D: tl.constexpr, F64: tl.constexpr):
    """``1 / sqrt(ssq / D + eps)`` with IEEE sqrt and divisions (``ssq`` [BT, BH]); 1 for the
    rows that do not exist (``rows`` false: no 1/0 in padding when eps = 0)."""
    if F64:
        out = 1.0 / tl.sqrt(tl.where(rows, ssq / D + eps, 1.0))
    else:
        out = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.where(rows, tl.math.div_rn(ssq, D * 1.0) + eps, 1.0)))
    return out


@triton.jit
def _load_row(ptr, row, rows, BT: tl.constexpr, BH: tl.constexpr, R2: tl.constexpr, D: tl.constexpr,
              R2P: tl.constexpr, TP: tl.constexpr, INTERLEAVED: tl.constexpr, F64: tl.constexpr):
    """Rows at int64 offsets ``row`` [BT, BH] (``rows``: which exist): lanes x1, x2 [BT, BH, R2P]
    and the tail [BT, BH, TP] (columns [r, d)), compute dtype; masked entries are 0."""
    if INTERLEAVED:
        col = tl.arange(0, 2 * R2P)
        m = rows[:, :, None] & (col < 2 * R2)[None, None, :]
        v = _to_cdt(tl.load(ptr + row[:, :, None] + col[None, None, :], mask=m, other=0.0), F64)
        x1, x2 = tl.split(tl.reshape(v, (BT, BH, R2P, 2)))
    else:
        col = tl.arange(0, R2P)
        m = rows[:, :, None] & (col < R2)[None, None, :]
        off = row[:, :, None] + col[None, None, :]
        x1 = _to_cdt(tl.load(ptr + off, mask=m, other=0.0), F64)
        x2 = _to_cdt(tl.load(ptr + off + R2, mask=m, other=0.0), F64)
    tcol = 2 * R2 + tl.arange(0, TP)
    tm = rows[:, :, None] & (tcol < D)[None, None, :]
    xt = _to_cdt(tl.load(ptr + row[:, :, None] + tcol[None, None, :], mask=tm, other=0.0), F64)
    return x1, x2, xt


@triton.jit
def _store_row(ptr, row, rows, y1, y2, yt, BT: tl.constexpr, BH: tl.constexpr, R2: tl.constexpr, D: tl.constexpr,
               R2P: tl.constexpr, TP: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Store the lanes of :func:`_load_row` (one cast to the pointer's dtype), real columns only."""
    ty = ptr.dtype.element_ty
    if INTERLEAVED:
        col = tl.arange(0, 2 * R2P)
        m = rows[:, :, None] & (col < 2 * R2)[None, None, :]
        y = tl.reshape(tl.join(y1, y2), (BT, BH, 2 * R2P))
        tl.store(ptr + row[:, :, None] + col[None, None, :], y.to(ty), mask=m)
    else:
        col = tl.arange(0, R2P)
        m = rows[:, :, None] & (col < R2)[None, None, :]
        off = row[:, :, None] + col[None, None, :]
        tl.store(ptr + off, y1.to(ty), mask=m)
        tl.store(ptr + off + R2, y2.to(ty), mask=m)
    tcol = 2 * R2 + tl.arange(0, TP)
    tm = rows[:, :, None] & (tcol < D)[None, None, :]
    tl.store(ptr + row[:, :, None] + tcol[None, None, :], yt.to(ty), mask=tm)


@triton.jit
def _load_w(w_ptr, sw, woff, R2: tl.constexpr, D: tl.constexpr, R2P: tl.constexpr, TP: tl.constexpr,
            INTERLEAVED: tl.constexpr, F64: tl.constexpr):
    """``w' = weight_offset + w`` as lanes w1, w2 [R2P] and tail [TP] (compute dtype, 0 where padded)."""
    if INTERLEAVED:
        col = tl.arange(0, 2 * R2P)
        m = col < 2 * R2
        v = tl.where(m, _to_cdt(tl.load(w_ptr + col * sw, mask=m, other=0.0), F64) + woff, 0.0)
        w1, w2 = tl.split(tl.reshape(v, (R2P, 2)))
    else:
        col = tl.arange(0, R2P)
        m = col < R2
        w1 = tl.where(m, _to_cdt(tl.load(w_ptr + col * sw, mask=m, other=0.0), F64) + woff, 0.0)
        w2 = tl.where(m, _to_cdt(tl.load(w_ptr + (col + R2) * sw, mask=m, other=0.0), F64) + woff, 0.0)
    tcol = 2 * R2 + tl.arange(0, TP)
    tm = tcol < D
    wt = tl.where(tm, _to_cdt(tl.load(w_ptr + tcol * sw, mask=tm, other=0.0), F64) + woff, 0.0)
    return w1, w2, wt


@triton.jit
def _scalar(hi, lo, F64: tl.constexpr):
    """A host float passed as float32 ``hi`` + ``lo`` (float64 math: ~48 bits; float32: ``hi``)."""
    if F64:
        out = tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        out = hi
    return out


@triton.jit
def _half_tree(p, BT: tl.constexpr, BH: tl.constexpr, W: tl.constexpr):
    """``p [BT, BH, 2W]`` -> ``p[k] + p[k + W]`` for k < W (one level of the CPU's tree16)."""
    a, b = tl.split(tl.permute(tl.reshape(p, (BT, BH, 2, W)), (0, 1, 3, 2)))
    return a + b


@triton.jit
def _sumsq16(ptr, row, rows, BT: tl.constexpr, BH: tl.constexpr, D: tl.constexpr, F64: tl.constexpr):
    """``sum(x²)`` of the rows at ``row`` [BT, BH] in the order of the CPU operator (csrc/kernel.cpp
    ``sumsq16``/``dot16``): 16 partial sums, lane k adding the squares of columns k, k + 16, ...
    in column order (zero past D), then the fixed tree ``p[k] += p[k + w]`` for w = 8, 4, 2, 1.
    The same operations in the same order: the same bits as the CPU op. The row is read again
    in 16-column blocks (it was just loaded: the reads hit the cache)."""
    lane = tl.arange(0, 16)
    acc = _to_cdt(tl.zeros((BT, BH, 16), tl.float32), F64)
    for j in tl.static_range(0, D, 16):
        col = j + lane
        m = rows[:, :, None] & (col < D)[None, None, :]
        v = _to_cdt(tl.load(ptr + row[:, :, None] + col[None, None, :], mask=m, other=0.0), F64)
        acc += v * v
    p8 = _half_tree(acc, BT, BH, 8)
    p4 = _half_tree(p8, BT, BH, 4)
    p2 = _half_tree(p4, BT, BH, 2)
    a, b = tl.split(p2)
    return a + b


@triton.jit
def _norm_rope_fwd_tile(x_ptr, o_ptr, r_ptr, w_ptr, sx0, sx1, sxh, so0, so1, soh, sr0, sr1, srh, sw,
                        m0, m1, tmask, h0, H, c, s, eps, woff,
                        R2: tl.constexpr, D: tl.constexpr, R2P: tl.constexpr, TP: tl.constexpr, BT: tl.constexpr,
                        BH: tl.constexpr, INTERLEAVED: tl.constexpr, F64: tl.constexpr, INPLACE: tl.constexpr,
                        SAVE_RSTD: tl.constexpr):
    """Normalise and rotate heads ``h0 .. h0+BH-1`` of the tokens ``(m0, m1)`` [BT]; c/s [BT, 1|BH, R2P]."""
    if INPLACE:
        dst = x_ptr  # o_ptr is None (the op never passes one tensor twice)
    else:
        dst = o_ptr
    h = h0 + tl.arange(0, BH).to(tl.int64)  # [BH]
    rows = tmask[:, None] & (h < H)[None, :]  # [BT, BH]
    xrow = m0[:, None] * sx0 + m1[:, None] * sx1 + h[None, :] * sxh  # [BT, BH] int64
    orow = m0[:, None] * so0 + m1[:, None] * so1 + h[None, :] * soh
    x1, x2, xt = _load_row(x_ptr, xrow, rows, BT, BH, R2, D, R2P, TP, INTERLEAVED, F64)
    ssq = _sumsq16(x_ptr, xrow, rows, BT, BH, D, F64)  # [BT, BH] over all d dims, the CPU's order
    rstd = _rstd(ssq, eps, rows, D, F64)
    w1, w2, wt = _load_w(w_ptr, sw, woff, R2, D, R2P, TP, INTERLEAVED, F64)
    r3 = rstd[:, :, None]
    y1 = x1 * r3 * w1[None, None, :]
    y2 = x2 * r3 * w2[None, None, :]
    # every lane is in registers before the first store (in place safe)
    _store_row(dst, orow, rows, y1 * c - y2 * s, y2 * c + y1 * s, xt * r3 * wt[None, None, :],
               BT, BH, R2, D, R2P, TP, INTERLEAVED)
    if SAVE_RSTD:
        tl.store(r_ptr + m0[:, None] * sr0 + m1[:, None] * sr1 + h[None, :] * srh, rstd, mask=rows)


@triton.jit
def qk_norm_fwd_kernel(
    xa_ptr, oa_ptr, ra_ptr, wa_ptr, xb_ptr, ob_ptr, rb_ptr, wb_ptr, cos_ptr, sin_ptr,
    M, M1, HA, HB, NBA,
    sxa0, sxa1, sxah, soa0, soa1, soah, sra0, sra1, srah, swa,
    sxb0, sxb1, sxbh, sob0, sob1, sobh, srb0, srb1, srbh, swb,
    sc0, sc1, sch, scr, ss0, ss1, ssh, ssr,
    eps_hi, eps_lo, woff_hi, woff_lo,
    R2: tl.constexpr, D: tl.constexpr, R2P: tl.constexpr, TP: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    INTERLEAVED: tl.constexpr, COS_PER_HEAD: tl.constexpr, F64: tl.constexpr, INPLACE: tl.constexpr,
    HAS_B: tl.constexpr, SAVE_RSTD: tl.constexpr,
):  # fmt: skip
    """Per-head RMSNorm then RoPE of ``BT`` tokens x ``BH`` heads of group a (q) or b (k).

    Grid ``(cdiv(M, BT), NBA + cdiv(HB, BH))`` as :func:`rope_kernel`. ``r*`` are the
    inverse RMS outputs ``[m0, m1, h]`` (compute dtype; None unless SAVE_RSTD), ``w*`` the
    ``[d]`` weights (any float dtype, stride ``sw*``). ``eps``/``weight_offset`` arrive as
    float32 pairs ``hi + lo`` (float64 math keeps ~48 bits of them).
    """
    t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT).to(tl.int64)  # [BT] int64
    tmask = t < M
    m0 = t // M1
    m1 = t % M1
    pid_h = tl.program_id(1)
    is_b = pid_h >= NBA
    h0 = tl.where(is_b, pid_h - NBA, pid_h).to(tl.int64) * BH
    H = tl.where(is_b, HB, HA)
    eps = _scalar(eps_hi, eps_lo, F64)
    woff = _scalar(woff_hi, woff_lo, F64)
    # cos/sin: loaded once per tile, shared by its BH heads
    c, s = _tables(cos_ptr, sin_ptr, m0 * sc0 + m1 * sc1, m0 * ss0 + m1 * ss1, tmask, h0, H, sch, scr, ssh, ssr,
                   R2, R2P, BH, COS_PER_HEAD, F64)
    if HAS_B:
        if is_b:
            _norm_rope_fwd_tile(
                xb_ptr, ob_ptr, rb_ptr, wb_ptr, sxb0, sxb1, sxbh, sob0, sob1, sobh, srb0, srb1, srbh, swb,
                m0, m1, tmask, h0, HB, c, s, eps, woff, R2, D, R2P, TP, BT, BH, INTERLEAVED, F64, INPLACE, SAVE_RSTD,
            )  # fmt: skip
        else:
            _norm_rope_fwd_tile(
                xa_ptr, oa_ptr, ra_ptr, wa_ptr, sxa0, sxa1, sxah, soa0, soa1, soah, sra0, sra1, srah, swa,
                m0, m1, tmask, h0, HA, c, s, eps, woff, R2, D, R2P, TP, BT, BH, INTERLEAVED, F64, INPLACE, SAVE_RSTD,
            )  # fmt: skip
    else:
        _norm_rope_fwd_tile(
            xa_ptr, oa_ptr, ra_ptr, wa_ptr, sxa0, sxa1, sxah, soa0, soa1, soah, sra0, sra1, srah, swa,
            m0, m1, tmask, h0, HA, c, s, eps, woff, R2, D, R2P, TP, BT, BH, INTERLEAVED, F64, INPLACE, SAVE_RSTD,
        )  # fmt: skip


@triton.jit
def _norm_rope_bwd_group(g_ptr, x_ptr, dx_ptr, r_ptr, w_ptr, p_ptr,
                         sg0, sg1, sgh, sx0, sx1, sxh, sd0, sd1, sdh, sr0, sr1, srh, sw,
                         cos_ptr, sin_ptr, sc0, sc1, sch, scr, ss0, ss1, ssh, ssr,
                         M, M1, H, h0, pid0, NT, G, prow, woff,
                         R2: tl.constexpr, D: tl.constexpr, R2P: tl.constexpr, TP: tl.constexpr, BT: tl.constexpr,
                         BH: tl.constexpr, INTERLEAVED: tl.constexpr, COS_PER_HEAD: tl.constexpr, F64: tl.constexpr,
                         STORE_DX: tl.constexpr, DW: tl.constexpr):
    """Backward of heads ``h0 ..`` for token tiles ``pid0, pid0 + G, ... < NT``; the weight
    gradient of those rows (summed in registers, fixed order) goes to row ``prow`` of ``p_ptr``."""
    w1, w2, wt = _load_w(w_ptr, sw, woff, R2, D, R2P, TP, INTERLEAVED, F64)
    a1 = _to_cdt(tl.zeros((R2P,), tl.float32), F64)
    a2 = _to_cdt(tl.zeros((R2P,), tl.float32), F64)
    at = _to_cdt(tl.zeros((TP,), tl.float32), F64)
    h = h0 + tl.arange(0, BH).to(tl.int64)  # [BH]
    for tile in range(pid0, NT, G):
        t = (tl.zeros((BT,), tl.int64) + tile) * BT + tl.arange(0, BT).to(tl.int64)  # [BT] int64 before the multiply
        tmask = t < M
        m0 = t // M1
        m1 = t % M1
        c, s = _tables(cos_ptr, sin_ptr, m0 * sc0 + m1 * sc1, m0 * ss0 + m1 * ss1, tmask, h0, H, sch, scr, ssh, ssr,
                       R2, R2P, BH, COS_PER_HEAD, F64)
        rows = tmask[:, None] & (h < H)[None, :]  # [BT, BH]
        grow = m0[:, None] * sg0 + m1[:, None] * sg1 + h[None, :] * sgh
        xrow = m0[:, None] * sx0 + m1[:, None] * sx1 + h[None, :] * sxh
        g1, g2, gt = _load_row(g_ptr, grow, rows, BT, BH, R2, D, R2P, TP, INTERLEAVED, F64)
        x1, x2, xt = _load_row(x_ptr, xrow, rows, BT, BH, R2, D, R2P, TP, INTERLEAVED, F64)
        rstd = tl.load(r_ptr + m0[:, None] * sr0 + m1[:, None] * sr1 + h[None, :] * srh, mask=rows, other=0.0)
        r3 = _to_cdt(rstd, F64)[:, :, None]  # rows outside: 0, so they add nothing below
        xh1 = x1 * r3
        xh2 = x2 * r3
        xht = xt * r3
        u1 = g1 * c + g2 * s  # R(-θ) g
        u2 = g2 * c - g1 * s
        if DW:
            a1 += tl.sum(tl.sum(u1 * xh1, 0), 0)
            a2 += tl.sum(tl.sum(u2 * xh2, 0), 0)
            at += tl.sum(tl.sum(gt * xht, 0), 0)
        if STORE_DX:
            v1 = u1 * w1[None, None, :]
            v2 = u2 * w2[None, None, :]
            vt = gt * wt[None, None, :]
            cdot = _div(tl.sum(v1 * xh1, 2) + tl.sum(v2 * xh2, 2) + tl.sum(vt * xht, 2), D * 1.0, F64)[:, :, None]
            drow = m0[:, None] * sd0 + m1[:, None] * sd1 + h[None, :] * sdh
            _store_row(dx_ptr, drow, rows, r3 * (v1 - xh1 * cdot), r3 * (v2 - xh2 * cdot), r3 * (vt - xht * cdot),
                       BT, BH, R2, D, R2P, TP, INTERLEAVED)
    if DW:
        prow64 = prow.to(tl.int64) * D
        if INTERLEAVED:
            col = tl.arange(0, 2 * R2P)
            tl.store(p_ptr + prow64 + col, tl.reshape(tl.join(a1, a2), (2 * R2P,)), mask=col < 2 * R2)
        else:
            col = tl.arange(0, R2P)
            tl.store(p_ptr + prow64 + col, a1, mask=col < R2)
            tl.store(p_ptr + prow64 + col + R2, a2, mask=col < R2)
        tcol = 2 * R2 + tl.arange(0, TP)
        tl.store(p_ptr + prow64 + tcol, at, mask=tcol < D)


@triton.jit
def qk_norm_bwd_kernel(
    ga_ptr, xa_ptr, dxa_ptr, ra_ptr, wa_ptr, pa_ptr, gb_ptr, xb_ptr, dxb_ptr, rb_ptr, wb_ptr, pb_ptr, cos_ptr, sin_ptr,
    M, M1, HA, HB, NBA, NT, G, NT_B, G_B,
    sga0, sga1, sgah, sxa0, sxa1, sxah, sda0, sda1, sdah, sra0, sra1, srah, swa,
    sgb0, sgb1, sgbh, sxb0, sxb1, sxbh, sdb0, sdb1, sdbh, srb0, srb1, srbh, swb,
    sc0, sc1, sch, scr, ss0, ss1, ssh, ssr,
    woff_hi, woff_lo,
    R2: tl.constexpr, D: tl.constexpr, R2P: tl.constexpr, TP: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    BT_B: tl.constexpr, BH_B: tl.constexpr,
    INTERLEAVED: tl.constexpr, COS_PER_HEAD: tl.constexpr, F64: tl.constexpr, HAS_B: tl.constexpr,
    DX_A: tl.constexpr, DW_A: tl.constexpr, DX_B: tl.constexpr, DW_B: tl.constexpr,
):  # fmt: skip
    """Backward of :func:`qk_norm_fwd_kernel`: ``dx`` of q (a) and k (b) and their weights' partial sums.

    Grid ``(max(G, G_B), NBA + cdiv(HB, BH_B))`` with ``G <= NT = cdiv(M, BT)`` token-tile programs
    for group a and ``G_B <= NT_B = cdiv(M, BT_B)`` for group b; program ``(i, j)`` walks tiles
    ``i, i + G, ...`` of head block ``j`` (programs past a group's own count do nothing). Each
    group has its own tile ``(BT, BH)`` / ``(BT_B, BH_B)``: the one it gets when launched alone,
    so a tensor's weight gradient (whose summation order follows the tiles) has the same bits
    in a joint launch and alone (in-place autograd runs one backward node per tensor). ``g*`` are the incoming
    gradients, ``x*`` the saved inputs, ``r*`` the saved inverse RMS; ``dx*`` (None unless
    DX_*) get ``dx``; ``p*`` (None unless DW_*) are ``[G * head blocks, d]`` partial weight
    gradients, row ``i * head blocks + j``, every row written once.
    """
    pid0 = tl.program_id(0)
    pid_h = tl.program_id(1)
    woff = _scalar(woff_hi, woff_lo, F64)
    if HAS_B:
        if pid_h >= NBA:
            jb = pid_h - NBA
            if pid0 < G_B:
                _norm_rope_bwd_group(
                    gb_ptr, xb_ptr, dxb_ptr, rb_ptr, wb_ptr, pb_ptr,
                    sgb0, sgb1, sgbh, sxb0, sxb1, sxbh, sdb0, sdb1, sdbh, srb0, srb1, srbh, swb,
                    cos_ptr, sin_ptr, sc0, sc1, sch, scr, ss0, ss1, ssh, ssr,
                    M, M1, HB, jb.to(tl.int64) * BH_B, pid0, NT_B, G_B, pid0 * tl.cdiv(HB, BH_B) + jb, woff,
                    R2, D, R2P, TP, BT_B, BH_B, INTERLEAVED, COS_PER_HEAD, F64, DX_B, DW_B,
                )  # fmt: skip
        elif pid0 < G:
            _norm_rope_bwd_group(
                ga_ptr, xa_ptr, dxa_ptr, ra_ptr, wa_ptr, pa_ptr,
                sga0, sga1, sgah, sxa0, sxa1, sxah, sda0, sda1, sdah, sra0, sra1, srah, swa,
                cos_ptr, sin_ptr, sc0, sc1, sch, scr, ss0, ss1, ssh, ssr,
                M, M1, HA, pid_h.to(tl.int64) * BH, pid0, NT, G, pid0 * NBA + pid_h, woff,
                R2, D, R2P, TP, BT, BH, INTERLEAVED, COS_PER_HEAD, F64, DX_A, DW_A,
            )  # fmt: skip
    else:
        _norm_rope_bwd_group(
            ga_ptr, xa_ptr, dxa_ptr, ra_ptr, wa_ptr, pa_ptr,
            sga0, sga1, sgah, sxa0, sxa1, sxah, sda0, sda1, sdah, sra0, sra1, srah, swa,
            cos_ptr, sin_ptr, sc0, sc1, sch, scr, ss0, ss1, ssh, ssr,
            M, M1, HA, pid_h.to(tl.int64) * BH, pid0, NT, G, pid0 * NBA + pid_h, woff,
            R2, D, R2P, TP, BT, BH, INTERLEAVED, COS_PER_HEAD, F64, DX_A, DW_A,
        )  # fmt: skip
