"""torch.compile / torch.export of RotaryEmbedding and apply_rotary: no graph breaks, no
recompilation when only the sequence length changes, same numbers as eager.

Dynamo-level properties (graph breaks, guards, recompiles) do not depend on the compiler
backend, so most tests compile with ``backend="aot_eager"`` (dynamo + AOTAutograd, which
also traces the backward) to stay fast; ``test_inductor_end_to_end`` runs inductor once.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch import nn

import ropekit
from ropekit import RopeConfig, RotaryEmbedding, apply_rotary, apply_rotary_qk, cos_sin

BACKENDS = ropekit.backends.available()
# Inductor's C++ build and strict export take 10-25 s each on a busy 2-core CI box:
# opt-in with ROPEKIT_SLOW_TESTS=1 (run for every change to the graph path).
slow = pytest.mark.skipif(not os.environ.get("ROPEKIT_SLOW_TESTS"), reason="set ROPEKIT_SLOW_TESTS=1")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _n_compiled(fn) -> int:
    """How many compiled variants dynamo holds for ``fn`` (1 = never recompiled)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(fn.__code__))


def test_module_no_graph_breaks_every_position_input():
    rope = RotaryEmbedding(RopeConfig(16, rotary_dim=12))

    def f(q, k, off, pos2d, qt, kt, cu):
        a = rope(q, k)
        b = rope(q, k, offsets=off)
        c = rope(q, k, offsets=7)
        d = rope(q, k, positions=pos2d)
        e = rope(q.transpose(1, 2), k.transpose(1, 2), positions=pos2d[0], format="bhsd")
        g = rope(qt, kt, cu_seqlens=cu, format="thd")
        return a, b, c, d, e, g

    q, k = torch.randn(2, 5, 3, 16), torch.randn(2, 5, 1, 16)
    qt, kt = torch.randn(9, 3, 16), torch.randn(9, 1, 16)
    args = (q, k, torch.tensor([0, 4]), torch.randint(0, 50, (2, 5)), qt, kt, torch.tensor([0, 3, 3, 8, 9]))
    ex = torch._dynamo.explain(f)(*args)
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1
    # and the traced graph computes what eager does
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    want = f(*args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-6, rtol=2e-6)


def test_module_dynamic_seq_len_no_recompile_fwd_bwd():
    cfg = RopeConfig(32, rotary_dim=24, layout="interleaved")
    rope = RotaryEmbedding(cfg)

    def f(q, k, off):
        q2, k2 = rope(q, k, offsets=off)
        return (q2 * k2.sum(2, keepdim=True)).sum()  # uses both, GQA broadcast over heads

    cf = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for s in (3, 7, 16, 41):
        q = torch.randn(2, s, 4, 32, requires_grad=True)
        k = torch.randn(2, s, 2, 32, requires_grad=True)
        off = torch.tensor([0, 11])
        out = cf(q, k, off)
        gq, gk = torch.autograd.grad(out, (q, k))
        want = f(q, k, off)
        wq, wk = torch.autograd.grad(want, (q, k))
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(gq, wq, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(gk, wk, atol=2e-5, rtol=2e-5)
    assert _n_compiled(f) == 1


@pytest.mark.parametrize("backend", [b if b != "reference" else pytest.param(b, marks=slow) for b in BACKENDS])
def test_apply_rotary_each_backend_fullgraph(backend):
    """fullgraph=True raises on any graph break; two sequence lengths, one compiled graph."""
    cfg = RopeConfig(24, rotary_dim=16, layout="half" if backend != "complex" else "interleaved")
    shapes = [(2, 3, 2, 24), (2, 6, 2, 24)] if backend == "triton" else [(2, 5, 3, 24), (2, 9, 3, 24)]

    def f(x, k, c, s):
        y = apply_rotary(x, c, s, backend=backend)
        q2, k2 = apply_rotary_qk(x, k, c, s, backend=backend)
        z = apply_rotary(y, c, s, backend=backend, conjugate=True)  # back to x
        return y, q2, k2, z

    cf = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for shp in shapes:
        x = torch.randn(*shp)
        c, s = cos_sin(cfg, torch.arange(shp[1]) * 3)
        args = (x, x[:, :, :1].clone(), c[:, None], s[:, None])
        got, want = cf(*args), f(*args)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(got[3], x, atol=2e-6, rtol=2e-6)
    assert _n_compiled(f) == 1


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in ("reference", "triton")])
def test_apply_rotary_backward_under_compile(backend):
    """Opaque backends (custom op) carry the R(-θ) backward; traceable ones use autograd."""
    cfg = RopeConfig(8)
    c, s = cos_sin(cfg, torch.arange(4))
    x = torch.randn(2, 4, 3, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 4, 3, 8, dtype=torch.float64)

    def f(x):
        return (apply_rotary(x, c[:, None].double(), s[:, None].double(), backend=backend) * g).sum()

    (gx,) = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x), x)
    # independent expectation: the gradient of <R x, g> is Rᵀ g = R(-θ) g
    want = apply_rotary(g, c[:, None].double(), s[:, None].double(), backend="reference", conjugate=True)
    torch.testing.assert_close(gx, want, atol=1e-12, rtol=1e-12)


