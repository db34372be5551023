"""Every backend against the float64 dense-matrix oracle, forward and backward.

The oracle is ``backend="reference"`` (RoFormer eq. 15's block-diagonal matrix, float64,
differentiated by torch itself) fed float64 inputs and float64 tables; the reference itself
is checked against a per-pair Python-float implementation in ``test_reference_vs_python``.
"""

from __future__ import annotations

import pytest
import torch

import ropekit
from ropekit import RopeConfig, apply_rotary, apply_rotary_qk, cos_sin

from _oracle import rope_bshd

# (dtype, atol, rtol): float32 tables, float32 math, one rounding to dtype
DTYPES = [
    (torch.float32, 2e-6, 2e-6),
    (torch.float64, 1e-12, 1e-12),
    (torch.bfloat16, 2e-2, 1.6e-2),
    (torch.float16, 3e-3, 2e-3),
]
FAST = [b for b in ropekit.backends.available() if b not in ("reference", "triton")]
SHAPES = [  # (b, s, h, d, r)
    (2, 5, 3, 72, 72),
    (2, 5, 3, 72, 40),  # partial rotary, non power of two
    (1, 1, 1, 8, 8),  # s = 1
    (3, 4, 2, 64, 32),
]


def _tables(cfg, pos, dtype):
    return cos_sin(cfg, pos, dtype=dtype)


def _oracle(x, cfg, pos2d):
    c, s = cos_sin(cfg, pos2d, dtype=torch.float64)  # [b, s, r/2]
    return apply_rotary(x.double(), c[:, :, None], s[:, :, None], layout=cfg.layout, backend="reference")


def test_reference_vs_python():
    torch.manual_seed(0)
    for layout in ropekit.LAYOUTS:
        for r in (8, 6):
            cfg = RopeConfig(8, rotary_dim=r, layout=layout)
            x = torch.randn(2, 3, 2, 8, dtype=torch.float64)
            pos = torch.tensor([[0, 7, 1000], [3, 3, 123456]])
            got = _oracle(x, cfg, pos)
            want = rope_bshd(x, pos, r, layout)
            torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=lambda v: str(v))
