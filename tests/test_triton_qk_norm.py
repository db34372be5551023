"""The fused per-head RMSNorm + RoPE Triton kernel (``apply_qk_norm_rotary(..., backend="triton")``).

Compared with two independent results:

1. a float64 oracle written here in plain torch (RMSNorm over all ``d`` dims, then the
   rotation of the first ``r`` dims with explicit pair indices), differentiated by torch;
   it gets the same tables as the kernel, promoted to float64, so the comparison measures
   the kernel's arithmetic (the tables' own precision is tested in tests/test_tables.py);
2. the unfused composition a user would write: ``torch.nn.functional.rms_norm`` on
   ``x.float()`` with ``weight_offset + w.float()``, then ``apply_rotary_qk(...,
   backend="eager")``, rounded once to the dtype (and its torch gradients).

Tolerances, measured (4 seeds x the 30 dtype/layout/shape cases of the first test, under
``TRITON_INTERPRET=1``), not guessed:

* float32: ``|got - oracle| <= TOL_F32 * (|oracle| + mean|oracle|)`` elementwise with
  ``TOL_F32 = 1e-6``; the largest measured value is 3.3e-7 (forward, dq, dk and the weight
  gradients alike; the composition itself measures 3.5e-7).
* bfloat16 / float16: every element within 1 ulp of the oracle rounded to the dtype (and of
  the composition's result), forward and every gradient; measured: at most 1 ulp. Where
  that is not achievable in float32 it is 1 ulp plus float32's error, ``TOL_F32 *
  mean|oracle|``: an element that cancels far below its operands (``a·c - b·s`` of 1e-4
  from terms of 1) carries float32's absolute error, 1.6 float16 ulps at 1e-4 (seen in 2
  elements of 240 float16 cases); the allowance is far below one ulp at ordinary
  magnitudes. The interpreter truncates float32 -> bfloat16 at the store instead of
  rounding (see tests/test_triton.py), which is what the one ulp covers there; on a GPU
  the store rounds.
* float64: 1e-12 relative, and ``torch.autograd.gradcheck``.

On a machine without CUDA the root conftest sets ``TRITON_INTERPRET=1`` and the kernel runs
on CPU tensors through Triton's interpreter (shapes stay tiny); ``ROPEKIT_TEST_DEVICE=cuda``
runs the same file on a GPU (and fails instead of falling back when there is none).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

DEV = os.environ.get("ROPEKIT_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEV not in ("cpu", "cuda"):
    raise RuntimeError(f"ROPEKIT_TEST_DEVICE must be cpu or cuda, not {DEV!r}")
if DEV == "cuda":
    if not torch.cuda.is_available():
        raise RuntimeError(f"ROPEKIT_TEST_DEVICE=cuda but torch {torch.__version__} sees no CUDA device")
    import triton  # noqa: F401  (required on CUDA: an ImportError fails the run instead of skipping it)
else:
    pytest.importorskip("triton")

from _oracle import triton_on_cpu  # noqa: E402

import ropekit  # noqa: E402
from ropekit import RopeConfig, RopeError, apply_qk_norm_rotary, apply_rotary_qk, cos_sin  # noqa: E402

tb = pytest.importorskip("ropekit.backends.triton")
pytestmark = pytest.mark.skipif(not tb.available(), reason="triton needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _triton_on_cpu(request):
    """The ops on CPU tensors run the Triton impls for the whole test (tests/_oracle.py)."""
    with triton_on_cpu(DEV, request.node.name):
        yield


LAYOUTS = ropekit.LAYOUTS
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [  # (b, s, hq, hk, d, r): d and r/2 not powers of two, partial and full rotary, GQA/MQA
    (2, 3, 4, 2, 80, 40),
    (1, 2, 3, 1, 96, 64),
    (2, 2, 2, 2, 128, 128),
    (1, 3, 4, 1, 64, 32),
    (2, 2, 3, 1, 72, 72),
]
TOL_F32 = 1e-6
EPS = 1e-6


# --------------------------------------------------------------------------------------
# references and comparisons
# --------------------------------------------------------------------------------------


def _oracle(x, w, cos, sin, eps, weight_offset, layout):
    """float64: ``x / sqrt(mean(x²) + eps) * (weight_offset + w)``, then pairs rotated by index."""
    xf = x.double()
    r2 = cos.shape[-1]
    y = xf / torch.sqrt(xf.square().mean(-1, keepdim=True) + eps) * (weight_offset + w.double())
    if layout == "half":
        i1 = torch.arange(r2, device=x.device)
        i2 = i1 + r2
    else:
        i1 = torch.arange(0, 2 * r2, 2, device=x.device)
        i2 = i1 + 1
    a, b = y[..., i1], y[..., i2]
    c, s = cos.double(), sin.double()
    out = y.clone()
    out[..., i1] = a * c - b * s
    out[..., i2] = b * c + a * s
    return out


def _composition(q, k, wq, wk, cos, sin, eps, weight_offset, layout):
    """What a user writes without the fused kernel: float32 rms_norm, then ropekit's eager rotation."""
    d = q.shape[-1]
    nq = F.rms_norm(q.float(), (d,), weight_offset + wq.float(), eps)
    nk = F.rms_norm(k.float(), (k.shape[-1],), weight_offset + wk.float(), eps)
    rq, rk = apply_rotary_qk(nq, nk, cos, sin, layout=layout, backend="eager")
    return rq.to(q.dtype), rk.to(k.dtype)


