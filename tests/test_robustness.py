"""Every input a user or a config file can pass gets a RopeError (expected / got / fix), never
ZeroDivisionError, OverflowError, AttributeError, TypeError or an allocator RuntimeError;
and the same kind of value is judged the same way in every field.

The sweeps below are the search for those defect classes across the API: each constructor
and function that takes a number, a flag, a device or a tensor is called with values that
are wrong everywhere (a numeric string, an int too large for a float, NaN, inf, a bool, a
list, an arbitrary object).
"""

from __future__ import annotations

import math

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RopeError, cos_sin
from ropekit import analysis as A
from ropekit import multi_axis as M
from ropekit import reference
from ropekit import scaling as S
from ropekit import variants as V
from ropekit.convert import convert_layout, layout_permutation
from ropekit.parallel import shard_positions
from ropekit.positions import positions_from_cu_seqlens, resolve_positions, split_format
from ropekit.tables import MAX_TABLE_BYTES, TableCache, build_table, from_full_width, to_full_width

CFG = RopeConfig(16)

#: Wrong in every numeric field: a numeric string, ints too large for a float, NaN, inf, a
#: bool, a list, an object, a complex number, a tensor without a value (meta).
BAD_NUMBERS = ["8", "1e4", 10**400, -(10**400), float("nan"), float("inf"), True, [2.0], object(), 1j, torch.tensor(8.0, device="meta")]

#: field -> a call taking the value under test
NUMBER_FIELDS = {
    "RopeConfig.head_dim": lambda v: RopeConfig(head_dim=v),
    "RopeConfig.base": lambda v: RopeConfig(64, base=v),
    "RopeConfig.rotary_dim": lambda v: RopeConfig(64, rotary_dim=v),
    "RopeConfig.inv_freq(seq_len)": lambda v: RopeConfig(64, scaling=S.DynamicNTK(2.0, 8)).inv_freq(v),
    "cos_sin(seq_len)": lambda v: cos_sin(CFG, torch.arange(3), seq_len=v),
    "Linear.factor": lambda v: S.Linear(v),
    "NTK.factor": lambda v: S.NTK(v),
    "DynamicNTK.factor": lambda v: S.DynamicNTK(v, 16),
    "DynamicNTK.max_position": lambda v: S.DynamicNTK(2.0, v),
    "YaRN.factor": lambda v: S.YaRN(v, 16),
    "YaRN.original_max_position": lambda v: S.YaRN(4.0, v),
    "YaRN.beta_fast": lambda v: S.YaRN(4.0, 16, beta_fast=v),
    "YaRN.beta_slow": lambda v: S.YaRN(4.0, 16, beta_slow=v),
    "YaRN.mscale": lambda v: S.YaRN(4.0, 16, mscale=v),
    "YaRN.mscale_all_dim": lambda v: S.YaRN(4.0, 16, mscale_all_dim=v),
    "YaRN.attention_factor": lambda v: S.YaRN(4.0, 16, attention_factor=v),
    "LongRoPE.short_factor[i]": lambda v: S.LongRoPE([1.0, v], [1.0, 1.0], 16, factor=2.0),
    "LongRoPE.original_max_position": lambda v: S.LongRoPE([1.0], [1.0], v, factor=2.0),
    "LongRoPE.factor": lambda v: S.LongRoPE([1.0], [1.0], 16, factor=v),
    "LongRoPE.attention_factor": lambda v: S.LongRoPE([1.0], [1.0], 16, attention_factor=v),
    "Llama3.factor": lambda v: S.Llama3(v, 1.0, 4.0, 16),
    "Llama3.low_freq_factor": lambda v: S.Llama3(8.0, v, 4.0, 16),
    "Llama3.high_freq_factor": lambda v: S.Llama3(8.0, 1.0, v, 16),
    "Llama3.original_max_position": lambda v: S.Llama3(8.0, 1.0, 4.0, v),
    "Proportional.partial_rotary_factor": lambda v: S.Proportional(v),
    "Proportional.factor": lambda v: S.Proportional(0.5, factor=v),
    "p_rope p": lambda v: V.p_rope_inv_freq(CFG, v),
    "xpos gamma": lambda v: V.xpos_zeta(CFG, v),
    "xpos scale_base": lambda v: V.xpos_cos_sin(CFG, torch.arange(3), scale_base=v),
    "xpos center": lambda v: V.xpos_cos_sin(CFG, torch.arange(3), center=v),
    "RopeMixed.num_heads": lambda v: V.RopeMixed(16, v),
    "RopeMixed.n_axes": lambda v: V.RopeMixed(16, 2, n_axes=v, init="axial"),
    "RopeMixed.theta": lambda v: V.RopeMixed(16, 2, theta=v),
    "AxialRope.n_axes": lambda v: M.AxialRope(32, n_axes=v),
    "AxialRope.max_freq": lambda v: M.AxialRope(32, max_freq=v),
    "AxialRope.sections[i]": lambda v: M.AxialRope(32, sections=(8, v)),
    "grid_positions shape[i]": lambda v: M.grid_positions((2, v)),
    "grid_positions scale": lambda v: M.grid_positions((2, 2), scale=v),
    "mrope_positions spatial_merge_size": lambda v: M.mrope_positions(torch.zeros(1, 2, dtype=torch.long), spatial_merge_size=v),
    "mrope_decode_positions start": lambda v: M.mrope_decode_positions(torch.tensor([[0]]), v),
    "mrope_decode_positions length": lambda v: M.mrope_decode_positions(torch.tensor([[0]]), 1, length=v),
    "pair_axes sections[i]": lambda v: M.pair_axes([2, v]),
    "positions_from_cu_seqlens total": lambda v: positions_from_cu_seqlens(torch.tensor([0, 3]), total=v),
    "TableCache min_len": lambda v: TableCache(CFG, min_len=v),
    "TableCache.get n": lambda v: TableCache(CFG).get(v, device="cpu"),
    "layout_permutation head_dim": lambda v: layout_permutation(v, "half", "interleaved"),
    "layout_permutation rotary_dim": lambda v: layout_permutation(16, "half", "interleaved", rotary_dim=v),
    "analysis.decay_distances max_distance": lambda v: A.decay_distances(v),
    "analysis.classify_pairs rtol": lambda v: A.classify_pairs(CFG, rtol=v),
    "analysis.context_coverage context": lambda v: A.context_coverage(CFG, v, 8),
}


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=[repr(v)[:12] for v in BAD_NUMBERS])
@pytest.mark.parametrize("field", sorted(NUMBER_FIELDS))
def test_bad_numbers_are_rope_errors_everywhere(field, value):
    with pytest.raises(RopeError) as e:
        NUMBER_FIELDS[field](value)
    msg = str(e.value)
    assert msg.startswith("expected ") and ", got " in msg and ". Fix: " in msg
    if isinstance(value, str):  # a numeric string is named as a string, wherever it is
        assert f"the string {value!r}" in msg and "not a string" in msg


