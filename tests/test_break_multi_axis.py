"""Adversarial inputs to ``ropekit.multi_axis``: each test is a defect that was found by
trying to break the module (wrong exception type, silent garbage, silent mixing), kept as a
regression test. Expected values come from a reference computation in the test (the
documented equivalent call, or transformers' ``get_vision_position_ids`` formula).
"""

from __future__ import annotations

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RopeError, RotaryEmbedding
from ropekit.config import MAX_EXACT_POSITION
from ropekit.multi_axis import (
    AxialRope,
    MultiAxisRotaryEmbedding,
    apply_rotary_mrope,
    image_positions,
    mrope_decode_positions,
    mrope_positions,
    mrope_tables,
    with_special_tokens,
)

T = torch.tensor


def _qk(seed=0, b=2, s=5, d=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, 3, d, generator=g), torch.randn(b, s, 1, d, generator=g)


# --------------------------------------------------------------------------- module positions
def test_module_positions_shared_by_the_batch_as_1_s_n():
    # RotaryEmbedding takes positions [1, s] (shared by the batch); the multi-axis module
    # refused [1, s, n_axes]. Reference: the documented [s, n_axes] form of the same positions.
    cfg = RopeConfig(16)
    rope = MultiAxisRotaryEmbedding(cfg, [2, 3, 3])
    q, k = _qk()
    pos = torch.randint(0, 50, (5, 3), generator=torch.Generator().manual_seed(1))
    want_q, want_k = rope(q, k, pos)
    for fmt, perm in (("bshd", (0, 1, 2, 3)), ("bhsd", (0, 2, 1, 3)), ("sbhd", (1, 0, 2, 3))):
        got_q, got_k = rope(q.permute(perm), k.permute(perm), pos[None], format=fmt)
        assert torch.equal(got_q.permute(perm), want_q) and torch.equal(got_k.permute(perm), want_k), fmt
    # text positions: the same bits as RotaryEmbedding with [1, s] positions
    p = torch.arange(7, 12)
    tq, tk = rope(q, k, p[None, :, None].expand(1, 5, 3))
    rq, rk = RotaryEmbedding(cfg)(q, k, positions=p[None])
    assert torch.equal(tq, rq) and torch.equal(tk, rk)
    # a batch that is neither 1 nor b is still refused
    with pytest.raises(RopeError, match=r"\[1, 5, 3\]"):
        rope(q, k, pos[None].expand(3, 5, 3))


def test_apply_rotary_mrope_tables_shared_by_the_batch():
    # per-axis tables [3, 1, s, r/2] (from positions (3, 1, s)) broadcast over the batch
    cfg = RopeConfig(16)
    q, k = _qk(2)
    pos = torch.randint(0, 50, (3, 1, 5), generator=torch.Generator().manual_seed(3))
    c3, s3 = ropekit.cos_sin(cfg, pos)  # [3, 1, s, r/2]
    want = apply_rotary_mrope(q, k, c3[:, 0], s3[:, 0], [2, 3, 3])  # reference: the [3, s, r/2] form
    got = apply_rotary_mrope(q, k, c3, s3, [2, 3, 3])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_module_meta_positions_with_real_q_is_a_rope_error():
    # was NotImplementedError ("Cannot copy out of meta tensor") from positions.to(q.device)
    rope = MultiAxisRotaryEmbedding(RopeConfig(16), [2, 3, 3])
    q, k = _qk()
    with pytest.raises(RopeError, match="meta"):
        rope(q, k, torch.zeros(2, 5, 3, dtype=torch.long, device="meta"))


# --------------------------------------------------------------------------- tables
def test_mrope_tables_refuses_cos_and_sin_of_different_dtypes():
    # was: cos float32 and sin float64 returned side by side, silently
    c3, s3 = ropekit.cos_sin(RopeConfig(16), torch.arange(15).view(3, 5))
    with pytest.raises(RopeError, match="dtype"):
        mrope_tables(c3, s3.double(), [2, 3, 3])
    q, k = _qk()
    with pytest.raises(RopeError, match="dtype"):
        apply_rotary_mrope(q, k, c3, s3.double(), [2, 3, 3])


def test_with_special_tokens_refuses_mismatched_tables():
    c, s = AxialRope(32, 2).cos_sin(image_positions(4, 5))  # [20, 16]
    with pytest.raises(RopeError, match="shape"):
        with_special_tokens(c, s[:3], 1)  # was: [21, 16] and [4, 16] returned
    with pytest.raises(RopeError, match="dtype"):
        with_special_tokens(c, s.double(), 1)  # was: float32 and float64 returned


def test_axial_default_split_refuses_axes_without_pairs():
    # head_dim 8 = 4 pairs over 6 axes: axes 4 and 5 got 0 pairs and their positions were
    # ignored, silently. Explicit zero sections stay allowed (the caller asked for them).
    with pytest.raises(RopeError, match="n_axes"):
        AxialRope(8, 6)
    assert AxialRope(8, 2, sections=(4, 0)).sections == (4, 0)


# --------------------------------------------------------------------------- mrope_positions
_VIDEO = T([[0] + [2] * 8 + [0]])  # text, one 2x2x2 video (merge 1), text


def _hf_temporal(t: int, interval: float) -> list:
    """transformers' get_vision_position_ids: (torch.arange(t) * time_interval).long()."""
    return (torch.arange(t) * torch.tensor(interval, dtype=torch.float32)).long().tolist()