def _ulps(got, want, dtype, allowance=0.0):
    """Largest distance of ``got`` from ``want`` rounded to ``dtype``, in ulps of ``dtype`` (at the
    larger of the two magnitudes), after taking ``allowance`` (absolute) off each distance."""
    r = want.detach().to(dtype).double()
    g = got.detach().double()
    fi = torch.finfo(dtype)
    mag = torch.maximum(g.abs(), r.abs()).clamp_min(fi.smallest_normal)
    ulp = torch.exp2(torch.floor(torch.log2(mag))) * fi.eps
    return float((((g - r).abs() - allowance).clamp_min(0) / ulp).max())


def _check(got, want, dtype, what=""):
    """``got`` (kernel, in ``dtype``) against ``want`` (float64 oracle or a float32 result)."""
    assert got.shape == want.shape, what
    if dtype == torch.float64:
        torch.testing.assert_close(got, want.double(), rtol=1e-12, atol=1e-12, msg=what)
    elif dtype == torch.float32:
        w = want.detach().double()
        err = (got.detach().double() - w).abs() / (w.abs() + w.abs().mean())
        assert float(err.max()) <= TOL_F32, f"{what}: float32 error {float(err.max()):.3g} > {TOL_F32}"
    else:
        # one ulp, plus float32's own error where an element cancels far below its operands
        # (an fp16 result of 1e-4 from terms of 1 has an ulp of 6e-8, float32's error there)
        u = _ulps(got, want, dtype, TOL_F32 * float(want.detach().double().abs().mean()))
        assert u <= 1, f"{what}: {u} ulps of {dtype} from the reference"


def _inputs(b, s, hq, hk, d, r, layout, dtype, seed, positions=None):
    torch.manual_seed(seed)
    cfg = RopeConfig(d, rotary_dim=r, layout=layout)
    pos = torch.randint(0, 4000, (b, s)) if positions is None else positions
    tdt = torch.float64 if dtype == torch.float64 else torch.float32
    c, sn = cos_sin(cfg, pos.to(DEV), dtype=tdt)  # [b, s, r/2]: the tables a user passes
    q = (torch.randn(b, s, hq, d) * 2).to(device=DEV, dtype=dtype)
    k = (torch.randn(b, s, hk, d) * 0.5).to(device=DEV, dtype=dtype)
    wq = (torch.randn(d) * 0.5 + 1).to(device=DEV, dtype=dtype)
    wk = (torch.randn(d) * 0.5 + 1).to(device=DEV, dtype=dtype)
    return q, k, wq, wk, c[:, :, None], sn[:, :, None]


