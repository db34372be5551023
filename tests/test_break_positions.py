"""Adversarial inputs to ``ropekit.positions``: defects found by trying to break it, kept as
regression tests. Expected values come from a plain Python reference."""

from __future__ import annotations

import pytest
import torch

from ropekit import RopeError
from ropekit.config import MAX_EXACT_POSITION
from ropekit.positions import positions_from_cu_seqlens


def _ref_positions(cu):
    """Python reference: position i - cu[j] for every token i of sequence j."""
    return [i - a for a, b in zip(cu[:-1], cu[1:]) for i in range(a, b)]


def test_cu_seqlens_past_exact_positions_is_a_rope_error():
    # was a RuntimeError from allocating 2**53 positions (and they would not be exact)
    with pytest.raises(RopeError, match="2\\*\\*53"):
        positions_from_cu_seqlens(torch.tensor([0, 3, MAX_EXACT_POSITION + 5]))
    # int32 / uint8 / non-contiguous boundaries still give the reference positions
    for cu in (torch.tensor([0, 3, 3, 7], dtype=torch.int32), torch.tensor([0, 2, 5], dtype=torch.uint8),
               torch.tensor([0, 9, 2, 9, 2, 9, 6])[::2]):
        assert positions_from_cu_seqlens(cu).tolist() == _ref_positions(cu.tolist())
