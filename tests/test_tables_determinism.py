"""Exact tables are a pure function of the angle, computed the same way in every process.

``torch.cos`` on float64 CPU tensors runs a vector math library which has returned values
accurate to only ~28 bits on the first call in a fresh worker thread (seen in ~2 of 100 pytest
subprocesses: 66 of 2112 float32 table values 1 ulp off, all in the second thread's half).
The tables come from ``torch.ops.ropekit.cos_sin`` instead: a reduction by pi/2 and
polynomials in IEEE double operations (the kernel of each instruction-set level, the same
bits at each), and the C library's ``cos``/``sin`` for the angles outside the reduction's
range. The oracle here is Python's ``math.cos``/``math.sin`` (the C
library, within 1 ulp of the exact value): the op agrees with it within 1 ulp of float64, bit
for bit on the C library's lanes, and rounded to float32 / bfloat16 / float16 bit for bit.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from fractions import Fraction

import pytest
import torch

import ropekit
from ropekit import RopeConfig, cos_sin, ops
from ropekit.tables import cos_sin_f64

pytestmark = pytest.mark.skipif(not ops.LOADED, reason=f"the compiled ops are not built: {ops.REASON}")

LIMIT = 1.6e6  # the op's reduction covers |x| < LIMIT (csrc/ops.cpp, trig::LIMIT)


def _math(angles):  # the oracle: Python's math module, the C library's cos/sin, one value at a time
    flat = angles.reshape(-1).tolist()
    c = torch.tensor([math.cos(a) for a in flat], dtype=torch.float64).reshape(angles.shape)
    s = torch.tensor([math.sin(a) for a in flat], dtype=torch.float64).reshape(angles.shape)
    return c, s


def _ulps(a, b):  # distance in float64 ulps of finite values of the same sign or zero
    ia, ib = a.view(torch.int64), b.view(torch.int64)
    same = (a == b) | (torch.sign(a) == torch.sign(b))
    assert bool(same.all()), "a sign differs"
    return (ia - ib).abs()


def _angles():
    g = torch.Generator().manual_seed(3)
    cfg = RopeConfig(128, base=500000.0)
    pos = torch.cat([torch.arange(300), torch.randint(0, 2**22, (300,), generator=g),
                     torch.randint(0, 2**40, (40,), generator=g), torch.tensor([2**53])])
    a = pos.to(torch.float64)[:, None] * cfg.inv_freq()  # [641, 64]: one rounding per product
    r = (torch.rand(20000, generator=g, dtype=torch.float64) - 0.5) * 200  # every quadrant, both signs
    return torch.cat([a.reshape(-1), r])


def _specials():
    k = torch.arange(1, 200, dtype=torch.float64)
    near = torch.cat([k * (math.pi / 2), torch.nextafter(k * (math.pi / 2), torch.tensor(0.0, dtype=torch.float64))])
    return torch.cat([
        torch.tensor([0.0, -0.0, 1e-300, 5e-324, -3.0, 2.0**-30, 2.0**-31, math.pi / 4, -math.pi / 4, 1e22,
                      -1e300, 2.0**1000, LIMIT, -LIMIT, math.nextafter(LIMIT, 0.0), 1.5e6, -1.5e6], dtype=torch.float64),
        near,  # multiples of pi/2 in double: reduced angles ~1e-16 (the C library's lanes)
    ])


def _pi_over_2():  # pi/2 as a Fraction, to ~400 bits: Machin's formula in integer arithmetic
    bits = 400

    def atan_inv(n):
        x = s = (1 << bits) // n
        k, sign = 1, -1
        while x:
            x //= n * n
            s += sign * (x // (2 * k + 1))
            sign, k = -sign, k + 1
        return s

    return Fraction(4 * (4 * atan_inv(5) - atan_inv(239)), 2 << bits)


def _near_multiples_of_pi_over_2():
    """Doubles below the reduction's limit that are exceptionally close to a multiple k·pi/2
    with large k (continued-fraction convergents of (pi/2)·2^(52-e) for binades e): the
    angles where the reduction's absolute error is largest relative to the reduced angle."""
    half_pi, out = _pi_over_2(), []
    for e in range(10, 21):  # x in [2^e, 2^(e+1))
        alpha = half_pi * 2 ** (52 - e)  # x = m·2^(e-52) ~ k·pi/2  <=>  m/k ~ alpha
        h0, h1, k0, k1, rest = 0, 1, 1, 0, alpha
        for _ in range(60):
            a_i = math.floor(rest)
            h0, h1, k0, k1 = h1, a_i * h1 + h0, k1, a_i * k1 + k0
            if h1 < 2**53 and k1 >= 2**8 and h1 * 2.0 ** (e - 52) < LIMIT:
                out.append(h1 * 2.0 ** (e - 52))
            if rest == a_i or h1 >= 2**53:
                break
            rest = 1 / (rest - a_i)
    return torch.tensor(sorted(set(out)), dtype=torch.float64)


