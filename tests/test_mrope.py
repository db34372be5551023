"""M-RoPE (Qwen2-VL family): tables and position ids against the installed transformers.

Everything from transformers is built from tiny configs in the test (no weights, no hub).
Transformers computes angles in float32 (``position.float() * inv_freq_float32``), ours
in float64, so tables agree to float32 angle rounding: ``|Δ| <~ max_pos · 2^-24``.
Positions differ per axis, so a pair taking its position from the wrong axis shows as an
O(1) error, far above the tolerance.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RopeError, apply_rotary, from_full_width
from ropekit.multi_axis import mrope_decode_positions, mrope_positions, multi_axis_cos_sin, pair_axes

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl import modeling_qwen2_vl as hf_q2  # noqa: E402
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf_q25  # noqa: E402
from transformers.models.qwen3_vl import modeling_qwen3_vl as hf_q3  # noqa: E402


def _text_cfg(mod_cfg_cls, head_dim, section, theta=10000.0):
    return mod_cfg_cls(
        hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=1, intermediate_size=8,
        num_hidden_layers=1, vocab_size=16, head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": list(section)},
    )


def _qwen2_rotary(head_dim, section, theta=10000.0):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig

    return hf_q2.Qwen2VLRotaryEmbedding(_text_cfg(Qwen2VLTextConfig, head_dim, section, theta))


def _qwen25_rotary(head_dim, section, theta=10000.0):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

    return hf_q25.Qwen2_5_VLRotaryEmbedding(_text_cfg(Qwen2_5_VLTextConfig, head_dim, section, theta))


def _qwen3_rotary(head_dim, section, theta=10000.0):
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig

    return hf_q3.Qwen3VLTextRotaryEmbedding(_text_cfg(Qwen3VLTextConfig, head_dim, section, theta))


def _random_ids(b, s, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, hi, (3, b, s), generator=g)  # (3, b, s), different per axis


def _hf_tables(rot, ids):
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = rot(x, ids)  # [b, s, d] full width
    return from_full_width(cos, "half"), from_full_width(sin, "half")


CASES = [
    # (builder, head_dim, section, interleaved, theta)
    (_qwen2_rotary, 32, (4, 6, 6), False, 10000.0),
    (_qwen2_rotary, 128, (16, 24, 24), False, 1000000.0),  # Qwen2-VL-7B's section and theta
    (_qwen25_rotary, 40, (6, 7, 7), False, 10000.0),
    (_qwen3_rotary, 128, (24, 20, 20), True, 5000000.0),  # Qwen3-VL's section and theta
    (_qwen3_rotary, 40, (8, 6, 6), True, 10000.0),
]


@pytest.mark.parametrize("builder,head_dim,section,interleaved,theta", CASES)
def test_tables_match_transformers_rotary_module(builder, head_dim, section, interleaved, theta):
    rot = builder(head_dim, section, theta)
    ids = _random_ids(2, 7, 300, seed=head_dim + sum(section))
    hcos, hsin = _hf_tables(rot, ids)
    cfg = RopeConfig(head_dim, base=theta)
    cos, sin = multi_axis_cos_sin(cfg, ids.movedim(0, -1), section, interleaved=interleaved)
    assert cos.shape == hcos.shape == (2, 7, head_dim // 2)
    tol = 300 * 2.0**-23  # float32 angle rounding in transformers (positions < 300)
    torch.testing.assert_close(cos, hcos, atol=tol, rtol=0)
    torch.testing.assert_close(sin, hsin, atol=tol, rtol=0)
    # the other pair->axis rule would not pass: chunked vs interleaved differ by O(1) here
    # (chunked Qwen2 sections such as [4, 6, 6] cannot even be interleaved)
    try:
        wrong, _ = multi_axis_cos_sin(cfg, ids.movedim(0, -1), section, interleaved=not interleaved)
    except RopeError:
        assert not interleaved
    else:
        assert (wrong - hcos).abs().max() > 0.1


@pytest.mark.parametrize("builder,head_dim,section,interleaved,theta", CASES[:1] + CASES[3:4])
def test_rotated_qk_match_transformers_apply(builder, head_dim, section, interleaved, theta):
    rot = builder(head_dim, section, theta)
    b, s, h = 2, 5, 3
    ids = _random_ids(b, s, 50, seed=3)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, s, head_dim, generator=g)  # bhsd, transformers' attention layout
    k = torch.randn(b, 1, s, head_dim, generator=g)
    hcos, hsin = rot(q, ids)  # [b, s, d]
    hq, hk = hf_q2.apply_rotary_pos_emb(q, k, hcos, hsin)
    cos, sin = multi_axis_cos_sin(RopeConfig(head_dim, base=theta), ids.movedim(0, -1), section, interleaved=interleaved)
    cos, sin = cos[:, None], sin[:, None]  # [b, 1, s, r/2]
    for backend in ("eager", "complex", "reference"):
        oq = apply_rotary(q, cos, sin, backend=backend)
        ok = apply_rotary(k, cos, sin, backend=backend)
        torch.testing.assert_close(oq, hq, atol=5e-5, rtol=1e-5)
        torch.testing.assert_close(ok, hk, atol=5e-5, rtol=1e-5)


def test_qwen3_interleaved_assignment_matches_transformers_rule():
    # transformers' rule: axis a in {1,2} takes j ≡ a (mod 3) for j < 3*section[a], else axis 0
    for section in ((24, 20, 20), (8, 6, 6), (5, 5, 5), (3, 1, 2)):
        n = sum(section)
        ref = torch.zeros(n, dtype=torch.int64)
        for a in (1, 2):
            ref[a : 3 * section[a] : 3] = a
        assert torch.equal(pair_axes(section, interleaved=True), ref), section
    axes = pair_axes((24, 20, 20), interleaved=True)
    assert axes[-4:].tolist() == [0, 0, 0, 0] and axes[:6].tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.bincount(axes).tolist() == [24, 20, 20]
    # sections the cycle cannot honour (transformers would silently give axis 1 21 pairs)
    with pytest.raises(RopeError, match="fit the cycle"):
        pair_axes((16, 24, 24), interleaved=True)


def test_text_tokens_reduce_to_1d_rope():
    cfg = RopeConfig(64, base=1e6)
    p = torch.arange(0, 4000, 37)
    pos = p[:, None].expand(-1, 3)  # same position on t, h, w
    for sec, inter in (((8, 12, 12), False), ((12, 10, 10), True)):
        c, s = multi_axis_cos_sin(cfg, pos, sec, interleaved=inter, dtype=torch.float64)
        c1, s1 = ropekit.cos_sin(cfg, p, dtype=torch.float64)
        assert torch.equal(c, c1) and torch.equal(s, s1)


def test_scaling_factor_is_folded_like_cos_sin():
    sc = pytest.importorskip("ropekit.scaling")
    if not hasattr(sc, "YaRN"):
        pytest.skip("YaRN scaling not in this tree yet")
    cfg = RopeConfig(32, scaling=sc.YaRN(factor=4.0, original_max_position=64))
    assert cfg.attention_factor != 1.0  # so the comparison below checks the folding
    p = torch.arange(10)
    c, s = multi_axis_cos_sin(cfg, p[:, None].expand(-1, 3), (4, 6, 6))
    c1, s1 = ropekit.cos_sin(cfg, p)
    torch.testing.assert_close(c, c1, atol=0, rtol=0)
    torch.testing.assert_close(s, s1, atol=0, rtol=0)


def test_relative_invariance_per_axis():
    # shifting every token's position on one axis leaves q·k scores unchanged
    cfg = RopeConfig(32)
    g = torch.Generator().manual_seed(1)
    pos = torch.randint(0, 40, (6, 3), generator=g)
    q = torch.randn(6, 1, 32, dtype=torch.float64, generator=g)
    k = torch.randn(6, 1, 32, dtype=torch.float64, generator=g)

    def scores(p):
        c, s = multi_axis_cos_sin(cfg, p, (6, 5, 5), interleaved=True, dtype=torch.float64)
        qr = apply_rotary(q, c[:, None], s[:, None])[:, 0]
        kr = apply_rotary(k, c[:, None], s[:, None])[:, 0]
        return qr @ kr.T

    base = scores(pos)
    for axis in range(3):
        shifted = pos.clone()
        shifted[:, axis] += 17
        torch.testing.assert_close(scores(shifted), base, atol=1e-10, rtol=0)
        moved = pos.clone()
        moved[0, axis] += 1  # a real change on that axis does change the scores
        assert (scores(moved) - base).abs().max() > 1e-3


# --------------------------------------------------------------------------- get_rope_index
def _hf_rope_index(model_cls, cfg, **kw):
    """Call transformers' get_rope_index unbound, on a namespace holding only the config."""
    ns = types.SimpleNamespace(config=cfg)
    ns.get_vision_position_ids = types.MethodType(model_cls.get_vision_position_ids, ns)
    with torch.no_grad():
        return model_cls.get_rope_index(ns, **kw)


