"""Adversarial checks of the core API: the default positions of apply_rotary_gather."""

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RopeError, apply_rotary_gather, cos_sin


def test_gather_thd_without_boundaries_is_documented_and_refused():
    # the documented default (positions 0 .. s-1) is for the 4-D formats: thd has no s and refuses
    ct, st = cos_sin(RopeConfig(8), torch.arange(8))
    q, k = torch.randn(5, 2, 8), torch.randn(5, 1, 8)
    with pytest.raises(RopeError, match="cu_seqlens"):
        apply_rotary_gather(q, k, ct, st, format="thd")
    # bshd: the default really is 0 .. s-1 (oracle: the same rows picked explicitly)
    qb, kb = torch.randn(2, 5, 2, 8), torch.randn(2, 5, 1, 8)
    got = apply_rotary_gather(qb, kb, ct, st)
    want = ropekit.apply_rotary_qk(qb, kb, ct[:5, None], st[:5, None])
    assert all(torch.equal(a, b) for a, b in zip(got, want))
