"""The compiled operators (``torch.ops.ropekit.*``) as PyTorch sees them: determinism across
calls and processes, every instruction-set level, no compiler at run time, a missing build,
the dispatcher's view of autograd and in place, and graphs (jit.trace, torch.compile, export)
holding the ropekit op.

Expected values: the eager run of the same call in this process, whose bits are pinned to
the float32 formula by tests/test_cpu_backend.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RopeError, RotaryEmbedding, apply_rotary, apply_rotary_qk, cos_sin, ops

pytestmark = pytest.mark.skipif(not ops.LOADED, reason=f"operators not built: {ops.REASON}")

# One script, run in fresh processes: hashes of the outputs of a fixed set of calls (every
# dtype, both layouts, partial rotary, in place, gather, backward), each call made twice.
_PROBE = textwrap.dedent(
    r"""
    import hashlib, json, warnings
    import torch, ropekit
    from ropekit import RopeConfig, RotaryEmbedding, apply_rotary, apply_rotary_qk, cos_sin, ops

    def digest(ts):
        h = hashlib.sha256()
        for t in ts:
            h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def calls():
        g = torch.Generator().manual_seed(0)
        out = []
        for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for layout in ("half", "interleaved"):
                q = torch.randn(2, 9, 4, 72, generator=g).to(dt)
                k = torch.randn(2, 9, 2, 72, generator=g).to(dt)
                c, s = cos_sin(RopeConfig(72, rotary_dim=56), torch.arange(9), dtype=torch.float64 if dt is torch.float64 else torch.float32)
                c, s = c[:, None], s[:, None]
                out += list(apply_rotary_qk(q, k, c, s, layout=layout))
                qi = q.clone(); apply_rotary(qi, c, s, layout=layout, inplace=True); out.append(qi)
                rope = RotaryEmbedding(RopeConfig(72, rotary_dim=56, layout=layout))
                out += list(rope(q, k, offsets=torch.tensor([3, 11])))
                qq = q.float().requires_grad_() if dt is not torch.float64 else q.clone().requires_grad_()
                y, _ = apply_rotary_qk(qq, k.to(qq.dtype), c.to(qq.dtype), s.to(qq.dtype), layout=layout)
                (y * torch.arange(y.numel()).view_as(y).to(y.dtype)).sum().backward()
                out.append(qq.grad)
        big = torch.randn(4, 256, 8, 128, generator=g)  # > 1 MB: split over threads
        c, s = cos_sin(RopeConfig(128), torch.arange(256))
        c128, s128 = c, s
        out.append(apply_rotary(big, c[:, None], s[:, None]))
        # fused per-head RMSNorm + rotation: the fast path (d % 16 == 0) and the buffered one,
        # forward and backward (weight gradients reduced across threads in the big case)
        for d, r, dt in ((128, 128, torch.float32), (128, 64, torch.bfloat16), (72, 56, torch.float16),
                         (80, 40, torch.float64), (128, 128, torch.bfloat16)):
            for layout in ("half", "interleaved"):
                n = 64 if d == 128 and r == 128 else 9
                c, s = cos_sin(RopeConfig(d, rotary_dim=r), torch.arange(n), dtype=torch.float64 if dt is torch.float64 else torch.float32)
                q = torch.randn(2, n, 8, d, generator=g).to(dt).requires_grad_()
                k = torch.randn(2, n, 2, d, generator=g).to(dt).requires_grad_()
                wq = torch.randn(d, generator=g).requires_grad_()
                wk = torch.randn(d, generator=g).to(dt).requires_grad_()
                qo, ko = ropekit.apply_qk_norm_rotary(q, k, wq, wk, c[:, None], s[:, None], layout=layout, weight_offset=1.0)
                gq, gk = torch.randn(qo.shape, generator=g).to(dt), torch.randn(ko.shape, generator=g).to(dt)
                out += [qo, ko, *torch.autograd.grad((qo, ko), (q, k, wq, wk), (gq, gk))]
        big = torch.randn(8, 256, 8, 128, generator=g).requires_grad_()  # 8 MB: forward and backward threaded
        wb = torch.randn(128, generator=g).requires_grad_()
        qo, ko = ropekit.apply_qk_norm_rotary(big, big[:, :, :2], wb, wb, c128[:, None], s128[:, None])
        out += [qo, ko, *torch.autograd.grad((qo * 2).sum() + (ko * ko).sum(), (big, wb))]
        return out

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        first = digest(calls())
        second = digest(calls())
    print(json.dumps({"first": first, "second": second, "capability": ops.capability(),
                      "available": ropekit.backends.available(), "warnings": [str(x.message) for x in w]}))
    """
)


def _probe(env_extra=None, prelude=""):
    env = dict(os.environ, **(env_extra or {}))
    r = subprocess.run([sys.executable, "-c", prelude + _PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def baseline():
    return _probe()


def test_same_bits_first_call_later_calls_and_other_processes(baseline):
    again = _probe()
    assert baseline["first"] == baseline["second"] == again["first"] == again["second"]
    assert "cpu" in baseline["available"] and not baseline["warnings"]


@pytest.mark.parametrize("level", ops.levels())
def test_every_instruction_set_level_gives_the_same_bits(level, baseline):
    """``ROPEKIT_CPU_CAPABILITY`` forces each level this machine can run; the bits do not move."""
    res = _probe({"ROPEKIT_CPU_CAPABILITY": level})
    assert res["capability"] == level
    assert res["first"] == res["second"] == baseline["first"]


def test_levels_lists_the_levels_this_cpu_runs_lowest_first():
    lv = ops.levels()
    assert lv[0] == "default" and lv[-1] == ops.capability()
    assert tuple(lv) == ops.LEVELS[: len(lv)]


def test_a_level_above_the_cpu_is_not_used(baseline):
    top = "avx512bf16"  # the highest level there is
    # the CPU's own best level: a process without ROPEKIT_CPU_CAPABILITY (this suite may run
    # with it set, forcing a lower level on every process it starts)
    env = {k: v for k, v in os.environ.items() if k != "ROPEKIT_CPU_CAPABILITY"}
    r = subprocess.run([sys.executable, "-c", "from ropekit import ops; print(ops.capability())"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    best = r.stdout.split()[-1]
    if best == top:
        pytest.skip(f"this CPU runs {top}, the highest level: none above it to ask for")
    res = _probe({"ROPEKIT_CPU_CAPABILITY": top})
    assert res["capability"] == best and res["first"] == baseline["first"]


def test_no_compiler_at_run_time(baseline, tmp_path):
    """With PATH stripped of every compiler the cpu backend is available and gives the same bits."""
    res = _probe({"PATH": str(tmp_path), "CXX": "", "CC": ""})
    assert "cpu" in res["available"] and res["first"] == baseline["first"]


def test_without_the_build_auto_warns_once_and_runs_eager(baseline):
    """A package installed without its extension: cpu is not listed, the first CPU call warns
    once (then none), and the results are the eager backend's."""
    res = _probe(prelude="import sys; sys.modules['ropekit._C'] = None\n")
    assert "cpu" not in res["available"]
    assert len(res["warnings"]) == 1 and "eager" in res["warnings"][0]
    assert res["first"] == res["second"]
    code = "import sys; sys.modules['ropekit._C'] = None\nimport ropekit\nropekit.backends.get('cpu')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "RopeError" in r.stderr and "not available" in r.stderr


