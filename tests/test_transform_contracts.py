"""Contracts found broken by an adversarial pass over autograd and function transforms; each
test failed on the code before its fix."""

import pytest
import torch

import ropekit
from ropekit import RopeConfig


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_module_table_built_inside_a_transform_is_the_exact_table(transform):
    # the first call ran inside torch.func: cos_sin_f64 fell back to torch.cos / torch.sin and
    # the module cached that float64 table for good (91 entries an ulp off at d = 128)
    cfg = RopeConfig(head_dim=128, base=5e5)
    q, k = torch.randn(2, 64, 2, 128, dtype=torch.float64), torch.randn(2, 64, 1, 128, dtype=torch.float64)
    fresh = ropekit.RotaryEmbedding(cfg)
    want = fresh(q, k)
    m = ropekit.RotaryEmbedding(cfg)
    if transform == "vmap":
        torch.func.vmap(lambda a, b: m(a[None], b[None])[0][0])(q, k)
    else:
        torch.func.grad(lambda a: m(a, k)[0].sum())(q)
    n = m.cos_cached.shape[0]
    assert torch.equal(m.cos_cached, fresh.cos_cached[:n]) and torch.equal(m.sin_cached, fresh.sin_cached[:n])
    got = m(q, k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_learnable_angles_inside_grad_still_differentiate():
    from ropekit.tables import cos_sin_f64

    a = torch.linspace(-2.0, 2.0, 9, dtype=torch.float64)
    g = torch.func.grad(lambda x: cos_sin_f64(x)[1].sum())(a)  # d/dx sum(sin x) = cos x
    torch.testing.assert_close(g, torch.cos(a), rtol=0, atol=1e-15)


def test_to_empty_marks_the_tables_stale():
    # to_empty replaced the built tables with uninitialised memory of the same dtype; the next
    # call rotated with it (errors of 1e36, inf), silently
    cfg = RopeConfig(head_dim=64)
    q, k = torch.randn(1, 5, 2, 64), torch.randn(1, 5, 1, 64)
    want = ropekit.RotaryEmbedding(cfg)(q, k)
    m = ropekit.RotaryEmbedding(cfg)
    m(q, k)
    m.to_empty(device="cpu")
    got = m(q, k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", ["auto", "cpu", "eager", "reference"])
def test_outputs_of_inputs_without_grad_do_not_require_grad(backend):
    # the cpu backend's two-output autograd Functions marked both outputs as requiring grad
    # when only q (or only q_weight) did: a KV cache written from k_out kept the graph alive
    cos, sin = ropekit.cos_sin(RopeConfig(16), torch.arange(4))
    cos, sin = cos[:, None], sin[:, None]
    q, k = torch.randn(1, 4, 2, 16, requires_grad=True), torch.randn(1, 4, 1, 16)
    w = torch.ones(16)
    _, ko = ropekit.apply_rotary_qk(q, k, cos, sin, backend=backend)
    assert not ko.requires_grad and ko.grad_fn is None
    _, ko = ropekit.apply_qk_norm_rotary(q, k, w, w, cos, sin, backend=backend)
    assert not ko.requires_grad
    qo, ko = ropekit.apply_qk_norm_rotary(q.detach(), k, w.clone().requires_grad_(), w, cos, sin, backend=backend)
    assert qo.requires_grad and not ko.requires_grad
    ct, st = ropekit.cos_sin(RopeConfig(16), torch.arange(8))
    _, ko = ropekit.apply_rotary_gather(q, k, ct, st, positions=torch.tensor([1, 3, 5, 7]), backend=backend)
    assert not ko.requires_grad
    (qo.sum()).backward()  # the remaining graph still differentiates


def test_multi_axis_float64_text_tokens_are_rotary_embedding_bits():
    # the multi-axis module built float32 tables for float64 q/k (error 1.5e-7 where
    # RotaryEmbedding is exact); its docs promise RotaryEmbedding's bits for text tokens
    cfg = RopeConfig(head_dim=16, base=1e4)
    q, k = torch.randn(2, 50, 4, 16, dtype=torch.float64), torch.randn(2, 50, 1, 16, dtype=torch.float64)
    pos = torch.arange(50)[:, None].expand(50, 3)
    a = ropekit.MultiAxisRotaryEmbedding(cfg, [2, 3, 3])(q, k, pos)
    b = ropekit.RotaryEmbedding(cfg)(q, k)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = ropekit.MultiAxisRotaryEmbedding(cfg, [2, 3, 3], table_dtype=torch.float32)(q, k, pos)  # asked for: kept
    assert not torch.equal(c[0], b[0])


def test_module_under_vmap_over_positions_and_linearize():
    # the module read the offsets / positions on the host to size its table: under vmap over
    # them that raised torch's "Cannot access data pointer" / ".item()" errors, and under
    # torch.func.linearize (make_fx) a proxy; now cos/sin come from the positions directly
    cfg = RopeConfig(head_dim=8, base=100.0)
    rope = ropekit.RotaryEmbedding(cfg)
    q, k = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 1, 8)
    off = torch.tensor([3, 7])
    want = rope(q, k, offsets=off)
    got = torch.func.vmap(lambda a, b, o: rope(a[None], b[None], offsets=o[None]))(q, k, off)
    assert torch.equal(got[0][:, 0], want[0]) and torch.equal(got[1][:, 0], want[1])
    got = torch.func.vmap(lambda a, b, p: rope(a[None], b[None], positions=p))(q, k, off[:, None])
    assert torch.equal(got[0][:, 0], want[0])
    t = torch.randn_like(q)
    for backend in ("eager", "auto"):
        m = ropekit.RotaryEmbedding(cfg, backend=backend)
        _, lin = torch.func.linearize(lambda x: m(x, k)[0], q)
        torch.testing.assert_close(lin(t), m(t, k)[0], rtol=0, atol=1e-6)
        assert m.cos_cached is None or m.cos_cached.device.type == "cpu"  # no traced table cached
    ct, st = ropekit.cos_sin(cfg, torch.arange(16))
    pos = torch.tensor([[3], [9]])
    _, lin = torch.func.linearize(lambda x: ropekit.apply_rotary_gather(x, k, ct, st, positions=pos, backend="eager")[0], q)
    torch.testing.assert_close(lin(t), ropekit.apply_rotary_gather(t, k, ct, st, positions=pos)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["eager", "reference", "cpu"])
@pytest.mark.parametrize("bad", [-1, 40])
def test_compiled_gather_checks_position_values(backend, bad):
    # compiled, the torch-only backends took a negative position as a row from the end
    # (silently) and aborted the process on one past the table (inductor's bounds assert);
    # the cpu backend raised the kernel's ValueError, not the eager call's RopeError
    import torch._dynamo

    ct, st = ropekit.cos_sin(RopeConfig(64), torch.arange(32))
    q, k = torch.randn(1, 4, 2, 64), torch.randn(1, 4, 2, 64)

    def f(q, k, pos):
        return ropekit.apply_rotary_gather(q, k, ct, st, positions=pos, backend=backend)

    torch._dynamo.reset()
    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    good = torch.tensor([0, 1, 2, 31])
    want, got = f(q, k, good), cf(q, k, good)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    with pytest.raises(ropekit.RopeError, match=r"positions in \[0, 32\)"):
        cf(q, k, torch.tensor([0, 1, 2, bad]))


def test_exported_gather_stays_plain_aten():
    ct, st = ropekit.cos_sin(RopeConfig(64), torch.arange(32))

    class M(torch.nn.Module):
        def forward(self, q, k, pos):
            return ropekit.apply_rotary_gather(q, k, ct, st, positions=pos, backend="eager")

    ep = torch.export.export(M(), (torch.randn(1, 4, 2, 64), torch.randn(1, 4, 2, 64), torch.tensor([0, 1, 2, 3])))
    assert "positions_in_range" not in str(ep.graph)
