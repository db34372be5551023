"""The Triton kernels as the CUDA implementations of ``torch.ops.ropekit.*``.

Without a GPU the impl functions (``ropekit.backends._triton_ops.IMPLS``, registered at the
CUDA key by ``register_cuda_kernels``) run on CPU tensors under ``TRITON_INTERPRET=1`` and are
compared with the op's C++ CPU kernel: float32 and float16 bit-identical (the launch turns
FMA contraction off; tests/test_triton_aot.py shows there is no ``fma.rn`` on the GPU
either); bfloat16 bit-identical to the CPU op's float32 result truncated (the interpreter's
float32 -> bfloat16 store truncates; on a GPU it rounds, as the CPU op does).

The decode path's host code (positions checked in the kernel on CUDA) runs under a dispatch
mode that fails on any data-dependent host read.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import ropekit  # noqa: E402
from ropekit import RopeConfig, cos_sin, ops  # noqa: E402

pytestmark = pytest.mark.skipif(not ops.LOADED, reason="the ops need ropekit._C")
T = pytest.importorskip("ropekit.backends._triton_ops")
tb = pytest.importorskip("ropekit.backends.triton")
if not tb.available():
    pytest.skip("triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

OPS = torch.ops.ropekit


def _trunc_bf16(x32: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 by truncation (what the interpreter's store does)."""
    return (x32.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _same(got, x, want_fn):
    """``got`` (Triton) against the CPU op: bits for float32/float16/float64; for bfloat16 the
    CPU op's float32 result on the same values, truncated (interpreter) or rounded (GPU)."""
    if got.dtype == torch.bfloat16 and got.device.type == "cpu":
        want = _trunc_bf16(want_fn(x.float()))
    else:
        want = want_fn(x)
    assert got.dtype == want.dtype
    assert torch.equal(got.view(torch.int16) if got.element_size() == 2 else got, want.view(torch.int16) if want.element_size() == 2 else want)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("conj", [False, True])
def test_rotary_bits_equal_the_cpu_op(dtype, layout, conj):
    torch.manual_seed(3)
    cfg = RopeConfig(72, rotary_dim=40, layout=layout)
    x = (torch.randn(2, 5, 3, 72) * 3).to(dtype)
    tdt = torch.float64 if dtype == torch.float64 else torch.float32
    c, s = cos_sin(cfg, torch.randint(0, 10000, (5,)), dtype=tdt)
    c, s = c[:, None], s[:, None]
    _same(T.rotary(x, c, s, layout, conj), x, lambda v: OPS.rotary(v, c, s, layout, conj))
    y = x.clone()
    T.rotary_(y, c, s, layout, conj)
    _same(y, x, lambda v: OPS.rotary(v, c, s, layout, conj))
    out = torch.empty_like(x)
    T.rotary_out(x, c, s, layout, conj, out=out)
    _same(out, x, lambda v: OPS.rotary(v, c, s, layout, conj))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qk_and_gather_bits_equal_the_cpu_op(dtype):
    torch.manual_seed(4)
    cfg = RopeConfig(64)
    q, k = torch.randn(3, 4, 4, 64).to(dtype), torch.randn(3, 4, 2, 64).to(dtype)
    ct, st = cos_sin(cfg, torch.arange(32))
    pos = torch.randint(0, 32, (3, 4))
    for i, (got, want) in enumerate(zip(T.rotary_gather(q, k, ct, st, pos, "bshd", "half", False),
                                        (q, k))):
        _same(got, want, lambda v, i=i: OPS.rotary_gather(v if i == 0 else q.to(v.dtype), v if i else k.to(v.dtype),
                                                          ct, st, pos, "bshd", "half", False)[i])
    c, s = ct[pos][:, :, None], st[pos][:, :, None]
    for i, got in enumerate(T.rotary_qk(q, k, c, s, "interleaved", True)):
        _same(got, (q, k)[i], lambda v, i=i: OPS.rotary_qk(v if i == 0 else q.to(v.dtype), v if i else k.to(v.dtype), c,
                                                           s, "interleaved", True)[i])
    # decode: [b] positions with s = 1, in place
    q1, k1 = torch.randn(3, 1, 4, 64).to(dtype), torch.randn(3, 1, 2, 64).to(dtype)
    p1 = torch.tensor([5, 31, 0])
    a, b = q1.clone(), k1.clone()
    T.rotary_gather_(a, b, ct, st, p1)
    _same(a, q1, lambda v: OPS.rotary_gather(v, k1.to(v.dtype), ct, st, p1)[0])
    _same(b, k1, lambda v: OPS.rotary_gather(q1.to(v.dtype), v, ct, st, p1)[1])


def test_qk_norm_close_to_the_cpu_op():
    """Norm + rotation: products unfused like the CPU op, but the sum of squares is reduced in
    another order (a tree over the row vs the CPU's 16 lanes): within a few float32 ulps."""
    torch.manual_seed(5)
    q, k = torch.randn(2, 5, 4, 64), torch.randn(2, 5, 2, 64)
    wq, wk = torch.randn(64), torch.randn(64)
    c, s = cos_sin(RopeConfig(64, rotary_dim=48), torch.arange(5))
    c, s = c[:, None], s[:, None]
    got = T.qk_norm_rotary_fwd(q, k, wq, wk, c, s, 1e-6, 1.0, "half")
    want = OPS.qk_norm_rotary_fwd(q, k, wq, wk, c, s, 1e-6, 1.0, "half")
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    got = T.qk_norm_rotary_bwd(gq, gk, q, k, wq, wk, want[2], want[3], c, s, 1.0, "half")
    ref = OPS.qk_norm_rotary_bwd(gq, gk, q, k, wq, wk, want[2], want[3], c, s, 1.0, "half")
    for g, w in zip(got, ref):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    # an empty side (the other tensor of a single-tensor backward)
    none, r0 = torch.empty(0, 64), torch.empty(0)
    dq, dn, dw, dwn = T.qk_norm_rotary_bwd(gq, none, q, none, wq, wq, want[2], r0, c, s, 1.0, "half")
    torch.testing.assert_close(dq, ref[0], atol=1e-4, rtol=1e-4)
    assert dn.numel() == 0 and torch.equal(dwn, torch.zeros_like(wq))


def test_register_cuda_kernels():
    T.register_cuda_kernels()
    T.register_cuda_kernels()  # once per process
    for name in T.IMPLS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ropekit::{name}", "CUDA"), name
    assert set(T.IMPLS) == {"rotary", "rotary_", "rotary_out", "rotary_qk", "rotary_qk_", "rotary_gather",
                            "rotary_gather_", "qk_norm_rotary", "qk_norm_rotary_", "qk_norm_rotary_fwd",
                            "qk_norm_rotary_fwd_", "qk_norm_rotary_bwd"}


def test_backend_triton_runs_the_kernels_with_the_ops_autograd():
    """backend="triton" on CPU (interpreter): the op, its C++ autograd, the Triton impls."""
    torch.manual_seed(6)
    q = torch.randn(2, 3, 4, 16, requires_grad=True)
    c, s = cos_sin(RopeConfig(16), torch.arange(3))
    with T._OnTriton():
        y = ropekit.apply_rotary(q, c[:, None], s[:, None], backend="triton")
        y.backward(torch.ones_like(y))
    assert torch.equal(y, OPS.rotary(q.detach(), c[:, None], s[:, None]))
    assert torch.equal(q.grad, OPS.rotary(torch.ones_like(q), c[:, None], s[:, None], "half", True))


class _NoHostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on any op that reads tensor data back to the host (a sync on CUDA)."""

    BANNED = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "allclose", "tolist", "aminmax", "min",
              "max", "unique", "masked_select"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().split("::")[-1].split(".")[0] in self.BANNED:
            raise AssertionError(f"host read: {func.name()}")
        return func(*args, **(kwargs or {}))


def test_decode_path_reads_nothing_back(monkeypatch):
    """The CUDA branch of the gather impls (positions checked in the kernel) makes no
    data-dependent host read. On CPU tensors with the kernel launch recorded instead of run
    (the interpreter itself reads the data); with a GPU, ``make gpu-check`` captures the same
    call in a CUDA graph under ``torch.cuda.set_sync_debug_mode("error")``."""
    from ropekit.backends import _triton_kernels as K

    launches = []

    class _Rec:
        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append(kw)

    monkeypatch.setattr(K, "rope_kernel", _Rec())
    monkeypatch.setattr(tb, "_device_side_checks", lambda t: True)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda *a: (_ for _ in ()).throw(AssertionError("tolist")))
    ct, st = cos_sin(RopeConfig(128), torch.arange(64))
    q, k = torch.randn(8, 1, 32, 128, dtype=torch.bfloat16), torch.randn(8, 1, 8, 128, dtype=torch.bfloat16)
    offsets = torch.randint(0, 63, (8,))
    with _NoHostReads():
        T.rotary_gather_(q, k, ct, st, offsets)  # decode, in place: [b] positions, s = 1
        T.rotary_gather(q, k, ct, st, offsets[:, None].expand(8, 1))
    assert len(launches) == 2 and all(kw["CHECK_POS"] and kw["debug"] for kw in launches)
    with pytest.raises(AssertionError, match="host read"):
        with _NoHostReads():
            torch.aminmax(offsets)  # what the host check did