def test_cos_sin_f64_within_one_ulp_of_the_c_library():
    hard = _near_multiples_of_pi_over_2()
    assert len(hard) >= 10
    a = torch.cat([_angles(), _specials(), hard, -hard])
    c, s = cos_sin_f64(a)
    wc, ws = _math(a)
    assert c.dtype == s.dtype == torch.float64 and c.shape == s.shape == a.shape
    assert int(_ulps(c, wc).max()) <= 1 and int(_ulps(s, ws).max()) <= 1
    # the C library is itself within 1 ulp of the exact value: most values agree bit for bit
    # (~98% here; without the rounding-error terms of the polynomials' leading sums, ~84%)
    assert float((c == wc).double().mean()) > 0.93 and float((s == ws).double().mean()) > 0.93
    # rounded to the table dtypes: the same values as the C library's (checked on these angles)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(c.to(dt), wc.to(dt)) and torch.equal(s.to(dt), ws.to(dt)), dt
    # the C library's lanes: large angles, and reduced angles below 2^-30, bit for bit
    lib = (a.abs() >= LIMIT) | (a.abs() < 2.0**-30)
    lib |= (a - torch.round(a / (math.pi / 2)) * (math.pi / 2)).abs() < 1e-12
    assert int(lib.sum()) > 400
    assert torch.equal(c[lib], wc[lib]) and torch.equal(s[lib], ws[lib])
    assert torch.equal(s[:2].view(torch.int64), a[:2].view(torch.int64))  # sin(-0) = -0


def test_layouts_and_vector_tails_give_the_same_bits():
    a = _angles()[:4099]
    c, s = cos_sin_f64(a)
    for x, idx in ((a.view(-1, 1).t(), None), (a[1:], slice(1, None)), (a[3:4098:2], slice(3, 4098, 2))):
        cx, sx = cos_sin_f64(x)
        want = (c, s) if idx is None else (c[idx], s[idx])
        assert torch.equal(cx.reshape(-1), want[0].reshape(-1)) and torch.equal(sx.reshape(-1), want[1].reshape(-1))
    for i in (0, 1, 2, 3, 4, 4097, 4098):  # alone: lane 0 of a zero-padded block
        ci, si = cos_sin_f64(a[i:i + 1])
        assert torch.equal(ci, c[i:i + 1]) and torch.equal(si, s[i:i + 1])


def test_non_finite_angles_and_empty():
    x = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=torch.float64)
    c, s = cos_sin_f64(x)
    assert c.isnan().all() and s.isnan().all()
    c, s = cos_sin_f64(torch.empty(0, 5, dtype=torch.float64))
    assert c.shape == s.shape == (0, 5)