def _grads(fn, tensors, g_outs):
    """Outputs of ``fn(*leaves)`` and the gradients of ``sum(out * g)`` w.r.t. the leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    outs = fn(*leaves)
    loss = sum((o.double() * g.double()).sum() for o, g in zip(outs, g_outs))
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, leaves))


class _Launches:
    """Count the kernel launches (forward and backward)."""

    def __init__(self, monkeypatch):
        self.fwd = self.bwd = 0
        fwd, bwd = tb._qk_norm_launch, tb._qk_norm_bwd_launch

        def f(*a, **kw):
            self.fwd += 1
            return fwd(*a, **kw)

        def b(*a, **kw):
            self.bwd += 1
            return bwd(*a, **kw)

        monkeypatch.setattr(tb, "_qk_norm_launch", f)
        monkeypatch.setattr(tb, "_qk_norm_bwd_launch", b)


# --------------------------------------------------------------------------------------
# values: forward and backward against the oracle and the composition
# --------------------------------------------------------------------------------------


def test_backend_declares_the_fused_kernel():
    assert tb.QK_NORM is True and ropekit.backends.get("triton").apply_qk_norm is tb.apply_qk_norm


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_vs_oracle_and_composition(dtype, layout, shape, monkeypatch):
    b, s, hq, hk, d, r = shape
    woff = float(SHAPES.index(shape) % 2)  # 0.0 (Qwen3) and 1.0 (Gemma: y = x̂ (1 + w))
    q, k, wq, wk, c, sn = _inputs(b, s, hq, hk, d, r, layout, dtype, seed=SHAPES.index(shape))
    if woff:
        wq, wk = wq - 1, wk - 1
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    calls = _Launches(monkeypatch)
    got, dgot = _grads(lambda *t: apply_qk_norm_rotary(*t, c, sn, eps=EPS, weight_offset=woff, layout=layout,
                                                       backend="triton"), (q, k, wq, wk), (gq, gk))
    assert (calls.fwd, calls.bwd) == (1, 1)  # q and k in one launch, forward and backward
    assert got[0].dtype == dtype and got[1].shape == k.shape
    ref, dref = _grads(lambda q, k, wq, wk: (_oracle(q, wq, c, sn, EPS, woff, layout), _oracle(k, wk, c, sn, EPS, woff, layout)),
                       (q.double(), k.double(), wq.double(), wk.double()), (gq, gk))
    comp, dcomp = _grads(lambda *t: _composition(*t, c, sn, EPS, woff, layout), (q, k, wq, wk), (gq, gk))
    for name, g_, r_, c_ in zip(("q", "k", "dq", "dk", "dq_weight", "dk_weight"), got + dgot, ref + dref, comp + dcomp):
        assert g_.dtype == dtype, name
        _check(g_, r_, dtype, f"{name} vs oracle")
        _check(g_, c_.double(), dtype, f"{name} vs composition")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float64_vs_oracle_and_gradcheck(layout):
    q, k, wq, wk, c, sn = _inputs(1, 3, 3, 1, 72, 40, layout, torch.float64, seed=11)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    fn = lambda *t: apply_qk_norm_rotary(*t, c, sn, eps=1e-5, weight_offset=0.25, layout=layout, backend="triton")  # noqa: E731
    got, dgot = _grads(fn, (q, k, wq, wk), (gq, gk))
    ref, dref = _grads(lambda q, k, wq, wk: (_oracle(q, wq, c, sn, 1e-5, 0.25, layout), _oracle(k, wk, c, sn, 1e-5, 0.25, layout)),
                       (q, k, wq, wk), (gq, gk))
    for g_, r_ in zip(got + dgot, ref + dref):
        _check(g_, r_, torch.float64)
    # gradcheck (fast mode: the interpreter runs ~25 launches a second), out of place and in place
    small = [t[:, :2, :2, :10].clone().requires_grad_() for t in (q, k)] + [t[:10].clone().requires_grad_() for t in (wq, wk)]
    c2, s2 = cos_sin(RopeConfig(10, rotary_dim=6, layout=layout), torch.tensor([[0, 7]], device=DEV), dtype=torch.float64)
    c2, s2 = c2[:, :, None], s2[:, :, None]
    f2 = lambda *t: apply_qk_norm_rotary(*t, c2, s2, eps=0.1, weight_offset=1.0, layout=layout, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(f2, small, fast_mode=True)
    f3 = lambda q, k, a, b: apply_qk_norm_rotary(q * 1, k * 1, a, b, c2, s2, eps=0.1, layout=layout,  # noqa: E731
                                                 backend="triton", inplace=True)
    assert torch.autograd.gradcheck(f3, small, fast_mode=True)


def test_determinism_same_bits_twice(monkeypatch):
    """Forward, dx and the weight gradients are bit-identical run to run (no atomics), also with
    few backward programs (each sums several token tiles: the in-kernel loop)."""
    q, k, wq, wk, c, sn = _inputs(2, 3, 4, 2, 80, 40, "half", torch.float32, seed=5)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    fn = lambda *t: apply_qk_norm_rotary(*t, c, sn, backend="triton")  # noqa: E731
    for programs in (tb._DW_PROGRAMS, 4):
        monkeypatch.setattr(tb, "_DW_PROGRAMS", programs)
        with tb.launch_config(tile=256, bh_max=4):  # BT = 1 token: 6 tiles over 4 programs
            first, dfirst = _grads(fn, (q, k, wq, wk), (gq, gk))
            again, dagain = _grads(fn, (q, k, wq, wk), (gq, gk))
        for a, b in zip(first + dfirst, again + dagain):
            assert torch.equal(a, b)
    ref, dref = _grads(lambda q, k, wq, wk: (_oracle(q, wq, c, sn, EPS, 0.0, "half"), _oracle(k, wk, c, sn, EPS, 0.0, "half")),
                       (q.double(), k.double(), wq.double(), wk.double()), (gq, gk))
    for g_, r_ in zip(first + dfirst, ref + dref):
        _check(g_, r_, torch.float32, "3 backward programs")


def test_block_sizes_keep_forward_and_dx_bits():
    """Rows are independent: other block sizes give the same forward and dx bits (dw: the
    summation order changes with the split, the values stay within the float32 tolerance)."""
    q, k, wq, wk, c, sn = _inputs(2, 5, 5, 2, 96, 64, "interleaved", torch.bfloat16, seed=6)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    fn = lambda *t: apply_qk_norm_rotary(*t, c, sn, layout="interleaved", backend="triton")  # noqa: E731
    want, dwant = _grads(fn, (q, k, wq, wk), (gq, gk))
    with tb.launch_config(tile=512, bh_max=1, num_warps=1):
        got, dgot = _grads(fn, (q, k, wq, wk), (gq, gk))
    for a, b in zip(got + dgot[:2], want + dwant[:2]):
        assert torch.equal(a, b)
    for a, b in zip(dgot[2:], dwant[2:]):
        assert _ulps(a, b.double(), torch.bfloat16) <= 1


# --------------------------------------------------------------------------------------
# layouts in memory, broadcasting, in place
# --------------------------------------------------------------------------------------


def _ref_pair(q, k, wq, wk, c, sn, layout="half", woff=0.0):
    return _oracle(q, wq, c, sn, EPS, woff, layout), _oracle(k, wk, c, sn, EPS, woff, layout)


@pytest.mark.parametrize("inplace", [False, True])
def test_fused_qkv_slices_and_bhsd_memory(inplace, monkeypatch):
    """q/k as slices of one fused [b, s, hq + 2 hk, d] buffer (rows wider than their heads), and
    bshd views of bhsd memory: one launch, right values, no byte outside q/k written."""
    torch.manual_seed(7)
    b, s, hq, hk, d = 2, 3, 4, 2, 80
    cfg = RopeConfig(d, rotary_dim=40)
    c, sn = cos_sin(cfg, torch.arange(s, device=DEV))  # [s, r/2]
    w = torch.randn(2, d, device=DEV)
    calls = _Launches(monkeypatch)
    qkv = torch.randn(b, s, hq + 2 * hk, d, device=DEV)
    q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hk], qkv[:, :, hq + hk:]
    v0 = v.clone()
    want = _ref_pair(q, k, w[0], w[1], c[:, None], sn[:, None])
    qo, ko = apply_qk_norm_rotary(q, k, w[0], w[1], c[:, None], sn[:, None], inplace=inplace, backend="triton")
    for got, ref in zip((qo, ko), want):
        _check(got, ref, torch.float32)
    assert torch.equal(v, v0)  # the v heads between and after are not touched
    if inplace:
        assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
    base_q = torch.randn(b, hq, s, d, device=DEV)  # bhsd memory, a bshd view
    base_k = torch.randn(b, hk, s, d, device=DEV)
    bq, bk = base_q.transpose(1, 2), base_k.transpose(1, 2)
    want = _ref_pair(bq, bk, w[0], w[1], c[:, None], sn[:, None])
    qo, ko = apply_qk_norm_rotary(bq, bk, w[0], w[1], c[:, None], sn[:, None], inplace=inplace, backend="triton")
    for got, ref in zip((qo, ko), want):
        _check(got, ref, torch.float32)
    if inplace:
        _check(base_q.transpose(1, 2), want[0], torch.float32)
    # bhsd tensors themselves with [s, r/2] tables (broadcast over batch and heads)
    qo, ko = apply_qk_norm_rotary(base_q, base_k, w[0], w[1], c, sn, backend="triton")
    _check(qo, _oracle(base_q, w[0], c, sn, EPS, 0.0, "half"), torch.float32)
    _check(ko, _oracle(base_k, w[1], c, sn, EPS, 0.0, "half"), torch.float32)
    assert calls.fwd == 3


def test_no_write_past_the_head_dim():
    """d = 76 rows of stride 80 (r/2 = 20 and the tail 36 both padded): the masks use the real
    d and r/2, padded lanes are never stored."""
    torch.manual_seed(8)
    buf = torch.randn(2, 3, 3, 80, device=DEV)
    kbuf = torch.randn(2, 3, 1, 80, device=DEV)
    guard, kguard = buf[..., 76:].clone(), kbuf[..., 76:].clone()
    q, k = buf[..., :76], kbuf[..., :76]
    c, sn = cos_sin(RopeConfig(76, rotary_dim=40), torch.arange(3, device=DEV))
    w = torch.randn(76, device=DEV)
    want = _ref_pair(q, k, w, w, c[:, None], sn[:, None])
    apply_qk_norm_rotary(q, k, w, w, c[:, None], sn[:, None], inplace=True, backend="triton")
    _check(q, want[0], torch.float32)
    _check(k, want[1], torch.float32)
    assert torch.equal(buf[..., 76:], guard) and torch.equal(kbuf[..., 76:], kguard)


def test_broadcasting_per_sample_per_head_decode():
    """Tables [b, s, 1, r/2] (per-sample positions), [b, s, h, r/2] (per head: hq == hk), decode s = 1."""
    torch.manual_seed(9)
    cfg = RopeConfig(64, rotary_dim=48, layout="interleaved")
    q, k = torch.randn(2, 3, 4, 64, device=DEV), torch.randn(2, 3, 4, 64, device=DEV)
    wq, wk = torch.randn(64, device=DEV), torch.randn(64, device=DEV)
    pos = torch.randint(0, 500, (2, 3, 4), device=DEV)
    c, sn = cos_sin(cfg, pos)  # [b, s, h, r/2]: a position per head
    qo, ko = apply_qk_norm_rotary(q, k, wq, wk, c, sn, layout="interleaved", backend="triton")
    _check(qo, _oracle(q, wq, c, sn, EPS, 0.0, "interleaved"), torch.float32)
    _check(ko, _oracle(k, wk, c, sn, EPS, 0.0, "interleaved"), torch.float32)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    fn = lambda *t: apply_qk_norm_rotary(*t, c, sn, layout="interleaved", backend="triton")  # noqa: E731
    got, dgot = _grads(fn, (q, k, wq, wk), (gq, gk))
    ref, dref = _grads(lambda q, k, wq, wk: _ref_pair(q, k, wq, wk, c, sn, "interleaved"),
                       (q.double(), k.double(), wq.double(), wk.double()), (gq, gk))
    for g_, r_ in zip(dgot, dref):
        _check(g_, r_, torch.float32, "per-head tables backward")
    # decode: one token per sample at its own position, bf16, MQA
    q1, k1, wq1, wk1, c1, s1 = _inputs(3, 1, 4, 1, 96, 64, "half", torch.bfloat16, seed=10,
                                       positions=torch.tensor([[5], [900], [3000]]))
    qo, ko = apply_qk_norm_rotary(q1, k1, wq1, wk1, c1, s1, backend="triton")
    _check(qo, _oracle(q1, wq1, c1, s1, EPS, 0.0, "half"), torch.bfloat16)
    _check(ko, _oracle(k1, wk1, c1, s1, EPS, 0.0, "half"), torch.bfloat16)


def test_inplace_equals_out_of_place_and_inputs_untouched(monkeypatch):
    q, k, wq, wk, c, sn = _inputs(2, 3, 4, 2, 80, 40, "half", torch.bfloat16, seed=12)
    q0, k0 = q.clone(), k.clone()
    qo, ko = apply_qk_norm_rotary(q, k, wq, wk, c, sn, backend="triton")
    assert torch.equal(q, q0) and torch.equal(k, k0)
    qi, ki = apply_qk_norm_rotary(q, k, wq, wk, c, sn, backend="triton", inplace=True)
    assert qi is q and ki is k
    assert torch.equal(q, qo) and torch.equal(k, ko)  # the same kernel: the same bits


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inplace_autograd_on_views_of_one_projection(layout, monkeypatch):
    """q and k rotated in place as views of one qkv projection output, under autograd: one node
    per tensor (autograd's view handling); gradients of x, W and both norm weights."""
    torch.manual_seed(13)
    b, s, hq, hk, d = 2, 3, 4, 2, 72
    cfg = RopeConfig(d, rotary_dim=40, layout=layout)
    c, sn = cos_sin(cfg, torch.arange(s, device=DEV))
    c, sn = c[:, None], sn[:, None]
    x = torch.randn(b, s, 16, device=DEV)
    W = torch.randn(16, (hq + 2 * hk) * d, device=DEV) * 0.3
    w0 = torch.randn(2, d, device=DEV)
    g = torch.randn(b, s, hq + 2 * hk, d, device=DEV)

    def step(kind):
        xl, Wl, wq, wk = (t.clone().requires_grad_() for t in (x, W, w0[0], w0[1]))
        qkv = (xl @ Wl).view(b, s, hq + 2 * hk, d)
        q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hk], qkv[:, :, hq + hk:]
        if kind == "oracle":
            qo, ko = _oracle(q, wq, c, sn, EPS, 1.0, layout), _oracle(k, wk, c, sn, EPS, 1.0, layout)
        else:
            qo, ko = apply_qk_norm_rotary(q, k, wq, wk, c, sn, weight_offset=1.0, layout=layout, backend="triton",
                                          inplace=kind == "inplace")
        out = torch.cat((qo.double(), ko.double(), v.double()), 2)
        return torch.autograd.grad((out * g.double()).sum(), (xl, Wl, wq, wk))

    calls = _Launches(monkeypatch)
    got = step("inplace")
    assert (calls.fwd, calls.bwd) == (1, 2)  # one forward launch; one backward node (launch) per tensor
    ref, outp = step("oracle"), step("out")
    for name, a, r_, o in zip(("x", "W", "q_weight", "k_weight"), got, ref, outp):
        _check(a, r_, torch.float32, name)
        assert torch.equal(a, o), name  # in place and out of place: the same gradient bits
    leaf = torch.randn(1, 2, 2, d, device=DEV, requires_grad=True)
    with pytest.raises(RopeError, match="leaf"):
        apply_qk_norm_rotary(leaf, leaf.detach().clone(), w0[0], w0[1], c[:2], sn[:2], backend="triton", inplace=True)


