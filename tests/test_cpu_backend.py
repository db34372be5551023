"""The fused CPU backend ("cpu") against the float64 reference and an independent float32 formula.

Expected values come from (a) ``backend="reference"`` (the dense rotation matrix in float64,
differentiated by torch) and (b) the rotation written out below with separate torch ops in
float32 (``x1*c - x2*s``; products rounded separately, as the kernel does with
``-ffp-contract=off``), cast once to the input dtype. (b) pins the bf16/fp16 rounding: the
kernel must be bit-identical to "compute in float32, round once to nearest even".
"""

from __future__ import annotations

import warnings

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RopeError, RotaryEmbedding, apply_rotary, apply_rotary_qk, cos_sin
from ropekit.backends import _cpu_build
from ropekit.backends import cpu

from _oracle import backward_for_mode

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LAYOUTS = ["half", "interleaved"]
# tolerance against the float64 oracle: a few ulp of the dtype (|x| <~ 4)
TOL = {torch.float32: 2e-6, torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float64: 1e-13}


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    cpu._reset()
    if not cpu.kernel_loaded():
        pytest.skip("the CPU kernel could not be built here (no C++ compiler)")
    yield
    cpu._reset()


@pytest.fixture
def no_eager(monkeypatch):
    """Fail if the backend falls back to eager: these tests must run the compiled kernel."""

    def boom(*a, **kw):
        raise AssertionError("eager fallback taken")

    monkeypatch.setattr(cpu._eager, "rotate", boom)


def _tables(d, s, r=None, positions=None, dtype=torch.float64):
    cfg = RopeConfig(d, rotary_dim=r)
    pos = torch.arange(s) if positions is None else positions
    return cos_sin(cfg, pos, dtype=dtype)  # [*pos.shape, r/2]


