"""The fused RoPE Triton kernel (imported only by :mod:`ropekit.backends.triton`).

One kernel covers every entry point (``rotate``, ``rotate_qk``, ``rotate_qk_gather`` and
their backward). The launcher hands it canonical 4-D views

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
 14. no autotuning (the kernel may mutate its input).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["rope_kernel"]


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
):
    """Rotate ``BT`` tokens x ``BH`` heads of group a (q) or b (k); see the module docstring.

    ``M = m0 * m1`` tokens; ``NBA = cdiv(HA, BH)`` head blocks belong to group a.
    INPLACE: ``oa_ptr``/``ob_ptr`` are None and results go to ``xa_ptr``/``xb_ptr``;
    not HAS_B: ``xb_ptr``/``ob_ptr`` are None and the grid has no group-b blocks.
    GATHER: ``sc0``/``ss0`` are the table row strides, ``scr``/``ssr`` the column strides,
    ``sp0``/``sp1`` the strides of ``pos [m0, m1]`` (0 when shared by the batch).
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
    col = tl.arange(0, R2P)
    cmask = tmask[:, None] & (col < R2)[None, :]  # [BT, R2P]
    if GATHER:
        p = tl.load(pos_ptr + m0 * sp0 + m1 * sp1, mask=tmask, other=0).to(tl.int64)  # [BT]
        coff = p * sc0
        soff = p * ss0
    else:
        coff = m0 * sc0 + m1 * sc1
        soff = m0 * ss0 + m1 * ss1
    if COS_PER_HEAD:
        # tables differ per head (single group only): [BT, BH, R2P]
        hh = h0 + tl.arange(0, BH).to(tl.int64)
        cm3 = cmask[:, None, :] & (hh < HA)[None, :, None]
        c = tl.load(cos_ptr + (coff[:, None] + hh[None, :] * sch)[:, :, None] + col[None, None, :] * scr, mask=cm3, other=0.0)
        s = tl.load(sin_ptr + (soff[:, None] + hh[None, :] * ssh)[:, :, None] + col[None, None, :] * ssr, mask=cm3, other=0.0)
    else:
        c = tl.load(cos_ptr + coff[:, None] + col[None, :] * scr, mask=cmask, other=0.0)[:, None, :]  # [BT, 1, R2P]
        s = tl.load(sin_ptr + soff[:, None] + col[None, :] * ssr, mask=cmask, other=0.0)[:, None, :]
    if F64:
        c = c.to(tl.float64)
        s = s.to(tl.float64)
    else:
        c = c.to(tl.float32)
        s = s.to(tl.float32)
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
