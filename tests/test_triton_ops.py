"""The Triton kernels as the CUDA implementations of ``torch.ops.ropekit.*``: the same bits
as the C++ CPU operator.

The impl functions (``ropekit.backends._triton_ops.IMPLS``, registered at the CUDA key by
``register_cuda_kernels``) run on ``ROPEKIT_TEST_DEVICE`` (default: cuda when available):
on CUDA tensors on a GPU (``make gpu-check``), else on CPU tensors under
``TRITON_INTERPRET=1``. Their results are compared with the op's C++ CPU kernel on CPU copies
of the same inputs: the rotation (every op) in float32, float16, bfloat16 and float64, and
the fused norm's forward, bit-identical (the launch turns FMA contraction off --
tests/test_triton_aot.py shows there is no ``fma.rn`` in the compiled rotation -- and the
norm sums its squares in the CPU's 16-lane order). Under the interpreter only, bfloat16 is
compared with the CPU op's float32 result truncated (the interpreter's float32 -> bfloat16
store truncates; a GPU rounds to nearest even, as the CPU op does). The fused norm's
backward is within a few float32 ulps (its sums run in another order).

The decode path's host code (positions checked in the kernel on CUDA) runs under a dispatch
mode that fails on any data-dependent host read; on a GPU it is also captured in a CUDA graph
under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import os

import pytest
import torch

DEV = os.environ.get("ROPEKIT_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEV == "cuda":
    import triton  # noqa: F401  (required on CUDA: an ImportError fails the run instead of skipping it)
else:
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


class _Dev:
    """The Triton impls on ``DEV``: CPU arguments moved there, results moved back."""

    def __getattr__(self, name):
        if name not in T.IMPLS:
            raise AttributeError(name)
        fn = T.IMPLS[name]

        def call(*args, **kw):
            moved = [a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args]
            kwm = {k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            out = fn(*moved, **kwm)
            if DEV != "cpu":  # written arguments (in place, out=): the results back into the CPU tensors
                for a, m in zip((*args, *kw.values()), (*moved, *kwm.values())):
                    if isinstance(a, torch.Tensor) and a is not m:
                        a.copy_(m.cpu())
            return _cpu(out)

        return call


def _cpu(out):
    if isinstance(out, torch.Tensor):
        return out.cpu()
    if isinstance(out, (tuple, list)):
        return type(out)(_cpu(o) for o in out)
    return out


TD = _Dev()  # T.<impl> on DEV


def _same(got, x, want_fn):
    """``got`` (Triton) against the CPU op: bits for float32/float16/float64; for bfloat16 the
    CPU op's float32 result on the same values, truncated (interpreter) or rounded (GPU)."""
    if got.dtype == torch.bfloat16 and DEV == "cpu":
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
    _same(TD.rotary(x, c, s, layout, conj), x, lambda v: OPS.rotary(v, c, s, layout, conj))
    y = x.clone()
    TD.rotary_(y, c, s, layout, conj)
    _same(y, x, lambda v: OPS.rotary(v, c, s, layout, conj))
    out = torch.empty_like(x)
    TD.rotary_out(x, c, s, layout, conj, out=out)
    _same(out, x, lambda v: OPS.rotary(v, c, s, layout, conj))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qk_and_gather_bits_equal_the_cpu_op(dtype):
    torch.manual_seed(4)
    cfg = RopeConfig(64)
    q, k = torch.randn(3, 4, 4, 64).to(dtype), torch.randn(3, 4, 2, 64).to(dtype)
    ct, st = cos_sin(cfg, torch.arange(32))
    pos = torch.randint(0, 32, (3, 4))
    for i, (got, want) in enumerate(zip(TD.rotary_gather(q, k, ct, st, pos, "bshd", "half", False),
                                        (q, k))):
        _same(got, want, lambda v, i=i: OPS.rotary_gather(v if i == 0 else q.to(v.dtype), v if i else k.to(v.dtype),
                                                          ct, st, pos, "bshd", "half", False)[i])
    c, s = ct[pos][:, :, None], st[pos][:, :, None]
    for i, got in enumerate(TD.rotary_qk(q, k, c, s, "interleaved", True)):
        _same(got, (q, k)[i], lambda v, i=i: OPS.rotary_qk(v if i == 0 else q.to(v.dtype), v if i else k.to(v.dtype), c,
                                                           s, "interleaved", True)[i])
    # decode: [b] positions with s = 1, in place
    q1, k1 = torch.randn(3, 1, 4, 64).to(dtype), torch.randn(3, 1, 2, 64).to(dtype)
    p1 = torch.tensor([5, 31, 0])
    a, b = q1.clone(), k1.clone()
    TD.rotary_gather_(a, b, ct, st, p1)
    _same(a, q1, lambda v: OPS.rotary_gather(v, k1.to(v.dtype), ct, st, p1)[0])
    _same(b, k1, lambda v: OPS.rotary_gather(q1.to(v.dtype), v, ct, st, p1)[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d,r,layout", [(64, 48, "half"), (72, 40, "interleaved"), (20, 20, "half")])
def test_qk_norm_forward_bits_equal_the_cpu_op(dtype, d, r, layout):
    """Norm + rotation forward: the sum of squares in the CPU op's order (16 lanes, then its
    fixed tree), products unfused: outputs and saved rstd bit-identical to the CPU op
    (bfloat16: its float32 result truncated, as the interpreter stores)."""
    torch.manual_seed(5)
    q, k = (torch.randn(2, 5, 4, d) * 3).to(dtype), torch.randn(2, 5, 2, d).to(dtype)
    wq, wk = torch.randn(d), torch.randn(d).to(dtype)
    tdt = torch.float64 if dtype == torch.float64 else torch.float32
    c, s = cos_sin(RopeConfig(d, rotary_dim=r, layout=layout), torch.arange(5), dtype=tdt)
    c, s = c[:, None], s[:, None]
    got = TD.qk_norm_rotary_fwd(q, k, wq, wk, c, s, 1e-6, 1.0, layout)
    for i in range(4):
        _same(got[i], (q, k)[i % 2],
              lambda v, i=i: OPS.qk_norm_rotary_fwd(v if i % 2 == 0 else k.to(v.dtype), v if i % 2 else q.to(v.dtype),
                                                    wq, wk.to(v.dtype) if v.dtype != dtype else wk, c, s, 1e-6, 1.0,
                                                    layout)[i])


def test_qk_norm_backward_close_to_the_cpu_op():
    """Backward: dx sums ``v·x̂`` over the row as a tree (the CPU: 16 lanes), and the weight
    gradient sums over token tiles (the CPU: per block of rows): within a few float32 ulps."""
    torch.manual_seed(5)
    q, k = torch.randn(2, 5, 4, 64), torch.randn(2, 5, 2, 64)
    wq, wk = torch.randn(64), torch.randn(64)
    c, s = cos_sin(RopeConfig(64, rotary_dim=48), torch.arange(5))
    c, s = c[:, None], s[:, None]
    want = OPS.qk_norm_rotary_fwd(q, k, wq, wk, c, s, 1e-6, 1.0, "half")
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    got = TD.qk_norm_rotary_bwd(gq, gk, q, k, wq, wk, want[2], want[3], c, s, 1.0, "half")
    ref = OPS.qk_norm_rotary_bwd(gq, gk, q, k, wq, wk, want[2], want[3], c, s, 1.0, "half")
    for g, w in zip(got, ref):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    # an empty side (the other tensor of a single-tensor backward)
    none, r0 = torch.empty(0, 64), torch.empty(0)
    dq, dn, dw, dwn = TD.qk_norm_rotary_bwd(gq, none, q, none, wq, wq, want[2], r0, c, s, 1.0, "half")
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
    """backend="triton" (on CPU: the interpreter): the op, its C++ autograd, the Triton impls."""
    torch.manual_seed(6)
    q0 = torch.randn(2, 3, 4, 16)
    q = q0.to(DEV).requires_grad_()
    c, s = cos_sin(RopeConfig(16), torch.arange(3))
    cd, sd = c[:, None].to(DEV), s[:, None].to(DEV)
    with T.on_triton(q):
        y = ropekit.apply_rotary(q, cd, sd, backend="triton")
        y.backward(torch.ones_like(y))
    assert torch.equal(y.detach().cpu(), OPS.rotary(q0, c[:, None], s[:, None]))
    assert torch.equal(q.grad.cpu(), OPS.rotary(torch.ones_like(q0), c[:, None], s[:, None], "half", True))


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
    if DEV == "cpu":  # (on a GPU, test_decode_in_a_cuda_graph_without_host_sync runs the module itself)
        # the module's decode step, once its tables cover the positions (a first call builds them)
        rope = ropekit.RotaryEmbedding(RopeConfig(128), backend="triton", max_position=64)
        # the module's CUDA branch on CPU tensors: no host read of the offsets (the kernel checks them)
        monkeypatch.setattr(ropekit.modules, "_host_reads_cheap", lambda t: False)
        with T._OnTriton():
            rope(q, k, offsets=offsets, inplace=True)
            with _NoHostReads():
                rope(q, k, offsets=offsets, inplace=True)
        assert len(launches) == 4 and all(kw["CHECK_POS"] for kw in launches)
    with pytest.raises(AssertionError, match="host read"):
        with _NoHostReads():
            torch.aminmax(offsets)  # what the host check did


@pytest.mark.skipif(DEV != "cuda", reason="needs a GPU (make gpu-check runs it)")
def test_decode_in_a_cuda_graph_without_host_sync():
    """On a GPU: ``RotaryEmbedding(...)(q, k, offsets=...)`` and ``apply_rotary_gather`` in place,
    each step run under ``torch.cuda.set_sync_debug_mode("error")`` (any host sync raises),
    then captured in a CUDA graph and replayed with new offsets: the same bits as eager calls."""
    torch.manual_seed(8)
    b, hq, hk, d = 8, 32, 8, 128
    rope = ropekit.RotaryEmbedding(RopeConfig(d), backend="triton", max_position=4096)
    ct, st = cos_sin(RopeConfig(d), torch.arange(4096, device=DEV), device=DEV)
    q0 = torch.randn(b, 1, hq, d, device=DEV, dtype=torch.bfloat16)
    k0 = torch.randn(b, 1, hk, d, device=DEV, dtype=torch.bfloat16)
    q, k = q0.clone(), k0.clone()
    off = torch.randint(0, 4000, (b,), device=DEV)

    steps = {
        "module": lambda: rope(q, k, offsets=off, inplace=True),
        "gather": lambda: ropekit.apply_rotary_gather(q, k, ct, st, positions=off, inplace=True, backend="triton"),
    }
    for name, step in steps.items():
        step()  # warm-up: tables, kernel compile
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()  # raises on any host synchronisation
        finally:
            torch.cuda.set_sync_debug_mode("default")
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            step()
        for _ in range(3):
            off.copy_(torch.randint(0, 4000, (b,), device=DEV))
            q.copy_(q0)
            k.copy_(k0)
            g.replay()
            got = q.clone(), k.clone()
            q.copy_(q0)
            k.copy_(k0)
            step()
            assert torch.equal(got[0], q) and torch.equal(got[1], k), name
        torch.cuda.synchronize()
