"""Axial N-D RoPE and position grids: per-axis 1-D RoPE oracle, transformers' Qwen2-VL vision
rotary, relative invariance per axis, special tokens, resolution scaling."""

from __future__ import annotations

import math

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RopeError, apply_rotary
from ropekit.multi_axis import (
    AxialRope,
    grid_positions,
    image_positions,
    video_positions,
    with_special_tokens,
)


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("sections", [(8, 8), (5, 11), (4, 6, 6), (3, 0, 5)])
def test_axial_lang_equals_per_axis_1d_rope(sections):
    """Oracle: in the interleaved layout axis a's pairs are one contiguous block of 2·n_a
    dims, so axial RoPE = ordinary 1-D RoPE (ropekit.cos_sin, RopeConfig(2·n_a)) applied
    block by block with that axis's position."""
    n_axes, r = len(sections), 2 * sum(sections)
    d = r + 6  # partial rotary: 6 dims pass through
    rope = AxialRope(d, n_axes=n_axes, rotary_dim=r, sections=sections, base=100.0, layout="interleaved")
    pos = torch.randint(0, 50, (7, n_axes), generator=torch.Generator().manual_seed(1))
    x = _rand(7, 2, d)  # [t, h, d]
    got = rope.apply(x[None], pos)[0]
    want = x.clone()
    start = 0
    for a, n_a in enumerate(sections):
        if n_a == 0:
            continue
        c, s = ropekit.cos_sin(RopeConfig(2 * n_a, base=100.0), pos[:, a], dtype=torch.float64)  # [t, n_a]
        blk = x[..., start : start + 2 * n_a]
        want[..., start : start + 2 * n_a] = apply_rotary(blk, c[:, None], s[:, None], layout="interleaved", backend="reference")
        start += 2 * n_a
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_axial_matches_transformers_qwen2_vl_vision_rotary():
    hf = pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

    vc = Qwen2VLVisionConfig(embed_dim=64, num_heads=2, depth=1)  # head_dim 32 -> 8 pairs per axis
    rot = hf.Qwen2VLVisionRotaryEmbedding(vc)
    pos = image_positions(6, 9)  # [54, 2] (row, col), as transformers builds them
    hcos, hsin = rot(torch.zeros(1), pos)  # [54, 32] full width
    rope = AxialRope(32, n_axes=2, base=vc.rope_parameters["rope_theta"])
    cos, sin = rope.cos_sin(pos)
    tol = 8 * 2.0**-23  # transformers: float32 angles, positions < 9
    torch.testing.assert_close(cos, ropekit.from_full_width(hcos), atol=tol, rtol=0)
    torch.testing.assert_close(sin, ropekit.from_full_width(hsin), atol=tol, rtol=0)


def test_pixel_frequencies():
    # rotary-embedding-torch freqs_for="pixel": linspace(1, max_freq/2, dim//2) * pi per axis
    rope = AxialRope(40, n_axes=2, sections=(6, 14), freqs="pixel", max_freq=12.0)
    f = rope.inv_freq()
    torch.testing.assert_close(f[:6], torch.linspace(1.0, 6.0, 6, dtype=torch.float64) * math.pi)
    torch.testing.assert_close(f[6:], torch.linspace(1.0, 6.0, 14, dtype=torch.float64) * math.pi)
    # on normalised coordinates the angle at the grid corner (-1, -1) is -ω
    pos = image_positions(3, 5, normalize=True)
    ang = rope.angles(pos)
    torch.testing.assert_close(ang[0], -f)
    torch.testing.assert_close(ang[-1], f)


@pytest.mark.parametrize("kind,shape,layout", [("lang", (5, 4), "half"), ("lang", (3, 4, 5), "interleaved"), ("pixel", (4, 6), "half")])
def test_relative_invariance_per_axis(kind, shape, layout):
    n_axes = len(shape)
    rope = AxialRope(24, n_axes=n_axes, freqs=kind, layout=layout)
    pos = grid_positions(shape) if kind == "lang" else grid_positions(shape, normalize=True)
    t = pos.shape[0]
    q, k = _rand(t, 1, 24, seed=2), _rand(t, 1, 24, seed=3)

    def scores(p, n_special=0):
        c, s = rope.cos_sin(p, n_special=n_special, dtype=torch.float64)
        qq = torch.cat((_rand(n_special, 1, 24, seed=9), q)) if n_special else q
        kk = torch.cat((_rand(n_special, 1, 24, seed=10), k)) if n_special else k
        qr = apply_rotary(qq, c[:, None], s[:, None], layout=layout)[:, 0]
        kr = apply_rotary(kk, c[:, None], s[:, None], layout=layout)[:, 0]
        return qr @ kr.T

    base = scores(pos)
    for a in range(n_axes):
        shift = torch.zeros(n_axes, dtype=pos.dtype)
        shift[a] = 7 if kind == "lang" else 0.37
        torch.testing.assert_close(scores(pos + shift), base, atol=1e-10, rtol=0)
        # moving one token on this axis only does change its scores
        moved = pos.clone()
        moved[0, a] += shift[a]
        assert (scores(moved) - base).abs().max() > 1e-3
    # with a CLS token in front, the patch-patch block is still shift invariant and the
    # CLS rows do not depend on the patch positions' absolute offset either
    with_cls = scores(pos, n_special=1)
    torch.testing.assert_close(with_cls[1:, 1:], base, atol=1e-10, rtol=0)
    shifted = scores(pos + 1 if kind == "lang" else pos + 0.5, n_special=1)
    torch.testing.assert_close(shifted[1:, 1:], base, atol=1e-10, rtol=0)
    assert (shifted[0, 1:] - with_cls[0, 1:]).abs().max() > 1e-3  # CLS vs patch does see absolute position


