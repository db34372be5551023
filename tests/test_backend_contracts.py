"""The contract of a refused call on the torch-only backends (``eager``, ``reference``,
``complex``; and ``cpu``, whose learnable-table path runs the same code): a
``ropekit.RopeError``, and nothing written — checked bit for bit on every tensor the call
was given — for in-place writes autograd or inference mode would refuse (a view of a leaf
that requires grad, an inference tensor outside ``torch.inference_mode()``), for q/k pairs
where only one of them is refused, and for bad tables under ``torch.compile``, where the
compiled call refuses with the same RopeError as the eager one. ``reference`` and
``complex`` compile with ``fullgraph=True`` on their first use in a process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import ropekit
from ropekit import RopeError

TORCH_ONLY = ["eager", "reference", "complex"]
cpu_ok = pytest.mark.skipif("cpu" not in ropekit.backends.available(), reason="compiled cpu operators not built")

COS, SIN = ropekit.cos_sin(ropekit.RopeConfig(8), torch.arange(3))  # [3, 4]
C, S = COS[:, None], SIN[:, None]  # [s, 1, r/2] for [b, s, h, d]
W = torch.ones(8)


def _bits(*ts):
    return [t.detach().clone() for t in ts]


def _unchanged(ts, before):
    return all(torch.equal(t.detach(), b) for t, b in zip(ts, before))


def _tables(backend):
    """``(backend, cos, sin)``: ``"cpu+learnable"`` is the cpu backend with tables that require
    grad (its fallback to the torch-only code)."""
    if backend == "cpu+learnable":
        return "cpu", C.clone().requires_grad_(), S.clone().requires_grad_()
    return backend, C, S


CALLS = {  # name -> fn(q, k, backend, cos, sin): an in-place call writing q and k (or x = q)
    "apply_rotary": lambda q, k, be, c, s: ropekit.apply_rotary(q, c, s, inplace=True, backend=be),
    "apply_rotary_qk": lambda q, k, be, c, s: ropekit.apply_rotary_qk(q, k, c, s, inplace=True, backend=be),
    "apply_qk_norm_rotary": lambda q, k, be, c, s: ropekit.apply_qk_norm_rotary(q, k, W, W, c, s, inplace=True,
                                                                                 backend=be),
    "apply_rotary_gather": lambda q, k, be, c, s: ropekit.apply_rotary_gather(
        q, k, torch.cat([COS, COS]), torch.cat([SIN, SIN]), positions=torch.tensor([4, 5, 3]), inplace=True,
        backend=be),
}
BACKENDS = TORCH_ONLY + [pytest.param("cpu", marks=cpu_ok), pytest.param("cpu+learnable", marks=cpu_ok)]


# ------------------------------------------------------------------ a view of a leaf that requires grad
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_on_a_view_of_a_leaf_is_refused_before_writing(backend, call):
    be, c, s = _tables(backend)
    leaf = torch.randn(2, 1, 3, 2, 8, requires_grad=True)
    before = _bits(leaf)
    with pytest.raises(RopeError, match=r"view of a leaf.*Fix: .*clone\(\)"):
        CALLS[call](leaf[0], leaf[1], be, c, s)
    assert _unchanged([leaf], before)
    with torch.no_grad():  # what torch allows is still written
        CALLS[call](leaf[0], leaf[1], be, c.detach(), s.detach())
    assert not torch.equal(leaf.detach(), before[0])


# ------------------------------------------------------------------ q and k: both checked before either is written
@pytest.mark.parametrize("call", ["apply_rotary_qk", "apply_qk_norm_rotary", "apply_rotary_gather"])
@pytest.mark.parametrize("refused", ["leaf", "view of a leaf", "inference"])
@pytest.mark.parametrize("first", [False, True], ids=["k_refused", "q_refused"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_qk_inplace_writes_neither_when_one_is_refused(backend, first, refused, call):
    be, c, s = _tables(backend)
    ok = torch.randn(1, 3, 2, 8)
    if refused == "leaf":
        bad = torch.randn(1, 3, 2, 8, requires_grad=True)
    elif refused == "view of a leaf":
        bad = torch.randn(2, 1, 3, 2, 8, requires_grad=True)[0]
    else:
        with torch.inference_mode():
            bad = torch.randn(1, 3, 2, 8)
    q, k = (bad, ok) if first else (ok, bad)
    before = _bits(q, k)
    with pytest.raises(RopeError):
        CALLS[call](q, k, be, c, s)
    assert _unchanged([q, k], before)


# ------------------------------------------------------------------ inference tensors outside inference mode
@pytest.mark.parametrize("kind", ["inplace", "out"])
@pytest.mark.parametrize("backend", TORCH_ONLY + [pytest.param("cpu", marks=cpu_ok)])
def test_writing_an_inference_tensor_outside_inference_mode_is_refused_before_writing(backend, kind):
    with torch.inference_mode():
        t = torch.randn(2, 3, 2, 8)
    x = torch.randn(2, 3, 2, 8)
    before = _bits(t)
    with pytest.raises(RopeError, match=r"inference"):
        if kind == "inplace":
            ropekit.apply_rotary(t, C, S, inplace=True, backend=backend)
        else:
            ropekit.apply_rotary(x, C, S, out=t, backend=backend)
    assert _unchanged([t], before)
    with torch.inference_mode():  # inside inference mode it is written
        src = t if kind == "inplace" else x
        want = ropekit.apply_rotary(src, C, S, backend=backend)
        if kind == "inplace":
            ropekit.apply_rotary(t, C, S, inplace=True, backend=backend)
        else:
            ropekit.apply_rotary(x, C, S, out=t, backend=backend)
    assert torch.equal(t, want)


# ------------------------------------------------------------------ torch.compile: refused as in eager mode
BAD_X = torch.randn(4, 1, 8)
BAD_COS, BAD_SIN = torch.randn(4, 3, 4), torch.randn(4, 3, 4)  # enlarge x's dim 1 -> 3: refused

COMPILED = {  # name -> (fn of tensors, tensors): every call refused for BAD_COS/BAD_SIN
    "apply_rotary": (lambda be: lambda x: ropekit.apply_rotary(x, BAD_COS, BAD_SIN, backend=be), 1),
    "inplace": (lambda be: lambda x: ropekit.apply_rotary(x, BAD_COS, BAD_SIN, inplace=True, backend=be), 1),
    "out": (lambda be: lambda x, o: ropekit.apply_rotary(x, BAD_COS, BAD_SIN, out=o, backend=be), 2),
    "qk_inplace": (lambda be: lambda q, k: ropekit.apply_rotary_qk(q, k, BAD_COS, BAD_SIN, inplace=True, backend=be),
                   2),
    "qk_norm_inplace": (lambda be: lambda q, k: ropekit.apply_qk_norm_rotary(q, k, torch.ones(7), torch.ones(7), C[:, 0],
                                                                             S[:, 0], inplace=True, backend=be), 2),
    "gather_inplace": (lambda be: lambda q, k: ropekit.apply_rotary_gather(q, k, torch.randn(9, 4), torch.randn(9, 3),
                                                                           inplace=True, backend=be), 2),
}


def _compiled_refusal(backend, call, compile_backend, dynamic):
    make, n = COMPILED[call]
    fn = make(backend)
    args = [torch.randn(4, 1, 8) if call != "gather_inplace" else torch.randn(1, 3, 2, 8) for _ in range(n)]
    with pytest.raises(RopeError) as eager_err:
        fn(*[a.clone() for a in args])
    before = _bits(*args)
    torch._dynamo.reset()
    cf = torch.compile(fn, fullgraph=True, backend=compile_backend, dynamic=dynamic)
    for _ in range(2):  # the first call compiles, the second runs the cached graph
        with pytest.raises(RopeError) as err:
            cf(*args)
        assert str(err.value) == str(eager_err.value)
        assert _unchanged(args, before)


@pytest.mark.parametrize("call", list(COMPILED))
@pytest.mark.parametrize("backend", TORCH_ONLY)
def test_compiled_call_refuses_with_the_eager_rope_error(backend, call):
    _compiled_refusal(backend, call, "eager", None)


@pytest.mark.parametrize("compile_backend,dynamic", [("aot_eager", True), ("inductor", False)])
@pytest.mark.parametrize("backend", TORCH_ONLY)
def test_compiled_call_refuses_through_aot_and_inductor(backend, compile_backend, dynamic):
    for call in ("apply_rotary", "inplace", "qk_norm_inplace"):
        _compiled_refusal(backend, call, compile_backend, dynamic)


@cpu_ok
@pytest.mark.parametrize("call", list(COMPILED))
def test_cpu_compiled_call_refuses_with_the_eager_rope_error(call):
    _compiled_refusal("cpu", call, "eager", None)


FIRST_USE = """
import sys, torch, ropekit
be = sys.argv[1]
cos, sin = ropekit.cos_sin(ropekit.RopeConfig(8), torch.arange(3))
x = torch.randn(2, 3, 2, 8)
f = torch.compile(lambda x: ropekit.apply_rotary(x, cos[:, None], sin[:, None], backend=be), fullgraph=True,
                  backend="eager")
