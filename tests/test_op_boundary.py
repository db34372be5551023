"""The operator boundary as PyTorch defines it (issue: one validator, one autograd per op, no
aliasing hazards).

- ``torch.library.opcheck`` (schema, autograd registration, fake tensor, aot_dispatch_dynamic)
  on every op and variant over representative inputs;
- every written tensor against every input it reads (partial and full overlap): refused
  before anything is written, on direct op calls and on every backend of the public API;
- devices mixed (meta included) and wrong dtypes/shapes of every auxiliary tensor: refused,
  never an uninitialised output;
- flags that are not bools: refused on every public function;
- second derivatives (gradgradcheck, float64) of rotary, rotary_qk, rotary_gather and
  qk_norm_rotary on every backend; torch.func.grad / vmap.
"""

from __future__ import annotations

import pytest
import torch

import ropekit
from ropekit import RopeError, ops

pytestmark = pytest.mark.skipif(not ops.LOADED, reason="ropekit._C not built")
O = torch.ops.ropekit if ops.LOADED else None
BACKENDS = ["cpu", "eager", "complex", "reference"]


def tables(n, r2, dtype=torch.float32):
    cfg = ropekit.RopeConfig(2 * r2)
    return ropekit.cos_sin(cfg, torch.arange(n), dtype=dtype)  # [n, r/2]


def rnd(*shape, dtype=torch.float32, **kw):
    return torch.randn(*shape, dtype=dtype, **kw)


# --------------------------------------------------------------------------------------
# opcheck on every op and variant


def _rot_cases():
    c, s = tables(5, 8)
    hc, hs = rnd(5, 3, 6).clamp(-1, 1), rnd(5, 3, 6).clamp(-1, 1)  # per-head tables, partial (r=12 of 16)
    yield "bshd", rnd(2, 5, 3, 16), c[:, None], s[:, None]
    yield "noncontig", rnd(2, 3, 5, 16).transpose(1, 2), c[:, None], s[:, None]
    yield "per_head_partial", rnd(2, 5, 3, 16), hc, hs
    yield "bf16_odd_d", rnd(1, 5, 2, 18, dtype=torch.bfloat16), c[:, None, :4], s[:, None, :4]
    yield "fp16", rnd(5, 4, 16, dtype=torch.float16), c[:, None], s[:, None]
    yield "fp64", rnd(5, 16, dtype=torch.float64), c.double(), s.double()
    yield "empty", rnd(0, 5, 3, 16), c[:, None], s[:, None]


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("case", list(_rot_cases()), ids=lambda c: c[0])
def test_opcheck_rotary_variants(case, layout):
    _, x, c, s = case
    ops_ = [(O.rotary.default, (x, c, s, layout, False), {}),
            (O.rotary_.default, (x.clone(), c, s, layout, True), {}),
            (O.rotary_out.default, (x, c, s, layout, False), {"out": torch.empty_like(x)})]
    if x.numel() == 0:  # opcheck's own storage comparison cannot take empty tensors: the fake and the kernel here
        from torch._subclasses.fake_tensor import FakeTensorMode

        for op, args, kw in ops_:
            op(*args, **kw)
        assert O.rotary(x, c, s, layout).shape == x.shape
        with FakeTensorMode(allow_non_fake_inputs=True):
            assert O.rotary(x, c, s, layout).shape == x.shape
        return
    kw_ = {}
    for op, args, kw in ops_:
        torch.library.opcheck(op, args, kw)
    if x.dim() >= 2:
        gqa = x.dim() == 4 and (c.dim() < 2 or c.shape[-2] == 1)  # per-head tables need k's heads == q's
        k = x[..., :1, :].clone() if gqa else x.clone()
        torch.library.opcheck(O.rotary_qk.default, (x, k, c, s, layout, False), **kw_)
        torch.library.opcheck(O.rotary_qk_.default, (x.clone(), k.clone(), c, s, layout, True), **kw_)