def test_mrope_positions_interval_beyond_exact_positions_is_refused():
    # Δ = 1e30: the float32 product overflows int64 in .long(), and positions came back as
    # -2**63, silently. Δ = 1e17: positions past 2**53, not exact in the float64 angle.
    for dt in (1e30, 1e17):
        with pytest.raises(RopeError, match="video_time_intervals"):
            mrope_positions(_VIDEO, video_grid_thw=T([[2, 2, 2]]), video_time_intervals=[dt])
    # a large but exact interval still follows transformers' formula
    dt = 2.0**40
    pos, _ = mrope_positions(_VIDEO, video_grid_thw=T([[2, 2, 2]]), video_time_intervals=[dt])
    assert sorted(set(pos[0, 0, 1:9].tolist())) == [1 + v for v in _hf_temporal(2, dt)]


@pytest.mark.parametrize("bad", [0.5, T(0.5)])
def test_mrope_positions_interval_not_a_sequence_is_a_rope_error(bad):
    # was TypeError ("'float' object is not iterable", "iteration over a 0-d tensor")
    with pytest.raises(RopeError, match="video_time_intervals"):
        mrope_positions(_VIDEO, video_grid_thw=T([[2, 2, 2]]), video_time_intervals=bad)


def test_mrope_positions_grid_far_larger_than_its_tokens_is_a_rope_error():
    # was a RuntimeError from allocating the 2**40-token grid before comparing token counts
    with pytest.raises(RopeError, match="token counts"):
        mrope_positions(T([[0, 1, 1, 1, 1, 0]]), image_grid_thw=T([[1, 2**20, 2**20]]))


def test_mrope_positions_unused_grid_rows_are_refused():
    # was: the second image grid silently ignored (grids are consumed in order over the batch,
    # so a grid without tokens means grids and tokens do not describe the same batch)
    with pytest.raises(RopeError, match="image_grid_thw"):
        mrope_positions(T([[0, 1, 1, 1, 1, 0]]), image_grid_thw=T([[1, 2, 2], [1, 4, 4]]))
    with pytest.raises(RopeError, match="video_grid_thw"):
        mrope_positions(T([[0, 0]]), video_grid_thw=T([[1, 2, 2]]))


def test_mrope_positions_split_video_frames_must_be_a_bool():
    with pytest.raises(RopeError, match="split_video_frames"):
        mrope_positions(T([[0, 0]]), split_video_frames="yes")


# --------------------------------------------------------------------------- decode positions
def test_mrope_decode_positions_refuses_float_delta():
    # was: float delta gave float "positions"
    with pytest.raises(RopeError, match="integer"):
        mrope_decode_positions(T([[-2.0]]), 7)


def test_mrope_decode_positions_refuses_positions_out_of_range():
    # delta = -2 after an 8-token prefill: start 0 gives position -2 (start must count the
    # cached tokens); a huge delta gives positions past 2**53. Both came back silently.
    with pytest.raises(RopeError, match=">= 0"):
        mrope_decode_positions(T([[-2]]), 0)
    with pytest.raises(RopeError, match="2\\*\\*53"):
        mrope_decode_positions(T([[MAX_EXACT_POSITION]]), 5)
    # the boundary itself is fine: reference start + delta
    assert mrope_decode_positions(T([[-2]]), 2)[:, 0, 0].tolist() == [0, 0, 0]


# --------------------------------------------------------------------------- multi_axis_angles
def test_multi_axis_angles_refuses_bad_axes_and_freqs():
    # a public building block: out-of-range axes, float axes, mismatched freqs and lists were
    # RuntimeError / AttributeError from index_select and broadcasting
    from ropekit.multi_axis import multi_axis_angles, pair_axes

    pos = torch.randint(0, 9, (5, 3), generator=torch.Generator().manual_seed(4))
    axes, freqs = pair_axes([2, 3, 3]), RopeConfig(16).inv_freq()
    # reference: φ[t, j] = pos[t, axes[j]] · freqs[j] in float64
    ref = torch.tensor([[float(pos[t, axes[j]]) * float(freqs[j]) for j in range(8)] for t in range(5)], dtype=torch.float64)
    assert torch.equal(multi_axis_angles(pos, axes, freqs), ref)
    for bad_axes in (axes + 1, axes - 1, axes.float()):
        with pytest.raises(RopeError, match="axes"):
            multi_axis_angles(pos, bad_axes, freqs)
    with pytest.raises(RopeError, match="freqs"):
        multi_axis_angles(pos, axes, freqs[:5])
    with pytest.raises(RopeError, match="positions"):
        multi_axis_angles(pos.tolist(), axes, freqs)


# --------------------------------------------------------------------------- axial on meta
def test_axial_float_positions_on_meta():
    # float grids on meta (shape-only model construction) were a RuntimeError from the
    # finite check reading the values ("Tensor.item() cannot be called on meta tensors")
    ax = AxialRope(32, 2)
    grid = image_positions(4, 5, reference_shape=(2, 2))  # float64 [20, 2]
    want_c, _ = ax.cos_sin(grid, n_special=1)  # reference: the same call with values
    c, s = ax.cos_sin(grid.to("meta"), n_special=1)
    assert c.device.type == s.device.type == "meta" and c.shape == s.shape == want_c.shape
    x = torch.randn(2, 21, 3, 32)
    with pytest.raises(RopeError, match="meta"):  # real x, meta positions: no values to rotate by
        ax.apply(x, grid.to("meta"), n_special=1)
    # meta x with real positions follows x (as MultiAxisRotaryEmbedding), was a device RopeError
    out = ax.apply(x.to("meta"), grid, n_special=1)
    assert out.device.type == "meta" and out.shape == x.shape