def test_threads_and_flush_denormal_do_not_change_bits():
    big = _angles().repeat(30)  # ~1M values: many chunks of at::parallel_for
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cos_sin_f64(big)
        torch.set_num_threads(max(2, n))
        many = cos_sin_f64(big)
        flushed = torch.set_flush_denormal(True)
        ftz = cos_sin_f64(big)
    finally:
        torch.set_num_threads(n)
        torch.set_flush_denormal(False)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    if flushed:
        assert torch.equal(one[0], ftz[0]) and torch.equal(one[1], ftz[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_cos_sin_tables_match_the_c_library_rounded_once(dtype):
    cfg = RopeConfig(128, base=500000.0)
    pos = torch.tensor([0, 1, 7, 2**10, 2**16 + 5, 2**20 + 3, 2**24 - 1, 2**31 + 11, 2**45 + 1])
    c, s = cos_sin(cfg, pos, dtype=dtype)
    inv = cfg.inv_freq().tolist()
    wc = torch.tensor([[math.cos(p * f) for f in inv] for p in pos.tolist()], dtype=torch.float64)
    ws = torch.tensor([[math.sin(p * f) for f in inv] for p in pos.tolist()], dtype=torch.float64)
    if dtype == torch.float64:
        assert int(_ulps(c, wc).max()) <= 1 and int(_ulps(s, ws).max()) <= 1
    else:
        assert torch.equal(c, wc.to(dtype)) and torch.equal(s, ws.to(dtype))
    assert torch.equal((c, s)[0], cos_sin_f64(pos.double()[:, None] * cfg.inv_freq())[0].to(dtype))


def test_every_table_builder_uses_it():
    cfg = RopeConfig(64, base=10000.0)
    inv = cfg.inv_freq()
    # 2-D (image) tables: the angle of each pair is its axis' position times its frequency
    pos = torch.tensor([[0, 0], [3, 5], [1000, 77]])
    c, s = ropekit.multi_axis_cos_sin(cfg, pos, [16, 16], dtype=torch.float64)
    axes = torch.tensor([0] * 16 + [1] * 16)
    wc, ws = cos_sin_f64(pos.double()[:, axes] * inv)
    assert torch.equal(c, wc) and torch.equal(s, ws)
    # rerotate: the rotation by (new - old)·θ
    x = torch.randn(1, 4, 2, 64, dtype=torch.float64)
    old, new = torch.arange(4), torch.arange(4) + 1000
    y = ropekit.rerotate(x, cfg, old, new)
    wc, ws = cos_sin_f64((new - old).double()[:, None] * inv)
    want = ropekit.apply_rotary(x, wc[:, None], ws[:, None], backend="reference")
    assert torch.equal(y, want)


def test_first_call_in_fresh_processes_is_the_same():
    # each child's first float64 trigonometry is the table itself, split over 2 threads
    code = (
        "import hashlib, torch, ropekit\n"
        "torch.set_num_threads(2)\n"
        "c, s = ropekit.cos_sin(ropekit.RopeConfig(128), torch.arange(4096))\n"
        "print(hashlib.sha256(c.numpy().tobytes() + s.numpy().tobytes()).hexdigest())\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="2")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
            for _ in range(3)}
    c, s = cos_sin(RopeConfig(128), torch.arange(4096))
    here = hashlib.sha256(c.numpy().tobytes() + s.numpy().tobytes()).hexdigest() + "\n"
    assert outs == {here}
    wc, ws = _math(torch.arange(4096, dtype=torch.float64)[:, None] * RopeConfig(128).inv_freq())
    assert torch.equal(c, wc.float()) and torch.equal(s, ws.float())


def test_every_level_gives_the_same_bits(tmp_path):
    # the kernel runs at each instruction-set level's vector width (2 to 8 lanes): a fresh
    # process per level this CPU runs, the same angles (every lane path: reduced, the C
    # library's, zero-padded tails), the same bits
    a = torch.cat([_angles(), _specials(), _near_multiples_of_pi_over_2()])[:30001]
    torch.save(a, tmp_path / "a.pt")
    code = (
        "import sys, hashlib, torch, ropekit\n"
        "from ropekit.tables import cos_sin_f64\n"
        "a = torch.load(sys.argv[1])\n"
        "c, s = cos_sin_f64(a)\n"
        "print(torch.ops.ropekit.cpu_capability(), hashlib.sha256(c.numpy().tobytes() + s.numpy().tobytes()).hexdigest())\n"
    )
    c, s = cos_sin_f64(a)
    here = hashlib.sha256(c.numpy().tobytes() + s.numpy().tobytes()).hexdigest()
    levels = ops.levels()
    assert levels
    for lv in levels:
        env = dict(os.environ, ROPEKIT_CPU_CAPABILITY=lv)
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.pt")], capture_output=True, text=True,
                             env=env, check=True).stdout.split()
        assert out == [lv, here], (lv, out)


def test_op_boundary():
    a = _angles()[:1000].view(10, 100)
    torch.library.opcheck(torch.ops.ropekit.cos_sin.default, (a,))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        c, s = torch.ops.ropekit.cos_sin(torch.empty(3, 4, dtype=torch.float64))
        assert c.shape == s.shape == (3, 4) and c.dtype == torch.float64
    with pytest.raises(ValueError, match="float64 angles"):
        torch.ops.ropekit.cos_sin(torch.ones(3))
    # compiled: the op is called from the graph (same bits as eager)
    f = torch.compile(lambda p: cos_sin(RopeConfig(64), p), fullgraph=True, backend="eager")
    got = f(torch.arange(9))
    want = cos_sin(RopeConfig(64), torch.arange(9))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_op_is_differentiable():
    # direct calls of the op: d cos = -sin, d sin = cos (float64 gradcheck, twice)
    a = (torch.rand(7, dtype=torch.float64) - 0.5) * 20
    a = torch.cat([a, torch.tensor([2.0e6, 0.0], dtype=torch.float64)]).requires_grad_()  # both lane kinds
    torch.library.opcheck(torch.ops.ropekit.cos_sin.default, (a,))
    torch.autograd.gradcheck(lambda x: torch.ops.ropekit.cos_sin(x), (a,))
    torch.autograd.gradgradcheck(lambda x: torch.ops.ropekit.cos_sin(x), (a,))
    c, s = torch.ops.ropekit.cos_sin(a)
    gc, = torch.autograd.grad(c.sum(), a)
    assert torch.equal(gc, -torch.ops.ropekit.cos_sin(a.detach())[1])
    with torch.no_grad():
        c, s = torch.ops.ropekit.cos_sin(a)
    assert not c.requires_grad


def test_gradient_path_uses_torch():
    a = torch.tensor([0.5, 1.5], dtype=torch.float64, requires_grad=True)
    c, s = cos_sin_f64(a)
    (c.sum() + s.sum()).backward()
    torch.testing.assert_close(a.grad, (-torch.sin(a) + torch.cos(a)).detach())


def test_vmap_over_angles():
    # torch.func.vmap: the op has no batching rule, so the tables take torch.cos there
    a = _angles()[:600].view(6, 100)
    got = torch.func.vmap(cos_sin_f64)(a)
    want = cos_sin_f64(a)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=4e-16)


def test_cos_sin_under_vmap():
    # torch.func.vmap over a batch of position rows: the same tables as the batched call (the
    # position value checks, which would read a batched value, are skipped there)
    cfg = RopeConfig(32)
    pos = torch.arange(12).view(3, 4) * 1000
    got = torch.func.vmap(lambda p: cos_sin(cfg, p, dtype=torch.float64))(pos)
    want = cos_sin(cfg, pos, dtype=torch.float64)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=4e-16)