@pytest.mark.parametrize("fmt,shape,pos", [
    ("bshd", (2, 4, 3, 16), torch.tensor([[0, 1, 2, 3], [7, 8, 9, 10]])),
    ("bhsd", (2, 3, 4, 16), torch.tensor([3, 4, 5, 6])),
    ("sbhd", (1, 3, 2, 16), torch.tensor([9, 2, 0], dtype=torch.int32)),  # [b] per sample, s == 1
    ("thd", (6, 3, 16), torch.tensor([0, 1, 2, 0, 1, 11])),
])
def test_opcheck_gather(fmt, shape, pos):
    ct, st = tables(12, 6)  # partial rotary: r = 12 of d = 16
    q = rnd(*shape)
    kshape = list(shape)
    kshape[{"bshd": 2, "bhsd": 1, "sbhd": 2, "thd": 1}[fmt]] = 1  # GQA
    k = rnd(*kshape)
    for layout in ("half", "interleaved"):
        torch.library.opcheck(O.rotary_gather.default, (q, k, ct, st, pos, fmt, layout, False))
        torch.library.opcheck(O.rotary_gather_.default, (q.clone(), k.clone(), ct, st, pos, fmt, layout, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_qk_norm(dtype):
    c, s = tables(5, 6)
    q, k = rnd(2, 5, 4, 16, dtype=dtype), rnd(2, 5, 2, 16, dtype=dtype)
    wq, wk = rnd(16), rnd(16, dtype=dtype)
    args = (q, k, wq, wk, c[:, None], s[:, None], 1e-6, 1.0, "interleaved")
    torch.library.opcheck(O.qk_norm_rotary.default, args)
    torch.library.opcheck(O.qk_norm_rotary_.default, (q.clone(), k.clone()) + args[2:])
    torch.library.opcheck(O.qk_norm_rotary_fwd.default, args)
    torch.library.opcheck(O.qk_norm_rotary_fwd_.default, (q.clone(), k.clone()) + args[2:])
    _, _, rq, rk = O.qk_norm_rotary_fwd(*args)
    bwd = (torch.randn_like(q), torch.randn_like(k), q, k, wq, wk, rq, rk, c[:, None], s[:, None], 1.0, "interleaved")
    torch.library.opcheck(O.qk_norm_rotary_bwd.default, bwd)


# --------------------------------------------------------------------------------------
# aliasing: every written tensor against every input


def _overlapping_views(x, width):
    """Views of ``x``'s storage shaped like a [rows, width] table: full, shifted, partial."""
    flat = x.view(-1)
    rows = x.numel() // max(x.shape[-1], 1)
    return {
        "same_start": flat[: rows * width].view(rows, width),
        "shifted": flat[1: 1 + rows * width].view(rows, width) if flat.numel() > rows * width else None,
        "tail": x.reshape(rows, -1)[:, -width:],
    }


@pytest.mark.parametrize("where", ["same_start", "shifted", "tail"])
@pytest.mark.parametrize("which", ["cos", "sin"])
def test_inplace_tables_overlapping_x_refused(which, where):
    x = rnd(6, 16)
    view = _overlapping_views(x, 8)[where]
    if view is None:
        pytest.skip("no such view")
    other = torch.ones(6, 8)
    c, s = (view, other) if which == "cos" else (other, view)
    before = x.clone()
    with pytest.raises(ValueError, match=f"sharing no memory with {which}"):
        O.rotary_(x, c, s)
    assert torch.equal(x, before)
    for be in BACKENDS:
        with pytest.raises(RopeError, match="sharing no memory"):
            ropekit.apply_rotary(x, c, s, inplace=True, backend=be)
        assert torch.equal(x, before), be


@pytest.mark.parametrize("which", ["cos", "sin"])
def test_out_overlapping_tables_refused(which):
    buf = rnd(8, 16)
    x = rnd(8, 16)
    out = buf
    c, s = (buf[:, 8:], torch.ones(8, 8)) if which == "cos" else (torch.ones(8, 8), buf[:, :8])
    before = buf.clone()
    with pytest.raises(ValueError, match=f"out sharing no memory with {which}"):
        O.rotary_out(x, c, s, out=out)
    assert torch.equal(buf, before)
    for be in BACKENDS:
        with pytest.raises(RopeError, match="sharing no memory"):
            ropekit.apply_rotary(x, c, s, out=out, backend=be)
        assert torch.equal(buf, before), be


def test_out_partially_overlapping_x_refused_exact_x_allowed():
    buf = rnd(9, 16)
    x, out = buf[:8], buf[1:]
    c, s = tables(8, 8)
    with pytest.raises(ValueError, match="out not overlapping x"):
        O.rotary_out(x, c, s, out=out)
    y = buf[:8].clone()
    O.rotary_out(buf[:8], c, s, out=buf[:8])  # exactly x: in place
    torch.testing.assert_close(buf[:8], O.rotary(y, c, s), rtol=0, atol=0)


def test_qk_inplace_tables_in_q_or_k_refused():
    q, k = rnd(4, 2, 16), rnd(4, 1, 16)
    c = q[:, 0, :8]
    s = torch.ones(4, 8)
    with pytest.raises(ValueError, match="q sharing no memory with cos"):
        O.rotary_qk_(q, k, c[:, None], s[:, None])
    c2 = k[:, 0, 8:]
    with pytest.raises(ValueError, match="k sharing no memory with cos"):
        O.rotary_qk_(q, k, c2[:, None], s[:, None])


@pytest.mark.parametrize("victim", ["cos_table", "sin_table", "positions"])
@pytest.mark.parametrize("owner", ["q", "k"])
def test_gather_inplace_inputs_in_q_or_k_refused(victim, owner):
    # the crash of the issue: positions a view of q's storage, rotated in place
    q, k = rnd(1, 8, 2, 16), rnd(1, 8, 2, 16)
    t = q if owner == "q" else k
    ct, st = tables(8, 8)
    pos = torch.arange(8)
    if victim == "positions":
        pos = t.view(-1).view(torch.int64)[:8]
        pos.copy_(torch.arange(8))
    elif victim == "cos_table":
        ct = t.view(-1)[: 8 * 8].view(8, 8)
    else:
        st = t.view(-1)[: 8 * 8].view(8, 8)
    before = (q.clone(), k.clone())
    with pytest.raises(ValueError, match=f"{owner} sharing no memory with {victim}"):
        O.rotary_gather_(q, k, ct, st, pos)
    assert torch.equal(q, before[0]) and torch.equal(k, before[1])
    for be in BACKENDS:
        with pytest.raises(RopeError, match="sharing no memory"):
            ropekit.apply_rotary_gather(q, k, ct, st, positions=pos, inplace=True, backend=be)
        assert torch.equal(q, before[0]) and torch.equal(k, before[1]), be


@pytest.mark.parametrize("victim", ["q_weight", "k_weight", "cos", "sin"])
def test_qk_norm_inplace_inputs_in_q_refused(victim):
    q, k = rnd(4, 2, 16), rnd(4, 1, 16)
    c, s = tables(4, 8)
    args = {"q_weight": torch.ones(16), "k_weight": torch.ones(16), "cos": c[:, None], "sin": s[:, None]}
    args[victim] = q[0, 0] if "weight" in victim else q[:, :1, :8]
    before = q.clone()
    with pytest.raises(ValueError, match=f"q sharing no memory with {victim}"):
        O.qk_norm_rotary_(q, k, args["q_weight"], args["k_weight"], args["cos"], args["sin"])
    assert torch.equal(q, before)
    for be in BACKENDS:
        with pytest.raises(RopeError, match="sharing no memory"):
            ropekit.apply_qk_norm_rotary(q, k, args["q_weight"], args["k_weight"], args["cos"], args["sin"],
                                         inplace=True, backend=be)
        assert torch.equal(q, before), be


def test_written_tensor_with_internal_overlap_refused():
    x = rnd(1, 16).expand(4, 16)
    c, s = tables(4, 8)
    with pytest.raises(ValueError, match="do not alias"):
        O.rotary_(x, c, s)
    with pytest.raises(ValueError, match="do not alias"):
        O.rotary_out(rnd(4, 16), c, s, out=x)


def test_disjoint_views_of_one_buffer_still_allowed():
    # q and k heads of one fused qkv projection, tables in another buffer: accepted, same bits
    qkv = rnd(2, 5, 6, 16)
    q, k = qkv[:, :, :4], qkv[:, :, 4:5]
    c, s = tables(5, 8)
    qe, ke = O.rotary_qk(q, k, c[:, None], s[:, None])
    O.rotary_qk_(q, k, c[:, None], s[:, None])
    assert torch.equal(q, qe) and torch.equal(k, ke)


# --------------------------------------------------------------------------------------
# devices (meta mixed in) and dtypes of every auxiliary tensor


def _meta(t):
    return t.to("meta")


def test_meta_mixed_with_cpu_refused_on_every_op():
    q, k = rnd(1, 4, 2, 16), rnd(1, 4, 1, 16)
    c, s = tables(4, 8)
    ct, st = tables(10, 8)
    pos = torch.arange(4)
    w = torch.ones(16)
    calls = {
        "rotary cos": lambda: O.rotary(q, _meta(c[:, None]), s[:, None]),
        "rotary_ sin": lambda: O.rotary_(q, c[:, None], _meta(s[:, None])),
        "rotary_out out": lambda: O.rotary_out(q, c[:, None], s[:, None], out=_meta(torch.empty_like(q))),
        "rotary_qk k": lambda: O.rotary_qk(q, _meta(k), c[:, None], s[:, None]),
        "gather positions": lambda: O.rotary_gather(q, k, ct, st, _meta(pos)),
        "gather table": lambda: O.rotary_gather(q, k, _meta(ct), st, pos),
        "gather_ positions": lambda: O.rotary_gather_(q, k, ct, st, _meta(pos)),
        "qk_norm weight": lambda: O.qk_norm_rotary(q, k, _meta(w), w, c[:, None], s[:, None]),
        "qk_norm_ weight": lambda: O.qk_norm_rotary_(q, k, w, _meta(w), c[:, None], s[:, None]),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="device"):
            call()
    # the backward: each of its 10 tensor arguments on meta in turn
    qf, kf, rq, rk = O.qk_norm_rotary_fwd(q, k, w, w, c[:, None], s[:, None], 1e-6, 0.0, "half")
    args = [torch.randn_like(q), torch.randn_like(k), q, k, w, w, rq, rk, c[:, None], s[:, None]]
    for i in range(len(args)):
        a = list(args)
        a[i] = _meta(a[i])
        with pytest.raises(ValueError, match="device"):
            O.qk_norm_rotary_bwd(*a, 0.0, "half")


def test_all_meta_still_works():
    q, k = rnd(1, 4, 2, 16, device="meta"), rnd(1, 4, 1, 16, device="meta")
    ct, st = (t.to("meta") for t in tables(10, 8))
    qo, ko = O.rotary_gather(q, k, ct, st, torch.arange(4, device="meta"))
    assert qo.device.type == "meta" and qo.shape == q.shape


@pytest.mark.parametrize("bad", ["int_table", "complex_x", "bool_positions", "float_positions", "int_weight"])
def test_wrong_dtypes_refused(bad):
    q, k = rnd(1, 4, 2, 16), rnd(1, 4, 1, 16)
    ct, st = tables(10, 8)
    pos = torch.arange(4)
    w = torch.ones(16)
    with pytest.raises(ValueError, match="expected"):
        if bad == "int_table":
            O.rotary_gather(q, k, ct.to(torch.int32), st, pos)
        elif bad == "complex_x":
            O.rotary(torch.randn(4, 8, dtype=torch.complex64), ct[:4, :4], st[:4, :4])
        elif bad == "bool_positions":
            O.rotary_gather(q, k, ct, st, pos > 1)
        elif bad == "float_positions":
            O.rotary_gather(q, k, ct, st, pos.float())
        else:
            O.qk_norm_rotary(q, k, w.to(torch.int64), w, ct[:4, None], st[:4, None])


@pytest.mark.parametrize("bad_rstd", [torch.float16, torch.bfloat16, torch.int8, "shape", "numel_only"])
def test_qk_norm_bwd_rstd_checked(bad_rstd):
    # an fp16/bf16/int8 rstd used to be read as float32 (past the buffer's end)
    q, k = rnd(2, 4, 3, 16), rnd(2, 4, 1, 16)
    c, s = tables(4, 8)
    w = torch.ones(16)
    _, _, rq, rk = O.qk_norm_rotary_fwd(q, k, w, w, c[:, None], s[:, None], 1e-6, 0.0, "half")
    if bad_rstd == "shape":
        rq = rq.reshape(2, 12)
    elif bad_rstd == "numel_only":
        rq = rq.reshape(-1)
    else:
        rq = rq.to(bad_rstd)
    with pytest.raises(ValueError, match="q_rstd"):
        O.qk_norm_rotary_bwd(torch.randn_like(q), torch.randn_like(k), q, k, w, w, rq, rk, c[:, None], s[:, None],
                             0.0, "half")


def test_qk_norm_bwd_refuses_non_finite_offset_and_bad_grads():
    q, k = rnd(2, 4, 3, 16), rnd(2, 4, 1, 16)
    c, s = tables(4, 8)
    w = torch.ones(16)
    _, _, rq, rk = O.qk_norm_rotary_fwd(q, k, w, w, c[:, None], s[:, None], 1e-6, 0.0, "half")
    g, gk = torch.randn_like(q), torch.randn_like(k)
    with pytest.raises(ValueError, match="weight_offset a finite number"):
        O.qk_norm_rotary_bwd(g, gk, q, k, w, w, rq, rk, c[:, None], s[:, None], float("nan"), "half")
    with pytest.raises(ValueError, match="grad_q of q's shape"):
        O.qk_norm_rotary_bwd(g[:, :2], gk, q, k, w, w, rq, rk, c[:, None], s[:, None], 0.0, "half")
    with pytest.raises(ValueError, match="grad_k of a real floating dtype"):
        O.qk_norm_rotary_bwd(g, gk.to(torch.int32), q, k, w, w, rq, rk, c[:, None], s[:, None], 0.0, "half")


def test_fake_refuses_what_the_kernel_refuses():
    # under FakeTensorMode (torch.compile's tracing) the same validator runs
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(4, 16)
        c, s = torch.randn(4, 8), torch.randn(4, 8)
        O.rotary(x, c, s)
        with pytest.raises(ValueError, match="broadcastable"):
            O.rotary(x, torch.randn(3, 8), torch.randn(3, 8))
        with pytest.raises(ValueError, match="real floating dtype"):
            O.rotary(x.to(torch.int32), c, s)
        with pytest.raises(ValueError, match="layout in"):
            O.rotary(x, c, s, "halves")


# --------------------------------------------------------------------------------------
# flags are bools on every public function


BAD_FLAGS = ["false", "no", 0, 1, None, 1.0]


@pytest.mark.parametrize("value", BAD_FLAGS, ids=repr)
def test_flags_must_be_bool_everywhere(value):
    cfg = ropekit.RopeConfig(16)
    rope = ropekit.RotaryEmbedding(cfg)
    q, k = rnd(1, 4, 2, 16), rnd(1, 4, 1, 16)
    c, s = ropekit.cos_sin(cfg, torch.arange(4))
    ct, st = ropekit.cos_sin(cfg, torch.arange(8))
    w = torch.ones(16)
    before = (q.clone(), k.clone())
    calls = [
        lambda: ropekit.apply_rotary(q, c[:, None], s[:, None], inplace=value),
        lambda: ropekit.apply_rotary(q, c[:, None], s[:, None], conjugate=value),
        lambda: ropekit.apply_rotary_qk(q, k, c[:, None], s[:, None], inplace=value),
        lambda: ropekit.apply_rotary_qk(q, k, c[:, None], s[:, None], conjugate=value),
        lambda: ropekit.apply_qk_norm_rotary(q, k, w, w, c[:, None], s[:, None], inplace=value),
        lambda: ropekit.apply_rotary_gather(q, k, ct, st, inplace=value),
        lambda: rope(q, k, inplace=value),
        lambda: rope.rotate(q, inplace=value),
        lambda: ropekit.rerotate(k, cfg, torch.arange(4), torch.arange(4) + 1, inplace=value),
    ]
    for be in BACKENDS:
        calls.append(lambda be=be: ropekit.apply_rotary(q, c[:, None], s[:, None], inplace=value, backend=be))
        calls.append(lambda be=be: ropekit.apply_rotary(q, c[:, None], s[:, None], conjugate=value, backend=be))
    for i, call in enumerate(calls):
        with pytest.raises(RopeError, match="True or False"):
            call()
        assert torch.equal(q, before[0]) and torch.equal(k, before[1]), i


def test_conjugate_string_does_not_invert_on_torch_backends():
    c, s = tables(4, 8)
    x = rnd(4, 16)
    for be in BACKENDS:
        with pytest.raises(RopeError):
            ropekit.apply_rotary(x, c, s, conjugate="no", backend=be)


# --------------------------------------------------------------------------------------
# higher-order autograd


def _f64_inputs():
    # small: gradgradcheck's numerical Jacobian costs one forward per input element
    torch.manual_seed(0)
    c, s = tables(2, 3, dtype=torch.float64)  # partial rotary: r = 6 of d = 8
    q = rnd(2, 2, 2, 8, dtype=torch.float64, requires_grad=True)
    k = rnd(2, 2, 1, 8, dtype=torch.float64, requires_grad=True)
    return q, k, c[:, None], s[:, None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_gradgradcheck_rotary_and_qk(backend, layout):
    q, k, c, s = _f64_inputs()
    assert torch.autograd.gradgradcheck(lambda a: ropekit.apply_rotary(a, c, s, layout=layout, backend=backend), (q,))
    assert torch.autograd.gradgradcheck(
        lambda a, b: ropekit.apply_rotary_qk(a, b, c, s, layout=layout, backend=backend), (q, k))
    # in place on a non-leaf (autograd's in-place handling)
    assert torch.autograd.gradgradcheck(
        lambda a, b: ropekit.apply_rotary_qk(a * 1, b * 1, c, s, layout=layout, backend=backend, inplace=True), (q, k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck_gather(backend):
    q, k, _, _ = _f64_inputs()
    ct, st = tables(20, 3, dtype=torch.float64)
    pos = torch.tensor([[3, 4], [0, 9]])
    assert torch.autograd.gradgradcheck(
        lambda a, b: ropekit.apply_rotary_gather(a, b, ct, st, positions=pos, backend=backend), (q, k))
    assert torch.autograd.gradgradcheck(
        lambda a, b: ropekit.apply_rotary_gather(a * 1, b * 1, ct, st, positions=pos, backend=backend, inplace=True),
        (q, k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_gradgradcheck_qk_norm(backend, inplace):
    q, k, c, s = _f64_inputs()
    wq = (rnd(8, dtype=torch.float64) * 0.1).requires_grad_()
    wk = (rnd(8, dtype=torch.float64) * 0.1).requires_grad_()

    def f(a, b, x, y):
        if inplace:
            a, b = a * 1, b * 1
        return ropekit.apply_qk_norm_rotary(a, b, x, y, c, s, weight_offset=1.0, backend=backend, inplace=inplace)

    assert torch.autograd.gradcheck(f, (q, k, wq, wk))
    assert torch.autograd.gradgradcheck(f, (q, k, wq, wk))


def test_internal_qk_norm_steps_refuse_grad_instead_of_zeros():
    q, k, c, s = _f64_inputs()
    w = torch.ones(8, dtype=torch.float64)
    # the forward step is differentiable (an exported program's run_decompositions() runs it
    # on parameters that require grad): its gradients are the fused op's
    wq = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, x: O.qk_norm_rotary_fwd(a, b, x, w, c, s, 1e-6, 1.0, "half")[:2],
                                    (q, k, wq))
    _, _, rq0, _ = O.qk_norm_rotary_fwd(q, k, wq, w, c, s, 1e-6, 0.0, "half")
    assert not rq0.requires_grad  # the inverse RMS is not differentiable
    with pytest.raises(ValueError, match="not differentiable itself"):
        O.qk_norm_rotary_fwd_(q * 1, k * 1, w, w, c, s, 1e-6, 0.0, "half")
    qd, kd = q.detach(), k.detach()
    _, _, rq, rk = O.qk_norm_rotary_fwd(qd, kd, w, w, c, s, 1e-6, 0.0, "half")
    with pytest.raises(ValueError, match="not differentiable itself"):
        O.qk_norm_rotary_bwd(torch.randn_like(q, requires_grad=True), torch.randn_like(k), qd, kd, w, w, rq, rk, c, s,
                             0.0, "half")


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_and_vmap(backend):
    c, s = tables(5, 8, dtype=torch.float64)
    x = rnd(2, 5, 3, 16, dtype=torch.float64)
    g = torch.func.grad(lambda a: ropekit.apply_rotary(a, c[:, None], s[:, None], backend=backend).pow(2).sum())(x)
    torch.testing.assert_close(g, 2 * x)  # a rotation preserves the norm: d/dx |R x|² = 2x
    v = torch.vmap(lambda a: ropekit.apply_rotary(a, c[:, None], s[:, None], backend=backend))(x)
    torch.testing.assert_close(v, ropekit.apply_rotary(x, c[:, None], s[:, None], backend="reference"))


# --------------------------------------------------------------------------------------
# smaller boundary cases


@pytest.mark.parametrize("kw", [
    {"offsets": torch.tensor([2**63 - 1, 0])},
    {"offsets": torch.tensor(2**63 - 2)},
    {"offsets": 2**63 - 1},
], ids=["b_offsets", "0d_offsets", "int_offsets"])
def test_int64_overflowing_offsets_named_as_too_large(kw):
    rope = ropekit.RotaryEmbedding(ropekit.RopeConfig(16))
    q, k = rnd(2, 3, 2, 16), rnd(2, 3, 1, 16)
    with pytest.raises(RopeError, match=r"2\*\*53") as e:
        rope(q, k, **kw)
    assert "-9223372036854775808" not in str(e.value)


def test_packed_overflowing_offsets_named_as_too_large():
    rope = ropekit.RotaryEmbedding(ropekit.RopeConfig(16))
    with pytest.raises(RopeError, match=r"2\*\*53"):
        rope(rnd(5, 2, 16), rnd(5, 1, 16), format="thd", cu_seqlens=torch.tensor([0, 2, 5]),
             offsets=torch.tensor([2**63 - 1, 0]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine has the device")
def test_cuda_device_on_a_cpu_build_is_a_rope_error():
    with pytest.raises(RopeError, match="CUDA"):
        ropekit.cos_sin(ropekit.RopeConfig(16), torch.arange(4), device="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_allocation_failure_is_a_rope_error(backend):
    c, s = tables(1, 8)
    x = torch.empty(1, 16).expand(2**38, 16)  # an output of 2**38 rows cannot be allocated
    with pytest.raises(RopeError, match="fits in memory"):
        ropekit.apply_rotary(x, c, s, backend=backend)


def test_non_tensor_arguments_are_rope_errors():
    c, s = tables(4, 8)
    x = rnd(4, 16)
    with pytest.raises(RopeError, match="torch.Tensor"):
        ropekit.apply_rotary(x.tolist(), c, s)
    with pytest.raises(RopeError, match="torch.Tensor"):
        ropekit.apply_rotary(x, c.tolist(), s)
    with pytest.raises(RopeError, match="layout"):
        ropekit.apply_rotary(x, c, s, layout=1)
    rope = ropekit.RotaryEmbedding(ropekit.RopeConfig(16))
    with pytest.raises(RopeError, match="torch.Tensor"):
        rope(rnd(1, 4, 2, 16), rnd(1, 4, 1, 16), positions=[0, 1, 2, 3])


def test_uint64_positions_past_int64_are_named_as_they_are():
    # a uint64 position of 2**63 or more was converted to int64 (wrapping) and reported as a
    # negative position; it is refused with its own value, before anything is written
    cos_t, sin_t = ropekit.cos_sin(ropekit.RopeConfig(8), torch.arange(10))
    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8)
    q0, k0 = q.clone(), k.clone()
    pos = torch.tensor([1, 2, 2**63], dtype=torch.uint64)
    for backend in BACKENDS:
        with pytest.raises(RopeError, match=r"got a uint64 value of 2\*\*63 or more"):
            ropekit.apply_rotary_gather(q, k, cos_t, sin_t, positions=pos, inplace=True, backend=backend)
    with pytest.raises(RopeError, match=r"got a uint64 value of 2\*\*63 or more"):
        ropekit.RotaryEmbedding(ropekit.RopeConfig(8))(q, k, positions=pos[None], inplace=True)
    with pytest.raises(ValueError, match=f"got a position of {2**63}"):  # the op itself
        O.rotary_gather_(q, k, cos_t, sin_t, pos, "bshd", "half", False)
    assert torch.equal(q, q0) and torch.equal(k, k0)