def test_special_tokens_are_unrotated():
    rope = AxialRope(16, n_axes=3)
    pos = video_positions(2, 3, 2)  # [12, 3]
    cos, sin = rope.cos_sin(pos, n_special=4)
    assert cos.shape == (16, 8)
    assert torch.equal(cos[:4], torch.ones(4, 8)) and torch.equal(sin[:4], torch.zeros(4, 8))
    x = _rand(2, 16, 3, 16, dtype=torch.float32)  # [b, s, h, d]
    y = rope.apply(x, pos, n_special=4)
    assert torch.equal(y[:, :4], x[:, :4])
    c2, s2 = rope.cos_sin(pos)
    assert torch.equal(cos[4:], c2) and torch.equal(sin[4:], s2)
    # batched tables [b, t, r/2] get the rows on the token dim
    cb, sb = with_special_tokens(c2.expand(3, -1, -1), s2.expand(3, -1, -1), 2)
    assert cb.shape == (3, 14, 8) and torch.equal(cb[:, :2], torch.ones(3, 2, 8))


def test_grids():
    g = image_positions(3, 4)
    assert g.dtype == torch.int64 and g.shape == (12, 2)
    # row-major: token index = row * w + col
    assert torch.equal(g[:, 0] * 4 + g[:, 1], torch.arange(12))
    v = video_positions(2, 3, 4)
    assert torch.equal(v[:, 0] * 12 + v[:, 1] * 4 + v[:, 2], torch.arange(24))
    # resolution interpolation (EVA-02 pt/ft): a 32-wide grid squeezed into a 16-wide range
    r = grid_positions((8, 32), reference_shape=(8, 16))
    assert r.dtype == torch.float64
    assert torch.equal(r[:32, 1], torch.arange(32, dtype=torch.float64) / 2)
    assert torch.equal(r[::32, 0], torch.arange(8, dtype=torch.float64))
    s = grid_positions((2, 3), scale=(1.0, 0.25))
    assert s[:, 1].tolist() == [0.0, 0.25, 0.5] * 2
    n = grid_positions((3, 1), normalize=True)
    assert n[:, 0].tolist() == [-1.0, 0.0, 1.0] and n[:, 1].tolist() == [0.0] * 3


def test_interpolated_grid_keeps_trained_angle_range():
    rope = AxialRope(32, n_axes=2)
    trained = rope.angles(image_positions(14, 14))
    big = rope.angles(image_positions(28, 28, reference_shape=(14, 14)))
    # EVA-02's i * ref/n: the 28-wide grid stays in [0, 14), the trained position range
    # (un-interpolated it would reach 27 · ω_0)
    assert trained.max() == 13 * rope.inv_freq()[0] and big.max() == 13.5 * rope.inv_freq()[0]
    # every second position of the big grid lands exactly on a trained one
    torch.testing.assert_close(big.reshape(28, 28, -1)[::2, ::2].reshape(-1, 16), trained, atol=0, rtol=0)


def test_axial_backends_agree():
    rope = AxialRope(48, n_axes=2, rotary_dim=40, layout="half")
    pos = image_positions(4, 4)
    x = _rand(2, 17, 3, 48, dtype=torch.float32)
    ref = rope.apply(x.double(), pos, n_special=1, backend="reference")
    for be in ropekit.backends.available():
        torch.testing.assert_close(rope.apply(x, pos, n_special=1, backend=be).double(), ref, atol=2e-6, rtol=1e-6)


def test_axial_errors():
    with pytest.raises(RopeError, match="summing to r/2 = 16"):
        AxialRope(32, n_axes=2, sections=(8, 9))
    with pytest.raises(RopeError, match="2 sections"):
        AxialRope(32, n_axes=2, sections=(4, 6, 6))
    with pytest.raises(RopeError, match="freqs in"):
        AxialRope(32, freqs="log")
    with pytest.raises(RopeError, match="rotary_dim even"):
        AxialRope(32, rotary_dim=33)
    rope = AxialRope(32, n_axes=2)
    with pytest.raises(RopeError, match="n_axes"):
        rope.cos_sin(torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(RopeError, match="finite"):
        rope.cos_sin(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(RopeError, match="n_special"):
        rope.cos_sin(image_positions(2, 2), n_special=-1)
    with pytest.raises(RopeError, match="at most one"):
        grid_positions((2, 2), scale=2.0, normalize=True)
    with pytest.raises(RopeError, match=r"shape entries an int in \[1, .*got 0"):
        grid_positions((2, 0))
    with pytest.raises(RopeError, match="one reference_shape per axis"):
        grid_positions((2, 2), reference_shape=(4,))
