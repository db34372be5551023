"""Every instruction-set level gives the same bits, NaN included (docs/numerics.md, "NaN").

One probe script runs in a fresh process per level this CPU supports (``ROPEKIT_CPU_CAPABILITY``
forces it) and hashes every output of the compiled operators, case by case: rotary (fresh, in
place, ``out=``), rotary_qk, rotary_gather and qk_norm_rotary, forward and backward, over
float32/bfloat16/float16/float64, both layouts, full and partial rotary, odd shapes, with NaN
(both signs, with payloads), ±inf and -0 planted in x, in the cos/sin tables and in the norm
weights. The digests of every level must equal those of the default (portable) level. In
process, every NaN an operator computed must be the canonical quiet NaN.

Not timed: the probe only compares bits.
"""

from __future__ import annotations

import textwrap

import pytest

from ropekit import ops

from _oracle import run_at_level

pytestmark = pytest.mark.skipif(not ops.LOADED, reason=f"operators not built: {ops.REASON}")

_PROBE = textwrap.dedent(
    r"""
    import hashlib, json, struct
    import torch
    from ropekit import ops as _ops  # registers torch.ops.ropekit
    R = torch.ops.ropekit

    BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    # NaNs of both signs with payloads (quiet and signalling), per dtype, as raw bits
    NANS = {
        torch.float32: [0x7FC00000, 0xFFC00000, 0x7FA00001, 0xFF800123, 0x7FC0ABCD],
        torch.float64: [0x7FF8000000000000, 0xFFF8000000000000, 0x7FF4000000000001, 0xFFF0000000000123],
        torch.bfloat16: [0x7FC0, 0xFFC0, 0x7FA1, 0xFF81, 0x7FC5],
        torch.float16: [0x7E00, 0xFE00, 0x7D01, 0xFC05, 0x7E33],
    }

    def plant(t, g):
        # NaNs with payloads, +-inf, -0, and for the half types values that round to subnormals
        t = t.clone()
        flat = t.view(-1)
        n = flat.numel()
        bits = flat.view(BITS[t.dtype])
        for i, b in enumerate(NANS[t.dtype]):
            idx = torch.randint(0, n, (max(1, n // 97),), generator=g)
            v = b - (1 << (8 * t.element_size())) if b >= 1 << (8 * t.element_size() - 1) else b
            bits[idx] = v
        for val in (float("inf"), float("-inf"), -0.0, 0.0, 1e-30, -3e-8):
            idx = torch.randint(0, n, (max(1, n // 211),), generator=g)
            flat[idx] = val
        return t

    def digest(ts):
        h = hashlib.sha256()
        for t in ts:
            h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def nan_ok(ts):
        # every NaN in a computed output is the canonical quiet NaN
        canon = {torch.float32: 0x7FC00000, torch.float64: 0x7FF8000000000000, torch.bfloat16: 0x7FC0, torch.float16: 0x7E00}
        for t in ts:
            t = t.detach()
            m = torch.isnan(t)
            if m.any():
                b = t.contiguous().view(BITS[t.dtype])[m.contiguous()]
                c = canon[t.dtype]
                c = c - (1 << (8 * t.element_size())) if c >= 1 << (8 * t.element_size() - 1) else c
                if not bool((b == c).all()):
                    return False
        return True

    res, bad = {}, []
    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        ct = torch.float64 if dt is torch.float64 else torch.float32
        for layout in ("half", "interleaved"):
            for (b, s, hq, hk, d, r) in ((2, 5, 4, 2, 128, 128), (1, 3, 3, 1, 72, 56), (2, 1, 2, 3, 80, 40), (1, 4, 5, 2, 64, 24),
                                       (1, 2, 3, 2, 48, 48)):
                key = f"{str(dt)[6:]}/{layout}/b{b}s{s}h{hq}-{hk}d{d}r{r}"
                q = plant(torch.randn(b, s, hq, d, generator=g).to(dt), g)
                k = plant(torch.randn(b, s, hk, d, generator=g).to(dt), g)
                c = plant(torch.randn(s, 1, r // 2, generator=g).to(ct), g)
                sn = plant(torch.randn(s, 1, r // 2, generator=g).to(ct), g)
                outs = {}
                outs["rotary"] = [R.rotary(q, c, sn, layout, False), R.rotary(q, c, sn, layout, True)]
                x = q.clone(); R.rotary_(x, c, sn, layout, False); outs["rotary_"] = [x]
                o = torch.empty_like(q); R.rotary_out(q, c, sn, layout, False, out=o); outs["rotary_out"] = [o]
                outs["rotary_qk"] = list(R.rotary_qk(q, k, c, sn, layout, False))
                qq, kk = q.clone(), k.clone(); R.rotary_qk_(qq, kk, c, sn, layout, True); outs["rotary_qk_"] = [qq, kk]
                tc = plant(torch.randn(11, r // 2, generator=g).to(ct), g)
                ts = plant(torch.randn(11, r // 2, generator=g).to(ct), g)
                pos = torch.randint(0, 11, (b, s), generator=g)
                outs["rotary_gather"] = list(R.rotary_gather(q, k, tc, ts, pos, "bshd", layout, False))
                qq, kk = q.clone(), k.clone(); R.rotary_gather_(qq, kk, tc, ts, pos, "bshd", layout, True); outs["rotary_gather_"] = [qq, kk]
                if r == d or dt is not torch.float64:
                    wq = plant(torch.randn(d, generator=g).to(ct), g)
                    wk = plant(torch.randn(d, generator=g).to(ct), g)
                    cf, sf = torch.randn(s, 1, r // 2, generator=g).to(ct), torch.randn(s, 1, r // 2, generator=g).to(ct)
                    # "clean": no planted value anywhere (finite sums in every row: with the planted
                    # NaNs most rows' sums are NaN, which would hide a row's sum going to another row)
                    qc = torch.randn(b, s, hq, d, generator=g).to(dt)
                    kc = torch.randn(b, s, hk, d, generator=g).to(dt)
                    wc = torch.randn(d, generator=g).to(ct)
                    for name, (xq, xk, w1, w2, cc, ss, pl) in (("tables", (q, k, wq, wk, c, sn, plant)),
                                                                ("clean_tables", (q, k, wq, wk, cf, sf, plant)),
                                                                ("clean", (qc, kc, wc, wc, cf, sf, lambda t, g: t))):
                        qo, ko, rq, rk = R.qk_norm_rotary_fwd(xq, xk, w1, w2, cc, ss, 1e-6, 1.0, layout)
                        gq, gk = pl(torch.randn(qo.shape, generator=g).to(dt), g), pl(torch.randn(ko.shape, generator=g).to(dt), g)
                        grads = list(R.qk_norm_rotary_bwd(gq, gk, xq, xk, w1, w2, rq, rk, cc, ss, 1.0, layout))
                        qi, ki = xq.clone(), xk.clone(); R.qk_norm_rotary_(qi, ki, w1, w2, cc, ss, 1e-6, 0.0, layout)
                        outs["qk_norm_fwd/" + name] = [qo, ko, rq, rk, qi, ki]
                        outs["qk_norm_bwd/" + name] = grads
                for op, ts_ in outs.items():
                    res[key + "/" + op] = digest(ts_)
                    # partial rotary out of place copies the tail: those bits are kept, not computed
                    computed = [t[..., :r] if t.dim() == 4 and t.shape[-1] == d and not op.startswith("qk_norm") else t for t in ts_]
                    if not nan_ok(computed):
                        bad.append(key + "/" + op)
    # the fused forward stores float32 / float64 rows it knows finite without making NaNs
    # canonical (finite weights and tables below 2^40, a finite positive inverse RMS): rows
    # outside that must still store the canonical NaN. Huge finite weights or tables (the
    # products overflow: inf - inf), a zero row with eps = 0 (0 * inf), a row holding an
    # infinity (its sum is inf, its inverse RMS 0: inf * 0), and weights/tables of 2^39
    # (every output finite)
    for dt, big in ((torch.float32, 1e38), (torch.float64, 1e307)):
        for layout in ("half", "interleaved"):
            q = torch.randn(2, 3, 4, 64, generator=g).to(dt)
            q[0, 1] = 0.0
            q[1, 2, 1, 5] = float("inf")
            k = torch.randn(2, 3, 2, 64, generator=g).to(dt)
            c, sn = torch.randn(3, 1, 32, generator=g).to(dt), torch.randn(3, 1, 32, generator=g).to(dt)
            w = torch.randn(64, generator=g).to(dt)
            for name, (w1, cc, ss, eps) in (("w_huge", (w * big, c, sn, 1e-6)),
                                            ("tables_huge", (w, c * big, sn * big, 1e-6)),
                                            ("eps0", (w, c, sn, 0.0)),
                                            ("bound", (w.sign() * 2.0 ** 39, c.sign() * 2.0 ** 39, sn.sign() * 2.0 ** 39, 1e-6))):
                qo, ko, rq, rk = R.qk_norm_rotary_fwd(q, k, w1, w1, cc, ss, eps, 0.0, layout)
                qi, ki = q.clone(), k.clone(); R.qk_norm_rotary_(qi, ki, w1, w1, cc, ss, eps, 0.0, layout)
                key = f"raw/{str(dt)[6:]}/{layout}/{name}"
                res[key] = digest([qo, ko, rq, rk, qi, ki])
                if not nan_ok([qo, ko, qi, ki]):
                    bad.append(key)
                if name == "bound" and bool(torch.isnan(qo[0, 0]).any() or torch.isnan(ko).any()):
                    bad.append(key + " (a NaN in rows that have none)")
    # float16 fused forward rows whose weights or tables are too large for results known below
    # 65504 (the portable level then narrows them with the overflow test: results overflow to
    # inf), next to rows just inside the bounds (weights just below 65504 / (4·sqrt(d)))
    for layout in ("half", "interleaved"):
        q, k = torch.randn(2, 3, 4, 64, generator=g).half(), torch.randn(2, 3, 2, 64, generator=g).half()
        c, sn = torch.randn(3, 1, 32, generator=g), torch.randn(3, 1, 32, generator=g)
        c2, sn2 = torch.cat([c[:1] * 30.0, c[1:]]), torch.cat([sn[:1] * 30.0, sn[1:]])  # |c| + |s| >= 3.99 in row 0
        for name, (w, cc, ss) in (("w_big", (torch.randn(64, generator=g) * 20000.0, c, sn)),
                                  ("w_edge", (torch.full((64,), 65504.0 / (4.0 * 8.0) * 0.999), c, sn)),
                                  ("tables_big", (torch.full((64,), 1500.0), c2, sn2))):
            qo, ko, rq, rk = R.qk_norm_rotary_fwd(q, k, w, w, cc, ss, 1e-6, 0.0, layout)
            res[f"f16_bound/{layout}/{name}"] = digest([qo, ko])
        # small weights and tables, but rows holding inf / NaN or all zero with eps = 0 (their
        # inverse RMS is 0, NaN or inf: not bounded)
        qb = q.clone()
        qb[0, 0, 1, 3], qb[0, 1, 2, 7], qb[1, 2] = float("inf"), float("nan"), 0.0
        qo, ko, rq, rk = R.qk_norm_rotary_fwd(qb, k, torch.ones(64), torch.ones(64), c, sn, 0.0, 0.0, layout)
        res[f"f16_bound/{layout}/rows_not_finite"] = digest([qo, ko])
        if not nan_ok([qo, ko]):
            bad.append(f"f16_bound/{layout}/rows_not_finite")
    # fused forward results that are float32 subnormals (tiny weights and tables), in blocks
    # of normal ones: bfloat16 keeps them (its exponent range is float32's), but the
    # avx512bf16 conversion instructions would flush them to zero
    for dt in (torch.bfloat16, torch.float32, torch.float16):
        for layout in ("half", "interleaved"):
            q, k = torch.randn(2, 3, 4, 128, generator=g).to(dt), torch.randn(2, 3, 2, 128, generator=g).to(dt)
            c, sn = torch.randn(3, 1, 64, generator=g) * 2.0 ** -10, torch.randn(3, 1, 64, generator=g) * 2.0 ** -10
            w = torch.randn(128, generator=g) * torch.where(torch.rand(128, generator=g) < 0.5, 2.0 ** -118, 1.0)
            qo, ko, rq, rk = R.qk_norm_rotary_fwd(q, k, w, w, c, sn, 1e-6, 0.0, layout)
            res[f"tiny/{str(dt)[6:]}/{layout}"] = digest([qo, ko])
    # the order of the backward's dot product (dot16: lane j sums elements j, j + 16, ... in
    # turn): x = 1, the identity rotation, unit weights and rows of g whose products cancel in
    # every lane — B = 2^12, s = 2^-14, lane terms (B, s, -B, s) or (s, B, s, -B) in element
    # order: ((B + s) - B) + s = s, but any other order (e.g. (s + B) + s - B = 0) changes the
    # lane's sum, so cc and dx
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for layout in ("half", "interleaved"):
            for d in (64, 128):
                q, k = torch.ones(3, 2, 4, d).to(dt), torch.ones(3, 2, 2, d).to(dt)
                w, c1, s0 = torch.ones(d), torch.ones(2, 1, d // 2), torch.zeros(2, 1, d // 2)
                qo, ko, rq, rk = R.qk_norm_rotary_fwd(q, k, w, w, c1, s0, 1e-6, 0.0, layout)

                def cancelling(shape):
                    B, sm = 2.0 ** 12, 2.0 ** -14
                    pats = torch.tensor([[B, sm, -B, sm], [sm, B, sm, -B]])
                    rows = torch.randint(0, 2, shape[:-1], generator=g)  # a pattern per row
                    t = pats[rows][..., (torch.arange(shape[-1]) // 16) % 4]
                    sign = torch.where(torch.rand(shape[:-1] + (1,), generator=g) < 0.5, -1.0, 1.0)
                    return (t * sign).to(dt)

                gq, gk = cancelling(qo.shape), cancelling(ko.shape)
                grads = list(R.qk_norm_rotary_bwd(gq, gk, q, k, w, w, rq, rk, c1, s0, 0.0, layout))
                res[f"order/{str(dt)[6:]}/{layout}/d{d}"] = digest(grads)
    print(json.dumps({"capability": R.cpu_capability(), "digests": res, "noncanonical": bad}))
    """
)