def test_weight_gradient_bits_alone_and_joint():
    """A tensor's weight gradient has the same bits from a joint q/k backward launch and from its
    own (in-place autograd runs one node per tensor): each tensor keeps its own tile (hq = 16 and
    hk = 2 give other head blocks and token tiles) and its heads dim (cos shared over b and h)."""
    q, k, wq, wk, c, sn = _inputs(2, 40, 16, 2, 72, 40, "half", torch.float32, seed=21,
                                  positions=torch.arange(40).expand(2, 40))
    c, sn = c[:1], sn[:1]  # [1, s, 1, r/2]: shared by the batch and the heads
    _, _, rq, rk = torch.ops.ropekit.qk_norm_rotary_fwd(q, k, wq, wk, c, sn, EPS, 0.0, "half")
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    joint = tb.qk_norm_backward([gq, gk], [q, k], [wq, wk], [rq, rk], c, sn, 0.0, "half")
    none, r0 = q.new_empty(0, 72), rq.new_empty(0)
    k_alone = tb.qk_norm_backward([none, gk], [none, k], [wq, wk], [r0, rk], c, sn, 0.0, "half")
    q_alone = tb.qk_norm_backward([gq, none], [q, none], [wq, wk], [rq, r0], c, sn, 0.0, "half")
    for got, want in ((k_alone[1], joint[1]), (k_alone[3], joint[3]), (q_alone[0], joint[0]), (q_alone[2], joint[2])):
        assert torch.equal(got, want)