def _formula(x, cos, sin, layout, conjugate=False):
    """Independent float32 (float64 for float64 x) rotation, separate ops, one cast."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    r = 2 * cos.shape[-1]
    c, s = cos.to(cdt), sin.to(cdt)
    if conjugate:
        s = -s
    xf = x.to(cdt)
    if layout == "half":
        x1, x2 = xf[..., : r // 2], xf[..., r // 2 : r]
    else:
        x1, x2 = xf[..., 0:r:2], xf[..., 1:r:2]
    y1 = (x1 * c) - (x2 * s)
    y2 = (x2 * c) + (x1 * s)
    out = xf.clone()
    if layout == "half":
        out[..., : r // 2], out[..., r // 2 : r] = y1, y2
    else:
        out[..., 0:r:2], out[..., 1:r:2] = y1, y2
    return out.to(x.dtype)


def _ref(x, cos, sin, layout):
    """Float64 oracle."""
    return apply_rotary(x.double(), cos.double(), sin.double(), layout=layout, backend="reference")


def _assert_matches(y, x, cos, sin, layout, conjugate=False):
    assert y.dtype == x.dtype and y.shape == x.shape
    want = _formula(x, cos, sin, layout, conjugate)
    assert torch.equal(y, want), (y.double() - want.double()).abs().max()
    c, s = (cos, -sin) if conjugate else (cos, sin)
    torch.testing.assert_close(y.double(), _ref(x, c, s, layout), atol=TOL[x.dtype], rtol=TOL[x.dtype])


# ----------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "b,s,h,d,r",
    [(2, 5, 3, 72, None), (1, 1, 4, 64, None), (3, 7, 2, 72, 40), (2, 9, 3, 128, 96), (1, 4, 1, 8, 2)],
)
def test_forward_matches_reference(dtype, layout, b, s, h, d, r, no_eager):
    torch.manual_seed(b * 100 + s * 10 + h)
    x = torch.randn(b, s, h, d, dtype=dtype)
    x0 = x.clone()
    cos, sin = _tables(d, s, r)  # float64 [s, r/2]
    c32, s32 = cos.float()[:, None], sin.float()[:, None]  # [s, 1, r/2]
    y = apply_rotary(x, c32, s32, layout=layout, backend="cpu")
    assert torch.equal(x, x0), "input modified"
    _assert_matches(y, x, c32, s32, layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_conjugate_is_inverse(dtype, layout, no_eager):
    torch.manual_seed(1)
    x = torch.randn(2, 6, 3, 72, dtype=dtype)
    cos, sin = (t.float()[:, None] for t in _tables(72, 6))
    y = apply_rotary(x, cos, sin, layout=layout, backend="cpu", conjugate=True)
    _assert_matches(y, x, cos, sin, layout, conjugate=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_views_and_broadcast_tables(dtype, no_eager):
    """bshd views of bhsd memory, per-batch tables [b, s, 1, r/2], expanded tables, float64 and bf16 tables."""
    torch.manual_seed(2)
    b, s, h, d = 2, 11, 3, 72
    x = torch.randn(b, h, s, d, dtype=dtype).transpose(1, 2)  # [b, s, h, d] view, strides of bhsd
    assert not x.is_contiguous()
    pos = torch.stack([torch.arange(s), torch.arange(s) + 5])  # [b, s]
    cos, sin = _tables(d, s, positions=pos)  # [b, s, r/2]
    for c, sn in [
        (cos.float()[:, :, None], sin.float()[:, :, None]),  # [b, s, 1, r/2]
        (cos[:, :, None], sin[:, :, None]),  # float64 tables: converted to float32
        (cos.bfloat16()[:, :, None], sin.bfloat16()[:, :, None]),  # bf16 tables: converted
        (cos.float()[:, :, None].expand(b, s, h, d // 2), sin.float()[:, :, None].expand(b, s, h, d // 2)),
    ]:
        y = apply_rotary(x, c, sn, backend="cpu")
        assert y.stride() == x.stride()  # empty_like keeps the view's strides
        _assert_matches(y, x, c, sn, "half")
    # bhsd tensor with [s, r/2] tables (zero stride on b and h)
    xb = torch.randn(b, h, s, d, dtype=dtype)
    c0, s0 = (t.float() for t in _tables(d, s))
    _assert_matches(apply_rotary(xb, c0, s0, backend="cpu"), xb, c0, s0, "half")


def test_many_leading_dims_and_odd_strides():
    torch.manual_seed(3)
    # 6 leading dims, permuted (not mergeable into one)
    x = torch.randn(2, 3, 2, 2, 2, 3, 16).permute(1, 0, 3, 2, 5, 4, 6)  # [3, 2, 2, 2, 3, 2, 16]
    cos, sin = (t.float() for t in _tables(16, 2))  # [2, 8] broadcast to the last leading dim
    _assert_matches(apply_rotary(x, cos, sin, backend="cpu"), x, cos, sin, "half")
    # last dim not unit-stride -> eager fallback, still correct
    xs = torch.randn(2, 5, 3, 144)[..., ::2]
    c2, s2 = (t.float()[:, None] for t in _tables(72, 5))
    y = apply_rotary(xs, c2, s2, backend="cpu")
    torch.testing.assert_close(y.double(), _ref(xs, c2, s2, "half"), atol=2e-6, rtol=2e-6)
    # tables whose last dim is not unit-stride
    full = torch.randn(5, 1, 72)
    c3, s3 = full[..., ::2], full[..., 1::2]
    xx = torch.randn(2, 5, 3, 72)
    _assert_matches(apply_rotary(xx, c3, s3, backend="cpu"), xx, c3, s3, "half")


def test_nan_inf_and_rounding_edges_bf16(no_eager):
    cos = torch.tensor([[1.0, 0.0, 0.5, 1.0]])  # [1, r/2]
    sin = torch.tensor([[0.0, 1.0, 0.5, 0.0]])
    x = torch.tensor([[float("nan"), 1.0, float("inf"), 3.0, 2.0, float("nan"), 1.0, 1.00390625]], dtype=torch.bfloat16)
    y = apply_rotary(x, cos, sin, backend="cpu")
    _assert_nan_equal(y, _formula(x, cos, sin, "half"))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("half", [8, 16, 24, 40, 64])
@pytest.mark.parametrize("conjugate", [False, True])
def test_nan_payloads_stay_nan_bf16(layout, half, conjugate, no_eager):
    """NaN and inf in x and NaNs with any payload in the float32 tables: NaN exactly where the
    float32 formula has one, the same bits elsewhere. Pins the bf16 fast path, whose rounding has
    no NaN test (the tables' NaN payloads are made canonical per table row: a NaN whose low
    16 bits are set, e.g. 0x7FFFFFFF, would otherwise round to -0.0)."""
    g = torch.Generator().manual_seed(half)
    x = torch.randn(6, 4, 2 * half, generator=g).to(torch.bfloat16)  # [s, h, d]
    xb = x.view(torch.int16).view(-1)
    xb[::29], xb[3::31], xb[5::37], xb[9::43], xb[11::47] = 0x7FC0, -64, 0x7F80, 0x7FFF, -1  # NaN, -NaN, inf, NaNs
    cos, sin = torch.randn(6, 1, half, generator=g), torch.randn(6, 1, half, generator=g)
    cb, sb = cos.view(torch.int32).view(-1), sin.view(torch.int32).view(-1)
    payloads = [0x7FFFFFFF, -1, 0x7F800001, 0x7FFF8000, -32768, 0x7F800000, 0x7FC00000]  # NaNs, inf
    for i, bits in enumerate(payloads):
        cb[(7 * i + 3) % cb.numel()] = bits
        sb[(11 * i + 5) % sb.numel()] = bits
    y = apply_rotary(x, cos, sin, layout=layout, conjugate=conjugate, backend="cpu")
    _assert_nan_equal(y.view(torch.int16).view(torch.bfloat16), _formula(x, cos, sin, layout, conjugate))
    assert not torch.equal(torch.isnan(y), torch.zeros_like(y, dtype=torch.bool))  # the case is exercised


def _assert_nan_equal(a, b):
    assert a.shape == b.shape
    an, bn = torch.isnan(a), torch.isnan(b)
    assert torch.equal(an, bn)
    assert torch.equal(a[~an], b[~bn])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_correctly_rounded_float32(dtype, no_eager):
    """Many random values: bit-identical to float32 compute + one round-to-nearest-even."""
    torch.manual_seed(4)
    x = (torch.randn(4, 64, 8, 128) * torch.logspace(-3, 3, 128)).to(dtype)
    cos, sin = (t.float()[:, None] for t in _tables(128, 64, positions=torch.arange(64) * 997))
    y = apply_rotary(x, cos, sin, backend="cpu", layout="interleaved")
    assert torch.equal(y, _formula(x, cos, sin, "interleaved"))


# ----------------------------------------------------------------------------------------
# in place / out= / threads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_and_out(dtype, no_eager):
    torch.manual_seed(5)
    x = torch.randn(2, 7, 3, 72, dtype=dtype)
    cos, sin = (t.float()[:, None] for t in _tables(72, 7, 40))
    want = _formula(x, cos, sin, "half")
    xi = x.clone()
    ptr = xi.data_ptr()
    y = apply_rotary(xi, cos, sin, backend="cpu", inplace=True)
    assert y is xi and xi.data_ptr() == ptr
    assert torch.equal(xi, want)
    out = torch.full_like(x, 7.0)
    y = apply_rotary(x, cos, sin, backend="cpu", out=out)
    assert y is out and torch.equal(out, want)  # the tail (dims 40..71) copied too


def test_out_of_place_allocates_only_the_output(monkeypatch):
    """rotate_qk out of place: one empty_like per tensor, nothing else allocated by the backend."""
    torch.manual_seed(6)
    q, k = torch.randn(2, 5, 4, 64), torch.randn(2, 5, 2, 64)
    cos, sin = (t.float()[:, None] for t in _tables(64, 5))
    calls = []
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, *a, **kw: calls.append(t.shape) or real(t, *a, **kw))
    with torch.no_grad():
        qo, ko = cpu.rotate_qk(q, k, cos, sin, "half", False)
    assert calls == [q.shape, k.shape]
    assert qo.data_ptr() not in (q.data_ptr(), k.data_ptr())
    _assert_matches(qo, q, cos, sin, "half")
    _assert_matches(ko, k, cos, sin, "half")


@pytest.mark.parametrize("runtime", ["openmp", "pthreads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_threaded_split_matches(monkeypatch, dtype, runtime, no_eager):
    """Force the multi-threaded path on a small input (rows split across threads and q/k), on
    torch's OpenMP team (the default where torch runs one) and on the kernel's own pthreads."""
    monkeypatch.setattr(cpu, "PARALLEL_BYTES", 0)
    omp = cpu._openmp_entry_points()
    if runtime == "openmp" and omp is None:
        pytest.skip("no OpenMP runtime loaded by torch here")
    cpu._lib.rk_use_openmp(*(omp if runtime == "openmp" else (0, 0, 0)))
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        torch.manual_seed(7)
        q, k = torch.randn(3, 13, 5, 72, dtype=dtype), torch.randn(3, 13, 2, 72, dtype=dtype)
        cos, sin = (t.float()[:, None] for t in _tables(72, 13))
        wq, wk = _formula(q, cos, sin, "half"), _formula(k, cos, sin, "half")
        qo, ko = apply_rotary_qk(q, k, cos, sin, backend="cpu")
        assert torch.equal(qo, wq) and torch.equal(ko, wk)
        qo, ko = apply_rotary_qk(q, k, cos, sin, backend="cpu", inplace=True)
        assert qo is q and torch.equal(q, wq) and torch.equal(k, wk)
    finally:
        torch.set_num_threads(threads)
        cpu._lib.rk_use_openmp(*(omp or (0, 0, 0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_streaming_stores_match(monkeypatch, dtype, layout, no_eager):
    """Non-temporal stores (forced on small outputs), aligned and misaligned outputs, partial rotary."""
    monkeypatch.setattr(cpu, "NT_BYTES", 0)
    torch.manual_seed(71)
    for d, r in ((128, None), (72, 40)):
        x = torch.randn(2, 9, 5, d, dtype=dtype)
        cos, sin = (t.float()[:, None] for t in _tables(d, 9, r))
        want = _formula(x, cos, sin, layout)
        assert torch.equal(apply_rotary(x, cos, sin, layout=layout, backend="cpu"), want)
        buf = torch.empty(x.numel() + 1, dtype=dtype)
        out = buf[1:].view_as(x)  # misaligned by one element: regular stores
        assert torch.equal(apply_rotary(x, cos, sin, layout=layout, backend="cpu", out=out), want)


def test_qk_views_of_one_buffer_in_place(no_eager):
    """q and k as views of one fused qkv buffer, rotated in place in one call."""
    torch.manual_seed(8)
    qkv = torch.randn(2, 6, 4 + 2 + 2, 64)  # [b, s, hq + hk + hv, d]
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
    v0 = v.clone()
    cos, sin = (t.float()[:, None] for t in _tables(64, 6))
    wq, wk = _formula(q, cos, sin, "interleaved"), _formula(k, cos, sin, "interleaved")
    apply_rotary_qk(q, k, cos, sin, layout="interleaved", backend="cpu", inplace=True)
    assert torch.equal(q, wq) and torch.equal(k, wk) and torch.equal(v, v0)


def test_expanded_inplace_rejected():
    x = torch.randn(1, 3, 1, 8).expand(2, 3, 4, 8)
    cos, sin = (t.float()[:, None] for t in _tables(8, 3))
    with pytest.raises(RopeError, match="overlapping"):
        cpu.rotate_qk(x, x, cos, sin, "half", True)


# ----------------------------------------------------------------------------------------
# backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_matches_reference(dtype, layout, no_eager):
    torch.manual_seed(9)
    x = torch.randn(2, 5, 3, 72, dtype=dtype)
    cos, sin = (t.float()[:, None] for t in _tables(72, 5, 40))
    g = torch.randn(2, 5, 3, 72, dtype=dtype)
    xa = x.clone().requires_grad_()
    apply_rotary(xa, cos, sin, layout=layout, backend="cpu").backward(g)
    xr = x.double().requires_grad_()
    apply_rotary(xr, cos.double(), sin.double(), layout=layout, backend="reference").backward(g.double())
    torch.testing.assert_close(xa.grad.double(), xr.grad, atol=TOL[dtype], rtol=TOL[dtype])
    # the backward is the conjugated kernel, bit for bit
    assert torch.equal(xa.grad, _formula(g, cos, sin, layout, conjugate=True))


def test_backward_zero_stride_gradient_and_inplace_nonleaf(no_eager):
    torch.manual_seed(10)
    cos, sin = (t.float()[:, None] for t in _tables(64, 4))
    w = torch.randn(2, 4, 3, 64, requires_grad=True)
    y = apply_rotary(w * 2, cos, sin, backend="cpu", inplace=True)  # non-leaf in place
    y.sum().backward()  # gradient of ones, expanded (zero strides)
    wr = w.detach().double().requires_grad_()
    apply_rotary(wr * 2, cos.double(), sin.double(), backend="reference").sum().backward()
    torch.testing.assert_close(w.grad.double(), wr.grad, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# fused gather (RotaryEmbedding's path)


def _qk(fmt, b, s, hq, hk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shape = {"bshd": lambda h: (b, s, h, d), "bhsd": lambda h: (b, h, s, d), "sbhd": lambda h: (s, b, h, d), "thd": lambda h: (s, h, d)}[fmt]
    return torch.randn(*shape(hq), generator=g).to(dtype), torch.randn(*shape(hk), generator=g).to(dtype)


GATHER_CASES = [(f, k) for f in ("bshd", "bhsd", "sbhd") for k in ("none", "offsets", "positions_s", "positions_bs", "positions_1s")]
GATHER_CASES += [("thd", "none"), ("thd", "positions_s")]  # thd: cu_seqlens or [t] positions


@pytest.mark.parametrize("fmt,kind", GATHER_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_gather_matches_reference(fmt, kind, dtype, no_eager):
    b, s, hq, hk, d = 2, 7, 4, 2, 72
    cfg = RopeConfig(d, rotary_dim=48, layout="interleaved" if dtype == torch.bfloat16 else "half")
    q, k = _qk(fmt, b, s, hq, hk, d, dtype, seed=11)
    kw = {}
    if fmt == "thd":
        kw = {"cu_seqlens": torch.tensor([0, 3, 7])} if kind == "none" else {"positions": torch.tensor([5, 0, 9, 2, 2, 1, 30])}
    elif kind == "offsets":
        kw = {"offsets": torch.tensor([3, 17])}
    elif kind == "positions_s":
        kw = {"positions": torch.tensor([9, 1, 0, 4, 4, 20, 2])}
    elif kind == "positions_bs":
        kw = {"positions": torch.randint(0, 50, (b, s), generator=torch.Generator().manual_seed(1))}
    elif kind == "positions_1s":
        kw = {"positions": torch.arange(s)[None] + 3}
    ref = RotaryEmbedding(cfg, backend="reference", table_dtype=torch.float64)
    fast = RotaryEmbedding(cfg, backend="cpu")
    qr, kr = ref(q.double(), k.double(), format=fmt, **kw)
    q0, k0 = q.clone(), k.clone()
    qo, ko = fast(q, k, format=fmt, **kw)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    tol = TOL[dtype]
    torch.testing.assert_close(qo.double(), qr, atol=tol, rtol=tol)
    torch.testing.assert_close(ko.double(), kr, atol=tol, rtol=tol)
    # the unfused cpu path (gathered tables + rotate_qk) gives the same bits
    cos, sin = fast.cos_sin_for(q, format=fmt, **kw)
    qu, ku = apply_rotary_qk(q, k, cos, sin, layout=cfg.layout, backend="cpu")
    assert torch.equal(qo, qu) and torch.equal(ko, ku)
    # in place
    ptr = q.data_ptr()
    qi, ki = fast(q, k, format=fmt, inplace=True, **kw)
    assert qi is q and q.data_ptr() == ptr and torch.equal(q, qo) and torch.equal(k, ko)


@pytest.mark.parametrize("fmt", ["bshd", "thd"])
def test_gather_autograd(fmt, no_eager):
    torch.manual_seed(12)
    b, s, hq, hk, d = 2, 5, 3, 1, 64
    cfg = RopeConfig(d)
    q, k = _qk(fmt, b, s, hq, hk, d, torch.float32, seed=13)
    kw = {"cu_seqlens": torch.tensor([0, 2, 5])} if fmt == "thd" else {"offsets": torch.tensor([0, 7])}
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    outs = []
    for backend, dt in (("cpu", torch.float32), ("reference", torch.float64)):
        qa = q.to(dt).detach().clone().requires_grad_()
        ka = k.to(dt).detach().clone().requires_grad_()
        rope = RotaryEmbedding(cfg, backend=backend, table_dtype=dt)
        qo, ko = rope(qa * 1, ka * 1, format=fmt, inplace=True, **kw)  # in place on non-leaves
        (qo * gq.to(dt)).sum().add((ko * gk.to(dt)).sum()).backward()
        outs.append((qa.grad.double(), ka.grad.double()))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("mode", ["q_only", "both_sum", "k_no_grad"])
def test_gather_backward_partial_and_expanded(mode, inplace, monkeypatch, no_eager):
    """Backward of the fused gather: one kernel call, only for the gradients that exist and are needed.

    q_only: k's output unused -> a one-tensor call, no gradient for k; both_sum: expanded
    (zero-stride) gradients from .sum(); k_no_grad: k's gradient is not needed.
    """
    b, s, hq, hk, d = 2, 3, 2, 1, 16
    cos_t, sin_t = cos_sin(RopeConfig(d, rotary_dim=12), torch.arange(8))  # float32 [8, 6]
    pos = torch.tensor([[1, 7, 0], [3, 3, 5]])
    c, sn = cos_t[pos][:, :, None], sin_t[pos][:, :, None]  # [b, s, 1, r/2]
    q, k = _qk("bshd", b, s, hq, hk, d, torch.float32, seed=21)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    calls = []
    real = cpu._run
    monkeypatch.setattr(cpu, "_run", lambda jobs, njobs, serial=0: calls.append(njobs) or real(jobs, njobs, serial))
    qa = q.clone().requires_grad_()
    ka = k.clone().requires_grad_(mode != "k_no_grad")
    qi, ki = (qa * 1, ka * 1) if inplace else (qa, ka)
    qo, ko = cpu.rotate_qk_gather(qi, ki, cos_t, sin_t, pos, "bshd", "half", inplace)
    assert (qo is qi and ko is ki) == inplace
    assert torch.equal(qo, _formula(q, c, sn, "half")) and torch.equal(ko, _formula(k, c, sn, "half"))
    want_q, want_k = backward_for_mode(mode, qo, ko, gq, gk, q, k)
    assert calls == [2, 1 if want_k is None else 2]  # forward q+k, backward one call
    assert torch.equal(qa.grad, _formula(want_q, c, sn, "half", conjugate=True))
    if want_k is None:
        assert ka.grad is None
    else:
        assert torch.equal(ka.grad, _formula(want_k, c, sn, "half", conjugate=True))


def test_gather_positions_out_of_range_write_nothing():
    q, k = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 1, 16)
    cos_t, sin_t = cos_sin(RopeConfig(16), torch.arange(8))  # [8, 8] float32
    q0, k0 = q.clone(), k.clone()
    for bad in (torch.tensor([0, 1, 8, 2]), torch.tensor([[0, -1, 2, 3]])):
        with pytest.raises(RopeError, match=r"positions in \[0, 8\)"):
            cpu.rotate_qk_gather(q, k, cos_t, sin_t, bad, "bshd", "half", True)
        assert torch.equal(q, q0) and torch.equal(k, k0)
    with pytest.raises(RopeError, match="positions of shape"):
        cpu.rotate_qk_gather(q, k, cos_t, sin_t, torch.arange(5), "bshd", "half", False)
    # other table dtypes take the gather-then-convert path: still range-checked
    with pytest.raises(RopeError, match=r"positions in \[0, 8\)"):
        cpu.rotate_qk_gather(q, k, cos_t.double(), sin_t.double(), torch.tensor([0, 1, 9, 2]), "bshd", "half", False)
    qo, ko = cpu.rotate_qk_gather(q, k, cos_t.double(), sin_t.double(), torch.tensor([0, 1, 7, 2]), "bshd", "half", False)
    c, s = cos_t.double()[torch.tensor([0, 1, 7, 2])][:, None], sin_t.double()[torch.tensor([0, 1, 7, 2])][:, None]
    assert torch.equal(qo, _formula(q, c, s, "half"))


# ----------------------------------------------------------------------------------------
# build: fallback without a compiler, cache


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    monkeypatch.setenv("ROPEKIT_CACHE_DIR", str(tmp_path))
    cpu._reset()
    yield tmp_path
    cpu._reset()


def test_no_compiler_falls_back_to_eager_with_one_warning(fresh_build, monkeypatch):
    monkeypatch.setenv("ROPEKIT_CXX", str(fresh_build / "no-such-compiler"))
    x = torch.randn(2, 3, 2, 16)
    cos, sin = (t.float()[:, None] for t in _tables(16, 3))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y1 = apply_rotary(x, cos, sin, backend="cpu")
        y2, _ = apply_rotary_qk(x, x, cos, sin, backend="cpu")
        rope = RotaryEmbedding(RopeConfig(16), backend="cpu")
        y3, _ = rope(x, x)
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "falls back to the eager" in msgs[0], msgs
    assert not cpu.kernel_loaded()
    want = _ref(x, cos, sin, "half")
    for y in (y1, y2, y3):
        torch.testing.assert_close(y.double(), want, atol=2e-6, rtol=2e-6)
    assert list(fresh_build.iterdir()) == []


def test_unwritable_cache_dir_falls_back(fresh_build, monkeypatch):
    blocker = fresh_build / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ROPEKIT_CACHE_DIR", str(blocker / "sub"))
    with pytest.warns(RuntimeWarning, match="cache directory"):
        assert not cpu.kernel_loaded()
    x = torch.randn(1, 3, 2, 8)
    cos, sin = (t.float()[:, None] for t in _tables(8, 3))
    torch.testing.assert_close(apply_rotary(x, cos, sin, backend="cpu").double(), _ref(x, cos, sin, "half"), atol=2e-6, rtol=2e-6)


def test_cache_reuse_and_key(fresh_build, monkeypatch):
    assert cpu.kernel_loaded()  # builds into the empty cache dir
    libs = [p for p in fresh_build.iterdir() if p.suffix == ".so"]
    assert len(libs) == 1 and not [p for p in fresh_build.iterdir() if p.suffix == ".tmp"]
    mtime = libs[0].stat().st_mtime_ns
    cpu._reset()

    def no_compile(*a, **kw):
        raise AssertionError("recompiled although the cache holds the library")

    monkeypatch.setattr(_cpu_build, "_compile", no_compile)
    assert cpu.kernel_loaded()
    assert libs[0].stat().st_mtime_ns == mtime
    x = torch.randn(1, 2, 1, 8)
    cos, sin = (t.float()[:, None] for t in _tables(8, 2))
    _assert_matches(apply_rotary(x, cos, sin, backend="cpu"), x, cos, sin, "half")
    # the key covers the CPU, the flags and the source
    cxx = _cpu_build.find_compiler()
    flags = _cpu_build._BASE_FLAGS + ["-march=native"]
    p0 = _cpu_build.library_path(cxx, flags)
    assert p0 == libs[0]
    assert _cpu_build.library_path(cxx, flags[:-1]) != p0
    monkeypatch.setattr(_cpu_build, "_cpu_identity", lambda: "another cpu")
    assert _cpu_build.library_path(cxx, flags) != p0


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.delenv("ROPEKIT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _cpu_build.cache_dir() == tmp_path / "ropekit"
    monkeypatch.setenv("ROPEKIT_CACHE_DIR", str(tmp_path / "x"))
    assert _cpu_build.cache_dir() == tmp_path / "x"


def test_backend_registry_and_auto():
    x = torch.randn(1, 2, 1, 8)
    assert ropekit.backends.resolve("auto", x).NAME == "cpu"
    assert cpu.supports(x) and not cpu.supports(torch.zeros(2, dtype=torch.int64))


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def _vma_field(addr: int, field: str):
    """``field`` of the /proc/self/smaps mapping that holds ``addr`` (None if not found)."""
    cur = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                cur = lo <= addr < hi
            elif cur and head == field + ":":
                return line.split()[1]
    return None


def test_new_output_is_empty_like_and_advises_huge_pages():
    x = torch.randn(6, 4, 8).transpose(0, 1)  # a permuted view: empty_like keeps its strides
    out = cpu.new_output(x)
    assert out.shape == x.shape and out.stride() == x.stride() and out.dtype == x.dtype
    assert cpu.new_output(x, torch.contiguous_format).is_contiguous()
    assert cpu.kernel_loaded()
    assert cpu._lib.rk_advise_huge(out.data_ptr(), 4096) == 1  # no whole 2 MiB page inside: nothing done
    if _thp_mode() not in ("always", "madvise") or not hasattr(__import__("os"), "sched_getaffinity"):
        pytest.skip("no transparent huge pages on this system")
    big = cpu.new_output(torch.empty(cpu.HUGE_BYTES // 4 * 2))  # 2 x HUGE_BYTES of float32
    p = big.data_ptr() + (2 << 20) + 4096  # inside the advised (2 MiB-aligned) interior
    eligible = _vma_field(p, "THPeligible")
    if eligible is None:
        pytest.skip("this kernel's smaps has no THPeligible field")
    assert eligible == "1"
    # and a result through the public path is still right
    q = torch.randn(1, 2048, 8, 128)
    cos, sin = cos_sin(RopeConfig(128), torch.arange(2048))
    y = apply_rotary(q, cos[:, None], sin[:, None], backend="cpu")
    assert torch.equal(y, _formula(q, cos[:, None], sin[:, None], "half"))


# --- the per-signature fast path of apply_rotary_qk (cpu.fast_qk) ---------------------------


def _decode_inputs(dtype=torch.float32, b=3, hq=4, hk=2, d=32):
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(b, 1, hq + 2 * hk, d, generator=g).to(dtype)  # one projection output
    q, k = qkv[:, :, :hq], qkv[:, :, hq:hq + hk]  # non-contiguous views of one storage
    cos, sin = _tables(d, 64, positions=torch.tensor([[5], [17], [40]]), dtype=torch.float32)
    return qkv, q, k, cos[:, :, None], sin[:, :, None]  # tables [b, 1, 1, r/2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_fast_qk_repeats_the_validated_call(dtype, inplace, monkeypatch, no_eager):
    cpu._PLANS.clear()
    qkv, q, k, cos, sin = _decode_inputs(dtype)
    want = (_formula(q, cos, sin, "half"), _formula(k, cos, sin, "half"))
    before = qkv.clone()
    got1 = apply_rotary_qk(q, k, cos, sin, inplace=inplace, backend="cpu")  # validated, recorded
    assert len(cpu._PLANS) == 1
    if inplace:
        qkv.copy_(before)
    # from now on the checks must not run: the fast path alone answers
    monkeypatch.setattr(ropekit.functional, "check_tables", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    got2 = apply_rotary_qk(q, k, cos, sin, inplace=inplace, backend="cpu")
    for g1, g2, w in zip(got1, got2, want):
        assert torch.equal(g2, w) and (inplace or torch.equal(g1, w))
    if inplace:
        assert got2[0].data_ptr() == q.data_ptr() and got2[1].data_ptr() == k.data_ptr()
        assert torch.equal(qkv[:, :, 8:], before[:, :, 8:])  # the v part is untouched
    else:
        assert torch.equal(qkv, before)


def test_fast_qk_other_signatures_are_still_checked():
    cpu._PLANS.clear()
    _, q, k, cos, sin = _decode_inputs()
    apply_rotary_qk(q, k, cos, sin, backend="cpu")
    with pytest.raises(RopeError):
        apply_rotary_qk(q, k, cos, sin, layout="halves", backend="cpu")
    with pytest.raises(RopeError):  # tables of another batch: a new signature, checked
        apply_rotary_qk(q, k, cos[:2], sin[:2], backend="cpu")
    with pytest.raises(RopeError):  # same signature, but one table on a different dtype
        apply_rotary_qk(q, k, cos.to(torch.int32), sin, backend="cpu")


def test_fast_qk_in_place_bumps_the_version_counter():
    """A kernel write autograd does not see would make a saved tensor silently stale."""
    cpu._PLANS.clear()
    _, q, k, cos, sin = _decode_inputs()
    q, k = q.clone(), k.clone()
    w = torch.randn(q.shape[-1], 3, requires_grad=True)
    for _ in range(2):  # the second call takes the fast path
        y = (q @ w).sum()  # saves q for backward
        v = q._version
        apply_rotary_qk(q, k, cos, sin, inplace=True, backend="cpu")
        assert q._version > v
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


@pytest.mark.parametrize("mode", ["fresh", "inplace", "out"])
@pytest.mark.parametrize("conjugate", [False, True])
def test_fast_rotate_repeats_the_validated_call(mode, conjugate, monkeypatch, no_eager):
    cpu._PLANS.clear()
    _, q, _, cos, sin = _decode_inputs(torch.bfloat16)
    q = q.clone()
    want = _formula(q, cos, sin, "half", conjugate)
    buf = torch.empty_like(q)
    kw = dict(conjugate=conjugate, backend="cpu", inplace=mode == "inplace", out=buf if mode == "out" else None)
    x = q.clone()
    apply_rotary(x, cos, sin, **kw)  # validated, recorded
    assert len(cpu._PLANS) == 1
    monkeypatch.setattr(ropekit.functional, "check_tables", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    x = q.clone()
    v = (x if mode == "inplace" else buf)._version
    y = apply_rotary(x, cos, sin, **kw)
    assert torch.equal(y, want)
    assert y.data_ptr() == {"fresh": y.data_ptr(), "inplace": x.data_ptr(), "out": buf.data_ptr()}[mode]
    if mode != "fresh":
        assert y._version > v
    if mode != "inplace":
        assert torch.equal(x, q)


def test_fast_rotate_out_aliasing_x_still_handled():
    cpu._PLANS.clear()
    x = torch.randn(4, 8, 16)
    cos, sin = _tables(16, 8, dtype=torch.float32)  # [8, 8]: x is [b, s, d]
    other = torch.empty_like(x)
    apply_rotary(x, cos, sin, out=other, backend="cpu")  # records (x, out) of this signature
    want = _formula(x, cos, sin, "half")
    # out = x itself: the same signature, but the general path must treat it as in place
    y = apply_rotary(x, cos, sin, out=x, backend="cpu")
    assert y.data_ptr() == x.data_ptr() and torch.equal(y, want)
    # out overlapping x (same shape/strides, shifted by one row): rejected, nothing written
    base = torch.randn(5 * 8 * 16)
    xa, oa = base[: 4 * 128].view(4, 8, 16), base[128:].view(4, 8, 16)
    before = base.clone()
    with pytest.raises(RopeError):
        apply_rotary(xa, cos, sin, out=oa, backend="cpu")
    assert torch.equal(base, before)


def test_first_call_does_not_wait_for_the_compile(fresh_build, monkeypatch):
    """Empty cache: the first calls run eager while the kernel builds in the background."""
    monkeypatch.setattr(cpu, "_WAIT_BUILD", False)
    x = torch.randn(2, 3, 2, 16)
    cos, sin = (t.float()[:, None] for t in _tables(16, 3))
    y = apply_rotary(x, cos, sin, backend="cpu")
    torch.testing.assert_close(y.double(), _ref(x, cos, sin, "half"), atol=2e-6, rtol=2e-6)
    assert cpu._lib is None  # not built yet: that call was eager
    assert cpu.kernel_loaded()  # waits for the background build
    assert list(fresh_build.iterdir())  # the library is in the cache
    assert torch.equal(apply_rotary(x, cos, sin, backend="cpu"), _formula(x, cos, sin, "half"))


@pytest.mark.parametrize("seed", range(6))
def test_fast_paths_fuzz_against_formula(seed):
    """Random layouts, dtypes, strides (transposed / sliced views), broadcast tables, in place,
    out= and fresh: the first call (checked) and the repeats (fast path) give the formula's
    bits, and never touch memory outside their outputs."""
    g = torch.Generator().manual_seed(100 + seed)
    cpu._PLANS.clear()

    def ri(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    for _ in range(12):
        dtype = [torch.float32, torch.bfloat16, torch.float16, torch.float64][ri(0, 3)]
        if dtype is torch.float16 and not cpu._has_f16:
            continue
        layout = LAYOUTS[ri(0, 1)]
        b, s, hq, hk, half = ri(1, 3), ri(1, 5), ri(1, 4), ri(1, 3), ri(1, 20)
        d = 2 * half + 2 * ri(0, 2)  # partial rotary sometimes
        base_q = torch.randn(s, b, hq + 1, d + 3, generator=g).to(dtype)  # padded: views are strided
        base_k = torch.randn(b, hk, s, d, generator=g).to(dtype)
        q = base_q[:, :, :hq, :d].transpose(0, 1)  # [b, s, hq, d], non-contiguous
        k = base_k.transpose(1, 2)  # [b, s, hk, d] view of bhsd memory
        tab_dt = torch.float64 if dtype is torch.float64 else torch.float32
        cos, sin = _tables(d, s + 7, r=2 * half, positions=torch.randint(0, 50, (b, s), generator=g), dtype=tab_dt)
        cos, sin = cos[:, :, None], sin[:, :, None]  # [b, s, 1, half]
        mode = ["fresh", "inplace", "out"][ri(0, 2)]
        want_q, want_k = _formula(q, cos, sin, layout), _formula(k, cos, sin, layout)
        for _ in range(3):
            bq, bk = base_q.clone(), base_k.clone()
            qq, kk = bq[:, :, :hq, :d].transpose(0, 1), bk.transpose(1, 2)
            if mode == "out":
                oq, ok = torch.empty_like(qq), torch.empty_like(kk)
                yq = apply_rotary(qq, cos, sin, layout=layout, out=oq, backend="cpu")
                yk = apply_rotary(kk, cos, sin, layout=layout, out=ok, backend="cpu")
                assert yq.data_ptr() == oq.data_ptr() and yk.data_ptr() == ok.data_ptr()
            else:
                yq, yk = apply_rotary_qk(qq, kk, cos, sin, layout=layout, inplace=mode == "inplace", backend="cpu")
            assert torch.equal(yq, want_q) and torch.equal(yk, want_k)
            if mode == "inplace":
                # only the q view changed in its base: the padding stays as it was
                assert torch.equal(bq[:, :, hq:], base_q[:, :, hq:]) and torch.equal(bq[..., d:], base_q[..., d:])
            else:
                assert torch.equal(bq, base_q) and torch.equal(bk, base_k)
    assert any(cpu._PLANS.values())  # the repeats went through recorded plans