y = f(x)
assert torch.equal(y, ropekit.apply_rotary(x, cos[:, None], sin[:, None], backend=be)), "bits differ"
print("OK")
"""


@pytest.mark.parametrize("backend", ["reference", "complex"])
def test_fullgraph_compile_on_first_use_in_a_fresh_process(backend):
    r = subprocess.run([sys.executable, "-c", FIRST_USE, backend], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-2000:]


def test_exported_programs_hold_no_refusal_probe_and_compiled_probes_are_cpp():
    # an exported program of a valid call is the formula alone (portable: loads without ropekit's
    # probe op); a torch.compile graph may keep the probe of an accepted call, whose kernel is C++
    # (an empty tensor, no validation, no Python dispatch per call)
    x = torch.randn(2, 3, 2, 8)

    class M(torch.nn.Module):
        def forward(self, x):
            return ropekit.apply_rotary(x, C, S, backend="eager")

    for strict in (True, False):
        ep = torch.export.export(M(), (x,), strict=strict)
        assert not [n for n in ep.graph.nodes if "refused" in str(n.target)]
        assert torch.equal(ep.module()(x), M()(x))
    op = torch.ops.ropekit.refused.default
    assert op._schema.name == "ropekit::refused"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeExplicitAutograd")
    assert op("rotary", [x], ["half"], [False], []).shape == (0,)