def _run(level, **env):
    return run_at_level(_PROBE, level, env=env)


@pytest.fixture(scope="module")
def portable():
    return _run("default")


def test_the_portable_level_stores_only_canonical_nans(portable):
    assert portable["capability"] == "default"
    assert portable["noncanonical"] == []
    assert len(portable["digests"]) > 300


@pytest.mark.parametrize("level", [lv for lv in ops.levels() if lv != "default"])
def test_every_level_gives_the_bits_of_the_portable_level(level, portable):
    res = _run(level)
    assert res["capability"] == level
    assert res["noncanonical"] == []
    differ = sorted(k for k, v in res["digests"].items() if portable["digests"].get(k) != v)
    assert differ == [], f"{level} differs from default in {len(differ)} cases, e.g. {differ[:8]}"


@pytest.mark.parametrize("level", ops.levels())
def test_streaming_stores_give_the_same_bits(level, portable):
    """``ROPEKIT_STREAM_BYTES=0``: every out-of-place output the kernels can stream (aligned,
    float32 / bfloat16) is written with streaming stores, at every size the probe has (by
    default only outputs of 16 MiB and more are); the bits stay those of the portable level
    with regular stores."""
    res = _run(level, ROPEKIT_STREAM_BYTES="0")
    assert res["capability"] == level
    assert res["noncanonical"] == []
    differ = sorted(k for k, v in res["digests"].items() if portable["digests"].get(k) != v)
    assert differ == [], f"{level} with streaming stores differs in {len(differ)} cases, e.g. {differ[:8]}"