def test_integral_floats_are_ints_everywhere_and_strings_nowhere():
    """One rule for ints: 4096.0 (as JSON files sometimes write it) is 4096 in every field."""
    assert RopeConfig(64.0, rotary_dim=32.0) == RopeConfig(64, rotary_dim=32)
    assert S.YaRN(4, 4096.0) == S.YaRN(4.0, 4096)
    assert M.AxialRope(32.0, n_axes=2.0).n_axes == 2
    for bad in (64.5, "64"):
        with pytest.raises(RopeError, match="head_dim an int"):
            RopeConfig(bad)
        with pytest.raises(RopeError, match="original_max_position an int"):
            S.YaRN(4.0, bad)


#: name -> a call with a wrong type where a tensor / flag / device is expected
WRONG_TYPES = {
    "cos_sin positions object": lambda: cos_sin(CFG, object()),
    "cos_sin positions ragged list": lambda: cos_sin(CFG, [[1, 2], [3]]),
    "cos_sin positions 2**70": lambda: cos_sin(CFG, 2**70),
    "cos_sin positions [2**70]": lambda: cos_sin(CFG, [2**70]),
    "cos_sin device": lambda: cos_sin(CFG, torch.arange(3), device="nodevice"),
    "cos_sin attention_scaling 'no'": lambda: cos_sin(CFG, torch.arange(3), attention_scaling="no"),
    "angles positions str": lambda: ropekit.angles(CFG, "x"),
    "to_full_width list": lambda: to_full_width([[1.0, 2.0]]),
    "from_full_width list": lambda: from_full_width([[1.0, 2.0]]),
    "from_full_width int tensor": lambda: from_full_width(torch.ones(2, 4, dtype=torch.long)),
    "with_special_tokens list": lambda: M.with_special_tokens([[1.0]], [[0.0]], 1),
    "multi_axis_cos_sin list": lambda: M.multi_axis_cos_sin(CFG, [[0, 0, 0]], [2, 3, 3]),
    "multi_axis_cos_sin interleaved 'yes'": lambda: M.multi_axis_cos_sin(CFG, torch.zeros(1, 3, dtype=torch.long), [4, 2, 2], interleaved="yes"),
    "AxialRope.cos_sin list": lambda: M.AxialRope(16).cos_sin([[0, 0]]),
    "AxialRope.apply list": lambda: M.AxialRope(16).apply([[0.0] * 16], torch.zeros(1, 2, dtype=torch.long)),
    "mrope_positions list": lambda: M.mrope_positions([[0, 0]]),
    "mrope_positions grid str": lambda: M.mrope_positions(torch.ones(1, 4, dtype=torch.long), image_grid_thw="abc"),
    "mrope_decode_positions list": lambda: M.mrope_decode_positions([[0]], 1),
    "grid_positions device": lambda: M.grid_positions((2, 2), device="nodev"),
    "grid_positions normalize 'yes'": lambda: M.grid_positions((2, 2), normalize="yes"),
    "MultiAxisRotaryEmbedding positions list": lambda: ropekit.MultiAxisRotaryEmbedding(CFG, [2, 3, 3])(
        torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), [[0, 0, 0]] * 2
    ),
    "MultiAxisRotaryEmbedding sections str": lambda: ropekit.MultiAxisRotaryEmbedding(CFG, "abc"),
    "MultiAxisRotaryEmbedding table_dtype int": lambda: ropekit.MultiAxisRotaryEmbedding(CFG, [2, 3, 3], table_dtype=torch.int32),
    "MultiAxisRotaryEmbedding interleaved 'no'": lambda: ropekit.MultiAxisRotaryEmbedding(CFG, [2, 3, 3], interleaved="no"),
    "positions_from_cu_seqlens list": lambda: positions_from_cu_seqlens([0, 3]),
    "resolve_positions positions list": lambda: resolve_positions("bshd", 1, 3, positions=[0, 1, 2]),
    "resolve_positions offsets list": lambda: resolve_positions("bshd", 1, 3, offsets=[1]),
    "resolve_positions offsets float": lambda: resolve_positions("bshd", 1, 3, offsets=1.5),
    "resolve_positions offsets 2**70": lambda: resolve_positions("bshd", 1, 3, offsets=2**70),
    "resolve_positions offsets 2**53": lambda: resolve_positions("bshd", 1, 3, offsets=2**53),
    "split_format list": lambda: split_format([[1.0]], "bshd"),
    "xpos positions str": lambda: V.xpos_cos_sin(CFG, "x"),
    "apply_xpos lists": lambda: V.apply_xpos([1], [1], V.xpos_cos_sin(CFG, torch.arange(3))),
    "p_rope attention_scaling 'no'": lambda: V.p_rope_cos_sin(CFG, torch.arange(3), 0.5, attention_scaling="no"),
    "RopeMixed.angles list": lambda: V.RopeMixed(16, 2).angles([[0, 0]]),
    "RopeMixed generator int": lambda: V.RopeMixed(16, 2, generator=5),
    "convert_layout list": lambda: convert_layout([[1.0]], 1, "half", "half"),
    "convert_layout n_heads str": lambda: convert_layout(torch.zeros(4, 2), "2", "half", "half"),
    "shard_positions seq_len str": lambda: shard_positions("8", 2, 0),
    "reference.block_matrix lists": lambda: reference.block_matrix([[1.0]], [[0.0]]),
    "reference.rotation_matrix str": lambda: reference.rotation_matrix(CFG, "x"),
    "RopeConfig.from_dict list": lambda: RopeConfig.from_dict([1]),
    "RopeConfig.from_dict scaling int": lambda: RopeConfig.from_dict({"head_dim": 16, "scaling": 5}),
    "RopeConfig.replace unknown field": lambda: CFG.replace(bogus=1),
    "Scaling.from_dict list": lambda: S.Scaling.from_dict([("rope_type", "linear")]),
    "LongRoPE short_factor None": lambda: S.LongRoPE(None, [1.0], 16, factor=2.0),
    "YaRN truncate 'false'": lambda: S.YaRN(2.0, 16, truncate="false"),
    "DynamicNTK static 'yes'": lambda: S.DynamicNTK(2.0, 16, static="yes"),
    "TableCache cfg str": lambda: TableCache("cfg"),
    "TableCache.get device": lambda: TableCache(CFG).get(4, device="nodev"),
    "analysis.decay_bound distances str": lambda: A.decay_bound(CFG, "10"),
    "analysis.decay_bound distances 10**30": lambda: A.decay_bound(CFG, [10**30]),
    "analysis.decay_bound distances nan": lambda: A.decay_bound(CFG, [float("nan")]),
    "analysis.attention_scores distances str": lambda: A.attention_scores(CFG, "x"),
    "analysis.attention_scores distances -1": lambda: A.attention_scores(CFG, [-1]),
    "analysis.attention_scores distances 1.5": lambda: A.attention_scores(CFG, [1.5]),
}


