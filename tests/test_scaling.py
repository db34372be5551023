"""Scaling schemes: against transformers' ROPE_INIT_FUNCTIONS over parameter grids, against
independent closed forms, validation errors, table keys and plain-data round trips."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ropekit import RopeConfig, RopeError
from ropekit.scaling import NTK, DynamicNTK, Linear, Llama3, LongRoPE, Proportional, Scaling, YaRN

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

REL_INV = 1e-6  # inv_freq relative error bound vs transformers (docs/numerics.md)
REL_F64 = 1e-12  # vs transformers' own formulas evaluated in float64 (see _Float64Torch)
ABS_ATT = 1e-9  # attention factor bound


def hf_config(head_dim, base, max_pos, rope_scaling=None, partial=None):
    kw = dict(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_theta=base,
    )
    if partial is not None:
        kw["partial_rotary_factor"] = partial
    if rope_scaling is not None:
        kw["rope_scaling"] = dict(rope_scaling)
    return LlamaConfig(**kw)


class _Float64Torch:
    """``torch`` as seen by transformers' rope module, with float32 meaning float64.

    transformers computes frequencies in float32, whose rounding (amplified by ``ln base``
    in ``base**(2i/r)`` and by cancellation in YaRN/Llama-3 blends) reaches a few 1e-6
    relative. Running *its own code* with float64 isolates the formula from that rounding,
    so the comparison can be 1e-12 instead of "float32-close".
    """

    float = float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def hf_init(kind, cfg, seq_len=None, float64=True):
    import transformers.modeling_rope_utils as mru

    saved = mru.torch
    mru.torch = _Float64Torch() if float64 else torch
    try:
        inv, att = ROPE_INIT_FUNCTIONS[kind](cfg, None, seq_len=seq_len)
    finally:
        mru.torch = saved
    assert inv.dtype == (torch.float64 if float64 else torch.float32)
    return inv.double(), float(att)


def rel_err(ours, theirs):
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(((ours - theirs).abs() / theirs.abs().clamp_min(1e-300)).max())


def rotary(head_dim, partial):
    return int(head_dim * (partial or 1.0))


GRID_DIMS = [(64, None), (128, None), (128, 0.75), (96, 0.5)]


@pytest.mark.parametrize("head_dim,partial", GRID_DIMS)
@pytest.mark.parametrize("factor", [1.0, 2.0, 8.0, 32.5])
def test_linear_vs_transformers(head_dim, partial, factor):
    hf = hf_config(head_dim, 10000.0, 4096, {"rope_type": "linear", "factor": factor}, partial)
    inv, att = hf_init("linear", hf)
    cfg = RopeConfig(head_dim, 10000.0, rotary_dim=rotary(head_dim, partial), scaling=Linear(factor))
    assert rel_err(cfg.inv_freq(), inv) <= REL_F64
    assert abs(cfg.attention_factor - att) <= ABS_ATT


@pytest.mark.parametrize("head_dim,partial", GRID_DIMS)
@pytest.mark.parametrize("factor", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("seq_len", [None, 100, 4096, 4097, 10000, 100000])
def test_dynamic_vs_transformers(head_dim, partial, factor, seq_len):
    hf = hf_config(head_dim, 10000.0, 4096, {"rope_type": "dynamic", "factor": factor}, partial)
    inv, att = hf_init("dynamic", hf, seq_len)
    cfg = RopeConfig(head_dim, 10000.0, rotary_dim=rotary(head_dim, partial), scaling=DynamicNTK(factor, 4096))
    assert rel_err(cfg.inv_freq(seq_len), inv) <= REL_F64
    assert abs(cfg.attention_factor - att) <= ABS_ATT


YARN_GRID = list(
    itertools.product(
        [(64, None), (128, None), (128, 0.5)],
        [10000.0, 1e6, 150000.0],
        [2.0, 4.0, 32.0, 40.0],
        [(32.0, 1.0), (16.0, 2.0)],
        [(None, None), (1.0, 1.0), (0.707, 1.0), (0.707, None)],
        [True, False],
    )
)


@pytest.mark.parametrize("dims,base,factor,betas,mscales,truncate", YARN_GRID[::3])
def test_yarn_vs_transformers(dims, base, factor, betas, mscales, truncate):
    head_dim, partial = dims
    orig = 4096
    rs = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig,
          "beta_fast": betas[0], "beta_slow": betas[1], "truncate": truncate}  # fmt: skip
    if mscales[0] is not None:
        rs["mscale"] = mscales[0]
    if mscales[1] is not None:
        rs["mscale_all_dim"] = mscales[1]
    hf = hf_config(head_dim, base, int(orig * factor), rs, partial)
    inv, att = hf_init("yarn", hf)
    y = YaRN(factor, orig, beta_fast=betas[0], beta_slow=betas[1], mscale=mscales[0] if mscales[0] else 1.0,
             mscale_all_dim=mscales[1] or 0.0, truncate=truncate)  # fmt: skip
    cfg = RopeConfig(head_dim, base, rotary_dim=rotary(head_dim, partial), scaling=y)
    assert rel_err(cfg.inv_freq(), inv) <= REL_F64
    assert abs(cfg.attention_factor - att) <= ABS_ATT


def test_yarn_attention_factor_override_and_deepseek_values():
    hf = hf_config(64, 10000.0, 163840, {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                         "attention_factor": 0.5})  # fmt: skip
    inv, att = hf_init("yarn", hf)
    cfg = RopeConfig(64, 10000.0, scaling=YaRN(40.0, 4096, attention_factor=0.5))
    assert cfg.attention_factor == att == 0.5
    assert rel_err(cfg.inv_freq(), inv) <= REL_F64
    # independent formula (YaRN paper eq. 22 with DeepSeek's mscale): 0.1*m*ln(s)+1
    y = YaRN(40.0, 4096, mscale=0.707, mscale_all_dim=1.0)
    expect = (0.1 * 0.707 * math.log(40.0) + 1) / (0.1 * 1.0 * math.log(40.0) + 1)
    assert abs(RopeConfig(64, scaling=y).attention_factor - expect) <= 1e-15


LONG_GRID = [(96, None, 4096, 131072), (128, 0.75, 4096, 131072), (64, None, 2048, 8192)]


@pytest.mark.parametrize("head_dim,partial,orig,max_pos", LONG_GRID)
@pytest.mark.parametrize("seq_len", [None, 1, 2048, 2049, 4096, 4097, 200000])
@pytest.mark.parametrize("explicit", [None, "factor", "attention_factor"])
def test_longrope_vs_transformers(head_dim, partial, orig, max_pos, seq_len, explicit):
    r = rotary(head_dim, partial)
    g = torch.Generator().manual_seed(r + orig)
    short = (1 + torch.rand(r // 2, generator=g)).tolist()
    long = (1 + 60 * torch.rand(r // 2, generator=g)).tolist()
    rs = {"rope_type": "longrope", "short_factor": short, "long_factor": long, "original_max_position_embeddings": orig}
    kw = {}
    if explicit == "factor":
        rs["factor"] = kw["factor"] = 16.0
    elif explicit == "attention_factor":
        rs["attention_factor"] = kw["attention_factor"] = 1.25
        kw["factor"] = max_pos / orig
    else:
        kw["factor"] = max_pos / orig  # what transformers infers; the loader fills it the same way
    hf = hf_config(head_dim, 10000.0, max_pos, rs, partial)
    inv, att = hf_init("longrope", hf, seq_len)
    cfg = RopeConfig(head_dim, 10000.0, rotary_dim=r, scaling=LongRoPE(short, long, orig, **kw))
    # transformers builds the LongRoPE exponent with `.float()` (float32 even under _Float64Torch)
    assert rel_err(cfg.inv_freq(seq_len), inv) <= REL_INV
    assert abs(cfg.attention_factor - att) <= ABS_ATT


@pytest.mark.parametrize("head_dim,partial", GRID_DIMS)
@pytest.mark.parametrize("base", [10000.0, 500000.0])
@pytest.mark.parametrize("factor,low,high,orig", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192),
                                                  (16.0, 1.0, 1.0, 8192), (4.0, 2.0, 8.0, 2048)])  # fmt: skip
def test_llama3_vs_transformers(head_dim, partial, base, factor, low, high, orig):
    rs = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
          "original_max_position_embeddings": orig}  # fmt: skip
    hf = hf_config(head_dim, base, orig * 16, rs, partial)
    inv, att = hf_init("llama3", hf)
    cfg = RopeConfig(head_dim, base, rotary_dim=rotary(head_dim, partial), scaling=Llama3(factor, low, high, orig))
    ours = cfg.inv_freq()
    assert torch.isfinite(ours).all()
    assert rel_err(ours, inv) <= REL_F64
    assert abs(cfg.attention_factor - att) <= ABS_ATT


def test_llama3_equal_band_factors_is_a_step_function():
    # Llama 4 (low == high): wavelengths below L keep θ, above L get θ/factor (independent form).
    cfg = RopeConfig(128, 500000.0, scaling=Llama3(16.0, 1.0, 1.0, 8192))
    theta = cfg.base_inv_freq()
    wl = 2 * math.pi / theta
    expect = torch.where(wl > 8192, theta / 16.0, theta)
    assert torch.equal(cfg.inv_freq(), expect)
    # the exact edge wavelength stays unscaled instead of 0/0
    edge = RopeConfig(2, base=8192 / (2 * math.pi) * 1.0, scaling=Llama3(16.0, 1.0, 1.0, 8192))
    assert torch.isfinite(edge.inv_freq()).all()


@pytest.mark.skipif("proportional" not in ROPE_INIT_FUNCTIONS, reason="transformers without proportional RoPE")
@pytest.mark.parametrize("head_dim,prf,factor", [(512, 0.25, 1.0), (256, 0.5, 1.0), (64, 1.0, 2.0), (80, 0.3, 1.0)])
def test_proportional_vs_transformers(head_dim, prf, factor):
    rs = {"rope_type": "proportional", "partial_rotary_factor": prf, "factor": factor}
    hf = hf_config(head_dim, 1e6, 4096, rs)
    inv, att = hf_init("proportional", hf)
    cfg = RopeConfig(head_dim, 1e6, scaling=Proportional(prf, factor))
    ours = cfg.inv_freq()
    assert ours.shape == inv.shape
    nz = inv != 0
    assert torch.equal(ours != 0, nz)
    assert rel_err(ours[nz], inv[nz]) <= REL_F64
    assert cfg.attention_factor == att


def test_proportional_denominator_is_head_dim():
    cfg = RopeConfig(512, 1e6, scaling=Proportional(0.25))
    k = 64  # int(0.25 * 512 // 2)
    i = torch.arange(k, dtype=torch.float64)
    assert torch.allclose(cfg.inv_freq()[:k], 1e6 ** (-2 * i / 512), rtol=1e-15, atol=0)
    assert (cfg.inv_freq()[k:] == 0).all()


def test_default_vs_model_class_init():
    # unscaled RoPE: transformers' model classes compute 1/base^(2i/d) themselves
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for hd, base in [(64, 10000.0), (128, 500000.0), (256, 1e6)]:
        m = LlamaRotaryEmbedding(hf_config(hd, base, 4096))
        assert rel_err(RopeConfig(hd, base).inv_freq(), m.inv_freq.double()) <= REL_INV


def test_ntk_matches_hunyuan_alpha_and_closed_form():
    from transformers.models.hunyuan_v1_dense.modeling_hunyuan_v1_dense import HunYuanDenseV1RotaryEmbedding

    hc = transformers.HunYuanDenseV1Config(hidden_size=256, num_attention_heads=2, head_dim=128,
                                           rope_theta=10000.0, rope_scaling={"type": "dynamic", "alpha": 1000.0,
                                                                             "factor": 1.0})  # fmt: skip
    inv, att = HunYuanDenseV1RotaryEmbedding.compute_ntk_alpha_rope_parameters(hc)
    cfg = RopeConfig(128, 10000.0, scaling=NTK(1000.0))
    assert rel_err(cfg.inv_freq(), inv.double()) <= REL_INV
    # NTK-aware property: the lowest frequency is divided by exactly `factor`, the highest kept
    plain = RopeConfig(128, 10000.0).inv_freq()
    ntk = RopeConfig(128, 10000.0, scaling=NTK(8.0)).inv_freq()
    assert ntk[0] == plain[0] == 1.0
    assert abs(float(plain[-1] / ntk[-1]) - 8.0) < 1e-12


def test_dynamic_semantics_below_and_above_max_position():
    s = DynamicNTK(factor=2.0, max_position=4096)
    cfg = RopeConfig(64, 10000.0, scaling=s)
    plain = cfg.base_inv_freq()
    for L in (None, 1, 4096):
        assert torch.equal(cfg.inv_freq(L), plain) and cfg.table_key(L) is None
    above = cfg.inv_freq(8192)
    base = 10000.0 * (2.0 * 8192 / 4096 - 1.0) ** (64 / 62)  # independent form of the new base
    i = torch.arange(0, 64, 2, dtype=torch.float64)
    assert torch.allclose(above, base ** (-i / 64), rtol=1e-14, atol=0)
    assert cfg.table_key(8192) == 8192 and cfg.table_key(8193) == 8193
    # static: one table for every length, frozen at factor * max_position
    st = RopeConfig(64, 10000.0, scaling=DynamicNTK(2.0, 4096, static=True))
    assert torch.equal(st.inv_freq(10), st.inv_freq(10**6))
    assert torch.equal(st.inv_freq(None), cfg.inv_freq(8192))
    assert st.table_key(10) is None and st.table_key(10**6) is None


def test_table_key_changes_exactly_when_inv_freq_changes():
    long = RopeConfig(8, scaling=LongRoPE([1, 2, 3, 4], [5, 6, 7, 8], 100, factor=4.0))
    dyn = RopeConfig(8, scaling=DynamicNTK(2.0, 100))
    for cfg in (long, dyn):
        lengths = [None, 1, 99, 100, 101, 150, 1000]
        for a, b in itertools.product(lengths, lengths):
            same_key = cfg.table_key(a) == cfg.table_key(b)
            same_inv = torch.equal(cfg.inv_freq(a), cfg.inv_freq(b))
            assert same_key == same_inv, (cfg.scaling, a, b)
    assert long.table_key(100) == "short" and long.table_key(101) == "long"
    assert torch.equal(long.inv_freq(101), long.base_inv_freq() / torch.tensor([5.0, 6, 7, 8], dtype=torch.float64))
    for s in (Linear(2.0), NTK(2.0), YaRN(2.0, 64), Llama3(8.0, 1.0, 4.0, 64), Proportional(0.5)):
        assert RopeConfig(8, scaling=s).table_key(10**6) is None and not s.length_dependent
    assert DynamicNTK.length_dependent and LongRoPE.length_dependent


def test_longrope_factor_choice_uses_total_length_in_cos_sin():
    from ropekit import cos_sin

    s = LongRoPE([1.0] * 4, [4.0] * 4, original_max_position=16, factor=4.0)
    cfg = RopeConfig(8, scaling=s)
    pos = torch.arange(10)
    short = cos_sin(cfg, pos)  # default seq_len = 10 <= 16: short factors
    long = cos_sin(cfg, pos, seq_len=32)  # final length 32 > 16: long factors for every token
    ref_long = cos_sin(RopeConfig(8, scaling=Linear(4.0)), pos, attention_scaling=False)
    f = cfg.attention_factor
    assert torch.allclose(long[0], (ref_long[0].double() * f).float(), atol=1e-7)
    assert torch.allclose(short[0], (cos_sin(RopeConfig(8), pos)[0].double() * f).float(), atol=1e-7)


BAD = [
    (lambda: Linear(0.5), "factor"),
    (lambda: NTK(0.9), "factor"),
    (lambda: DynamicNTK(0.5, 4096), "factor"),
    (lambda: DynamicNTK(2.0, 0), "max_position"),
    (lambda: YaRN(0.5, 4096), "factor"),
    (lambda: YaRN(2.0, -1), "original_max_position"),
    (lambda: YaRN(2.0, 4096, beta_fast=1.0, beta_slow=32.0), "beta_fast"),
    (lambda: YaRN(2.0, 4096, beta_slow=0.0), "beta_slow"),
    (lambda: YaRN(2.0, 4096, mscale=-1.0), "mscale"),
    (lambda: YaRN(2.0, 4096, attention_factor=0.0), "attention_factor"),
    (lambda: YaRN(2.0, 4096, truncate="no"), "truncate"),
    (lambda: LongRoPE([1.0], [1.0], 4096), "factor"),
    (lambda: LongRoPE([1.0, -1.0], [1.0, 1.0], 4096, factor=2.0), "short_factor"),
    (lambda: LongRoPE([1.0], "abc", 4096, factor=2.0), "long_factor"),
    (lambda: LongRoPE([1.0], [1.0], 4096, factor=0.5), "factor"),
    (lambda: Llama3(0.5, 1.0, 4.0, 8192), "factor"),
    (lambda: Llama3(8.0, 4.0, 1.0, 8192), "high_freq_factor"),
    (lambda: Llama3(8.0, 0.0, 4.0, 8192), "low_freq_factor"),
    (lambda: Proportional(0.0), "partial_rotary_factor"),
    (lambda: Proportional(1.5), "partial_rotary_factor"),
    (lambda: RopeConfig(8, scaling=LongRoPE([1.0] * 3, [1.0] * 4, 64, factor=2.0)), "short_factor"),
    (lambda: RopeConfig(8, scaling=LongRoPE([1.0] * 4, [1.0] * 5, 64, factor=2.0)), "long_factor"),
    (lambda: RopeConfig(8, rotary_dim=4, scaling=Proportional(0.5)), "rotary_dim"),
    (lambda: RopeConfig(8, rotary_dim=2, scaling=NTK(2.0)), "rotary_dim"),
    (lambda: Scaling.from_dict({"rope_type": "nope"}), "rope_type"),
]


@pytest.mark.parametrize("make,key", BAD, ids=[k for _, k in BAD])
def test_bad_parameters_raise_rope_error_naming_the_key(make, key):
    with pytest.raises(RopeError) as e:
        make()
    msg = str(e.value)
    assert key in msg and "expected" in msg and "Fix:" in msg


@pytest.mark.parametrize(
    "scheme",
    [Linear(2.0), NTK(3.0), DynamicNTK(2.0, 64, static=True), YaRN(4.0, 64, mscale=0.707, mscale_all_dim=1.0,
     attention_factor=1.1, truncate=False), LongRoPE([1.0, 2.0], [3.0, 4.0], 64, factor=8.0),
     Llama3(8.0, 1.0, 4.0, 64), Proportional(0.5, 2.0)],  # fmt: skip
    ids=lambda s: type(s).__name__,
)
def test_plain_data_round_trip(scheme):
    import json

    cfg = RopeConfig(4, scaling=scheme) if not isinstance(scheme, Proportional) else RopeConfig(8, scaling=scheme)
    back = RopeConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and hash(back) == hash(cfg)
    assert torch.equal(back.inv_freq(100), cfg.inv_freq(100)) and back.attention_factor == cfg.attention_factor


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.2-1b", "llama-4-scout", "qwen2.5-7b-yarn", "phi-3.5-mini",
                                  "phi-4-mini", "deepseek-v3", "gpt-oss-20b"])  # fmt: skip
@pytest.mark.parametrize("seq_len", [None, 10**6])
def test_real_configs_vs_transformers_float32(name, seq_len):
    # The issue's literal bound, against transformers' float32 output, on real checkpoints.
    from ropekit import presets

    hf_dict = dict(presets.info(name)["hf_config"])
    kind = (hf_dict["rope_scaling"].get("rope_type") or hf_dict["rope_scaling"]["type"])
    hf = transformers.AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict)
    if hasattr(hf, "get_text_config"):
        hf = hf.get_text_config()
    inv32, att = hf_init(kind, hf, seq_len, float64=False)
    cfg = presets.get(name)
    assert rel_err(cfg.inv_freq(seq_len), inv32) <= REL_INV
    assert abs(cfg.attention_factor - att) <= ABS_ATT
