"""``torch.library.opcheck`` of every ``torch.ops.ropekit`` op with its Triton kernel (the CUDA
implementation): schema, autograd registration, fake tensor, aot_dispatch_dynamic.

With ``ROPEKIT_TEST_DEVICE=cuda`` (``make gpu-check``) the inputs are CUDA tensors and the ops
dispatch to the kernels registered at the CUDA key. Without a GPU the same checks run on CPU
tensors under ``TRITON_INTERPRET=1`` inside :func:`ropekit.backends._triton_ops.on_triton`
(the dispatch mode that routes the ops on CPU tensors to the same Triton impls), a subset of
the cases of tests/test_op_boundary.py (which holds them on the C++ CPU kernels).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from ropekit import ops

pytestmark = pytest.mark.skipif(not ops.LOADED, reason="ropekit._C not built")
DEV = os.environ.get("ROPEKIT_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEV == "cuda":
    import triton  # noqa: F401  (required on CUDA: an ImportError fails the run instead of skipping it)
else:
    pytest.importorskip("triton")
T = pytest.importorskip("ropekit.backends._triton_ops")
tb = pytest.importorskip("ropekit.backends.triton")
if not tb.available():
    pytest.skip("triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from test_op_boundary import _rot_cases, rnd, tables  # noqa: E402

O = torch.ops.ropekit


def _on(*ts):
    """The Triton kernels: CUDA tensors dispatch to them; CPU tensors through on_triton."""
    return T._OnTriton() if DEV == "cpu" else contextlib.nullcontext()


def _dev(t):
    return t.to(DEV) if isinstance(t, torch.Tensor) else t


def _opcheck(op, args, kwargs=None, **kw):
    args = tuple(_dev(a) for a in args)
    kwargs = {k: _dev(v) for k, v in (kwargs or {}).items()}
    with _on():
        torch.library.opcheck(op, args, kwargs, **kw)


_CASES = [c for c in _rot_cases() if c[0] in ("bshd", "noncontig", "per_head_partial", "bf16_odd_d", "fp64", "empty")]


@pytest.mark.parametrize("case", _CASES, ids=lambda c: c[0])
def test_opcheck_rotary_variants(case):
    name, x, c, s = case
    if name == "empty" and DEV == "cpu":
        pytest.skip("dynamo's clone_input of an empty tensor fails under a dispatch mode (CUDA runs it)")
    layout = "interleaved" if name in ("noncontig", "bf16_odd_d") else "half"
    utils = ("test_faketensor", "test_aot_dispatch_dynamic") if x.numel() == 0 else None
    kw_ = {} if utils is None else {"test_utils": utils}
    _opcheck(O.rotary.default, (x, c, s, layout, False), **kw_)
    _opcheck(O.rotary_.default, (x.clone(), c, s, layout, False), **kw_)
    _opcheck(O.rotary_out.default, (x, c, s, layout, True), {"out": torch.empty_like(x)}, **kw_)
    gqa = c.dim() < 2 or c.shape[-2] == 1
    k = x[..., :1, :].clone() if gqa else x.clone()
    _opcheck(O.rotary_qk.default, (x, k, c, s, layout, False), **kw_)
    _opcheck(O.rotary_qk_.default, (x.clone(), k.clone(), c, s, layout, True), **kw_)


@pytest.mark.parametrize("fmt,shape,pos", [
    ("bshd", (2, 4, 3, 16), torch.tensor([[0, 1, 2, 3], [7, 8, 9, 10]])),
    ("sbhd", (1, 3, 2, 16), torch.tensor([9, 2, 0], dtype=torch.int32)),  # [b] per sample, s == 1
    ("thd", (6, 3, 16), torch.tensor([0, 1, 2, 0, 1, 11])),
])
def test_opcheck_gather(fmt, shape, pos):
    ct, st = tables(12, 6)  # partial rotary: r = 12 of d = 16
    q = rnd(*shape)
    kshape = list(shape)
    kshape[{"bshd": 2, "sbhd": 2, "thd": 1}[fmt]] = 1  # GQA
    k = rnd(*kshape)
    layout = "interleaved" if fmt == "thd" else "half"
    _opcheck(O.rotary_gather.default, (q, k, ct, st, pos, fmt, layout, False))
    _opcheck(O.rotary_gather_.default, (q.clone(), k.clone(), ct, st, pos, fmt, layout, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_qk_norm(dtype):
    c, s = tables(5, 6)
    q, k = rnd(2, 5, 4, 16, dtype=dtype), rnd(2, 5, 2, 16, dtype=dtype)
    wq, wk = rnd(16), rnd(16, dtype=dtype)
    args = (q, k, wq, wk, c[:, None], s[:, None], 1e-6, 1.0, "interleaved")
    _opcheck(O.qk_norm_rotary.default, args)
    _opcheck(O.qk_norm_rotary_.default, (q.clone(), k.clone()) + args[2:])
    _opcheck(O.qk_norm_rotary_fwd.default, args)
    _opcheck(O.qk_norm_rotary_fwd_.default, (q.clone(), k.clone()) + args[2:])
    _, _, rq, rk = O.qk_norm_rotary_fwd(*args)
    bwd = (torch.randn_like(q), torch.randn_like(k), q, k, wq, wk, rq, rk, c[:, None], s[:, None], 1.0, "interleaved")
    _opcheck(O.qk_norm_rotary_bwd.default, bwd)


def test_the_checks_reach_the_triton_kernels(monkeypatch):
    """opcheck above runs the Triton impls, not the C++ CPU kernel."""
    calls = []
    real = T.IMPLS["rotary"]
    monkeypatch.setitem(T.IMPLS, "rotary", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    c, s = tables(5, 8)
    x = rnd(2, 5, 3, 16)
    if DEV == "cuda":  # the CUDA key holds the function registered at import: call the impl table's
        pytest.skip("on CUDA the ops dispatch to the registered kernels themselves")
    _opcheck(O.rotary.default, (x, c[:, None], s[:, None], "half", False))
    assert calls