def _qwen2_cfg(merge=2):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Qwen2VLConfig(vision_config=dict(embed_dim=8, num_heads=2, depth=1, spatial_merge_size=merge))


def _qwen25_cfg(merge=2, tps=2):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Qwen2_5_VLConfig(
            vision_config=dict(hidden_size=8, num_heads=2, depth=1, spatial_merge_size=merge, tokens_per_second=tps)
        )


def _sequence(parts):
    """parts: list of ("text", n) / ("image", (t, h, w)) / ("video", (t, h, w)); merge 2."""
    types_, imgs, vids = [], [], []
    for kind, v in parts:
        if kind == "text":
            types_ += [0] * v
        else:
            t, h, w = v
            types_ += [1 if kind == "image" else 2] * (t * (h // 2) * (w // 2))
            (imgs if kind == "image" else vids).append(list(v))
    return types_, imgs, vids


def _batch(seqs, pad_left=True):
    """Left-pad several sequences to one [b, s] batch with an attention mask."""
    s = max(len(t) for t, _, _ in seqs)
    types_ = torch.zeros(len(seqs), s, dtype=torch.int64)
    mask = torch.zeros(len(seqs), s, dtype=torch.int64)
    imgs, vids = [], []
    for i, (t, im, vi) in enumerate(seqs):
        types_[i, s - len(t) :] = torch.tensor(t)
        mask[i, s - len(t) :] = 1
        imgs += im
        vids += vi
    grid = lambda g: torch.tensor(g, dtype=torch.int64) if g else None  # noqa: E731
    return types_, mask, grid(imgs), grid(vids)


def test_rope_index_images_match_qwen2_vl():
    seqs = [
        _sequence([("text", 3), ("image", (1, 4, 6)), ("text", 5), ("image", (1, 2, 2)), ("text", 2)]),
        _sequence([("text", 1), ("image", (1, 8, 4)), ("text", 4)]),
    ]
    types_, mask, imgs, vids = _batch(seqs)
    ids = torch.full_like(types_, 5)
    hpos, hdelta = _hf_rope_index(
        hf_q2.Qwen2VLModel, _qwen2_cfg(), input_ids=ids, mm_token_type_ids=types_, image_grid_thw=imgs, attention_mask=mask
    )
    for text_after in ("max", "spatial"):  # identical for images
        pos, delta = mrope_positions(types_, image_grid_thw=imgs, spatial_merge_size=2, attention_mask=mask, text_after=text_after)
        assert torch.equal(pos, hpos) and torch.equal(delta, hdelta.long())


def test_rope_index_videos_match_qwen2_5_vl_time_intervals():
    # a short video (temporal extent below max(h, w)/m): every convention agrees
    seqs = [
        _sequence([("text", 2), ("video", (3, 8, 8)), ("text", 3), ("image", (1, 4, 2)), ("text", 1)]),
        _sequence([("text", 4), ("video", (2, 4, 6)), ("text", 2)]),
    ]
    types_, mask, imgs, vids = _batch(seqs)
    sec = torch.tensor([0.5, 1.0])  # second_per_grid_t per video, tokens_per_second = 2
    hpos, hdelta = _hf_rope_index(
        hf_q25.Qwen2_5_VLModel, _qwen25_cfg(tps=2), input_ids=torch.ones_like(types_), mm_token_type_ids=types_,
        image_grid_thw=imgs, video_grid_thw=vids, second_per_grid_ts=sec, attention_mask=mask,
    )
    pos, delta = mrope_positions(
        types_, image_grid_thw=imgs, video_grid_thw=vids, spatial_merge_size=2,
        video_time_intervals=(2 * sec).tolist(), attention_mask=mask,
    )
    assert torch.equal(pos, hpos) and torch.equal(delta, hdelta.long())
    # the temporal axis really is spaced by the interval: frames of video 1 at p + 0, 1, 2
    assert sorted(set(hpos[0, 0, mask[0].bool()][2:50].tolist())) == [2, 3, 4]


def test_rope_index_long_video_conventions():
    # 6 frames of a 2x2 merged grid, interval 1: temporal positions reach p+5 > p + max(h,w)/m = p+2
    seq = _sequence([("text", 2), ("video", (6, 4, 4)), ("text", 3)])
    types_, mask, _, vids = _batch([seq])
    hpos, hdelta = _hf_rope_index(
        hf_q2.Qwen2VLModel, _qwen2_cfg(), input_ids=torch.ones_like(types_), mm_token_type_ids=types_, video_grid_thw=vids
    )
    # transformers 5.x advances by max(h, w)/m after a vision block ("spatial")
    pos, delta = mrope_positions(types_, video_grid_thw=vids, spatial_merge_size=2, text_after="spatial")
    assert torch.equal(pos, hpos) and torch.equal(delta, hdelta.long())
    # the Qwen reference rule ("max"): text restarts after the largest position used.
    # Expected, written out by hand from that rule: text 0,1; video t = 2..7, h,w = 2..3;
    # text 8, 9, 10 (largest video position 7 + 1).
    pos, delta = mrope_positions(types_, video_grid_thw=vids, spatial_merge_size=2, text_after="max")
    assert pos[0, 0, :2].tolist() == [0, 1] and pos[:, 0, -3:].tolist() == [[8, 9, 10]] * 3
    assert pos[0, 0, 2:26].unique().tolist() == list(range(2, 8))
    assert pos[1, 0, 2:26].unique().tolist() == [2, 3] and pos[2, 0, 2:26].unique().tolist() == [2, 3]
    assert delta.tolist() == [[11 - 29]]


def test_rope_index_match_qwen3_vl_per_frame_videos():
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = Qwen3VLConfig(vision_config=dict(hidden_size=8, num_heads=2, depth=1, spatial_merge_size=2))
    # Qwen3-VL: <t1> frame1 <t2> frame2 ...: timestamp text tokens separate the frames
    seq = _sequence([("text", 2), ("image", (1, 4, 4)), ("text", 3)])
    frames = [("text", 2), ("video", (1, 4, 6))] * 3  # one video of 3 frames, listed per frame
    seq2 = _sequence(frames + [("text", 2)])
    types_, mask, imgs, _ = _batch([seq, seq2])
    vids = torch.tensor([[3, 4, 6]])  # one row per video, as the processor gives it
    hpos, hdelta = _hf_rope_index(
        hf_q3.Qwen3VLModel, cfg, input_ids=torch.ones_like(types_), mm_token_type_ids=types_,
        image_grid_thw=imgs, video_grid_thw=vids.clone(), attention_mask=mask,
    )
    pos, delta = mrope_positions(
        types_, image_grid_thw=imgs, video_grid_thw=vids, spatial_merge_size=2, attention_mask=mask, split_video_frames=True
    )
    assert torch.equal(pos, hpos) and torch.equal(delta, hdelta.long())


def test_decode_positions_continue_the_prefill():
    types_ = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0]])  # 2 text, 2x3 image (merge 1), 3 text
    grid = torch.tensor([[1, 2, 3]])
    full, _ = mrope_positions(types_, image_grid_thw=grid)
    pre, delta = mrope_positions(types_[:, :8], image_grid_thw=grid)
    # the last 3 text tokens decoded one at a time after an 8-token prefill
    for k in range(8, 11):
        step = mrope_decode_positions(delta, k)
        assert torch.equal(step[:, :, 0], full[:, :, k])
    # several tokens at once, per-sample starts
    many = mrope_decode_positions(delta.expand(2, 1), torch.tensor([8, 9]), length=2)
    assert many[:, 0].tolist() == [[5, 6]] * 3 and many[:, 1].tolist() == [[6, 7]] * 3