@pytest.mark.parametrize("inplace", [False, True])
def test_partial_gradients(inplace, monkeypatch):
    """Only what is needed: k's output unused (no k gradients), frozen norm weights, or
    frozen q/k with trainable weights (the weight gradients alone)."""
    q, k, wq, wk, c, sn = _inputs(2, 3, 3, 1, 64, 32, "half", torch.float32, seed=14)
    gq = torch.randn_like(q)

    def run(q_grad, w_grad, use_k):
        ql, kl = (t.clone().requires_grad_(q_grad) for t in (q, k))
        wql, wkl = (t.clone().requires_grad_(w_grad) for t in (wq, wk))
        qi, ki = (ql * 1, kl * 1) if inplace and q_grad else (ql.clone(), kl.clone()) if inplace else (ql, kl)
        qo, ko = apply_qk_norm_rotary(qi, ki, wql, wkl, c, sn, backend="triton", inplace=inplace)
        loss = (qo * gq).sum() + (ko.sum() if use_k else 0)
        loss.backward()
        return ql.grad, kl.grad, wql.grad, wkl.grad

    ref_q = lambda q, w: (_oracle(q, w, c, sn, EPS, 0.0, "half") * gq.double()).sum()  # noqa: E731
    q64, wq64 = q.double().requires_grad_(), wq.double().requires_grad_()
    dq_ref, dwq_ref = torch.autograd.grad(ref_q(q64, wq64), (q64, wq64))
    dq, dk, dwq, dwk = run(True, True, use_k=False)
    assert dk is None and dwk is None
    _check(dq, dq_ref, torch.float32, "dq")
    _check(dwq, dwq_ref, torch.float32, "dq_weight")
    dq, dk, dwq, dwk = run(True, False, use_k=True)
    assert dwq is None and dwk is None and dk is not None
    _check(dq, dq_ref, torch.float32, "dq, frozen weights")
    dq, dk, dwq, dwk = run(False, True, use_k=False)
    assert dq is None and dk is None and dwk is None
    _check(dwq, dwq_ref, torch.float32, "dq_weight, frozen q")


