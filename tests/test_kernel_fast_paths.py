"""The kernel's cheaper row paths give the formula's bits, at every level this CPU runs.

The rows without a NaN blend per stored vector (a block holding a NaN is stored again through
the canonical-NaN path), the conjugate rotation without the sign's multiply, the interleaved
layout by an in-pair swap against per-pair tables, the rows of one token's heads taken as one
run (tables or gather positions broadcast over the heads; also where the heads are innermost in
memory but not the last row dim, as in attention code's transposed q), the split tables kept per
call for contiguous ``[b, h, s, d]`` rows (each row a new table row), the bfloat16 rounding in 16-bit
words at ``avx2``, and the fused norm's versions of the same. The levels are compared with each
other in ``test_levels_bits.py``; here each level is compared with an independent float32 /
float64 formula in torch (separately rounded products, one round to nearest even), so a path
that every level shares is checked too. Special values are planted densely enough that blocks
with and without a NaN both occur.
"""

import textwrap

import pytest

from ropekit import ops

from _oracle import run_at_level

pytestmark = pytest.mark.skipif(not ops.LOADED, reason=f"operators not built: {ops.REASON}")

_PROBE = textwrap.dedent(
    r"""
    import itertools, json
    import torch
    import ropekit
    from ropekit import ops as _ops  # registers torch.ops.ropekit
    R = torch.ops.ropekit
    BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    CANON = {torch.float32: 0x7FC00000, torch.float64: 0x7FF8000000000000, torch.bfloat16: 0x7FC0, torch.float16: 0x7E00}

    def formula(x, c, s, layout, conj):
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf, c, s = x.to(ct), c.to(ct), s.to(ct)
        if conj:
            s = -s
        h = c.shape[-1]
        sl = (slice(0, h), slice(h, 2 * h)) if layout == "half" else (slice(0, 2 * h, 2), slice(1, 2 * h, 2))
        a, b = xf[..., sl[0]], xf[..., sl[1]]
        y = x.clone()  # the tail past the rotary dims is copied, bits kept
        y[..., sl[0]] = (a * c - b * s).to(x.dtype)
        y[..., sl[1]] = (b * c + a * s).to(x.dtype)
        return y

    def same(got, want, h):
        # the same bits; every NaN computed from the rotary dims the canonical one
        gb, wb = got.contiguous().view(BITS[got.dtype]), want.contiguous().view(BITS[got.dtype])
        gn, wn = torch.isnan(got), torch.isnan(want)
        if not torch.equal(gn, wn) or not torch.equal(gb[~gn], wb[~wn]):
            return False
        rot = got[..., : 2 * h]
        nan = rot[torch.isnan(rot)]
        return nan.numel() == 0 or nan.contiguous().view(BITS[got.dtype]).unique().tolist() == [CANON[got.dtype]]

    def plant(x, g, frac):
        f = x.view(-1)
        m = torch.rand(f.numel(), generator=g) < frac
        vals = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30, 6.0e4, 3.0e38])
        f[m] = vals[torch.randint(0, len(vals), (int(m.sum()),), generator=g)].to(x.dtype)
        return x

    g = torch.Generator().manual_seed(7)
    bad = []
    n = 0
    dts = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    for dt, layout, conj, h, extra, frac in itertools.product(dts, ["half", "interleaved"], [False, True],
                                                             [64, 36, 32, 20, 8, 5], [0, 2], [0.0, 0.01]):
        d = 2 * h + extra
        x = plant((torch.randn(3, 7, 5, d, generator=g) * 3).to(dt), g, frac)
        pos = torch.randint(0, 100, (7,), generator=g).double()
        th = pos[:, None] * (10000.0 ** (-torch.arange(h).double() / h))[None]
        tdt = torch.float64 if dt == torch.float64 else torch.float32
        c, s = th.cos().to(tdt), th.sin().to(tdt)
        key = f"{str(dt)[6:]}/{layout}/conj{int(conj)}/h{h}/d{d}/nan{frac}"
        # tables broadcast over the heads (one run per token) and per head (bhsd-like: no run);
        # x as attention code holds it: a [b, h, s, d] view of [b, s, h, d] memory, tables over s
        # (the operator walks the heads innermost, in memory order); and contiguous [b, h, s, d]
        # with tables over s: each row a new table row, every head the same rows again (the
        # kernel keeps the split rows per call), with one table row whose |c| + |s| is above 3.99
        # (float16's paired rows take the generic row there) and a NaN
        cl, sl_ = c.clone(), s.clone()
        cl[2] *= 3
        sl_[2] *= 3
        cl[4, 1] = float("nan")
        for tabs, xx, name in (((c[:, None], s[:, None]), x, "per token"),
                               ((c[:, None].expand(7, 5, h), s[:, None].expand(7, 5, h).contiguous()), x, "per head"),
                               ((c, s), x.transpose(1, 2), "bhsd view"),
                               ((cl, sl_), x.transpose(1, 2).contiguous(), "contiguous bhsd")):
            want = formula(xx, tabs[0], tabs[1], layout, conj)
            outs = {"fresh": R.rotary(xx, tabs[0], tabs[1], layout, conj)}
            y = xx.clone(); R.rotary_(y, tabs[0], tabs[1], layout, conj); outs["inplace"] = y
            y = torch.empty_like(xx); R.rotary_out(xx, tabs[0], tabs[1], layout, conj, out=y); outs["out"] = y
            for mode, got in outs.items():
                n += 1
                if not same(got, want, h):
                    bad.append(f"rotary {key} {mode} {name}")
        # the gather: positions per token, broadcast over the heads
        q, k = x, plant((torch.randn(3, 7, 2, d, generator=g) * 3).to(dt), g, frac)
        p = torch.randint(0, 100, (3, 7), generator=g)
        thp = torch.arange(100).double()[:, None] * (10000.0 ** (-torch.arange(h).double() / h))[None]
        tc, ts = thp.cos().to(tdt), thp.sin().to(tdt)
        qq, kk = q.clone(), k.clone()
        R.rotary_gather_(qq, kk, tc, ts, p, "bshd", layout, conj)
        for got, src in ((qq, q), (kk, k)):
            n += 1
            if not same(got, formula(src, tc[p][:, :, None], ts[p][:, :, None], layout, conj), h):
                bad.append(f"gather {key}")
        # and over contiguous [b, h, s, d] with a table of 10 rows (each met again per head)
        p10 = torch.randint(0, 10, (3, 7), generator=g)
        qb, kb = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        qq, kk = qb.clone(), kb.clone()
        R.rotary_gather_(qq, kk, tc[:10], ts[:10], p10, "bhsd", layout, conj)
        for got, src in ((qq, qb), (kk, kb)):
            n += 1
            if not same(got, formula(src, tc[p10][:, None], ts[p10][:, None], layout, conj), h):
                bad.append(f"gather bhsd {key}")

    # bfloat16 ties: y1 = a·1 - b·(-2^-8) = a + 2^-8 exactly, halfway between two bfloat16
    # values, for every bfloat16 a in [1, 2) (both parities) and their negatives
    a = torch.arange(0x3F80, 0x4000, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    a = torch.cat([a, -a])
    h = a.numel()
    x = torch.cat([a, torch.ones(h, dtype=torch.bfloat16)])[None, None].repeat(2, 3, 1)
    c, s = torch.ones(2, 1, h), torch.full((2, 1, h), -(2.0 ** -8))
    got = R.rotary(x, c, s, "half", False)
    n += 1
    if not same(got, formula(x, c, s, "half", False), h):
        bad.append("bfloat16 ties")

    # the fused norm against its torch composition (the eager backend)
    for dt, layout, d, frac, off in itertools.product([torch.float32, torch.bfloat16, torch.float16], ["half", "interleaved"],
                                                      [64, 128], [0.0, 0.003, 0.05], [0.0, 1.0]):
        q, k = plant((torch.randn(2, 6, 8, d, generator=g) * 3).to(dt), g, frac), plant(torch.randn(2, 6, 4, d, generator=g).to(dt), g, frac)
        wq, wk = torch.randn(d, generator=g).to(dt), torch.randn(d, generator=g)
        c, s = ropekit.cos_sin(ropekit.RopeConfig(d), torch.arange(6))
        got = ropekit.apply_qk_norm_rotary(q, k, wq, wk, c[:, None], s[:, None], backend="cpu", weight_offset=off, layout=layout)
        want = ropekit.apply_qk_norm_rotary(q, k, wq, wk, c[:, None], s[:, None], backend="eager", weight_offset=off, layout=layout)
        for gt, wt in zip(got, want):
            n += 1
            if not same(gt, wt, d // 2):
                bad.append(f"qk-norm {str(dt)[6:]}/{layout}/d{d}/nan{frac}/off{off}")
    print(json.dumps({"capability": R.cpu_capability(), "cases": n, "bad": bad}))
    """
)


@pytest.mark.parametrize("level", ops.levels())
def test_every_level_gives_the_formulas_bits(level):
    res = run_at_level(_PROBE, level)
    assert res["capability"] == level
    assert res["cases"] > 1500
    assert res["bad"] == [], f"{len(res['bad'])} cases differ at {level}, e.g. {res['bad'][:6]}"