# --- the dispatcher: in place, views, version counters, aliasing -----------------------------


BACKENDS = [b for b in ropekit.backends.available()]


def _tables(d, s):
    c, s_ = cos_sin(RopeConfig(d), torch.arange(s))
    return c[:, None], s_[:, None]


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_autograd_on_views_of_one_projection(backend):
    """The training step: q and k as views of one projection output, rotated in place under
    autograd; gradients equal the out-of-place ones."""
    torch.manual_seed(0)
    b, s, hq, hk, d = 2, 5, 4, 2, 16
    x = torch.randn(b, s, 24)
    w = torch.randn((hq + 2 * hk) * d, 24, requires_grad=True)
    cos, sin = _tables(d, s)
    grads = []
    for inplace in (False, True):
        w.grad = None
        qkv = (x @ w.T).view(b, s, hq + 2 * hk, d)
        q, k, v = qkv[:, :, :hq], qkv[:, :, hq : hq + hk], qkv[:, :, hq + hk :]
        qo, ko = apply_rotary_qk(q, k, cos, sin, inplace=inplace, backend=backend)
        assert (qo is q) == inplace
        loss = (qo * torch.arange(qo.numel()).view_as(qo)).sum() + (ko ** 2).sum() + v.sum()
        loss.backward()
        grads.append(w.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_q_k_sharing_memory_is_refused(backend):
    x = torch.randn(1, 3, 4, 8)
    cos, sin = _tables(8, 3)
    x0 = x.clone()
    for q, k in ((x, x), (x[:, :, :3], x[:, :, 1:])):
        with pytest.raises(RopeError, match="share no memory"):
            apply_rotary_qk(q, k, cos, sin, inplace=True, backend=backend)
        assert torch.equal(x, x0)  # nothing written
    # disjoint views of one buffer (fused qkv) are fine: each element rotated once
    q, k = x[:, :, :2], x[:, :, 2:]
    want_q, want_k = apply_rotary_qk(q, k, cos, sin, backend=backend)
    apply_rotary_qk(q, k, cos, sin, inplace=True, backend=backend)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    y = torch.randn(2, 3, 3, 2, 8)  # [b, s, 3 (q k v), h, d]
    q, k = y[:, :, 0], y[:, :, 1]
    want_q, want_k = apply_rotary_qk(q, k, cos, sin, backend=backend)
    apply_rotary_qk(q, k, cos, sin, inplace=True, backend=backend)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


def test_version_counter_and_saved_tensor_check():
    """In place bumps the version counter (the dispatcher's ADInplaceOrView kernel), so a graph
    that saved the old values refuses to run backward instead of using the new ones."""
    a = torch.randn(2, 3, 4, 8, requires_grad=True)
    q = a.sigmoid()  # sigmoid saves its output
    k = torch.randn(2, 3, 1, 8)
    cos, sin = _tables(8, 3)
    v0, vk = q._version, k._version
    apply_rotary_qk(q.detach(), k, cos, sin, inplace=True)
    assert q._version > v0 and k._version > vk
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        q.sum().backward()


def test_op_errors_are_rope_errors_with_the_same_information():
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 1, 8)
    cos, sin = _tables(8, 3)
    with pytest.raises(RopeError, match=r"layout in .*got 'diagonal'"):
        apply_rotary_qk(q, k, cos, sin, layout="diagonal")
    with pytest.raises(RopeError, match="broadcastable"):
        apply_rotary(q, cos[:2], sin[:2])
    with pytest.raises(RopeError, match="real floating dtype"):
        apply_rotary(q.int(), cos, sin)
    with pytest.raises(RopeError, match="torch.Tensor"):
        apply_rotary([1.0, 2.0], cos, sin)
    with pytest.raises(RopeError, match="leaf tensor"):
        apply_rotary(torch.randn(2, 3, 4, 8, requires_grad=True), cos, sin, inplace=True)
    with pytest.raises(RopeError, match="on x's device"):
        apply_rotary(q, cos.to("meta"), sin.to("meta"))
    # the raw op: a ValueError with ropekit's message
    with pytest.raises(ValueError, match="ropekit: expected cos and sin of the same shape"):
        torch.ops.ropekit.rotary(q, cos, sin[:, :, :2])