@pytest.mark.parametrize("layout", ropekit.LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_vs_reference(backend, dtype, atol, rtol, layout, shape):
    b, s, h, d, r = shape
    torch.manual_seed(hash((b, s, h, d, r)) % 1000)
    cfg = RopeConfig(d, rotary_dim=r, layout=layout)
    pos = torch.randint(0, 5000, (b, s))
    x0 = torch.randn(b, s, h, d).to(dtype)
    tdt = torch.float64 if dtype == torch.float64 else torch.float32
    c, sn = _tables(cfg, pos, tdt)
    x = x0.clone().requires_grad_()
    y = apply_rotary(x, c[:, :, None], sn[:, :, None], layout=layout, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(x.detach(), x0)  # input untouched
    want = _oracle(x0, cfg, pos)
    torch.testing.assert_close(y.double(), want, atol=atol, rtol=rtol)
    # backward: d/dx <y, g> against the oracle's torch-derived gradient
    g = torch.randn(b, s, h, d).to(dtype)
    (y * g).sum().backward()
    xr = x0.double().requires_grad_()
    yr = _oracle(xr, cfg, pos)
    (yr * g.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=atol * 2, rtol=rtol * 2)


@pytest.mark.parametrize("backend", FAST + ["reference"])
@pytest.mark.parametrize("layout", ropekit.LAYOUTS)
@pytest.mark.parametrize("r", [8, 4])
def test_gradcheck_float64(backend, layout, r):
    cfg = RopeConfig(8, rotary_dim=r, layout=layout)
    c, s = cos_sin(cfg, torch.tensor([0, 3, 11]), dtype=torch.float64)
    x = torch.randn(2, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    cs = (c[:, None].clone().requires_grad_(), s[:, None].clone().requires_grad_())
    f = lambda x, c, s: apply_rotary(x, c, s, layout=layout, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, *cs))
    assert torch.autograd.gradgradcheck(lambda x: f(x, *cs), (x,)) if backend == "reference" else True


@pytest.mark.parametrize("backend", FAST + ["reference"])
@pytest.mark.parametrize("layout", ropekit.LAYOUTS)
def test_non_contiguous_and_inplace(backend, layout):
    torch.manual_seed(1)
    cfg = RopeConfig(40, rotary_dim=24, layout=layout)
    base = torch.randn(2, 3, 7, 40)  # bhsd memory
    x = base.transpose(1, 2)  # bshd view, non-contiguous
    pos = torch.arange(7)
    c, s = cos_sin(cfg, pos)
    want = rope_bshd(x, pos.expand(2, 7), 24, layout)
    y = apply_rotary(x, c[:, None], s[:, None], layout=layout, backend=backend)
    torch.testing.assert_close(y.double(), want, atol=3e-6, rtol=3e-6)
    # in place on the view writes the underlying memory, nothing else
    keep = base.clone()
    ptr = x.data_ptr()
    z = apply_rotary(x, c[:, None], s[:, None], layout=layout, backend=backend, inplace=True)
    assert z.data_ptr() == ptr and z is x
    torch.testing.assert_close(base.transpose(1, 2).double(), want, atol=3e-6, rtol=3e-6)
    assert not torch.equal(base, keep)
    # out=
    out = torch.empty_like(keep.transpose(1, 2))
    got = apply_rotary(keep.transpose(1, 2), c[:, None], s[:, None], layout=layout, backend=backend, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out.double(), want, atol=3e-6, rtol=3e-6)


@pytest.mark.parametrize("backend", FAST + ["reference"])
def test_inplace_autograd(backend):
    cfg = RopeConfig(16)
    c, s = cos_sin(cfg, torch.arange(4), dtype=torch.float64)
    w = torch.randn(2, 4, 3, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 4, 3, 16, dtype=torch.float64)
    y = apply_rotary(w * 2, c[:, None], s[:, None], backend=backend, inplace=True)
    (y * g).sum().backward()
    w2 = w.detach().clone().requires_grad_()
    (apply_rotary(w2 * 2, c[:, None], s[:, None], backend="reference") * g).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)


@pytest.mark.parametrize("backend", FAST)
def test_qk_gqa_and_conjugate(backend):
    torch.manual_seed(2)
    cfg = RopeConfig(32, layout="interleaved")
    q, k = torch.randn(2, 6, 8, 32), torch.randn(2, 6, 2, 32)
    c, s = cos_sin(cfg, torch.arange(6))
    q2, k2 = apply_rotary_qk(q, k, c[:, None], s[:, None], layout="interleaved", backend=backend)
    pos = torch.arange(6).expand(2, 6)
    torch.testing.assert_close(q2.double(), rope_bshd(q, pos, 32, "interleaved"), atol=3e-6, rtol=3e-6)
    torch.testing.assert_close(k2.double(), rope_bshd(k, pos, 32, "interleaved"), atol=3e-6, rtol=3e-6)
    q3, k3 = apply_rotary_qk(q2, k2, c[:, None], s[:, None], layout="interleaved", backend=backend, conjugate=True)
    torch.testing.assert_close(q3, q, atol=3e-6, rtol=3e-6)
    torch.testing.assert_close(k3, k, atol=3e-6, rtol=3e-6)


def test_bf16_tables_and_mixed():
    # bf16 tables are accepted (upcast exactly); the result matches float32 math on those tables
    cfg = RopeConfig(16)
    c, s = cos_sin(cfg, torch.arange(5), dtype=torch.bfloat16)
    x = torch.randn(5, 2, 16)
    y = apply_rotary(x, c[:, None], s[:, None], backend="eager")
    y2 = apply_rotary(x, c[:, None].float(), s[:, None].float(), backend="eager")
    assert torch.equal(y, y2)


def test_empty_tensors():
    cfg = RopeConfig(8)
    c, s = cos_sin(cfg, torch.arange(0))
    x = torch.randn(2, 0, 3, 8)
    for be in FAST + ["reference"]:
        assert apply_rotary(x, c[:, None], s[:, None], backend=be).shape == x.shape


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("inplace", [False, True])
def test_qk_fused_autograd(backend, inplace):
    # apply_rotary_qk with grad goes through the backend's fused rotate_qk when it has one
    torch.manual_seed(5)
    cfg = RopeConfig(24, rotary_dim=16)
    c, s = cos_sin(cfg, torch.arange(5))
    q0, k0 = torch.randn(2, 5, 4, 24), torch.randn(2, 5, 2, 24)
    gq, gk = torch.randn_like(q0), torch.randn_like(k0)
    q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    qi, ki = (q * 1, k * 1) if inplace else (q, k)
    q2, k2 = apply_rotary_qk(qi, ki, c[:, None], s[:, None], backend=backend, inplace=inplace)
    ((q2 * gq).sum() + (k2 * gk).sum()).backward()
    qr, kr = q0.double().requires_grad_(), k0.double().requires_grad_()
    c64, s64 = cos_sin(cfg, torch.arange(5), dtype=torch.float64)
    q3 = apply_rotary(qr, c64[:, None], s64[:, None], backend="reference")
    k3 = apply_rotary(kr, c64[:, None], s64[:, None], backend="reference")
    ((q3 * gq.double()).sum() + (k3 * gk.double()).sum()).backward()
    torch.testing.assert_close(q2.double(), q3, atol=3e-6, rtol=3e-6)
    torch.testing.assert_close(k2.double(), k3, atol=3e-6, rtol=3e-6)
    torch.testing.assert_close(q.grad.double(), qr.grad, atol=3e-6, rtol=3e-6)
    torch.testing.assert_close(k.grad.double(), kr.grad, atol=3e-6, rtol=3e-6)
    # only one output used: the other gets no gradient launch
    q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    q2, _ = apply_rotary_qk(q, k, c[:, None], s[:, None], backend=backend)
    (q2 * gq).sum().backward()
    torch.testing.assert_close(q.grad.double(), qr.grad, atol=3e-6, rtol=3e-6)
    assert k.grad is None


@pytest.mark.parametrize("backend", FAST)
def test_qk_inplace_rejects_overlapping_windows(backend):
    cfg = RopeConfig(8)
    c, s = cos_sin(cfg, torch.arange(3))
    buf = torch.randn(40)
    win = buf.unfold(0, 8, 4)[:6].view(2, 3, 8)  # overlapping windows
    keep = buf.clone()
    with pytest.raises(ropekit.RopeError, match="overlapping memory"):
        apply_rotary_qk(win, win.clone(), c, s, backend=backend, inplace=True)
    assert torch.equal(buf, keep)
