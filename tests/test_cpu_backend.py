"""The fused CPU backend ("cpu") against the float64 reference and an independent float32 formula.

Expected values come from (a) ``backend="reference"`` (the dense rotation matrix in float64,
differentiated by torch) and (b) the rotation written out below with separate torch ops in
float32 (``x1*c - x2*s``; products rounded separately, as the kernel does with
``-ffp-contract=off``), cast once to the input dtype. (b) pins the bf16/fp16 rounding: the
kernel must be bit-identical to "compute in float32, round once to nearest even".
"""

from __future__ import annotations


import pytest
import torch

import ropekit
from ropekit import RopeConfig, RopeError, RotaryEmbedding, apply_rotary, apply_rotary_qk, cos_sin
from ropekit import ops
from ropekit.backends import cpu
from ropekit.functional import apply_gather

from _oracle import backward_for_mode

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LAYOUTS = ["half", "interleaved"]
# tolerance against the float64 oracle: a few ulp of the dtype (|x| <~ 4)
TOL = {torch.float32: 2e-6, torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float64: 1e-13}


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    # the project's install builds the operators (make setup); a missing build is a failure here
    assert ops.LOADED, ops.REASON
    yield


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


def test_out_of_place_returns_fresh_outputs():
    """Out of place: fresh outputs of the inputs' strides, inputs untouched."""
    torch.manual_seed(6)
    q, k = torch.randn(2, 5, 4, 64), torch.randn(2, 5, 2, 64)
    q0, k0 = q.clone(), k.clone()
    cos, sin = (t.float()[:, None] for t in _tables(64, 5))
    qo, ko = apply_rotary_qk(q, k, cos, sin, backend="cpu")
    assert qo.data_ptr() not in (q.data_ptr(), k.data_ptr()) and ko.data_ptr() not in (q.data_ptr(), k.data_ptr())
    assert torch.equal(q, q0) and torch.equal(k, k0)
    _assert_matches(qo, q, cos, sin, "half")
    _assert_matches(ko, k, cos, sin, "half")
    qt = torch.randn(2, 4, 5, 64).transpose(1, 2)  # bshd view of bhsd memory
    assert apply_rotary(qt, cos, sin, backend="cpu").stride() == qt.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_threaded_split_matches(dtype, no_eager):
    """Inputs above the one-thread threshold (~1 MB) split their rows over torch's pool
    (at::parallel_for): the same bits with 1, 2 and 3 threads, equal to the formula."""
    threads = torch.get_num_threads()
    torch.manual_seed(7)
    q, k = torch.randn(3, 130, 16, 72, dtype=dtype), torch.randn(3, 130, 3, 72, dtype=dtype)
    cos, sin = (t.float()[:, None] for t in _tables(72, 130))
    wq, wk = _formula(q, cos, sin, "half"), _formula(k, cos, sin, "half")
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            qo, ko = apply_rotary_qk(q, k, cos, sin, backend="cpu")
            assert torch.equal(qo, wq) and torch.equal(ko, wk)
            qi, ki = q.clone(), k.clone()
            apply_rotary_qk(qi, ki, cos, sin, backend="cpu", inplace=True)
            assert torch.equal(qi, wq) and torch.equal(ki, wk)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_streaming_stores_match(dtype, layout, no_eager):
    """Out-of-place outputs above 16 MB use non-temporal stores; aligned and misaligned
    outputs and partial rotary give the formula's bits."""
    torch.manual_seed(71)
    n = (17 << 20) // (2 if dtype is torch.bfloat16 else 4) // (16 * 128)  # rows for > 16 MB out
    for d, r in ((128, None), (136, 40)):
        x = torch.randn(1, n, 16, d, dtype=dtype)
        cos, sin = (t.float()[:, None] for t in _tables(d, n, r))
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
        apply_rotary_qk(x, x, cos, sin, backend="cpu", inplace=True)


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
def test_gather_backward_partial_and_expanded(mode, inplace, no_eager):
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
    qa = q.clone().requires_grad_()
    ka = k.clone().requires_grad_(mode != "k_no_grad")
    qi, ki = (qa * 1, ka * 1) if inplace else (qa, ka)
    with torch.autograd.profiler.profile() as prof:
        qo, ko = apply_gather(qi, ki, cos_t, sin_t, pos, format="bshd", layout="half", inplace=inplace, backend="cpu")
        assert (qo is qi and ko is ki) == inplace
        assert torch.equal(qo, _formula(q, c, sn, "half")) and torch.equal(ko, _formula(k, c, sn, "half"))
        want_q, want_k = backward_for_mode(mode, qo, ko, gq, gk, q, k)
    # one fused call forward (in place: rotary_gather_); backward one call for the gradients
    # that exist, except in place with both: one node per tensor (autograd's view + in-place
    # handling takes single-output nodes), so one call each
    calls = [e.name for e in prof.function_events if e.name.startswith("ropekit::rotary")]
    fwd = "ropekit::rotary_gather_" if inplace else "ropekit::rotary_gather"
    nbwd = 2 if inplace and want_k is not None else 1
    assert calls == [fwd] + ["ropekit::rotary_gather"] * nbwd, calls
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
            apply_gather(q, k, cos_t, sin_t, bad, format="bshd", layout="half", inplace=True, backend="cpu")
        assert torch.equal(q, q0) and torch.equal(k, k0)
    with pytest.raises(RopeError, match="positions of shape"):
        apply_gather(q, k, cos_t, sin_t, torch.arange(5), format="bshd", layout="half", inplace=False, backend="cpu")
    # other table dtypes take the gather-then-convert path: still range-checked
    with pytest.raises(RopeError, match=r"positions in \[0, 8\)"):
        apply_gather(q, k, cos_t.double(), sin_t.double(), torch.tensor([0, 1, 9, 2]), format="bshd", layout="half", inplace=False, backend="cpu")
    qo, ko = apply_gather(q, k, cos_t.double(), sin_t.double(), torch.tensor([0, 1, 7, 2]), format="bshd", layout="half", inplace=False, backend="cpu")
    c, s = cos_t.double()[torch.tensor([0, 1, 7, 2])][:, None], sin_t.double()[torch.tensor([0, 1, 7, 2])][:, None]
    assert torch.equal(qo, _formula(q, c, s, "half"))


# ----------------------------------------------------------------------------------------
# registry


def test_backend_registry_and_auto():
    x = torch.randn(1, 2, 1, 8)
    assert ropekit.backends.resolve("auto", x).NAME == "cpu"
    assert cpu.supports(x) and not cpu.supports(torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("seed", range(6))
def test_fuzz_against_formula(seed):
    """Random layouts, dtypes, strides (transposed / sliced views), broadcast tables, in place,
    out= and fresh: every call (repeated three times) gives the formula's bits and never
    touches memory outside its outputs."""
    g = torch.Generator().manual_seed(100 + seed)

    def ri(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    for _ in range(12):
        dtype = [torch.float32, torch.bfloat16, torch.float16, torch.float64][ri(0, 3)]
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
