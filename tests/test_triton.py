"""The Triton backend against the float64 dense-matrix oracle (``backend="reference"``).

On a machine without CUDA the root conftest sets ``TRITON_INTERPRET=1``, so the kernel runs
on CPU tensors through Triton's interpreter (~1 M elements/s: shapes stay tiny). With CUDA
the tests run on the GPU; ``ROPEKIT_TEST_DEVICE=cuda`` makes that a requirement (the module
fails to import without a CUDA device instead of testing the interpreter), and
``ROPEKIT_TEST_DEVICE=cpu`` forces the interpreter on a machine with a GPU. The
interpreter truncates float32 -> bfloat16 at the store instead of rounding, so low
precision outputs are compared with a tolerance of one ulp of the dtype (``rtol = eps``).

The oracle is RoFormer eq. 15's block-diagonal matrix in float64 with float64 tables,
differentiated by torch itself (it is checked against per-pair Python floats in
tests/test_backends.py::test_reference_vs_python).
"""

from __future__ import annotations

import os

import pytest
import torch

DEV = os.environ.get("ROPEKIT_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEV not in ("cpu", "cuda"):
    raise RuntimeError(f"ROPEKIT_TEST_DEVICE must be cpu or cuda, not {DEV!r}")
if DEV == "cuda":
    if not torch.cuda.is_available():
        raise RuntimeError(f"ROPEKIT_TEST_DEVICE=cuda but torch {torch.__version__} sees no CUDA device")
    import triton  # noqa: F401  (required on CUDA: an ImportError fails the run instead of skipping it)
else:
    pytest.importorskip("triton")

import ropekit  # noqa: E402
from ropekit import RopeConfig, RopeError, RotaryEmbedding, apply_rotary, apply_rotary_qk, cos_sin  # noqa: E402
from _oracle import backward_for_mode, triton_on_cpu  # noqa: E402

tb = pytest.importorskip("ropekit.backends.triton")
pytestmark = pytest.mark.skipif(not tb.available(), reason="triton needs CUDA or TRITON_INTERPRET=1")



@pytest.fixture(autouse=True)
def _triton_on_cpu(request):
    """The ops on CPU tensors run the Triton impls for the whole test (tests/_oracle.py)."""
    with triton_on_cpu(DEV, request.node.name):
        yield

LAYOUTS = ropekit.LAYOUTS
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [  # (b, s, h, d, r)
    (2, 5, 3, 72, 72),  # d not a power of two
    (2, 5, 3, 72, 40),  # partial rotary, r/2 = 20 not a power of two
    (1, 1, 1, 8, 8),  # s = 1
    (3, 4, 2, 64, 32),
]


def _tol(dtype):
    """(atol, rtol): float32 tables and math, one cast at the store (interpreter: truncation)."""
    if dtype == torch.float64:
        return 1e-12, 1e-12
    if dtype == torch.float32:
        return 2e-6, 2e-6
    # one ulp of the output dtype (eps = ulp at 1.0) plus float32 rounding of the tables
    return 1e-5, torch.finfo(dtype).eps


def _close(got, want, dtype, scale=1.0):
    atol, rtol = _tol(dtype)
    torch.testing.assert_close(got.double(), want.double(), atol=atol * scale, rtol=rtol * scale)


def _tables(cfg, pos, dtype):
    """Triton gets the tables a user would pass (float32; float64 for float64 x)."""
    return cos_sin(cfg, pos, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEV)


def _oracle(x, cfg, pos2d):
    """x [b, s, h, d], positions [b, s] -> float64 R x (torch-differentiable)."""
    c, s = cos_sin(cfg, pos2d, dtype=torch.float64, device=x.device)  # [b, s, r/2]
    return apply_rotary(x.double(), c[:, :, None], s[:, :, None], layout=cfg.layout, backend="reference")


class _Launches:
    """Count kernel launches (the custom op bodies call ``_launch`` once per launch)."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = tb._launch

        def counted(*a, **kw):
            self.n += 1
            return real(*a, **kw)

        monkeypatch.setattr(tb, "_launch", counted)


def test_available_and_supports():
    x = torch.randn(2, 8, device=DEV)
    assert "triton" in ropekit.backends.available()
    assert all(tb.supports(x.to(dt)) for dt in DTYPES)  # float64 is computed in float64
    assert not tb.supports(x.to(torch.int32))
    if DEV == "cpu":  # CPU tensors only through the interpreter
        assert tb.supports(x) == (tb._interpret())
    else:
        assert x.is_cuda and not tb._interpret()  # the compiled kernel, not the interpreter


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_vs_reference(dtype, layout, shape):
    b, s, h, d, r = shape
    torch.manual_seed(b * 1000 + s * 100 + d + r)
    cfg = RopeConfig(d, rotary_dim=r, layout=layout)
    pos = torch.randint(0, 5000, (b, s), device=DEV)
    x0 = torch.randn(b, s, h, d, device=DEV).to(dtype)
    c, sn = _tables(cfg, pos, dtype)
    x = x0.clone().requires_grad_()
    y = apply_rotary(x, c[:, :, None], sn[:, :, None], layout=layout, backend="triton")
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(x.detach(), x0)  # out of place: input untouched
    _close(y, _oracle(x0, cfg, pos), dtype)
    if r < d:  # the pass-through tail is copied bit-exactly
        assert torch.equal(y[..., r:].detach(), x0[..., r:])
    # backward: the same kernel conjugated, against torch's gradient of the oracle
    g = torch.randn(b, s, h, d, device=DEV).to(dtype)
    (y * g).sum().backward()
    xr = x0.double().clone().requires_grad_()
    (_oracle(xr, cfg, pos) * g.double()).sum().backward()
    _close(x.grad, xr.grad, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64(layout):
    cfg = RopeConfig(8, rotary_dim=6, layout=layout)
    c, s = cos_sin(cfg, torch.tensor([0, 3, 11], device=DEV), dtype=torch.float64)
    x = torch.randn(1, 3, 1, 8, dtype=torch.float64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: apply_rotary(x, c[:, None], s[:, None], layout=layout, backend="triton"), (x,))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_views_inplace_and_out(layout, monkeypatch):
    torch.manual_seed(1)
    cfg = RopeConfig(40, rotary_dim=24, layout=layout)
    base = torch.randn(2, 3, 7, 40, device=DEV)  # bhsd memory
    x = base.transpose(1, 2)  # [b, s, h, d] view, non-contiguous
    pos = torch.arange(7, device=DEV)
    c, s = cos_sin(cfg, pos, device=DEV)
    want = _oracle(x, cfg, pos.expand(2, 7))
    keep = base.clone()
    calls = _Launches(monkeypatch)
    y = apply_rotary(x, c[:, None], s[:, None], layout=layout, backend="triton")
    _close(y, want, torch.float32)
    assert torch.equal(base, keep)
    # in place on the view: same memory, right values, one launch without a contiguous copy
    ptr = x.data_ptr()
    z = apply_rotary(x, c[:, None], s[:, None], layout=layout, backend="triton", inplace=True)
    assert z is x and z.data_ptr() == ptr
    _close(base.transpose(1, 2), want, torch.float32)
    # out= (a bhsd-strided destination)
    out = torch.empty_like(keep).transpose(1, 2)
    got = apply_rotary(keep.transpose(1, 2), c[:, None], s[:, None], layout=layout, backend="triton", out=out)
    assert got.data_ptr() == out.data_ptr()
    _close(out, want, torch.float32)
    assert calls.n == 3


def test_no_write_past_rotary_or_head_dim():
    """d = 72 inside a wider row: masks use the real dims, padded lanes are never stored."""
    torch.manual_seed(3)
    cfg = RopeConfig(72, rotary_dim=40)
    buf = torch.randn(2, 3, 2, 80, device=DEV)
    guard = buf[..., 72:].clone()
    x = buf[..., :72]  # [b, s, h, 72] rows of stride 80
    c, s = cos_sin(cfg, torch.arange(3, device=DEV), device=DEV)
    want = _oracle(x, cfg, torch.arange(3, device=DEV).expand(2, 3))
    tail = x[..., 40:].clone()
    apply_rotary(x, c[:, None], s[:, None], backend="triton", inplace=True)
    _close(x, want, torch.float32)
    assert torch.equal(buf[..., 72:], guard)  # the next row's bytes
    assert torch.equal(x[..., 40:], tail)  # in place: the tail is not rewritten differently


def test_non_unit_last_stride_falls_back():
    """A last-dim stride != 1 is rotated through one contiguous copy (documented)."""
    cfg = RopeConfig(16)
    big = torch.randn(2, 4, 3, 16, 2, device=DEV)
    x = big[..., 0]  # stride(-1) == 2
    c, s = cos_sin(cfg, torch.arange(4, device=DEV), device=DEV)
    want = _oracle(x, cfg, torch.arange(4, device=DEV).expand(2, 4))
    _close(apply_rotary(x, c[:, None], s[:, None], backend="triton"), want, torch.float32)
    ptr = x.data_ptr()
    y = apply_rotary(x, c[:, None], s[:, None], backend="triton", inplace=True)
    assert y.data_ptr() == ptr
    _close(big[..., 0], want, torch.float32)


def test_tables_per_head_and_odd_ranks():
    """cos/sin differing per head, 2-D x, and a 5-D x whose leading dims cannot be merged."""
    torch.manual_seed(4)
    cfg = RopeConfig(16, layout="interleaved")
    pos = torch.randint(0, 300, (2, 3, 4), device=DEV)  # a position per (b, s, h)
    c, s = cos_sin(cfg, pos, device=DEV)  # [b, s, h, r/2]
    x = torch.randn(2, 3, 4, 16, device=DEV)
    want = torch.stack([_oracle(x[:, :, i : i + 1], cfg, pos[:, :, i])[:, :, 0] for i in range(4)], 2)
    _close(apply_rotary(x, c, s, layout="interleaved", backend="triton"), want, torch.float32)
    # 2-D x [s, d] with cos [s, r/2]
    p1 = torch.arange(5, device=DEV)
    c1, s1 = cos_sin(cfg, p1, device=DEV)
    x2 = torch.randn(5, 16, device=DEV)
    want2 = _oracle(x2[None, :, None], cfg, p1[None])[0, :, 0]
    _close(apply_rotary(x2, c1, s1, layout="interleaved", backend="triton"), want2, torch.float32)
    # 5-D non-mergeable view [2, 3, 5, 2, d] (dims 0/1 permuted in memory)
    x5 = torch.randn(3, 2, 5, 2, 16, device=DEV).transpose(0, 1)
    want5 = _oracle(x5.reshape(6, 5, 2, 16), cfg, p1.expand(6, 5)).reshape(2, 3, 5, 2, 16)
    _close(apply_rotary(x5, c1[:, None], s1[:, None], layout="interleaved", backend="triton"), want5, torch.float32)


@pytest.mark.parametrize("fmt", ["bshd", "bhsd"])
@pytest.mark.parametrize("inplace", [False, True])
def test_qk_one_launch_gqa(fmt, inplace, monkeypatch):
    torch.manual_seed(2)
    cfg = RopeConfig(72, rotary_dim=40, layout="interleaved")
    q, k = torch.randn(2, 6, 5, 72, device=DEV), torch.randn(2, 6, 2, 72, device=DEV)  # bshd, hq=5, hk=2
    pos = torch.arange(6, device=DEV)
    wq, wk = _oracle(q, cfg, pos.expand(2, 6)), _oracle(k, cfg, pos.expand(2, 6))
    c, s = cos_sin(cfg, pos, device=DEV)
    if fmt == "bhsd":
        q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        wq, wk = wq.transpose(1, 2), wk.transpose(1, 2)
        tc, ts = c, s  # [s, r/2]
    else:
        tc, ts = c[:, None], s[:, None]  # [s, 1, r/2]
    q0, k0 = q.clone(), k.clone()
    calls = _Launches(monkeypatch)
    q2, k2 = apply_rotary_qk(q, k, tc, ts, layout="interleaved", backend="triton", inplace=inplace)
    assert calls.n == 1  # q heads and k heads in one launch
    _close(q2, wq, torch.float32)
    _close(k2, wk, torch.float32)
    if inplace:
        assert q2.data_ptr() == q.data_ptr() and k2.data_ptr() == k.data_ptr()
    else:
        assert torch.equal(q, q0) and torch.equal(k, k0)
        assert q2.data_ptr() != q.data_ptr()
    q3, k3 = apply_rotary_qk(q2, k2, tc, ts, layout="interleaved", backend="triton", conjugate=True)
    _close(q3, q0, torch.float32, scale=3)
    _close(k3, k0, torch.float32, scale=3)


def test_qk_mixed_dtypes_two_launches(monkeypatch):
    cfg = RopeConfig(16)
    q, k = torch.randn(2, 3, 4, 16, device=DEV), torch.randn(2, 3, 1, 16, device=DEV).bfloat16()
    c, s = cos_sin(cfg, torch.arange(3, device=DEV), device=DEV)
    calls = _Launches(monkeypatch)
    q2, k2 = apply_rotary_qk(q, k, c[:, None], s[:, None], backend="triton")
    assert calls.n == 2 and k2.dtype == torch.bfloat16
    pos = torch.arange(3, device=DEV).expand(2, 3)
    _close(q2, _oracle(q, cfg, pos), torch.float32)
    _close(k2, _oracle(k, cfg, pos), torch.bfloat16)


# --------------------------------------------------------------------------------------
# RotaryEmbedding(backend="triton"): the fused in-kernel gather
# --------------------------------------------------------------------------------------


def _to_fmt(x, fmt):
    return {"bshd": x, "bhsd": x.transpose(1, 2), "sbhd": x.transpose(0, 1)}[fmt].contiguous()


def _from_fmt(x, fmt):
    return {"bshd": x, "bhsd": x.transpose(1, 2), "sbhd": x.transpose(0, 1)}[fmt]


CASES = ["default", "offset_int", "offset_b", "positions_s", "positions_bs"]


def _case(case, b, s):
    base = torch.arange(s, device=DEV)
    if case == "default":
        return {}, base.expand(b, s)
    if case == "offset_int":
        return {"offsets": 7}, (base + 7).expand(b, s)
    if case == "offset_b":
        off = torch.tensor([0, 9, 3][:b], device=DEV)
        return {"offsets": off}, off[:, None] + base
    if case == "positions_s":
        p = torch.randint(0, 100, (s,), device=DEV)
        return {"positions": p}, p.expand(b, s)
    p = torch.randint(0, 100, (b, s), device=DEV)
    return {"positions": p}, p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", ["bshd", "bhsd", "sbhd"])
@pytest.mark.parametrize("case", CASES)
def test_module_gather_vs_reference(dtype, fmt, case, monkeypatch):
    torch.manual_seed(len(case) * 7 + len(fmt))
    layout = "half" if case in ("default", "offset_b") else "interleaved"
    cfg = RopeConfig(72, rotary_dim=40, layout=layout)
    b, s = (3, 1) if case == "offset_b" else (2, 4)  # decode: s = 1, b > 1
    kw, pos = _case(case, b, s)
    qb = torch.randn(b, s, 3, 72, device=DEV).to(dtype)
    kb = torch.randn(b, s, 1, 72, device=DEV).to(dtype)
    tdt = torch.float64 if dtype == torch.float64 else torch.float32
    rope = RotaryEmbedding(cfg, backend="triton", table_dtype=tdt)
    q = _to_fmt(qb, fmt).clone().requires_grad_()
    k = _to_fmt(kb, fmt).clone().requires_grad_()
    calls = _Launches(monkeypatch)
    q2, k2 = rope(q, k, format=fmt, **kw)
    assert calls.n == 1  # q and k, table gather inside the kernel
    assert q2.dtype == dtype and q2.shape == q.shape
    _close(_from_fmt(q2, fmt), _oracle(qb, cfg, pos), dtype)
    _close(_from_fmt(k2, fmt), _oracle(kb, cfg, pos), dtype)
    # backward through the module: one conjugated launch for both gradients
    gq, gk = torch.randn_like(q2), torch.randn_like(k2)
    ((q2 * gq).sum() + (k2 * gk).sum()).backward()
    assert calls.n == 2
    qr, kr = qb.double().clone().requires_grad_(), kb.double().clone().requires_grad_()
    ((_oracle(qr, cfg, pos) * _from_fmt(gq, fmt).double()).sum() + (_oracle(kr, cfg, pos) * _from_fmt(gk, fmt).double()).sum()).backward()
    _close(_from_fmt(q.grad, fmt), qr.grad, dtype)
    _close(_from_fmt(k.grad, fmt), kr.grad, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_module_thd_cu_seqlens(layout):
    torch.manual_seed(5)
    cfg = RopeConfig(72, rotary_dim=40, layout=layout)
    cu = torch.tensor([0, 3, 4, 9], device=DEV)
    pos = torch.cat([torch.arange(3), torch.arange(1), torch.arange(5)]).to(DEV)  # restarts per sequence
    q = torch.randn(9, 3, 72, device=DEV, requires_grad=True)
    k = torch.randn(9, 2, 72, device=DEV, requires_grad=True)
    q2, k2 = RotaryEmbedding(cfg, backend="triton")(q, k, format="thd", cu_seqlens=cu)
    _close(q2, _oracle(q.detach()[None], cfg, pos[None])[0], torch.float32)
    _close(k2, _oracle(k.detach()[None], cfg, pos[None])[0], torch.float32)
    q2.sum().backward()  # zero-stride incoming gradient (expanded ones)
    qr = q.detach().double()[None].requires_grad_()
    _oracle(qr, cfg, pos[None]).sum().backward()
    _close(q.grad, qr.grad[0], torch.float32)
    assert k.grad is None  # k2 unused: no gradient launched for it


def test_module_inplace_and_untouched():
    torch.manual_seed(6)
    cfg = RopeConfig(64, rotary_dim=32)
    rope = RotaryEmbedding(cfg, backend="triton")
    pos = torch.tensor([[3, 4, 5], [0, 1, 2]], device=DEV)
    q, k = torch.randn(2, 3, 4, 64, device=DEV), torch.randn(2, 3, 2, 64, device=DEV)
    wq, wk = _oracle(q, cfg, pos), _oracle(k, cfg, pos)
    q0, k0 = q.clone(), k.clone()
    q2, k2 = rope(q, k, positions=pos)  # out of place
    assert torch.equal(q, q0) and torch.equal(k, k0)
    _close(q2, wq, torch.float32)
    pq, pk = q.data_ptr(), k.data_ptr()
    q3, k3 = rope(q, k, positions=pos, inplace=True)
    assert q3.data_ptr() == pq and k3.data_ptr() == pk
    _close(q, wq, torch.float32)
    _close(k, wk, torch.float32)
    # in place on non-leaves with autograd: gradient = R(-θ) g
    w = torch.randn(2, 3, 4, 64, device=DEV, requires_grad=True)
    wk_ = torch.randn(2, 3, 2, 64, device=DEV, requires_grad=True)
    g = torch.randn(2, 3, 4, 64, device=DEV)
    a, _ = rope(w * 1, wk_ * 1, positions=pos, inplace=True)
    (a * g).sum().backward()
    wr = w.detach().double().clone().requires_grad_()
    (_oracle(wr, cfg, pos) * g.double()).sum().backward()
    _close(w.grad, wr.grad, torch.float32)
    with pytest.raises(RopeError, match="leaf"):
        rope(w, wk_, positions=pos, inplace=True)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("mode", ["q_only", "both_sum", "k_no_grad"])
def test_gather_backward_partial_and_expanded(mode, inplace, monkeypatch):
    """Backward of the fused gather: one launch, only for the gradients that exist and are needed.

    q_only: k's output unused -> no gradient for k; both_sum: expanded (zero-stride)
    gradients from .sum(); k_no_grad: k's gradient is not needed.
    """
    torch.manual_seed(8)
    cfg = RopeConfig(16, rotary_dim=12)
    cos_t, sin_t = cos_sin(cfg, torch.arange(8, device=DEV))
    pos = torch.tensor([[1, 7, 0], [3, 3, 5]], device=DEV)
    q, k = torch.randn(2, 3, 2, 16, device=DEV), torch.randn(2, 3, 1, 16, device=DEV)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    qa = q.clone().requires_grad_()
    ka = k.clone().requires_grad_(mode != "k_no_grad")
    qi, ki = (qa * 1, ka * 1) if inplace else (qa, ka)
    calls = _Launches(monkeypatch)
    qo, ko = tb.apply_gather(qi, ki, cos_t, sin_t, pos, "bshd", "half", False, inplace)  # the op, its autograd
    assert (qo is qi and ko is ki) == inplace
    _close(qo, _oracle(q, cfg, pos), torch.float32)
    _close(ko, _oracle(k, cfg, pos), torch.float32)
    want_q, want_k = backward_for_mode(mode, qo, ko, gq, gk, q, k)
    # forward q+k in one launch; backward one launch for the gradients that exist, except in
    # place with both: one node per tensor (autograd's view + in-place handling takes
    # single-output nodes), so one launch each
    assert calls.n == (3 if inplace and mode != "q_only" and mode != "k_no_grad" else 2)
    for x, want, grad in ((q, want_q, qa.grad), (k, want_k, ka.grad)):
        if want is None:
            assert grad is None
            continue
        xr = x.double().requires_grad_()
        (_oracle(xr, cfg, pos) * want.double()).sum().backward()
        _close(grad, xr.grad, torch.float32)


def test_positions_outside_table_raise():
    cfg = RopeConfig(16)
    cos_t, sin_t = cos_sin(cfg, torch.arange(8, device=DEV))  # n = 8 rows
    q, k = torch.randn(1, 3, 2, 16, device=DEV), torch.randn(1, 3, 1, 16, device=DEV)
    ok = tb.rotate_qk_gather(q, k, cos_t, sin_t, torch.tensor([0, 5, 7], device=DEV), "bshd", "half", False)
    _close(ok[0], _oracle(q, cfg, torch.tensor([[0, 5, 7]], device=DEV)), torch.float32)
    if DEV == "cuda":  # checked in the kernel: a device-side assert (make gpu-check), not a RopeError
        return
    for bad in ([0, 5, 8], [-1, 0, 1]):
        with pytest.raises(RopeError, match=r"positions in \[0, 8\)"):
            tb.apply_gather(q, k, cos_t, sin_t, torch.tensor(bad, device=DEV), "bshd", "half", False, False)
    with pytest.raises(RopeError, match="positions of shape"):
        tb.apply_gather(q, k, cos_t, sin_t, torch.arange(4, device=DEV), "bshd", "half", False, False)


def test_torch_compile_fullgraph():
    """No graph break: the launch is a custom op (aot_eager also checks its fake/functional form)."""
    cfg = RopeConfig(16)
    cos_t, sin_t = cos_sin(cfg, torch.arange(8, device=DEV))
    q, k = torch.randn(2, 3, 4, 16, device=DEV), torch.randn(2, 3, 2, 16, device=DEV)
    pos = torch.tensor([[1, 2, 3], [5, 6, 7]], device=DEV)

    def f(q, k):
        a, b = apply_rotary_qk(q, k, cos_t[:3, None], sin_t[:3, None], backend="triton")
        c, d = ropekit.apply_rotary_gather(q, k, cos_t, sin_t, positions=pos, backend="triton")
        e, _ = ropekit.apply_rotary_gather(q * 2, k * 2, cos_t, sin_t, positions=pos, layout="interleaved", inplace=True,
                                           backend="triton")
        return a + 1, b, c, d, e

    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k)
    want = f(q, k)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    _close(got[2], _oracle(q, cfg, pos), torch.float32)
    _close(got[4], _oracle(q * 2, RopeConfig(16, layout="interleaved"), pos), torch.float32)


# --------------------------------------------------------------------------------------
# launch configuration (block sizes): defaults unchanged, overrides checked and bit-exact
# --------------------------------------------------------------------------------------


def test_launch_params_default_rule():
    """Without overrides the launcher picks what it always did: BH = min(pow2(heads), 16),
    BT = min(pow2(tokens), tile / (BH * 2 * R2P)), 4 warps, tile 4096 (16384 interpreted)."""
    assert tb.LAUNCH_DEFAULTS == {"tile": None, "bh_max": 16, "num_warps": 4}
    with tb.launch_config(**tb.LAUNCH_DEFAULTS):
        assert tb._launch_params(4096 * 8, 32, 8, 64, False) == (4096 // (16 * 128), 16, 4)
        assert tb._launch_params(64, 32, 8, 64, False) == (2, 16, 4)
        assert tb._launch_params(3, 5, 2, 32, False) == (4, 8, 4)
        assert tb._launch_params(1, 1, 0, 4, False) == (1, 1, 4)
        assert tb._launch_params(10**6, 32, 8, 64, True) == (16384 // (16 * 128), 16, 4)
        with tb.launch_config(tile=8192, bh_max=4, num_warps=8):
            assert tb._launch_params(4096 * 8, 32, 8, 64, False) == (8192 // (4 * 128), 4, 8)
        assert tb.LAUNCH == tb.LAUNCH_DEFAULTS  # restored


@pytest.mark.parametrize("bad", [{"tile": 3000}, {"tile": 0}, {"bh_max": 3}, {"num_warps": 64}, {"num_warps": True}, {"warps": 4}])
def test_launch_config_rejects_bad_values(bad):
    before = dict(tb.LAUNCH)
    with pytest.raises(RopeError, match="expected"):
        with tb.launch_config(**bad):
            pass
    assert tb.LAUNCH == before


def test_launch_env_parsing():
    assert tb._parse_launch_env("tile=8192, num_warps=8") == dict(tb.LAUNCH, tile=8192, num_warps=8)
    assert tb._parse_launch_env("tile=None")["tile"] is None
    for bad in ("tile", "tile=abc", "bh=4", "num_warps=3"):
        with pytest.raises(RopeError):
            tb._parse_launch_env(bad)


@pytest.mark.parametrize("cfg", [{"tile": 256, "bh_max": 2, "num_warps": 1}, {"tile": 1 << 15, "bh_max": 1, "num_warps": 8}])
def test_other_block_sizes_same_bits(cfg, monkeypatch):
    """Block sizes only change how the work is split: outputs are bit-identical."""
    torch.manual_seed(9)
    cfg_r = RopeConfig(72, rotary_dim=40)
    q, k = torch.randn(2, 5, 5, 72, device=DEV), torch.randn(2, 5, 2, 72, device=DEV)
    c, s = cos_sin(cfg_r, torch.arange(5, device=DEV), device=DEV)
    rope = RotaryEmbedding(cfg_r, backend="triton")
    pos = torch.tensor([[0, 3, 1, 7, 2], [4, 4, 0, 9, 5]], device=DEV)
    want = apply_rotary_qk(q, k, c[:, None], s[:, None], backend="triton") + rope(q, k, positions=pos)
    seen = []
    real = tb._launch_params
    monkeypatch.setattr(tb, "_launch_params", lambda *a: seen.append(real(*a)) or seen[-1])
    with tb.launch_config(**cfg):
        got = apply_rotary_qk(q, k, c[:, None], s[:, None], backend="triton") + rope(q, k, positions=pos)
    assert seen and all(p[1] <= cfg["bh_max"] and p[2] == cfg["num_warps"] for p in seen)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
