"""RotaryEmbedding: every format and position input against a per-token oracle; tables."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RotaryEmbedding

from _oracle import rope_bshd

BACKENDS = [b for b in ropekit.backends.available() if b != "triton"]


def _to_fmt(x_bshd, fmt):
    if fmt == "bshd":
        return x_bshd
    if fmt == "bhsd":
        return x_bshd.transpose(1, 2).contiguous()
    if fmt == "sbhd":
        return x_bshd.transpose(0, 1).contiguous()
    raise AssertionError(fmt)


def _from_fmt(x, fmt):
    if fmt == "bshd":
        return x
    if fmt == "bhsd":
        return x.transpose(1, 2)
    return x.transpose(0, 1)


POSITION_CASES = ["default", "offset_int", "offset_tensor", "positions_1d", "positions_2d"]


def _kwargs_and_pos(case, b, s):
    base = torch.arange(s)
    if case == "default":
        return {}, base.expand(b, s)
    if case == "offset_int":
        return {"offsets": 17}, (base + 17).expand(b, s)
    if case == "offset_tensor":
        off = torch.tensor([0, 9, 300])[:b]
        return {"offsets": off}, off[:, None] + base
    if case == "positions_1d":
        p = torch.tensor([5, 0, 2, 2, 99, 1000])[:s]
        return {"positions": p}, p.expand(b, s)
    p = torch.randint(0, 4000, (b, s))
    return {"positions": p}, p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["bshd", "bhsd", "sbhd"])
@pytest.mark.parametrize("case", POSITION_CASES)
@pytest.mark.parametrize("layout", ropekit.LAYOUTS)
def test_formats_and_positions(backend, fmt, case, layout):
    torch.manual_seed(0)
    b, s, hq, hk, d, r = 3, 6, 4, 2, 24, 16
    cfg = RopeConfig(d, rotary_dim=r, layout=layout)
    rope = RotaryEmbedding(cfg, backend=backend)
    q, k = torch.randn(b, s, hq, d), torch.randn(b, s, hk, d)
    kw, pos = _kwargs_and_pos(case, b, s)
    q2, k2 = rope(_to_fmt(q, fmt), _to_fmt(k, fmt), format=fmt, **kw)
    torch.testing.assert_close(_from_fmt(q2, fmt).double(), rope_bshd(q, pos, r, layout), atol=5e-6, rtol=5e-6)
    torch.testing.assert_close(_from_fmt(k2, fmt).double(), rope_bshd(k, pos, r, layout), atol=5e-6, rtol=5e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_thd_packed(backend):
    torch.manual_seed(1)
    cu = torch.tensor([0, 3, 3, 8, 9])  # includes an empty sequence
    t, d = 9, 16
    q, k = torch.randn(t, 3, d), torch.randn(t, 1, d)
    rope = RotaryEmbedding(RopeConfig(d), backend=backend)
    q2, k2 = rope(q, k, cu_seqlens=cu, format="thd")
    pos = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 0])  # restarts per sequence, written by hand from cu
    want = rope_bshd(q[None], pos[None], d, "half")[0]
    torch.testing.assert_close(q2.double(), want, atol=5e-6, rtol=5e-6)
    torch.testing.assert_close(k2.double(), rope_bshd(k[None], pos[None], d, "half")[0], atol=5e-6, rtol=5e-6)
    # explicit positions give the same
    q3, _ = rope(q, k, positions=pos, format="thd")
    assert torch.equal(q3, q2)


def test_decode_matches_prefill():
    torch.manual_seed(2)
    rope = RotaryEmbedding(RopeConfig(32))
    q, k = torch.randn(2, 10, 4, 32), torch.randn(2, 10, 4, 32)
    qa, ka = rope(q, k)
    for i in range(10):
        qi, ki = rope(q[:, i : i + 1], k[:, i : i + 1], offsets=torch.tensor([i, i]))
        assert torch.equal(qi, qa[:, i : i + 1]) and torch.equal(ki, ka[:, i : i + 1])


def test_module_backward_vs_oracle():
    torch.manual_seed(3)
    cfg = RopeConfig(16, layout="interleaved")
    rope = RotaryEmbedding(cfg)
    q = torch.randn(2, 5, 3, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 1, 16, dtype=torch.float64, requires_grad=True)
    rope64 = RotaryEmbedding(cfg, table_dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, k: rope64(q, k, offsets=torch.tensor([3, 0])), (q, k))
    q2, k2 = rope(q.float(), k.float())
    assert q2.requires_grad


def test_tables_cache_grow_state_dict_meta_and_dtype():
    cfg = RopeConfig(16)
    rope = RotaryEmbedding(cfg, max_position=8)
    assert rope.state_dict() == {}
    q = torch.randn(1, 4, 1, 16)
    rope(q, q)
    assert rope.cos_cached.shape == (8, 8)
    rope(q, q, offsets=100)  # grows to the next power of two
    assert rope.cos_cached.shape[0] == 128
    want_cos, _ = ropekit.cos_sin(cfg, torch.arange(128))
    assert torch.equal(rope.cos_cached, want_cos)
    # .to(bfloat16) of the model must not lower the precision of the tables
    rope.to(torch.bfloat16)
    rope(q.bfloat16(), q.bfloat16())
    n = rope.cos_cached.shape[0]
    assert rope.cos_cached.dtype == torch.float32 and torch.equal(rope.cos_cached, want_cos[:n])
    # meta-device construction, then rope_init()
    with torch.device("meta"):
        m = RotaryEmbedding(cfg, max_position=64)
    m.rope_init(device="cpu")
    assert torch.equal(m.cos_cached, ropekit.cos_sin(cfg, torch.arange(64))[0])
    # deepcopy / pickle
    m2 = copy.deepcopy(m)
    m3 = pickle.loads(pickle.dumps(m))
    for mm in (m2, m3):
        assert torch.equal(mm(q, q)[0], m(q, q)[0])


def test_thread_safe_growth():
    import threading

    cfg = RopeConfig(16)
    rope = RotaryEmbedding(cfg)
    x = torch.randn(1, 3, 1, 16)
    results, errors = {}, []

    def work(i):
        try:
            results[i] = rope(x, x, offsets=i * 37)[0]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, y in results.items():
        assert torch.equal(y, RotaryEmbedding(cfg)(x, x, offsets=i * 37)[0])


def test_module_errors():
    rope = RotaryEmbedding(RopeConfig(16))
    q = torch.randn(2, 4, 2, 16)
    with pytest.raises(ropekit.RopeError, match="format"):
        rope(q, q, format="bsdh")
    with pytest.raises(ropekit.RopeError, match="4 dims"):
        rope(q[0], q[0])
    with pytest.raises(ropekit.RopeError, match=r"cu_seqlens\[-1\] == t == 8"):
        rope(q.reshape(8, 2, 16), q.reshape(8, 2, 16), cu_seqlens=torch.tensor([0, 3, 7]), format="thd")
    with pytest.raises(ropekit.RopeError, match="non-decreasing"):
        rope(q.reshape(8, 2, 16), q.reshape(8, 2, 16), cu_seqlens=torch.tensor([0, 5, 3, 8]), format="thd")
    with pytest.raises(ropekit.RopeError, match=">= 0"):
        rope(q, q, positions=torch.tensor([0, 1, -1, 2]))
    with pytest.raises(ropekit.RopeError, match="integer dtype"):
        rope(q, q, positions=torch.arange(4.0))
    with pytest.raises(ropekit.RopeError, match=r"shape \[b\] = \[2\]"):
        rope(q, q, offsets=torch.tensor([1, 2, 3]))
    with pytest.raises(ropekit.RopeError, match="at most one"):
        rope(q, q, offsets=1, positions=torch.arange(4))
    with pytest.raises(ropekit.RopeError, match="same batch and sequence"):
        rope(q, q[:, :3])
    with pytest.raises(ropekit.RopeError, match="RopeConfig"):
        RotaryEmbedding({"head_dim": 16})


# --- the per-call fast path of the cpu backend (validated signatures, decode loops) ----------


def _cpu_or_skip():
    from ropekit import ops

    assert ops.LOADED, ops.REASON  # the project's install builds the operators


@pytest.mark.parametrize("fmt", ["bshd", "bhsd", "sbhd"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("layout", ropekit.LAYOUTS)
def test_fast_path_decode_loop_matches_oracle(fmt, inplace, layout, monkeypatch):
    """A decode loop (s = 1, per-sample offsets) and int-offset chunks: every call takes the
    module's one path (positions -> table rows -> the gather op), the table is built once and
    reused, and every result matches the oracle."""
    _cpu_or_skip()
    b, hq, hk, d, r = 3, 4, 2, 24, 16
    rope = RotaryEmbedding(RopeConfig(d, rotary_dim=r, layout=layout), backend="cpu", max_position=64)
    general = RotaryEmbedding._positions_and_tables
    calls = []
    monkeypatch.setattr(RotaryEmbedding, "_positions_and_tables", lambda *a, **kw: calls.append(1) or general(*a, **kw))
    g = torch.Generator().manual_seed(5)
    for step in range(4):
        off = torch.tensor([3, 20, 41]) + step
        q, k = torch.randn(b, 1, hq, d, generator=g), torch.randn(b, 1, hk, d, generator=g)
        qf, kf = _to_fmt(q, fmt).clone(), _to_fmt(k, fmt).clone()
        q2, k2 = rope(qf, kf, offsets=off, format=fmt, inplace=inplace)
        pos = off[:, None]
        torch.testing.assert_close(_from_fmt(q2, fmt).double(), rope_bshd(q, pos, r, layout), atol=5e-6, rtol=5e-6)
        torch.testing.assert_close(_from_fmt(k2, fmt).double(), rope_bshd(k, pos, r, layout), atol=5e-6, rtol=5e-6)
        assert (q2.data_ptr() == qf.data_ptr()) == inplace
        table = table if step else rope.cos_cached
    for step in range(3):  # int offsets, s = 5 (chunked prefill)
        q, k = torch.randn(b, 5, hq, d, generator=g), torch.randn(b, 5, hk, d, generator=g)
        q2, k2 = rope(_to_fmt(q, fmt), _to_fmt(k, fmt), offsets=7 * step, format=fmt)
        pos = (torch.arange(5) + 7 * step).expand(b, 5)
        torch.testing.assert_close(_from_fmt(q2, fmt).double(), rope_bshd(q, pos, r, layout), atol=5e-6, rtol=5e-6)
    # the general path for the first decode call (it builds the table) and the int-offset
    # chunks; the later decode calls go straight to the backend's offsets entry (the same op)
    assert len(calls) == 4
    assert rope.cos_cached is table  # built by the first call, never rebuilt


def test_fast_path_grows_tables_and_still_raises():
    _cpu_or_skip()
    rope = RotaryEmbedding(RopeConfig(16), backend="cpu", max_position=8)
    q, k = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 1, 16)
    rope(q, k, offsets=torch.tensor([1, 2]))  # an 8-row table
    # past the table: the op refuses before writing, the general path grows the table
    q2, _ = rope(q, k, offsets=torch.tensor([1, 500]))
    torch.testing.assert_close(q2.double(), rope_bshd(q, torch.tensor([[1], [500]]), 16, "half"), atol=5e-6, rtol=5e-6)
    assert rope.cos_cached.shape[0] > 500
    with pytest.raises(ropekit.RopeError):
        rope(q, k, offsets=torch.tensor([1, -3]), inplace=True)
    with pytest.raises(ropekit.RopeError):
        rope(q, k, offsets=-2)
    with pytest.raises(ropekit.RopeError):  # a bad format is still caught
        rope(q, k, offsets=torch.tensor([1, 2]), format="bsdh")
    qc = q.clone()
    with pytest.raises(ropekit.RopeError):
        rope(qc, k, offsets=torch.tensor([1, -3]), inplace=True)
    assert torch.equal(qc, q)  # nothing written


def _decode_oracle(q, off, d):
    return rope_bshd(q, off[:, None] if off.dim() == 1 else off, d, "half")


def test_offsets_entry_falls_back_where_it_must():
    """The module's one-step offsets entry (after a first call has built the table) gives the
    general path's results in every case it must hand back: a table to grow, a dtype switch,
    a changed backend, a functorch transform, a dispatch mode, a trace, non-contiguous
    offsets, chunked prefill (s > 1); its refusals are RopeErrors with nothing written."""
    _cpu_or_skip()
    d = 16
    rope = RotaryEmbedding(RopeConfig(d), backend="cpu", max_position=8)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 1, 2, d, generator=g), torch.randn(2, 1, 1, d, generator=g)
    off = torch.tensor([1, 2])
    rope(q, k, offsets=off)
    assert rope.__dict__.get("_decode") is not None  # recorded: later calls take the entry
    for o in (torch.tensor([3, 7]), torch.tensor([5, 600]), torch.tensor([0, 9, 2, 4])[::2]):  # grow, strided
        q2, k2 = rope(q, k, offsets=o)
        torch.testing.assert_close(q2.double(), _decode_oracle(q, o, d), atol=5e-6, rtol=5e-6)
        torch.testing.assert_close(k2.double(), _decode_oracle(k, o, d), atol=5e-6, rtol=5e-6)
    qs, ks = torch.randn(2, 3, 2, d, generator=g), torch.randn(2, 3, 1, d, generator=g)  # chunked prefill
    q2, _ = rope(qs, ks, offsets=off)
    torch.testing.assert_close(q2.double(), _decode_oracle(qs, off[:, None] + torch.arange(3), d), atol=5e-6, rtol=5e-6)
    # dtype switches: float64 q gets float64 tables, bfloat16 the float32 ones
    for dt in (torch.float64, torch.bfloat16, torch.float32):
        q2, _ = rope(q.to(dt), k.to(dt), offsets=off)
        assert q2.dtype == dt
        want = RotaryEmbedding(RopeConfig(d), backend="eager")(q.to(dt), k.to(dt), offsets=off)[0]
        torch.testing.assert_close(q2, want, atol=0, rtol=0) if dt == torch.float64 else None
        torch.testing.assert_close(q2.double(), _decode_oracle(q.to(dt).double(), off, d), atol=2e-2, rtol=2e-2)
    # a changed backend is honoured (the entry recorded for "cpu" is not used for it)
    rope.backend = "reference"
    got = rope(q, k, offsets=off)
    want = RotaryEmbedding(RopeConfig(d), backend="reference")(q, k, offsets=off)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    rope.backend = "cpu"
    # functorch: grad and vmap through the module with offsets
    qg = q.double()
    grad = torch.func.grad(lambda x: rope(x, k.double(), offsets=off)[0].square().sum())(qg)
    torch.testing.assert_close(grad, 2 * qg, atol=1e-12, rtol=1e-12)  # a rotation keeps the norm
    vm = torch.func.vmap(lambda x: rope(x[None], k[:1], offsets=off[:1])[0][0])(q)
    torch.testing.assert_close(vm.double(), _decode_oracle(q, off[:1].expand(2), d), atol=5e-6, rtol=5e-6)
    # a dispatch mode sees the op (the general path's call, through torch.ops)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen() as mode:
        q2, _ = rope(q, k, offsets=off)
    assert any("ropekit" in o for o in mode.ops)
    torch.testing.assert_close(q2.double(), _decode_oracle(q, off, d), atol=5e-6, rtol=5e-6)
    # autograd through the entry: gradients of a non-leaf rotated in place
    qa = q.double().requires_grad_()
    ka = k.double().requires_grad_()
    rope(qa.detach() * 1, ka.detach() * 1, offsets=off)  # float64 entry recorded
    q2, k2 = rope(qa * 1, ka * 1, offsets=off, inplace=True)
    (q2.sum() + k2.sum()).backward()
    want = torch.autograd.grad(_decode_oracle(qa, off, d).sum(), qa)[0]
    torch.testing.assert_close(qa.grad, want, atol=1e-12, rtol=1e-12)
    # refusals: RopeError, nothing written
    qc = q.clone()
    for bad in (dict(q=qc, k=torch.randn(2, 2, 1, d)), dict(q=qc, k=torch.randn(3, 1, 1, d)), dict(q=qc, k=k[..., :8])):
        with pytest.raises(ropekit.RopeError):
            rope(bad["q"], bad["k"], offsets=off, inplace=True)
        assert torch.equal(qc, q)
    with pytest.raises(ropekit.RopeError, match="minimum position"):
        rope(qc, k, offsets=torch.tensor([1, -3]), inplace=True)
    assert torch.equal(qc, q)


def test_offsets_entry_is_not_taken_inside_torch_compile():
    """After eager calls have recorded the module's offsets entry, a compiled call (fullgraph)
    traces the graph path (no host read of the offsets, no C++ entry) and gives the same
    values; eager calls afterwards still take the entry."""
    _cpu_or_skip()
    d = 16
    rope = RotaryEmbedding(RopeConfig(d), backend="cpu", max_position=16)
    q, k = torch.randn(2, 1, 2, d), torch.randn(2, 1, 1, d)
    off = torch.tensor([1, 9])
    want = rope(q, k, offsets=off)
    assert rope.__dict__.get("_decode") is not None
    torch._dynamo.reset()
    f = torch.compile(lambda a, b, o: rope(a, b, offsets=o), fullgraph=True, backend="eager")
    got = f(q, k, off)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    again = rope(q, k, offsets=off)
    assert all(torch.equal(a, b) for a, b in zip(again, want))


def test_offsets_entry_under_jit_trace_records_the_graph_path():
    _cpu_or_skip()
    d = 16
    rope = RotaryEmbedding(RopeConfig(d), backend="cpu", max_position=8)
    q, k = torch.randn(2, 1, 2, d), torch.randn(2, 1, 1, d)
    off = torch.tensor([1, 2])
    rope(q, k, offsets=off)
    traced = torch.jit.trace(lambda a, b, o: rope(a, b, offsets=o), (q, k, off), check_trace=False)
    off2 = torch.tensor([4, 6])
    torch.testing.assert_close(traced(q, k, off2)[0].double(), _decode_oracle(q, off2, d), atol=5e-6, rtol=5e-6)


def test_fast_path_length_dependent_scaling_is_not_cached():
    _cpu_or_skip()
    from ropekit.scaling import DynamicNTK

    cfg = RopeConfig(16, scaling=DynamicNTK(factor=4.0, max_position=8))
    rope = RotaryEmbedding(cfg, backend="cpu")
    eager = RotaryEmbedding(cfg, backend="eager")
    q, k = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 1, 16)
    for off in (0, 30, 2):  # the table depends on the length: every call recomputes it
        assert torch.allclose(rope(q, k, offsets=off)[0], eager(q, k, offsets=off)[0], atol=1e-6)


def test_fast_path_respects_a_subclass_that_makes_its_own_tables():
    _cpu_or_skip()

    class Doubled(RotaryEmbedding):  # tables for twice the position
        def tables(self, n, *, device, seq_len=None):
            cos, sin = super().tables(2 * n, device=device, seq_len=seq_len)
            return cos[::2].contiguous(), sin[::2].contiguous()

    rope = Doubled(RopeConfig(16), backend="cpu", max_position=32)
    q, k = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 1, 16)
    off = torch.tensor([3, 5])
    for _ in range(3):
        q2, _ = rope(q, k, offsets=off)
        want = rope_bshd(q, 2 * off[:, None], 16, "half")
        torch.testing.assert_close(q2.double(), want, atol=5e-6, rtol=5e-6)


# --- MLA heads (rotary_offset) and the direction of rotation ---------------------------------


@pytest.mark.parametrize("backend", [b for b in ropekit.backends.available()])
@pytest.mark.parametrize("inplace", [False, True])
def test_rotary_offset_rotates_only_the_rope_slice(backend, inplace):
    """An MLA head [nope | rope] (rotary_offset = nope): the rope slice equals RoPE of that slice
    alone, the nope dims pass through, gradients too; a head of the rope width alone is refused."""
    nope, rope_d = 8, 16
    cfg = RopeConfig(nope + rope_d, rotary_dim=rope_d, rotary_offset=nope, layout="interleaved")
    part = RopeConfig(rope_d, layout="interleaved")
    torch.manual_seed(4)
    q, k = torch.randn(2, 5, 3, nope + rope_d), torch.randn(2, 5, 1, nope + rope_d)
    off = torch.tensor([0, 9])
    qa, ka = (q * 1).requires_grad_(), (k * 1).requires_grad_()
    qi, ki = (qa * 1, ka * 1) if inplace else (qa, ka)
    qo, ko = RotaryEmbedding(cfg, backend=backend)(qi, ki, offsets=off, inplace=inplace)
    wq, wk = RotaryEmbedding(part, backend="reference")(q[..., nope:], k[..., nope:], offsets=off)
    torch.testing.assert_close(qo[..., nope:].detach(), wq.float(), atol=2e-6, rtol=0)
    torch.testing.assert_close(ko[..., nope:].detach(), wk.float(), atol=2e-6, rtol=0)
    assert torch.equal(qo[..., :nope].detach(), q[..., :nope]) and torch.equal(ko[..., :nope].detach(), k[..., :nope])
    g = torch.randn_like(qo)
    (qo * g).sum().backward()
    assert torch.equal(qa.grad[..., :nope], g[..., :nope])
    # d/dq of R(θ) q is R(θ)ᵀ = R(-θ): the rope slice of g rotated by -θ (direction -1)
    inv = RopeConfig(rope_d, layout="interleaved", direction=-1)
    want_g, _ = RotaryEmbedding(inv, backend="reference")(g[..., nope:], k[..., nope:], offsets=off)
    torch.testing.assert_close(qa.grad[..., nope:], want_g.float(), atol=2e-6, rtol=0)
    with pytest.raises(ropekit.RopeError, match="head width"):
        RotaryEmbedding(cfg, backend=backend)(q[..., nope:], k[..., nope:])


@pytest.mark.parametrize("backend", [b for b in ropekit.backends.available()])
def test_direction_minus_one_is_the_inverse_rotation(backend):
    cfg = RopeConfig(16, direction=-1)
    torch.manual_seed(5)
    q, k = torch.randn(2, 6, 2, 16), torch.randn(2, 6, 1, 16)
    for kw in ({}, {"offsets": 3}, {"offsets": torch.tensor([1, 4])}, {"positions": torch.arange(6)}):
        qo, ko = RotaryEmbedding(cfg, backend=backend)(q, k, **kw)
        back = RotaryEmbedding(RopeConfig(16), backend="reference")(qo, ko, **kw)  # +θ undoes -θ
        torch.testing.assert_close(back[0].float(), q, atol=3e-6, rtol=0)
        torch.testing.assert_close(back[1].float(), k, atol=3e-6, rtol=0)