def test_inplace_and_out_under_compile():
    cfg = RopeConfig(16)
    c, s = cos_sin(cfg, torch.arange(5))
    x = torch.randn(2, 5, 2, 16)
    want = apply_rotary(x, c[:, None], s[:, None])

    def f(x, out):
        a = apply_rotary(x.clone(), c[:, None], s[:, None], inplace=True)
        apply_rotary(x, c[:, None], s[:, None], out=out)
        return a

    out = torch.empty_like(x)
    a = torch.compile(f, fullgraph=True, backend="aot_eager")(x, out)
    torch.testing.assert_close(a, want)
    torch.testing.assert_close(out, want)


def test_length_dependent_scaling_needs_seq_len_under_compile():
    sc = ropekit.scaling.DynamicNTK(factor=2.0, max_position=16)
    rope = RotaryEmbedding(RopeConfig(16, scaling=sc))
    q = torch.randn(1, 40, 2, 16)
    f = torch.compile(lambda q: rope(q, q, seq_len=40), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(q)[0], rope(q, q, seq_len=40)[0], atol=2e-6, rtol=2e-6)
    g = torch.compile(lambda q: rope(q, q), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="seq_len="):
        g(q)


class _Attn(nn.Module):
    """A small causal self-attention block with RoPE (GQA: 4 query heads, 2 kv heads)."""

    def __init__(self, dim=32, hq=4, hk=2, layout="half"):
        super().__init__()
        self.hq, self.hk, self.d = hq, hk, dim // hq
        self.wq = nn.Linear(dim, hq * self.d, bias=False)
        self.wk = nn.Linear(dim, hk * self.d, bias=False)
        self.wv = nn.Linear(dim, hk * self.d, bias=False)
        self.wo = nn.Linear(hq * self.d, dim, bias=False)
        self.rope = RotaryEmbedding(RopeConfig(self.d, layout=layout))

    def forward(self, x, positions):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.hq, self.d)  # [b, s, hq, d]
        k = self.wk(x).view(b, s, self.hk, self.d)  # [b, s, hk, d]
        v = self.wv(x).view(b, s, self.hk, self.d)
        q, k = self.rope(q, k, positions=positions)
        o = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )  # [b, hq, s, d]
        return self.wo(o.transpose(1, 2).reshape(b, s, -1))


@pytest.mark.parametrize("strict", [False, pytest.param(True, marks=slow)])
def test_export_attention_block(strict):
    torch.manual_seed(0)
    m = _Attn().eval()
    x, pos = torch.randn(2, 6, 32), torch.arange(6)[None].expand(2, 6) + torch.tensor([[0], [3]])
    s = torch.export.Dim("s", min=2, max=4096)
    ep = torch.export.export(m, (x, pos), dynamic_shapes={"x": {1: s}, "positions": {1: s}}, strict=strict)
    for n in (6, 11):
        x2 = torch.randn(2, n, 32)
        p2 = torch.arange(n)[None].expand(2, n) + torch.tensor([[0], [5]])
        torch.testing.assert_close(ep.module()(x2, p2), m(x2, p2), atol=1e-5, rtol=1e-5)
    # the rotation really is in the graph: relative positions change the output (a uniform
    # shift would not — RoPE scores depend on position differences only)
    torch.testing.assert_close(ep.module()(x2, p2 + 1000), m(x2, p2), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ep.module()(x2, p2), ep.module()(x2, p2 * 2), atol=1e-4)


def test_meta_tensors_shape_only():
    rope = RotaryEmbedding(RopeConfig(16))
    q, k = torch.empty(2, 5, 3, 16, device="meta"), torch.empty(2, 5, 1, 16, device="meta")
    q2, k2 = rope(q, k, offsets=torch.tensor([1, 2], device="meta"))
    assert q2.device.type == "meta" and q2.shape == q.shape and k2.shape == k.shape
    qt = torch.empty(9, 3, 16, device="meta")
    q3, _ = rope(qt, qt, cu_seqlens=torch.tensor([0, 4, 9], device="meta"), format="thd")
    assert q3.shape == qt.shape and rope.cos_cached is None  # no table was built on meta


@slow
def test_inductor_end_to_end():
    """One real inductor compile: in-graph float64 cos/sin and the fused rotation."""
    cfg = RopeConfig(16, rotary_dim=12, layout="interleaved")
    rope = RotaryEmbedding(cfg)
    f = torch.compile(lambda q, k, p: rope(q, k, positions=p), fullgraph=True, dynamic=True)
    for s in (5, 13):
        q, k = torch.randn(2, s, 2, 16), torch.randn(2, s, 1, 16)
        p = torch.randint(0, 100_000, (2, s))
        for g, w in zip(f(q, k, p), rope(q, k, positions=p)):
            torch.testing.assert_close(g, w, atol=2e-6, rtol=2e-6)
