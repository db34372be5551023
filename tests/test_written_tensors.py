"""The operators' rules for the tensors they write (``csrc/ops.cpp``: ``check_not_leaf``,
``check_writable``, ``disjoint``), checked before anything is written:

* in place on a view of a leaf that requires grad is refused (torch refuses it too, but only
  after its kernel has written, when the view's history is rebased);
* writing into an inference tensor outside ``torch.inference_mode()`` is refused (torch too,
  after writing, when the version counter is bumped);
* a written tensor and a read one that are views of one buffer in separate bands of a common
  period (a table beside ``x`` in each row, a weight beside ``q`` in ``k``'s part) share no
  element and are accepted, with the bits of the same call on copies; bands that meet are
  still refused.

Expected values are the same call on fresh copies of the inputs (no aliasing).
"""

from __future__ import annotations

import pytest
import torch

import ropekit
from ropekit import RopeError

D = 8


def _tables(n):
    cos, sin = ropekit.cos_sin(ropekit.RopeConfig(D), torch.arange(n))
    return cos, sin


def _inplace_calls():
    cos, sin = _tables(3)
    C, S = cos[:, None], sin[:, None]
    w = torch.ones(D)
    return {
        "apply_rotary": lambda a, b: ropekit.apply_rotary(a, C, S, inplace=True, backend="cpu"),
        "apply_rotary_qk": lambda a, b: ropekit.apply_rotary_qk(a, b, C, S, inplace=True, backend="cpu"),
        "apply_qk_norm_rotary": lambda a, b: ropekit.apply_qk_norm_rotary(a, b, w, w, C, S, inplace=True,
                                                                          backend="cpu"),
        "apply_rotary_gather": lambda a, b: ropekit.apply_rotary_gather(a, b, cos, sin, inplace=True, backend="cpu"),
    }


@pytest.mark.parametrize("name", list(_inplace_calls()))
def test_in_place_on_a_view_of_a_leaf_that_requires_grad_is_refused_before_writing(name):
    call = _inplace_calls()[name]
    leaf = torch.randn(2, 1, 3, 2, D, requires_grad=True)
    before = leaf.detach().clone()
    with pytest.raises(RopeError, match="a view of a leaf tensor that requires grad"):
        call(leaf[0], leaf[1])
    assert torch.equal(leaf.detach(), before)
    # the raw op refuses it too (its ValueError), with nothing written
    C, S = (t[:, None] for t in _tables(3))
    with pytest.raises(ValueError, match="a view of a leaf tensor that requires grad"):
        torch.ops.ropekit.rotary_(leaf[0], C, S)
    assert torch.equal(leaf.detach(), before)


@pytest.mark.parametrize("name", list(_inplace_calls()))
def test_in_place_on_a_view_of_a_leaf_is_allowed_without_grad_mode(name):
    call = _inplace_calls()[name]
    leaf = torch.randn(2, 1, 3, 2, D, requires_grad=True)
    want_a, want_b = leaf.detach()[0].clone(), leaf.detach()[1].clone()
    call(want_a, want_b)
    with torch.no_grad():
        call(leaf[0], leaf[1])
    assert torch.equal(leaf.detach()[0], want_a) and torch.equal(leaf.detach()[1], want_b)


def test_in_place_on_a_view_of_a_non_leaf_still_trains():
    # the usual case: q is a view of a projection's output (not a leaf): allowed, differentiable
    w = torch.randn(2 * D, D, requires_grad=True)
    h = torch.randn(3, D)
    cos, sin = _tables(3)
    q = (h @ w.T).view(3, 2, D)
    ropekit.apply_rotary(q, cos[:, None], sin[:, None], inplace=True, backend="cpu")
    q.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("backend", ["cpu", "eager"])
@pytest.mark.parametrize("kind", ["inplace", "out"])
def test_an_inference_tensor_is_not_written_outside_inference_mode(backend, kind):
    cos, sin = _tables(3)
    with torch.inference_mode():
        t = torch.randn(2, 3, 2, D)
    before = t.clone()
    x = torch.randn(2, 3, 2, D)
    with pytest.raises(RopeError, match="an inference tensor"):
        if kind == "inplace":
            ropekit.apply_rotary(t, cos[:, None], sin[:, None], inplace=True, backend=backend)
        else:
            ropekit.apply_rotary(x, cos[:, None], sin[:, None], out=t, backend=backend)
    assert torch.equal(t, before)
    # inside inference mode the same call writes it
    with torch.inference_mode():
        if kind == "inplace":
            ropekit.apply_rotary(t, cos[:, None], sin[:, None], inplace=True, backend=backend)
            want = ropekit.apply_rotary(before, cos[:, None], sin[:, None], backend=backend)
        else:
            ropekit.apply_rotary(x, cos[:, None], sin[:, None], out=t, backend=backend)
            want = ropekit.apply_rotary(x, cos[:, None], sin[:, None], backend=backend)
    assert torch.equal(t, want)


@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_a_table_beside_x_in_each_row_is_accepted(backend):
    # buf rows: [x (8) | cos (4)]: every element of x lies in [0, 8) of its 12-element row,
    # every element of cos in [8, 12): no element shared, though the address ranges interleave
    buf = torch.randn(4, 3, D + D // 2)
    x, cos = buf[..., :D], buf[:, :1, D:]
    sin = torch.randn(4, 1, D // 2)
    want = ropekit.apply_rotary(x.clone(), cos.clone(), sin, backend=backend)
    cos_before = cos.clone()
    ropekit.apply_rotary(x, cos, sin, inplace=True, backend=backend)
    assert torch.equal(x, want) and torch.equal(cos, cos_before)


@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_a_table_meeting_x_in_each_row_is_refused(backend):
    buf = torch.randn(4, 3, D + D // 2)
    x, cos = buf[..., :D], buf[:, :1, D - 1:D - 1 + D // 2]  # cos's first element is x's last
    sin = torch.randn(4, 1, D // 2)
    before = buf.clone()
    with pytest.raises(RopeError, match="sharing no memory with cos"):
        ropekit.apply_rotary(x, cos, sin, inplace=True, backend=backend)
    assert torch.equal(buf, before)


def test_a_weight_inside_k_is_refused_for_k_and_accepted_beside_q():
    # q = heads 0-1, k = head 2 of one [1, 3, 3, D] buffer; k_weight is k's first row: it lies
    # beside q in every row (accepted for q) and inside k (refused, naming k)
    c, s = _tables(3)
    buf = torch.randn(1, 3, 3, D)
    q, k = buf[:, :, :2], buf[:, :, 2:]
    with pytest.raises(RopeError, match="expected k sharing no memory with k_weight"):
        ropekit.apply_qk_norm_rotary(q, k, torch.ones(D), buf[0, 0, 2], c[:, None], s[:, None], inplace=True,
                                     backend="cpu")
    # q's weight beside q in the buffer's head 2 (k is a separate tensor): accepted, same bits
    qw = buf[0, 0, 2]
    k2 = torch.randn(1, 3, 1, D)
    want_q, want_k = ropekit.apply_qk_norm_rotary(q.clone(), k2.clone(), qw.clone(), torch.ones(D), c[:, None],
                                                  s[:, None], backend="cpu")
    ropekit.apply_qk_norm_rotary(q, k2, qw, torch.ones(D), c[:, None], s[:, None], inplace=True, backend="cpu")
    assert torch.equal(q, want_q) and torch.equal(k2, want_k)