@pytest.mark.parametrize("case", sorted(WRONG_TYPES))
def test_wrong_types_are_rope_errors(case):
    with pytest.raises(RopeError, match=r"^expected .*, got .*\. Fix: "):
        WRONG_TYPES[case]()


# ------------------------------------------------------------------ overflow / absurd sizes
def test_ntk_base_that_overflows_float64_is_refused():
    with pytest.raises(RopeError, match=r"NTK base .* fits in float64"):
        RopeConfig(4, scaling=S.NTK(1e200))  # 1e200 ** 2 overflows: was OverflowError at use
    with pytest.raises(RopeError, match=r"DynamicNTK base"):
        RopeConfig(4, scaling=S.DynamicNTK(1e200, 16, static=True))
    cfg = RopeConfig(4, scaling=S.DynamicNTK(1e150, 2))  # fine within the context ...
    assert torch.isfinite(cfg.inv_freq(2)).all()
    with pytest.raises(RopeError, match=r"DynamicNTK base"):
        cfg.inv_freq(2**40)  # ... and a RopeError far past it


def test_longrope_context_of_one_is_refused_not_zero_division():
    with pytest.raises(RopeError, match=r"original_max_position an int in \[2, "):
        S.LongRoPE([1.0], [1.0], 1, factor=2.0)


