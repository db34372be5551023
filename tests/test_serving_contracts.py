"""Contracts of the serving helpers and of ``rerotate``: re-rotation honours ``cfg.direction``,
``cfg.rotary_offset`` and the config's head width; positions and slots are validated before
anything is written; per-sequence profiles take integers only and large sparse positions;
every refusal is a RopeError naming the caller's argument.

Oracle: :func:`_rot64`, RoFormer's rotation in float64 from first principles (angle =
direction · position · θ_i, θ_i = base^(-2i/r) / ext_i; pairs ``(i, i + r/2)`` for ``half``,
``(2i, 2i + 1)`` for ``interleaved``; only dims ``[offset, offset + r)`` rotate).
"""

from __future__ import annotations

import math

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RopeError, RotaryEmbedding, ops, rerotate, serving
from ropekit.scaling import LongRoPE

pytestmark = pytest.mark.skipif(not ops.LOADED, reason="the serving ops need ropekit._C")


def _rot64(x, pos, r, layout, *, base=10000.0, direction=1, offset=0, ext=None):
    """``x [..., h, d]`` rotated at integer ``pos`` (``x.shape[:-2]``, one per token) in float64."""
    inv = torch.tensor([base ** (-2.0 * i / r) / (1.0 if ext is None else ext[i]) for i in range(r // 2)],
                       dtype=torch.float64)
    ang = direction * torch.as_tensor(pos).to(torch.float64)[..., None, None] * inv  # [..., 1, r/2]
    c, s = torch.cos(ang), torch.sin(ang)
    x = x.double()
    y = x.clone()
    i1 = torch.arange(r // 2) if layout == "half" else torch.arange(0, r, 2)
    i2 = i1 + r // 2 if layout == "half" else i1 + 1
    i1, i2 = i1 + offset, i2 + offset
    y[..., i1] = x[..., i1] * c - x[..., i2] * s
    y[..., i2] = x[..., i1] * s + x[..., i2] * c
    return y


def _paged(rows):
    """``[t, h, d]`` rows -> an nhd cache ``[1, t, h, d]`` (slot j holds row j)."""
    return rows.unsqueeze(0).clone()


# --- 1, 2: rerotate / rerotate_cache honour direction and rotary_offset ----------------------


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("direction,offset", [(-1, 0), (1, 16), (-1, 16)])
def test_rerotate_moves_keys_of_direction_and_offset_configs(layout, direction, offset):
    d, r = 64, 32
    cfg = RopeConfig(d, rotary_dim=r, layout=layout, direction=direction, rotary_offset=offset)
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(1, 5, 2, d, generator=g, dtype=torch.float64)  # [b, s, h, d] unrotated
    old, new = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([100, 7, 2, 0, 12345])
    stored = _rot64(raw, old[None], r, layout, direction=direction, offset=offset)
    want = _rot64(raw, new[None], r, layout, direction=direction, offset=offset)
    got = rerotate(stored, cfg, old, new)
    assert (got - want).abs().max() < 1e-10
    outside = torch.ones(d, dtype=torch.bool)
    outside[offset:offset + r] = False
    assert torch.equal(got[..., outside], stored[..., outside])  # the pass-through dims: untouched
    # in place, and the thd form
    x = stored[0].clone()
    assert rerotate(x, cfg, old, new, format="thd", inplace=True) is x
    assert (x - want[0]).abs().max() < 1e-10
    # the same keys in a paged cache
    cache = _paged(stored[0])
    serving.rerotate_cache(cache, torch.arange(5), old, new, cfg)
    assert (cache[0] - want[0]).abs().max() < 1e-10
    assert torch.equal(cache[0][..., outside], stored[0][..., outside])


def test_rerotate_matches_the_module_with_direction_and_offset():
    cfg = RopeConfig(64, rotary_dim=32, rotary_offset=32, direction=-1)
    rope = RotaryEmbedding(cfg)
    raw = torch.randn(1, 4, 1, 64, generator=torch.Generator().manual_seed(1))
    _, k0 = rope(raw, raw, positions=torch.arange(4))
    _, k10 = rope(raw, raw, positions=torch.arange(4) + 10)
    assert (rerotate(k0, cfg, torch.arange(4), torch.arange(4) + 10) - k10).abs().max() < 1e-5
    cache = k0.reshape(1, 4, 1, 64).clone()
    serving.rerotate_cache(cache, torch.arange(4), torch.arange(4), torch.arange(4) + 10, cfg)
    assert (cache - k10.reshape(1, 4, 1, 64)).abs().max() < 1e-5


# --- 6: new_cfg: another direction handled exactly, another layout/offset refused -------------


@pytest.mark.parametrize("dirs", [(1, -1), (-1, 1)])
def test_rerotate_cache_to_a_config_of_the_other_direction(dirs):
    d = 32
    old_cfg, new_cfg = RopeConfig(d, direction=dirs[0]), RopeConfig(d, direction=dirs[1])
    raw = torch.randn(3, 2, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    old, new = torch.tensor([3, 50, 0]), torch.tensor([5, 50, 9])
    cache = _paged(_rot64(raw, old, d, "half", direction=dirs[0]))
    serving.rerotate_cache(cache, torch.arange(3), old, new, old_cfg, new_cfg=new_cfg)
    assert (cache[0] - _rot64(raw, new, d, "half", direction=dirs[1])).abs().max() < 1e-10


@pytest.mark.parametrize("change", [dict(layout="interleaved"), dict(rotary_dim=16, rotary_offset=16)])
def test_rerotate_cache_refuses_another_layout_or_offset(change):
    cfg = RopeConfig(32, rotary_dim=16)
    new_cfg = RopeConfig(32, **{"rotary_dim": 16, **change})
    cache = torch.randn(1, 4, 1, 32)
    before = cache.clone()
    with pytest.raises(RopeError, match="new_cfg of cfg's layout and rotary_offset.*permutation"):
        serving.rerotate_cache(cache, torch.tensor([0]), torch.tensor([3]), torch.tensor([5]), cfg, new_cfg=new_cfg)
    assert torch.equal(cache, before)


# --- 3, 4, 7, 11: refusals before anything is written ---------------------------------------


def _refused(fn, cache, match):
    before = cache.clone()
    with pytest.raises(RopeError, match=match) as e:
        fn()
    assert torch.equal(cache, before)
    return str(e.value)


@pytest.mark.parametrize("width", [32, 128])
def test_rerotate_refuses_another_head_width(width):
    cfg, p = RopeConfig(64), torch.arange(5)
    x = torch.randn(1, 5, 2, width)
    msg = _refused(lambda: rerotate(x, cfg, p, p + 1, inplace=True), x,
                   r"expected x with the config's head width cfg.head_dim = 64, got x of head width")
    assert "from_full_width" not in msg
    cache = torch.randn(2, 4, 1, width)
    s = torch.tensor([0, 1])
    msg = _refused(lambda: serving.rerotate_cache(cache, s, s, s + 5, cfg), cache,
                   r"expected k_cache with the config's head width")
    assert "from_full_width" not in msg and "cos_table" not in msg


@pytest.mark.parametrize("old,new,match", [
    (-1, 0, "old_positions >= 0"),
    (0, 2**53 + 1, r"new_positions <= 2\*\*53"),
    (-2**62, 2**62, "old_positions >= 0"),  # new - old would wrap in int64
    (2**60, 0, r"old_positions <= 2\*\*53"),
])
def test_rerotate_cache_validates_positions(old, new, match):
    cache = torch.randn(1, 2, 1, 2, dtype=torch.float64)
    _refused(lambda: serving.rerotate_cache(cache, torch.tensor([0]), torch.tensor([old]), torch.tensor([new]),
                                            RopeConfig(2)), cache, match)


def test_rerotate_cache_position_two_to_the_53_is_exact():
    cache = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)  # one pair, θ_0 = 1
    serving.rerotate_cache(cache, torch.tensor([0]), torch.tensor([0]), torch.tensor([2**53]), RopeConfig(2))
    a = float(2**53)
    assert torch.allclose(cache.flatten(), torch.tensor([math.cos(a), math.sin(a)], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("cl", ["nhd", "hnd"])
def test_rerotate_cache_refuses_a_slot_past_the_cache(cl):
    cache = torch.randn(2, 4, 1, 64)  # N * B = 8 slots
    c = cache if cl == "nhd" else cache.permute(0, 2, 1, 3)
    _refused(lambda: serving.rerotate_cache(c, torch.tensor([1, 8]), torch.tensor([1, 2]), torch.tensor([3, 4]),
                                            RopeConfig(64), cache_layout=cl), cache, "slots below N \\* B = 8")


def test_rerotate_cache_messages_name_the_cache():
    cfg, s, p = RopeConfig(64), torch.tensor([0, 1]), torch.tensor([0, 1])
    cache = torch.zeros(8, 1, 64)
    msg = _refused(lambda: serving.rerotate_cache(cache, s, p, p + 1, cfg), cache, "k_cache of 4 dims")
    assert "q [" not in msg
    cache = torch.zeros(2, 4, 1, 64, dtype=torch.long)
    msg = _refused(lambda: serving.rerotate_cache(cache, s, p, p + 1, cfg), cache, "k_cache of a real floating dtype")
    assert "expected q" not in msg


# --- 5: profiles take integer positions and indices ------------------------------------------


def test_profiles_refuse_float_positions_and_indices():
    cos, sin, _ = serving.profile_tables([RopeConfig(64)], 8)
    q, k = torch.randn(1, 2, 2, 64), torch.randn(1, 2, 1, 64)
    q0 = q.clone()
    with pytest.raises(RopeError, match="positions with an integer dtype"):
        serving.apply_rotary_profiles(q, k, cos, sin, torch.tensor([0]), positions=torch.tensor([0.9, 1.9]),
                                      inplace=True)
    with pytest.raises(RopeError, match="profile with an integer dtype"):
        serving.apply_rotary_profiles(q, k, cos, sin, torch.tensor([0.7]), positions=torch.tensor([0, 1]), inplace=True)
    assert torch.equal(q, q0)
    with pytest.raises(RopeError, match="positions with an integer dtype"):
        serving.profile_positions(torch.tensor([0.9, 1.9]), torch.tensor([0, 0]), 1, 8)
    with pytest.raises(RopeError, match="profile with an integer dtype"):
        serving.profile_positions(torch.tensor([0, 1]), torch.tensor([0.7, 0.7]), 1, 8)
    # integers: rotated at their own positions
    qr, _ = serving.apply_rotary_profiles(q, k, cos, sin, torch.tensor([0]), positions=torch.tensor([3, 7]))
    assert (qr.double() - _rot64(q, torch.tensor([[3, 7]]), 64, "half")).abs().max() < 1e-5


def test_profile_shape_mismatches_name_the_profile():
    cos, sin, _ = serving.profile_tables(RopeConfig(64), 8)
    q, k = torch.randn(2, 2, 2, 64), torch.randn(2, 2, 1, 64)
    with pytest.raises(RopeError, match=r"expected profile of shape \[b\] = \[2\].*got profile of shape \[3\]"):
        serving.apply_rotary_profiles(q, k, cos, sin, torch.tensor([0, 0, 0]), positions=torch.tensor([0, 1]))
    with pytest.raises(RopeError, match=r"got profile of shape \[1\]"):  # not broadcast over the batch
        serving.apply_rotary_profiles(q, k, cos, sin, torch.tensor([0]), positions=torch.tensor([0, 1]))


# --- 8: every bad argument is a RopeError ----------------------------------------------------


def _exception_cases():
    cfg = RopeConfig(64)
    lr = RopeConfig(64, scaling=LongRoPE([1.0] * 32, [2.0] * 32, original_max_position=48, factor=4.0))
    ct, st = ropekit.cos_sin(cfg, torch.arange(16))
    q, k = torch.randn(3, 2, 64), torch.randn(3, 1, 64)
    pos = slots = torch.tensor([0, 1, 2])
    c = torch.zeros(2, 4, 1, 64)
    cache_call = serving.apply_rotary_cache
    cs, sn = torch.zeros(1, 8, 32), torch.zeros(1, 8, 32)
    two = torch.zeros(3, 2, dtype=torch.long)
    return {
        "cache_layout=None": lambda: cache_call(q.clone(), k, ct, st, pos, c, slots=slots, cache_layout=None),
        "layout=None": lambda: cache_call(q.clone(), k, ct, st, pos, c, slots=slots, layout=None),
        "v=[1]": lambda: cache_call(q.clone(), k, ct, st, pos, c, slots=slots, v=[1], v_cache=c.clone()),
        "mrope_section=32": lambda: serving.rerotate_cache(c, slots[:2], two, two, cfg, mrope_section=32),
        "profile_tables(cfg, -1)": lambda: serving.profile_tables(cfg, -1),
        "profile_tables(cfg, None)": lambda: serving.profile_tables(cfg, None),
        "profile_tables(5, 4)": lambda: serving.profile_tables(5, 4),
        "seq_lens=['a']": lambda: serving.profile_tables(lr, 4, seq_lens=["a"]),
        "seq_lens=5": lambda: serving.profile_tables(lr, 4, seq_lens=5),
        "longrope_profile(lr, 'abc')": lambda: serving.longrope_profile(lr, "abc"),
        "longrope_profile(lr, None)": lambda: serving.longrope_profile(lr, None),
        "longrope_profile(None, 5)": lambda: serving.longrope_profile(None, 5),
        "stack_profiles(n 4 and 5)": lambda: serving.stack_profiles([(torch.zeros(4, 2), torch.zeros(4, 2)),
                                                                    (torch.zeros(5, 2), torch.zeros(5, 2))]),
        "positions [5] for s=3": lambda: serving.apply_rotary_profiles(
            torch.randn(2, 3, 2, 64), torch.randn(2, 3, 1, 64), cs, sn, torch.tensor([0, 0]),
            positions=torch.tensor([0, 1, 2, 3, 4])),
        "profile_positions([3], [2])": lambda: serving.profile_positions(pos, torch.tensor([0, 0]), 1, 8),
    }


@pytest.mark.parametrize("case", list(_exception_cases()))
def test_serving_refusals_are_rope_errors(case):
    with pytest.raises(RopeError, match=r"^expected .*, got .*\. Fix: "):
        _exception_cases()[case]()


def test_valid_profile_calls_still_work():
    lr = RopeConfig(64, scaling=LongRoPE([1.0] * 32, [2.0] * 32, original_max_position=48, factor=4.0))
    assert [serving.longrope_profile(lr, n) for n in (48, 49, 49.0)] == [0, 1, 1]
    cos, sin, idx = serving.profile_tables(lr, 4, seq_lens=torch.tensor([10, 100]))
    assert cos.shape == (2, 4, 32) and idx.tolist() == [0, 1]
    assert serving.stack_profiles([(cos[0], sin[0]), (cos[1], sin[1])])[0].shape == (2, 4, 32)


# --- 9, 12: packed thd offsets and cu_seqlens -------------------------------------------------


@pytest.mark.parametrize("off", [2**53 + 1, 2**63 - 1, 2**63, 2**64 + 3])
@pytest.mark.parametrize("fn", ["module", "gather"])
def test_thd_int_offsets_past_two_to_the_53_refused(off, fn):
    cfg = RopeConfig(64)
    q, k, cu = torch.randn(10, 4, 64), torch.randn(10, 2, 64), torch.tensor([0, 5, 10])
    with pytest.raises(RopeError, match=r"offsets <= 2\*\*53") as e:
        if fn == "module":
            RotaryEmbedding(cfg)(q, k, cu_seqlens=cu, offsets=off, format="thd")
        else:
            ct, st = ropekit.cos_sin(cfg, torch.arange(16))
            ropekit.apply_rotary_gather(q, k, ct, st, cu_seqlens=cu, offsets=off, format="thd")
    assert "-9223372036854775808" not in str(e.value)


@pytest.mark.parametrize("cu", [[0, 2, 6], (0, 2, 6)])
def test_cu_seqlens_not_a_tensor_refused(cu):
    ct, st = ropekit.cos_sin(RopeConfig(8), torch.arange(16))
    q, k = torch.randn(6, 2, 8), torch.randn(6, 1, 8)
    with pytest.raises(RopeError, match=f"expected cu_seqlens an integer torch.Tensor.*got {type(cu).__name__}"):
        ropekit.apply_rotary_gather(q, k, ct, st, cu_seqlens=cu, format="thd")
    with pytest.raises(RopeError, match="cu_seqlens"):
        RotaryEmbedding(RopeConfig(8))(q, k, cu_seqlens=cu, format="thd")


# --- 10: seq_lens= with large sparse positions ------------------------------------------------


@pytest.mark.parametrize("fmt", ["bshd", "sbhd"])
def test_module_seq_lens_large_sparse_positions(fmt):
    ext_s, ext_l = [1.0, 2.0], [4.0, 8.0]  # powers of two: θ_i / ext_i exact
    cfg = RopeConfig(4, scaling=LongRoPE(ext_s, ext_l, original_max_position=48, attention_factor=1.0))
    g = torch.Generator().manual_seed(4)
    b, s = 3, 2
    q, k = torch.randn(b, s, 2, 4, generator=g), torch.randn(b, s, 1, 4, generator=g)
    off, lens = torch.tensor([2**40, 3, 2**22]), [100, 10, 60]
    perm = (0, 1, 2, 3) if fmt == "bshd" else (1, 0, 2, 3)
    rope = RotaryEmbedding(cfg)
    qo, ko = rope(q.permute(perm), k.permute(perm), offsets=off, seq_lens=lens, format=fmt)
    qo, ko = qo.permute(perm), ko.permute(perm)
    pos = off[:, None] + torch.arange(s)  # [b, s]
    for i in range(b):
        ext = ext_l if lens[i] > 48 else ext_s
        assert (qo[i].double() - _rot64(q[i], pos[i], 4, "half", ext=ext)).abs().max() < 1e-5
        qi, ki = RotaryEmbedding(cfg)(q[i:i + 1], k[i:i + 1], offsets=int(off[i]), seq_len=lens[i])
        assert torch.equal(qi, qo[i:i + 1]) and torch.equal(ki, ko[i:i + 1])  # one call per sequence: the same bits


@pytest.mark.parametrize("direction", [1, -1])
def test_rerotate_the_rope_part_alone_of_an_mla_config(direction):
    # MLA caches k_pe (the rope part, rotary_dim wide) apart from the compressed kv: with the
    # model's config (head_dim = nope + rope, rotary_offset = nope) it rotates whole
    cfg = RopeConfig(192, rotary_dim=64, rotary_offset=128, direction=direction)
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(1, 6, 1, 64, generator=g, dtype=torch.float64)
    old, new = torch.arange(6), torch.tensor([9, 3, 70000, 5, 5, 1])
    stored = _rot64(raw, old[None], 64, "half", direction=direction)
    want = _rot64(raw, new[None], 64, "half", direction=direction)
    assert (rerotate(stored, cfg, old, new) - want).abs().max() < 1e-10
    cache = _paged(stored[0])
    serving.rerotate_cache(cache, torch.arange(6), old, new, cfg)
    assert (cache[0] - want[0]).abs().max() < 1e-10
    with pytest.raises(ropekit.RopeError, match=r"or its rope part alone, cfg.rotary_dim = 64"):
        rerotate(stored[..., :32], cfg, old, new)
