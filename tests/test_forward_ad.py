"""Forward-mode AD (``torch.autograd.forward_ad`` dual tensors) through every public function.

The compiled operators have no forward derivative: before, a dual input to the ``cpu`` /
``auto`` backends came back with its tangent dropped (no error), or raised torch's "jvp is not
implemented for the c++ API of custom Function". Now the Python functions take the eager
formula for dual tensors, and the operators themselves refuse them. The oracle: RoPE is linear
in x, so the tangent of ``rot(x)`` is ``rot(t)`` (the reference backend, float64); the fused
norm's tangent is ``torch.func.jvp`` of the eager backend's composition.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import ropekit
from ropekit import RopeConfig, cos_sin

BACKENDS = ["auto", "cpu", "eager", "reference"]


def _tables(d=8, s=5, dtype=torch.float64):
    c, s_ = cos_sin(RopeConfig(d, base=100.0), torch.arange(s))
    return c[:, None].to(dtype), s_[:, None].to(dtype)


def _tangent(y):
    t = fwAD.unpack_dual(y).tangent
    assert t is not None, "the tangent was dropped"
    return t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_apply_rotary_tangent_is_the_rotated_tangent(backend, inplace):
    torch.manual_seed(0)
    cos, sin = _tables()
    x, t = torch.randn(2, 5, 3, 8, dtype=torch.float64), torch.randn(2, 5, 3, 8, dtype=torch.float64)
    want = ropekit.apply_rotary(t, cos, sin, backend="reference")
    with fwAD.dual_level():
        xd = fwAD.make_dual(x.clone(), t)
        y = ropekit.apply_rotary(xd, cos, sin, backend=backend, inplace=inplace)
        got = _tangent(y)
        primal = fwAD.unpack_dual(y).primal
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    torch.testing.assert_close(primal, ropekit.apply_rotary(x, cos, sin, backend="reference"), rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_rotary_qk_and_gather_tangents(backend):
    torch.manual_seed(1)
    cos, sin = _tables()
    q, k = torch.randn(1, 5, 4, 8, dtype=torch.float64), torch.randn(1, 5, 2, 8, dtype=torch.float64)
    tq = torch.randn_like(q)
    with fwAD.dual_level():
        qo, ko = ropekit.apply_rotary_qk(fwAD.make_dual(q, tq), k, cos, sin, backend=backend)
        torch.testing.assert_close(_tangent(qo), ropekit.apply_rotary(tq, cos, sin, backend="reference"), rtol=0,
                                   atol=1e-15)
        assert fwAD.unpack_dual(ko).tangent is None  # k was not dual
    ct, st = cos_sin(RopeConfig(8, base=100.0), torch.arange(16))
    ct, st = ct.double(), st.double()
    pos = torch.tensor([3, 0, 7, 15, 2])
    with fwAD.dual_level():
        qo, _ = ropekit.apply_rotary_gather(fwAD.make_dual(q, tq), k, ct, st, positions=pos, backend=backend)
        want = ropekit.apply_rotary(tq, ct[pos][:, None], st[pos][:, None], backend="reference")
        torch.testing.assert_close(_tangent(qo), want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", ["auto", "cpu", "eager"])
def test_apply_qk_norm_rotary_tangent(backend):
    torch.manual_seed(2)
    cos, sin = _tables()
    q, k = torch.randn(2, 5, 3, 8, dtype=torch.float64), torch.randn(2, 5, 1, 8, dtype=torch.float64)
    wq, wk = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    tq = torch.randn_like(q)
    f = lambda a: ropekit.apply_qk_norm_rotary(a, k, wq, wk, cos, sin, backend="eager")[0]  # noqa: E731
    _, want = torch.func.jvp(f, (q,), (tq,))
    with fwAD.dual_level():
        qo, ko = ropekit.apply_qk_norm_rotary(fwAD.make_dual(q, tq), k, wq, wk, cos, sin, backend=backend)
        got = _tangent(qo)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_module_decode_and_prefill_keep_the_tangent():
    torch.manual_seed(3)
    rope = ropekit.RotaryEmbedding(RopeConfig(8, base=100.0)).double()
    q, k = torch.randn(2, 4, 3, 8, dtype=torch.float64), torch.randn(2, 4, 1, 8, dtype=torch.float64)
    tq = torch.randn_like(q)
    want = rope(tq, k)[0]  # linear in q: the tangent is the rotated tangent
    with fwAD.dual_level():
        qo, _ = rope(fwAD.make_dual(q, tq), k)
        torch.testing.assert_close(_tangent(qo), want, rtol=0, atol=1e-15)
        off = torch.tensor([5, 9])  # [b] offsets: the module's fast C++ gather path
        qo, _ = rope(fwAD.make_dual(q, tq), k, offsets=off)
        torch.testing.assert_close(_tangent(qo), rope(tq, k, offsets=off)[0], rtol=0, atol=1e-15)


def test_operators_refuse_dual_tensors_instead_of_dropping_the_tangent():
    cos, sin = _tables(dtype=torch.float32)
    x = torch.randn(1, 5, 2, 8)
    with fwAD.dual_level():
        xd = fwAD.make_dual(x, torch.ones_like(x))
        for call in (lambda: torch.ops.ropekit.rotary(xd, cos, sin, "half", False),
                     lambda: torch.ops.ropekit.rotary_qk(xd, x, cos, sin, "half", False)):
            with pytest.raises(ValueError, match="forward-mode AD tangent"):
                call()
        with torch.no_grad():  # grad mode does not turn forward AD off: still refused
            with pytest.raises(ValueError, match="forward-mode AD tangent"):
                torch.ops.ropekit.rotary(xd, cos, sin, "half", False)


def test_cos_sin_f64_tangent():
    from ropekit.tables import cos_sin_f64

    a = torch.linspace(-3.0, 3.0, 11, dtype=torch.float64)
    t = torch.randn_like(a)
    with fwAD.dual_level():
        c, s = cos_sin_f64(fwAD.make_dual(a, t))
        torch.testing.assert_close(_tangent(c), -torch.sin(a) * t, rtol=0, atol=1e-15)
        torch.testing.assert_close(_tangent(s), torch.cos(a) * t, rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_func_linearize_is_not_a_zero_map(backend):
    # torch.func.linearize runs forward AD on dual tensors (no functorch transform is active
    # while it traces): the operators dropped the tangent, and the linear map was zero
    cos, sin = _tables()
    x, t = torch.randn(1, 5, 2, 8, dtype=torch.float64), torch.randn(1, 5, 2, 8, dtype=torch.float64)
    _, lin = torch.func.linearize(lambda a: ropekit.apply_rotary(a, cos, sin, backend=backend), x)
    torch.testing.assert_close(lin(t), ropekit.apply_rotary(t, cos, sin, backend="reference"), rtol=0, atol=1e-15)