def test_meta_and_fake_tensors_match_eager_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k = torch.randn(2, 4, 5, 16).transpose(1, 2), torch.randn(2, 5, 1, 16)  # a bshd view of bhsd memory
    cos, sin = _tables(16, 5)
    want = apply_rotary_qk(q, k, cos, sin)
    got = apply_rotary_qk(q.to("meta"), k.to("meta"), cos.to("meta"), sin.to("meta"))
    with FakeTensorMode() as mode:
        fake = apply_rotary_qk(*(mode.from_tensor(t) for t in (q, k, cos, sin)))
    for w, g, f in zip(want, got, fake):
        assert g.device.type == "meta" and g.shape == w.shape and g.stride() == w.stride() and g.dtype == w.dtype
        assert f.shape == w.shape and f.stride() == w.stride()


# --- graphs hold the ropekit op ---------------------------------------------------------------


def _inputs():
    torch.manual_seed(3)
    return torch.randn(2, 6, 4, 32), torch.randn(2, 6, 2, 32)


def _grads(fn, q, k):
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    qo, ko = fn(q, k)
    ((qo * qo.detach().abs()).sum() + ko.sum() * 3).backward()
    return qo.detach(), ko.detach(), q.grad, k.grad


def test_jit_trace_of_the_module_equals_eager():
    rope = RotaryEmbedding(RopeConfig(32, rotary_dim=24))
    q, k = _inputs()
    traced = torch.jit.trace(lambda a, b: rope(a, b, offsets=5), (q, k))
    assert "ropekit::rotary" in str(traced.graph)
    for w, g in zip(rope(q, k, offsets=5), traced(q, k)):
        assert torch.equal(w, g)
    for w, g in zip(_grads(lambda a, b: rope(a, b, offsets=5), q, k), _grads(traced, q, k)):
        assert torch.equal(w, g)