def test_absurd_table_lengths_are_rope_errors(monkeypatch):
    cache = TableCache(CFG)
    with pytest.raises(RopeError, match=r"table of at most 1024 GiB, got 1099511627776 rows x 8 pairs"):
        cache.get(2**40, device="cpu")
    with pytest.raises(RopeError, match=r"table length an int in \[0, 9007199254740993\]"):
        build_table(CFG, 2**60, dtype=torch.float32, device="cpu")
    assert MAX_TABLE_BYTES == 1 << 40
    # an allocation the device refuses is reported with the table's size
    import ropekit.tables as T

    def refuse(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(T, "cos_sin", refuse)
    with pytest.raises(RopeError, match=r"fits in cpu memory, got 1024 rows x 8 pairs .* \(the allocator refused it\)"):
        build_table(CFG, 1024, dtype=torch.float32, device="cpu")
    # other runtime errors are not disguised
    monkeypatch.setattr(T, "cos_sin", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        build_table(CFG, 4, dtype=torch.float32, device="cpu")


def test_huge_offsets_and_positions_are_rope_errors():
    rope = ropekit.RotaryEmbedding(CFG)
    q = torch.randn(1, 4, 2, 16)
    for off in (2**53, 2**70):
        with pytest.raises(RopeError, match=r"offsets \+ s - 1 <= 2\*\*53"):
            rope(q, q, offsets=off)
    assert resolve_positions("bshd", 1, 1, offsets=2**53).tolist() == [2**53]  # the last exact one


# ------------------------------------------------------------------ messages
def test_four_dim_q_with_thd_is_told_to_pack_not_to_reshape_to_bshd():
    rope = ropekit.RotaryEmbedding(CFG)
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(RopeError) as e:
        rope(q, q, format="thd", cu_seqlens=torch.tensor([0, 4]))
    msg = str(e.value)
    assert "3 dims for format 'thd' ([tokens, heads, head_dim]" in msg and "got 4 dims" in msg
    fix = msg.split("Fix: ")[1]
    assert "[t, heads, head_dim]" in fix and "format='bshd'" in fix
    assert "reshape to [batch, seq, heads, head_dim]" not in fix
    with pytest.raises(RopeError, match=r"Fix: reshape to \[batch, heads, seq, head_dim\]"):
        split_format(torch.randn(4, 2, 16), "bhsd")


def test_null_short_factor_is_named_as_null_not_missing():
    with pytest.raises(RopeError, match=r"short_factor a list of numbers, got null \(None\)"):
        S.LongRoPE(None, [1.0], 16, factor=2.0)


def test_scaling_from_dict_names_missing_and_unknown_keys():
    with pytest.raises(RopeError, match=r"YaRN keys .*required: \['factor', 'original_max_position'\].*missing \['factor'\]"):
        S.Scaling.from_dict({"rope_type": "yarn", "original_max_position": 4096})
    with pytest.raises(RopeError, match=r"unknown \['x'\]"):
        S.Scaling.from_dict({"rope_type": "linear", "factor": 2.0, "x": 1})
    y = S.YaRN(4.0, 4096, attention_factor=1.5)
    assert S.Scaling.from_dict(y.to_dict()) == y
    legacy = dict(y.to_dict())
    legacy["attention_factor_override"] = legacy.pop("attention_factor")
    assert S.Scaling.from_dict(legacy) == y  # older dicts still load


# ------------------------------------------------------------------ xPos at extreme positions
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_xpos_tables_are_finite_and_nonzero_up_to_the_limit_and_refused_past_it(dtype):
    cfg = RopeConfig(64)
    lim = V.xpos_max_distance(cfg, dtype=dtype)
    zeta0 = 0.4 / 1.4
    # the limit is where ζ_0^(lim/B) meets the dtype's range
    room = min(math.log(torch.finfo(dtype).max), -math.log(torch.finfo(dtype).tiny))
    assert lim == int(512 * room / abs(math.log(zeta0)))
    c = 10**9  # far positions: only m - c matters
    pos = torch.tensor([c - lim, c - lim // 2, c, c + lim // 3, c + lim])
    t = V.xpos_cos_sin(cfg, pos, center=c, dtype=dtype)
    for cs, sn in ((t.cos_q, t.sin_q), (t.cos_k, t.sin_k)):
        mag = torch.hypot(cs.double(), sn.double())  # = the scale ζ_i^(±(m-c)/B)
        assert torch.isfinite(mag).all() and (mag > 0).all()
    for bad in (pos[:1] - 1, pos[-1:] + 1):
        with pytest.raises(RopeError, match=rf"within {lim} of the center c for xPos tables in {dtype}"):
            V.xpos_cos_sin(cfg, bad, center=c, dtype=dtype)


def test_xpos_default_center_covers_about_71k_positions_in_float32():
    cfg = RopeConfig(64)
    lim = V.xpos_max_distance(cfg)
    assert 35_000 < lim < 36_000
    t = V.xpos_cos_sin(cfg, torch.arange(5 * 10**6, 5 * 10**6 + 2 * lim + 1, 997))  # default c: the middle
    assert all(torch.isfinite(x).all() for x in t)
    with pytest.raises(RopeError, match=r"dtype=torch.float64 \(\|m - c\| up to 289519\)"):
        V.xpos_cos_sin(cfg, torch.tensor([0, 2 * lim + 2]))


# ------------------------------------------------------------------ the reference oracle scales
class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("fmt", ["bshd", "bhsd"])
def test_reference_builds_one_matrix_per_position_not_per_row(layout, fmt):
    """Largest intermediate: O(x.numel()) or O(s·r²), never O(x.numel()·r) (a matrix per row)."""
    b, s, h, d = 3, 16, 32, 64
    cfg = RopeConfig(d, layout=layout)
    cos, sin = cos_sin(cfg, torch.arange(s))
    x = torch.randn(b, s, h, d) if fmt == "bshd" else torch.randn(b, h, s, d)
    c, sn = (cos[:, None], sin[:, None]) if fmt == "bshd" else (cos, sin)
    with _LargestTensor() as mode:
        y = ropekit.apply_rotary(x, c, sn, layout=layout, backend="reference")
    assert mode.largest <= max(2 * x.numel(), s * d * d), mode.largest  # per row would be x.numel() * d
    torch.testing.assert_close(y, ropekit.apply_rotary(x, c, sn, layout=layout, backend="eager"), atol=1e-6, rtol=1e-6)
    R = reference.rotation_matrix(cfg, torch.arange(s))  # [s, d, d], the dense oracle matrix
    xs = x if fmt == "bshd" else x.transpose(1, 2)
    want = torch.einsum("sij,bshj->bshi", R, xs.double()).float()
    got = y if fmt == "bshd" else y.transpose(1, 2)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ head widths
@pytest.mark.parametrize("width", [24, 8])
def test_head_width_other_than_the_config_is_a_rope_error_naming_both(width):
    """Wider heads were accepted with only their first dims rotated; narrower ones failed
    with an error about table widths. Same check in every module of these files."""
    x = torch.randn(1, 4, 2, width)
    pos3, pos2 = torch.zeros(4, 3, dtype=torch.long), M.image_positions(2, 2)
    calls = {
        "MultiAxisRotaryEmbedding": lambda: ropekit.MultiAxisRotaryEmbedding(CFG, [2, 3, 3])(x, x, pos3),
        "AxialRope.apply": lambda: M.AxialRope(16).apply(x, pos2),
        "RopeMixed": lambda: V.RopeMixed(16, 2)(x, x, positions=pos2),
    }
    for name, call in calls.items():
        with pytest.raises(RopeError, match=rf"head width cfg.head_dim = 16, got [qx] of head width {width}.*head_dim={width}"):
            call()
