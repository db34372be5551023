"""Exact tables are a pure function of the angle: the C library's cos/sin per element.

``torch.cos`` on float64 CPU tensors runs a vector math library whose results differ from the
C library's in the last bit for ~1 in 400 angles, and which has returned values accurate to
only ~28 bits on the first call in a fresh worker thread (seen in ~2 of 100 pytest
subprocesses: 66 of 2112 float32 table values 1 ulp off, all in the second thread's half).
The tables therefore come from ``torch.ops.ropekit.cos_sin`` (``std::cos``/``std::sin`` per
element): the oracle here is Python's ``math.cos``/``math.sin``, which call the same C
functions, so the comparison is bit for bit.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import ropekit
from ropekit import RopeConfig, cos_sin, ops
from ropekit.tables import cos_sin_f64

pytestmark = pytest.mark.skipif(not ops.LOADED, reason=f"the compiled ops are not built: {ops.REASON}")


def _math(angles):  # the oracle: Python's math module, the C library's cos/sin, one value at a time
    flat = angles.reshape(-1).tolist()
    c = torch.tensor([math.cos(a) for a in flat], dtype=torch.float64).reshape(angles.shape)
    s = torch.tensor([math.sin(a) for a in flat], dtype=torch.float64).reshape(angles.shape)
    return c, s


def _angles():
    g = torch.Generator().manual_seed(3)
    cfg = RopeConfig(128, base=500000.0)
    pos = torch.cat([torch.arange(300), torch.randint(0, 2**40, (200,), generator=g), torch.tensor([2**53])])
    a = pos.to(torch.float64)[:, None] * cfg.inv_freq()  # [501, 64]: one rounding per product
    extra = torch.tensor([0.0, -0.0, 1e-300, 5e-324, -3.0, math.pi / 2, 1e22, -1e300, 2.0**1000], dtype=torch.float64)
    return a, extra


def test_cos_sin_f64_bit_equal_to_the_c_library():
    a, extra = _angles()
    for x in (a, extra, a.t(), a[:, ::3]):  # contiguous, transposed, strided
        c, s = cos_sin_f64(x)
        wc, ws = _math(x)
        assert c.dtype == s.dtype == torch.float64 and c.shape == s.shape == x.shape
        assert torch.equal(c, wc) and torch.equal(s, ws)
    # the reason it exists: torch.cos (MKL's vector math here) differs in the last bit for some
    # angles; where it does not (another BLAS build) this check has nothing to show
    tc = torch.cos(a)
    if not torch.equal(tc, _math(a)[0]):
        assert not torch.equal(tc, cos_sin_f64(a)[0])


def test_non_finite_angles_and_empty():
    x = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=torch.float64)
    c, s = cos_sin_f64(x)
    assert c.isnan().all() and s.isnan().all()
    c, s = cos_sin_f64(torch.empty(0, 5, dtype=torch.float64))
    assert c.shape == s.shape == (0, 5)


def test_threads_do_not_change_bits():
    a, _ = _angles()
    big = a.repeat(20, 1)  # 640k values: many chunks of at::parallel_for
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cos_sin_f64(big)
        torch.set_num_threads(max(2, n))
        many = cos_sin_f64(big)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_cos_sin_tables_are_the_c_library_rounded_once(dtype):
    cfg = RopeConfig(128, base=500000.0)
    pos = torch.tensor([0, 1, 7, 2**10, 2**16 + 5, 2**24 - 1, 2**31 + 11, 2**45 + 1])
    c, s = cos_sin(cfg, pos, dtype=dtype)
    inv = cfg.inv_freq().tolist()
    wc = torch.tensor([[math.cos(p * f) for f in inv] for p in pos.tolist()], dtype=torch.float64)
    ws = torch.tensor([[math.sin(p * f) for f in inv] for p in pos.tolist()], dtype=torch.float64)
    assert torch.equal(c, wc.to(dtype)) and torch.equal(s, ws.to(dtype))


def test_every_table_builder_uses_it():
    cfg = RopeConfig(64, base=10000.0)
    inv = cfg.inv_freq()
    # 2-D (image) tables: the angle of each pair is its axis' position times its frequency
    pos = torch.tensor([[0, 0], [3, 5], [1000, 77]])
    c, s = ropekit.multi_axis_cos_sin(cfg, pos, [16, 16], dtype=torch.float64)
    axes = torch.tensor([0] * 16 + [1] * 16)
    ang = pos.double()[:, axes] * inv
    wc, ws = _math(ang)
    assert torch.equal(c, wc) and torch.equal(s, ws)
    # rerotate: the rotation by (new - old)·θ
    x = torch.randn(1, 4, 2, 64, dtype=torch.float64)
    old, new = torch.arange(4), torch.arange(4) + 1000
    y = ropekit.rerotate(x, cfg, old, new)
    wc, ws = _math((new - old).double()[:, None] * inv)
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
    import hashlib

    c, s = cos_sin(RopeConfig(128), torch.arange(4096))
    here = hashlib.sha256(c.numpy().tobytes() + s.numpy().tobytes()).hexdigest() + "\n"
    assert outs == {here}
    wc, ws = _math(torch.arange(4096, dtype=torch.float64)[:, None] * RopeConfig(128).inv_freq())
    assert torch.equal(c, wc.float()) and torch.equal(s, ws.float())


def test_op_boundary():
    a, _ = _angles()
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


def test_gradient_path_uses_torch():
    a = torch.tensor([0.5, 1.5], dtype=torch.float64, requires_grad=True)
    c, s = cos_sin_f64(a)
    (c.sum() + s.sum()).backward()
    torch.testing.assert_close(a.grad, (-torch.sin(a) + torch.cos(a)).detach())


def test_vmap_over_angles():
    # torch.func.vmap: the op has no batching rule, so the tables take torch.cos there (no
    # fallback warning); values as the direct call up to torch.cos's last-bit differences
    a, _ = _angles()
    got = torch.func.vmap(cos_sin_f64)(a[:6])
    want = cos_sin_f64(a[:6])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=4e-16)