@pytest.mark.parametrize("which", ["apply_rotary", "apply_rotary_qk", "apply_rotary_qk_inplace"])
def test_jit_trace_of_the_functions_equals_eager(which):
    cos, sin = _tables(32, 6)

    def fn(q, k):
        if which == "apply_rotary":
            return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin, layout="interleaved")
        if which == "apply_rotary_qk":
            return apply_rotary_qk(q, k, cos, sin)
        return apply_rotary_qk(q * 1, k * 1, cos, sin, inplace=True)

    q, k = _inputs()
    traced = torch.jit.trace(fn, (q, k))
    assert "ropekit::rotary" in str(traced.graph)
    for w, g in zip(fn(q, k), traced(q, k)):
        assert torch.equal(w, g)
    for w, g in zip(_grads(fn, q, k), _grads(traced, q, k)):
        assert torch.equal(w, g)


def test_verify_of_the_cpu_backend_runs_the_operators():
    """`ropekit verify --backend cpu` measures the compiled operators (it once reported PASS for
    an eager fallback)."""
    from ropekit.cli import main

    with torch.autograd.profiler.profile() as prof:
        code = main(["verify", "head_dim=32,context=256", "--backend", "cpu"])
    assert code == 0
    assert any(e.name.startswith("ropekit::rotary") for e in prof.function_events)


def _recording_backend(graphs):
    from torch._dynamo.backends.common import aot_autograd

    def record(gm, _):
        graphs.append(gm)
        return gm

    return aot_autograd(fw_compiler=record, bw_compiler=record)


@pytest.mark.parametrize("which", ["apply_rotary", "apply_rotary_qk", "module", "module_inplace"])
def test_compile_fullgraph_holds_the_op_forward_and_backward(which):
    torch._dynamo.reset()
    cos, sin = _tables(32, 6)
    rope = RotaryEmbedding(RopeConfig(32, rotary_dim=24))

    def fn(q, k):
        if which == "apply_rotary":
            return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin, layout="interleaved")
        if which == "apply_rotary_qk":
            return apply_rotary_qk(q, k, cos, sin)
        if which == "module":
            return rope(q, k, offsets=torch.tensor([0, 3]))
        return rope(q * 1, k * 1, offsets=2, inplace=True)

    graphs = []
    compiled = torch.compile(fn, fullgraph=True, backend=_recording_backend(graphs))
    q, k = _inputs()
    want, got = _grads(fn, q, k), _grads(compiled, q, k)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert len(graphs) == 2 and all(any("ropekit." in str(n.target) for n in gm.graph.nodes) for gm in graphs), targets


def test_inductor_forward_and_backward():
    torch._dynamo.reset()
    cos, sin = _tables(32, 6)
    fn = lambda q, k: apply_rotary_qk(q, k, cos, sin, layout="interleaved")  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    q, k = _inputs()
    for w, g in zip(_grads(fn, q, k), _grads(compiled, q, k)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_export_holds_the_op():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rope = RotaryEmbedding(RopeConfig(32))

        def forward(self, q, k):
            return self.rope(q, k, offsets=1)

    m = M()
    q, k = _inputs()
    ep = torch.export.export(m, (q, k))
    assert "ropekit.rotary" in str(ep.graph)
    for w, g in zip(m(q, k), ep.module()(q, k)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