def test_mrope_errors():
    cfg = RopeConfig(32)
    with pytest.raises(RopeError, match="sum 15"):
        multi_axis_cos_sin(cfg, torch.zeros(2, 3, dtype=torch.long), (4, 6, 5))
    with pytest.raises(RopeError, match="movedim"):
        multi_axis_cos_sin(cfg, torch.zeros(3, 2, 5, dtype=torch.long), (4, 6, 6))
    with pytest.raises(RopeError, match="integer dtype"):
        multi_axis_cos_sin(cfg, torch.zeros(2, 3), (4, 6, 6))
    with pytest.raises(RopeError, match=">= 0"):
        multi_axis_cos_sin(cfg, -torch.ones(2, 3, dtype=torch.long), (4, 6, 6))
    with pytest.raises(RopeError, match="token counts"):
        mrope_positions(torch.tensor([[0, 1, 1, 1]]), image_grid_thw=torch.tensor([[1, 2, 2]]))
    with pytest.raises(RopeError, match="one image_grid_thw row"):
        mrope_positions(torch.tensor([[0, 1, 0, 1]]), image_grid_thw=torch.tensor([[1, 1, 1]]))
    with pytest.raises(RopeError, match="divisible"):
        mrope_positions(torch.tensor([[1, 1]]), image_grid_thw=torch.tensor([[1, 1, 2]]), spatial_merge_size=2)
    with pytest.raises(RopeError, match="token types"):
        mrope_positions(torch.tensor([[0, 3]]))