def test_mixed_dtypes_weights_and_odd_strides(monkeypatch):
    """q float32 with k bfloat16 (two launches), float64 weights for bf16 q/k, a last-dim stride
    of 2 (one contiguous copy, written back in place), and a 5-D q/k whose leading dims no view
    can merge (a canonical copy, written back in place)."""
    torch.manual_seed(15)
    cfg = RopeConfig(40, rotary_dim=24)
    c, sn = cos_sin(cfg, torch.arange(3, device=DEV))
    c3, s3 = c[:, None], sn[:, None]
    w = torch.randn(40, device=DEV)
    q, k = torch.randn(2, 3, 4, 40, device=DEV), torch.randn(2, 3, 2, 40, device=DEV).bfloat16()
    calls = _Launches(monkeypatch)
    qo, ko = apply_qk_norm_rotary(q, k, w, w.double(), c3, s3, backend="triton")
    assert calls.fwd == 2 and ko.dtype == torch.bfloat16
    _check(qo, _oracle(q, w, c3, s3, EPS, 0.0, "half"), torch.float32)
    _check(ko, _oracle(k, w, c3, s3, EPS, 0.0, "half"), torch.bfloat16)
    kb = k.clone().requires_grad_()
    wd = w.double().requires_grad_()
    _, ko = apply_qk_norm_rotary(q, kb, w, wd, c3, s3, backend="triton")
    ko.float().sum().backward()
    assert wd.grad.dtype == torch.float64 and kb.grad.dtype == torch.bfloat16
    k64, w64 = k.double().requires_grad_(), w.double().requires_grad_()
    dk_ref, dw_ref = torch.autograd.grad(_oracle(k64, w64, c3, s3, EPS, 0.0, "half").sum(), (k64, w64))
    _check(kb.grad, dk_ref, torch.bfloat16, "bf16 dk")
    _check(wd.grad.float(), dw_ref, torch.float32, "float64 weight of bf16 k")
    # last-dim stride 2
    big_q, big_k = torch.randn(2, 3, 4, 40, 2, device=DEV), torch.randn(2, 3, 2, 40, 2, device=DEV)
    sq, sk = big_q[..., 0], big_k[..., 0]
    want = _ref_pair(sq, sk, w, w, c3, s3)
    qo, ko = apply_qk_norm_rotary(sq, sk, w, w, c3, s3, backend="triton")
    _check(qo, want[0], torch.float32)
    apply_qk_norm_rotary(sq, sk, w, w, c3, s3, backend="triton", inplace=True)
    _check(big_q[..., 0], want[0], torch.float32)
    _check(big_k[..., 0], want[1], torch.float32)
    # 5-D [2, 3, s, h, d] with dims 0/1 permuted in memory
    q5 = torch.randn(3, 2, 3, 4, 40, device=DEV).transpose(0, 1)
    k5 = torch.randn(3, 2, 3, 2, 40, device=DEV).transpose(0, 1)
    want = _ref_pair(q5, k5, w, w, c3, s3)
    qo, ko = apply_qk_norm_rotary(q5, k5, w, w, c3, s3, backend="triton")
    _check(qo, want[0], torch.float32)
    _check(ko, want[1], torch.float32)
    apply_qk_norm_rotary(q5, k5, w, w, c3, s3, backend="triton", inplace=True)
    _check(q5, want[0], torch.float32)
    _check(k5, want[1], torch.float32)


def test_saved_for_backward_is_inputs_plus_float32_rstd():
    """The documented memory: besides q, k, weights and tables, one float32 value per head row."""
    q, k, wq, wk, c, sn = _inputs(2, 3, 4, 2, 64, 32, "half", torch.bfloat16, seed=16)
    q.requires_grad_()
    k.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        apply_qk_norm_rotary(q, k, wq, wk, c, sn, backend="triton")
    ptrs = {t.data_ptr() for t in (q, k, wq, wk, c, sn)}
    extra = [t for t in saved if t.data_ptr() not in ptrs]
    assert len(saved) == 8
    assert sorted((t.dtype, t.numel()) for t in extra) == [(torch.float32, k.numel() // 64), (torch.float32, q.numel() // 64)]


def test_zero_eps_edge_and_fallbacks():
    """eps = 0 on non-zero rows; empty and 1-D q/k and learnable tables go to the composition."""
    q, k, wq, wk, c, sn = _inputs(1, 2, 2, 1, 64, 64, "half", torch.float32, seed=17)
    qo, ko = apply_qk_norm_rotary(q, k, wq, wk, c, sn, eps=0.0, backend="triton")
    _check(qo, _oracle(q, wq, c, sn, 0.0, 0.0, "half"), torch.float32)
    e = torch.empty(1, 0, 2, 64, device=DEV)
    qe, ke = apply_qk_norm_rotary(e, e[:, :, :1], wq, wk, c[:, :0], sn[:, :0], backend="triton")
    assert qe.shape == e.shape and ke.shape == (1, 0, 1, 64)
    cl, sl = c[0, 0, 0].clone().requires_grad_(), sn[0, 0, 0].clone()
    q1 = q[0, 0, 0]
    qo, ko = apply_qk_norm_rotary(q1, k[0, 0, 0], wq, wk, cl, sl, backend="triton")
    _check(qo, _oracle(q1, wq, cl, sl, EPS, 0.0, "half"), torch.float32)
    qo.sum().backward()
    assert cl.grad is not None


def test_bad_weights_are_refused():
    q, k, wq, wk, c, sn = _inputs(1, 2, 2, 1, 64, 64, "half", torch.float32, seed=18)
    with pytest.raises(RopeError, match="q_weight of shape"):
        apply_qk_norm_rotary(q, k, torch.ones(128, device=DEV), wk, c, sn, backend="triton")


def test_torch_compile_fullgraph():
    """No graph break: the launches are custom ops (triton_op on GPU), forward and backward,
    out of place and in place; the compiled results equal the eager ones bit for bit."""
    q, k, wq, wk, c, sn = _inputs(2, 3, 4, 2, 80, 40, "half", torch.float32, seed=19)
    wq.requires_grad_()

    def f(q, k):
        a, b = apply_qk_norm_rotary(q, k, wq, wk, c, sn, backend="triton")
        e, _ = apply_qk_norm_rotary(q * 2, k * 2, wq, wk, c, sn, layout="interleaved", backend="triton", inplace=True)
        return a + 1, b, e

    torch._dynamo.reset()
    ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(ql, kl)
    dgot = torch.autograd.grad(sum(t.sum() for t in got), (ql, kl, wq))
    want = f(ql, kl)
    dwant = torch.autograd.grad(sum(t.sum() for t in want), (ql, kl, wq))
    for a, b in zip(list(got) + list(dgot), list(want) + list(dwant)):
        if DEV == "cpu":  # the compiled graph holds the ops: on CPU tensors they run the C++ kernel (another
            torch.testing.assert_close(a, b)  # summation order than the interpreted Triton kernel)
        else:
            assert torch.equal(a, b)
    _check(got[1], _oracle(k, wk, c, sn, EPS, 0.0, "half"), torch.float32)
