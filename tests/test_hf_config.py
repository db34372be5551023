"""Config loading (dicts, paths, PretrainedConfig; 4.x and 5.x names) and parity with the
rotary-embedding modules of tiny transformers models built from configs (no weights)."""

from __future__ import annotations

import copy
import inspect
import json
import math
import os

import pytest
import torch

from ropekit import RopeConfig, RopeError, _hf_table, cos_sin, to_full_width
from ropekit.hf import layout_for_model_type, rope_config_from_hf, transformers_cos_sin
from ropekit.scaling import NTK, DynamicNTK, Linear, Llama3, LongRoPE, Proportional, YaRN

DATA = os.path.join(os.path.dirname(__file__), "data")


def data(name):
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- loader
def test_dict_path_and_directory_agree(tmp_path):
    d = data("llama-3.1-8b-instruct.json")
    (tmp_path / "config.json").write_text(json.dumps(d))
    a = rope_config_from_hf(d)
    b = rope_config_from_hf(str(tmp_path / "config.json"))
    c = rope_config_from_hf(tmp_path)
    e = RopeConfig.from_hf(d)
    assert a == b == c == e
    assert a == RopeConfig(128, 500000.0, scaling=Llama3(8.0, 1.0, 4.0, 8192))


def test_real_config_files():
    phi = rope_config_from_hf(os.path.join(DATA, "phi-3.5-mini-instruct.json"))
    assert (phi.head_dim, phi.rotary_dim, phi.layout) == (96, 96, "half")
    assert isinstance(phi.scaling, LongRoPE) and phi.scaling.factor == 32.0  # 131072 / 4096
    assert abs(phi.attention_factor - math.sqrt(1 + math.log(32) / math.log(4096))) < 1e-15
    phi4 = rope_config_from_hf(os.path.join(DATA, "phi-4-mini-instruct.json"))
    assert (phi4.head_dim, phi4.rotary_dim, len(phi4.scaling.long_factor)) == (128, 96, 48)
    ds = rope_config_from_hf(os.path.join(DATA, "deepseek-v3.json"))
    assert (ds.head_dim, ds.rotary_dim, ds.rotary_offset, ds.layout) == (192, 64, 128, "interleaved")  # [nope | rope]
    assert ds.scaling == YaRN(40.0, 4096, mscale=1.0, mscale_all_dim=1.0)
    assert ds.attention_factor == 1.0  # mscale == mscale_all_dim: the ratio is 1


def test_sparse_gemma3_file_uses_class_defaults():
    pytest.importorskip("transformers")
    g = rope_config_from_hf(os.path.join(DATA, "gemma-3-4b-it.json"))
    assert set(g) == {"full_attention", "sliding_attention"}
    assert g["full_attention"] == RopeConfig(256, 1e6, scaling=Linear(8.0))
    assert g["sliding_attention"] == RopeConfig(256, 10000.0)


def test_transformers_4x_names():
    neox = rope_config_from_hf({"model_type": "gpt_neox", "hidden_size": 512, "num_attention_heads": 8,
                                "rotary_pct": 0.25, "rotary_emb_base": 20000})  # fmt: skip
    assert (neox.head_dim, neox.rotary_dim, neox.base, neox.layout) == (64, 16, 20000.0, "half")
    gptj = rope_config_from_hf({"model_type": "gptj", "n_embd": 4096, "n_head": 16, "rotary_dim": 64})
    assert (gptj.head_dim, gptj.rotary_dim, gptj.layout) == (256, 64, "interleaved")
    su = rope_config_from_hf({"model_type": "phi3", "hidden_size": 64, "num_attention_heads": 2,
                              "max_position_embeddings": 8192, "original_max_position_embeddings": 4096,
                              "rope_scaling": {"type": "su", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16}})  # fmt: skip
    assert isinstance(su.scaling, LongRoPE) and su.scaling.factor == 2.0
    phi_yarn = rope_config_from_hf({"model_type": "phi3", "hidden_size": 64, "num_attention_heads": 2,
                                    "max_position_embeddings": 8192, "original_max_position_embeddings": 4096,
                                    "rope_scaling": {"type": "yarn", "short_factor": [1.0] * 16,
                                                     "long_factor": [2.0] * 16}})  # fmt: skip
    assert isinstance(phi_yarn.scaling, LongRoPE)
    typ = rope_config_from_hf({"hidden_size": 64, "num_attention_heads": 2, "max_position_embeddings": 2048,
                               "rope_scaling": {"type": "dynamic", "factor": 2.0}})  # fmt: skip
    assert typ.scaling == DynamicNTK(2.0, 2048)
    # head_dim given: transformers 4.57's HunYuan rotary module computes alpha's base from config.head_dim
    # (None by default: it raises, and from_hf, which checks the scaling against that module, refuses)
    hunyuan = rope_config_from_hf({"model_type": "hunyuan_v1_dense", "hidden_size": 256, "num_attention_heads": 2,
                                   "head_dim": 128, "rope_scaling": {"type": "dynamic", "alpha": 1000.0, "factor": 1.0}})  # fmt: skip
    assert hunyuan.scaling == NTK(1000.0)
    partial = rope_config_from_hf({"hidden_size": 256, "num_attention_heads": 2, "partial_rotary_factor": 0.5})
    assert partial.rotary_dim == 64
    glm = rope_config_from_hf({"model_type": "chatglm", "hidden_size": 4096, "num_attention_heads": 32,
                               "kv_channels": 128, "rope_ratio": 500})  # fmt: skip
    assert (glm.head_dim, glm.rotary_dim, glm.base, glm.layout) == (128, 64, 5_000_000.0, "interleaved")
    mrope = rope_config_from_hf({"model_type": "qwen2_vl", "hidden_size": 3584, "num_attention_heads": 28,
                                 "rope_theta": 1e6, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}})  # fmt: skip
    assert mrope == RopeConfig(128, 1e6)


def test_transformers_5x_names_and_per_layer():
    flat = rope_config_from_hf({"hidden_size": 128, "num_attention_heads": 2, "max_position_embeddings": 65536,
                                "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                    "original_max_position_embeddings": 16384,
                                                    "partial_rotary_factor": 0.5}})  # fmt: skip
    assert flat == RopeConfig(64, 1e6, rotary_dim=32, scaling=YaRN(4.0, 16384))
    nested = rope_config_from_hf({"model_type": "gemma4_text", "hidden_size": 64, "num_attention_heads": 4,
                                  "head_dim": 16, "global_head_dim": 32,
                                  "layer_types": ["sliding_attention", "full_attention"],
                                  "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                      "full_attention": {"rope_type": "proportional",
                                                                         "partial_rotary_factor": 0.25,
                                                                         "rope_theta": 1e6}},
                                  })  # fmt: skip
    assert nested["sliding_attention"] == RopeConfig(16, 1e4)
    assert nested["full_attention"] == RopeConfig(32, 1e6, scaling=Proportional(0.25))
    nope = rope_config_from_hf({"hidden_size": 64, "num_attention_heads": 4,
                                "rope_parameters": {"full_attention": None, "sliding_attention": {"rope_theta": 1e4}}})  # fmt: skip
    assert nope == {"full_attention": None, "sliding_attention": RopeConfig(16, 1e4)}


def test_yarn_factor_and_original_defaults_follow_transformers():
    # "factor": null -> max_position / original (transformers 5.24 warns and does the same);
    # an absent factor is refused, as transformers refuses it (tests/test_contracts_pending.py)
    y = rope_config_from_hf({"hidden_size": 128, "num_attention_heads": 2, "max_position_embeddings": 16384,
                             "rope_scaling": {"type": "yarn", "factor": None, "original_max_position_embeddings": 4096}})  # fmt: skip
    assert y.scaling.factor == 4.0
    # original missing -> max_position_embeddings; top-level original wins (Phi-3 rule of 5.x;
    # transformers 4.x reads Llama 3's original from rope_scaling only)
    l3 = {"hidden_size": 128, "num_attention_heads": 2, "max_position_embeddings": 1000,
          "original_max_position_embeddings": 500,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 9}}  # fmt: skip
    assert rope_config_from_hf(l3, read_code=False).scaling.original_max_position == 500
    four = (_hf_table.installed_version() or "5").startswith("4.")
    assert rope_config_from_hf(l3).scaling.original_max_position == (9 if four else 500)


@pytest.mark.parametrize(
    "mt,expect",
    [("gptj", "interleaved"), ("codegen", "interleaved"), ("cohere", "interleaved"), ("glm", "interleaved"),
     ("chatglm", "interleaved"), ("deepseek_v2", "interleaved"), ("deepseek_v3", "interleaved"),
     ("llama4_text", "interleaved"), ("llama", "half"), ("qwen2", "half"), ("gpt_neox", "half"),
     ("phi3", "half"), ("gemma3_text", "half"), ("gpt_oss", "half"), ("something_new", "half")],  # fmt: skip
)
def test_layout_inference(mt, expect):
    assert layout_for_model_type(mt) == expect  # the fallback rules (no modeling code)
    d = {"model_type": mt, "hidden_size": 64, "num_attention_heads": 2, "rotary_dim": 32}
    assert rope_config_from_hf(d, read_code=False).layout == expect
    cfg = rope_config_from_hf(d)  # measured from transformers' code when installed
    cfgs = cfg.values() if isinstance(cfg, dict) else [cfg]
    assert all(c.layout == expect for c in cfgs if c is not None)


def test_layout_override_flag_and_overrides():
    d = {"model_type": "deepseek_v3", "hidden_size": 64, "num_attention_heads": 2, "qk_rope_head_dim": 16}
    assert rope_config_from_hf(d).layout == "interleaved"
    assert rope_config_from_hf(dict(d, rope_interleave=False)).layout == "half"
    assert rope_config_from_hf(d, layout="half").layout == "half"
    assert rope_config_from_hf(d, base=5e5).base == 5e5


@pytest.mark.parametrize(
    "obj,match",
    [({"hidden_size": 64, "num_attention_heads": 2, "rope_scaling": {"rope_type": "xpos"}}, "longrope"),
     ({"hidden_size": 64, "num_attention_heads": 2, "rope_scaling": {"rope_type": "linear"}}, "'factor'"),
     ({"hidden_size": 64, "num_attention_heads": 2, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
      "low_freq_factor"),
     ({"hidden_size": 64, "num_attention_heads": 2, "rope_scaling": {"rope_type": "longrope", "factor": 2.0,
       "short_factor": [1.0] * 3, "long_factor": [1.0] * 16}, "original_max_position_embeddings": 4}, "short_factor"),
     ({"rope_theta": 1e4}, "head_dim"),
     ("/nonexistent/config.json", "path"),
     (42, "PretrainedConfig")],  # fmt: skip
)
def test_loader_errors(obj, match):
    with pytest.raises(RopeError, match=match) as e:
        rope_config_from_hf(obj)
    assert "Fix:" in str(e.value)


def test_unknown_override_rejected():
    with pytest.raises(RopeError, match="overrides"):
        rope_config_from_hf({"hidden_size": 64, "num_attention_heads": 2}, theta=5.0)


# ------------------------------------------------------------- tiny transformers models
transformers = pytest.importorskip("transformers")


def module_tables(module, pos, layer_type=None):
    x = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        out = module(x, pos) if layer_type is None else module(x, pos, layer_type)
    return out


def angle_tol(cfg, pos):
    # transformers' float32 angle m·θ carries ~|m·θ|·2^-23 error (plus a few ulp from
    # float32 inv_freq); ropekit's angle is exact, so the tables may differ by that much.
    amax = float(pos.max()) * float(cfg.inv_freq(int(pos.max()) + 1).max())
    return (8 * amax * 2.0**-24 + 2.0**-23) * max(1.0, cfg.attention_factor)


def check_module(cfg, module, pos, layer_type=None, full_width="cat"):
    cos_t, sin_t = module_tables(module, pos, layer_type)
    c32, s32 = transformers_cos_sin(cfg, pos)
    if full_width == "cat":
        c32, s32 = to_full_width(c32), to_full_width(s32)
    assert torch.equal(c32, cos_t) and torch.equal(s32, sin_t), "transformers_cos_sin is not bit-exact"
    c, s = cos_sin(cfg, pos)
    if full_width == "cat":
        c, s = to_full_width(c), to_full_width(s)
    tol = angle_tol(cfg, pos)
    assert (c - cos_t).abs().max() <= tol and (s - sin_t).abs().max() <= tol


def pos_batch(n, step=1):
    return torch.stack([torch.arange(0, n * step, step), torch.arange(3, 3 + n * step, step)])  # [b=2, s]


def test_llama_llama3_module():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=131072,
                                  rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192})  # fmt: skip
    check_module(rope_config_from_hf(hf), LlamaRotaryEmbedding(hf), pos_batch(64, 97))


def test_llama_attention_output_with_our_tables():
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    torch.manual_seed(0)
    hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=4096, rope_theta=500000.0,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})  # fmt: skip
    hf._attn_implementation = "eager"
    attn = LlamaAttention(hf, layer_idx=0).eval()
    cfg = rope_config_from_hf(hf)
    pos = pos_batch(12, 5)
    h = torch.randn(2, 12, 64)
    mask = torch.full((12, 12), float("-inf")).triu(1)[None, None].expand(2, 1, 12, 12)
    with torch.no_grad():
        ref = attn(h, position_embeddings=LlamaRotaryEmbedding(hf)(h, pos), attention_mask=mask)[0]
        c, s = transformers_cos_sin(cfg, pos)
        same = attn(h, position_embeddings=(to_full_width(c), to_full_width(s)), attention_mask=mask)[0]
        c, s = cos_sin(cfg, pos)
        exact = attn(h, position_embeddings=(to_full_width(c), to_full_width(s)), attention_mask=mask)[0]
    assert torch.equal(same, ref)
    assert torch.allclose(exact, ref, atol=1e-5, rtol=1e-5)


def test_qwen2_yarn_module():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    hf = transformers.Qwen2Config(hidden_size=256, num_attention_heads=2, max_position_embeddings=131072,
                                  rope_theta=1e6, rope_scaling={"type": "yarn", "factor": 4.0,
                                                                "original_max_position_embeddings": 32768})  # fmt: skip
    cfg = rope_config_from_hf(hf)
    assert isinstance(cfg.scaling, YaRN) and cfg.attention_factor > 1
    check_module(cfg, Qwen2RotaryEmbedding(hf), pos_batch(50, 33))


@pytest.mark.parametrize("n", [30, 200])  # original_max_position = 64: below and above
def test_phi3_longrope_module_both_sides(n):
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    g = torch.Generator().manual_seed(1)
    hf = transformers.Phi3Config(hidden_size=128, num_attention_heads=4, num_key_value_heads=4,
                                 max_position_embeddings=1024, original_max_position_embeddings=64,
                                 rope_theta=10000.0, pad_token_id=0,
                                 rope_scaling={"type": "longrope",
                                               "short_factor": (1 + torch.rand(16, generator=g)).tolist(),
                                               "long_factor": (1 + 30 * torch.rand(16, generator=g)).tolist()})  # fmt: skip
    cfg = rope_config_from_hf(hf)
    pos = pos_batch(n)
    check_module(cfg, Phi3RotaryEmbedding(hf), pos)
    assert cfg.table_key(int(pos.max()) + 1) == ("long" if n > 64 else "short")


def test_gpt_neox_partial_module():
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding

    hf = transformers.GPTNeoXConfig(hidden_size=256, num_attention_heads=4, rotary_pct=0.25, rotary_emb_base=10000)
    cfg = rope_config_from_hf(hf)
    assert (cfg.head_dim, cfg.rotary_dim) == (64, 16)
    check_module(cfg, GPTNeoXRotaryEmbedding(hf), pos_batch(40, 7))


def test_gptj_interleaved_sinusoids():
    from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions

    hf = transformers.GPTJConfig(n_embd=256, n_head=4, rotary_dim=16, n_positions=300)
    cfg = rope_config_from_hf(hf)
    assert (cfg.head_dim, cfg.rotary_dim, cfg.layout) == (64, 16, "interleaved")
    table = create_sinusoidal_positions(300, 16)  # [300, 16] = cat(sin, cos), half width each
    pos = torch.arange(300)
    c32, s32 = transformers_cos_sin(cfg, pos)
    assert torch.equal(s32, table[:, :8]) and torch.equal(c32, table[:, 8:])
    c, s = cos_sin(cfg, pos)
    tol = angle_tol(cfg, pos)
    assert (c - table[:, 8:]).abs().max() <= tol and (s - table[:, :8]).abs().max() <= tol


def test_deepseek_v3_yarn_mscale_module():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    hf = transformers.DeepseekV3Config(hidden_size=256, num_attention_heads=4, qk_rope_head_dim=16,
                                       qk_nope_head_dim=32, v_head_dim=32, kv_lora_rank=32, q_lora_rank=64,
                                       max_position_embeddings=163840, rope_theta=10000.0,
                                       rope_scaling={"type": "yarn", "factor": 40, "mscale": 0.707,
                                                     "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1,
                                                     "original_max_position_embeddings": 4096})  # fmt: skip
    cfg = rope_config_from_hf(hf)
    assert (cfg.rotary_dim, cfg.layout) == (16, "interleaved")
    assert cfg.attention_factor != 1.0  # mscale != mscale_all_dim
    check_module(cfg, DeepseekV3RotaryEmbedding(hf), pos_batch(30, 101))


def test_gemma3_per_layer_module():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    hf = transformers.Gemma3TextConfig(hidden_size=64, num_attention_heads=2, head_dim=32, num_hidden_layers=6,
                                       rope_theta=1e6, rope_local_base_freq=10000.0,
                                       rope_scaling={"rope_type": "linear", "factor": 8.0})  # fmt: skip
    cfgs = rope_config_from_hf(hf)
    module = Gemma3RotaryEmbedding(hf)
    if "layer_type" not in inspect.signature(module.forward).parameters:
        # transformers 4.x: a second module for the sliding layers, built by Gemma3TextModel
        # from a copy of the config with the local base and no scaling
        local = copy.deepcopy(hf)
        local.rope_theta, local.rope_scaling = local.rope_local_base_freq, {"rope_type": "default"}
        modules = {"full_attention": module, "sliding_attention": Gemma3RotaryEmbedding(local)}
        for layer_type, cfg in cfgs.items():
            check_module(cfg, modules[layer_type], pos_batch(40, 11))
        return
    for layer_type, cfg in cfgs.items():
        check_module(cfg, module, pos_batch(40, 11), layer_type=layer_type)


def test_gemma4_proportional_module():
    gm = pytest.importorskip("transformers.models.gemma4.modeling_gemma4")
    hf = transformers.Gemma4TextConfig(hidden_size=64, num_attention_heads=2, head_dim=16, global_head_dim=32,
                                       num_hidden_layers=2, num_key_value_heads=1,
                                       layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    cfgs = rope_config_from_hf(hf)
    assert cfgs["full_attention"] == RopeConfig(32, 1e6, scaling=Proportional(0.25))
    module = gm.Gemma4TextRotaryEmbedding(hf)
    for layer_type, cfg in cfgs.items():
        check_module(cfg, module, pos_batch(20, 13), layer_type=layer_type)


def test_gpt_oss_yarn_untruncated_module():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    hf = transformers.GptOssConfig(hidden_size=128, num_attention_heads=2, head_dim=64, num_key_value_heads=1,
                                   num_local_experts=2, max_position_embeddings=131072, rope_theta=150000.0,
                                   rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                 "beta_slow": 1.0, "original_max_position_embeddings": 4096,
                                                 "truncate": False})  # fmt: skip
    cfg = rope_config_from_hf(hf)
    assert cfg.scaling.truncate is False
    check_module(cfg, GptOssRotaryEmbedding(hf), pos_batch(30, 17), full_width=None)


@pytest.mark.parametrize("n", [50, 300])  # max_position = 128: below and above
def test_dynamic_ntk_module_below_and_above(n):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=128,
                                  rope_theta=10000.0, rope_scaling={"rope_type": "dynamic", "factor": 2.0})  # fmt: skip
    cfg = rope_config_from_hf(hf)
    pos = torch.arange(n)[None]
    check_module(cfg, LlamaRotaryEmbedding(hf), pos)
    assert (cfg.table_key(n) is None) == (n <= 128)


# ----------------------------------------------------------------------------- no silent mismatch
def test_from_hf_never_mutates_its_input():
    """transformers' config classes standardise rope_scaling in place; from_hf works on a copy,
    so a later call with a changed rope_theta reads the new value."""
    import copy

    pytest.importorskip("transformers")
    d = data("llama-3.1-8b-instruct.json")
    before = copy.deepcopy(d)
    first = rope_config_from_hf(d)
    assert d == before
    d["rope_theta"] = 1000.0
    assert rope_config_from_hf(d).base == 1000.0 != first.base


def test_model_type_running_another_familys_code():
    """sarvam_mla has no modeling module of its own: transformers runs DeepSeek-V3's code, which
    pairs (2i, 2i+1) when rope_interleave is set (its default). Read from that code."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if "sarvam_mla" not in CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no sarvam_mla")
    from ropekit.integrations.hf_sweep import tiny_config

    cfg = tiny_config("sarvam_mla")
    assert cfg.rope_interleave is True
    assert rope_config_from_hf(cfg).layout == "interleaved"
    cfg.rope_interleave = False
    assert rope_config_from_hf(cfg).layout == "half"


# ------------------------------------------- the installed transformers' rules, family by family
def _rotary_module(cfg):
    """The family's own rotary module built from ``cfg`` (as its model builds it)."""
    from ropekit import _hf_code

    module = _hf_code.modeling_module_for(cfg.model_type)
    return _hf_code.rotary_classes(module)[0](config=cfg)


def _tiny(model_type, prf=None, scaling=None, **top):
    """A tiny config of ``model_type`` (ropekit.integrations.hf_sweep.tiny_config) with another
    partial rotary factor and/or rope scaling, through the class as a config.json would go
    (5.x: inside ``rope_parameters``; 4.x: top-level ``partial_rotary_factor`` / GPT-NeoX
    ``rotary_pct`` and ``rope_scaling``), plus top-level keys ``top``."""
    import warnings

    from ropekit.integrations.hf_sweep import tiny_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = tiny_config(model_type)
        d = base.to_dict()
        if isinstance(d.get("rope_parameters"), dict):  # transformers 5.x
            rp = dict(d["rope_parameters"])
            if prf is not None:
                rp["partial_rotary_factor"] = prf
                d.pop("partial_rotary_factor", None)
            if scaling is not None:
                rp = {k: v for k, v in rp.items() if k in ("rope_theta", "partial_rotary_factor")} | scaling
            d["rope_parameters"] = rp
        else:
            if prf is not None:
                d["partial_rotary_factor"] = prf
                if "rotary_pct" in d:
                    d["rotary_pct"] = prf
        d.update(top)
        tries = [None] if scaling is None else [dict(scaling, type=scaling["rope_type"]),
                                                {"type" if k == "rope_type" else k: v for k, v in scaling.items()}]
        for i, sc in enumerate(tries):  # 4.57 Olmo2 takes {"type", "factor"} only
            if sc is not None and "rope_parameters" not in d:
                d["rope_scaling"] = sc
            try:
                return type(base).from_dict(copy.deepcopy(d))
            except ValueError as e:
                if i == len(tries) - 1:
                    pytest.skip(f"{model_type}'s config class refuses it: {e}")


#: Families whose own rotary module does not apply the partial rotary factor to the default
#: rope type in transformers 5.x (it does in 4.x), and families that apply it in every version.
PARTIAL_IGNORED_5X = ("llama", "mistral", "qwen2", "qwen3", "gemma", "granite", "olmo2", "cohere")
PARTIAL_APPLIED = ("phi", "stablelm", "gpt_neox", "persimmon", "glm", "phi3")


@pytest.mark.parametrize("rope_type", ["default", "linear", "yarn"])
@pytest.mark.parametrize("mt", PARTIAL_IGNORED_5X + PARTIAL_APPLIED)
def test_partial_rotary_factor_as_the_model_applies_it(mt, rope_type, tmp_path, monkeypatch):
    """The rotary width and frequencies of from_hf are the model's, for a partial rotary factor
    other than the class default (the family table's rows are verified on the default only):
    transformers 5.x's default rope ignores it in the Llama-style families (the whole head
    rotates), applies it in the scaled types and in Phi-style families; 4.x applies it always."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from ropekit import _hf_table
    from ropekit.tables import transformers_inv_freq

    if mt not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"no {mt} in this transformers")
    monkeypatch.setenv("ROPEKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_hf_table, "_MEMO", {})
    scaling = {"linear": {"rope_type": "linear", "factor": 2.0},
               "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
               "default": None}[rope_type]  # fmt: skip
    if mt == "phi3" and rope_type != "default":
        pytest.skip("Phi-3's config class takes longrope scaling only")
    default = _tiny(mt)
    first = rope_config_from_hf(default)
    prf = 0.5 if first.rotary_dim == first.head_dim // 4 else 0.25  # another factor than the class's
    cfg = _tiny(mt, prf=prf, scaling=scaling)
    module = _rotary_module(cfg)
    for attempt in ("check", "cached verdict"):  # the first answer checks the code, the second reads the verdict
        for obj in (cfg, cfg.to_dict(), cfg.to_diff_dict() | {"model_type": mt}):
            got = rope_config_from_hf(obj)
            assert got.rotary_dim == 2 * module.inv_freq.shape[-1], (attempt, type(obj).__name__, got)
            assert torch.equal(transformers_inv_freq(got), module.inv_freq.float()), (attempt, got)
            assert got.attention_factor == module.attention_scaling
    cached = json.loads(open(_hf_table.cache_path(_hf_table.installed_version())).read())
    assert f"{mt}+partial:{rope_type}" in cached and set(cached) <= {mt, f"{mt}+partial:{rope_type}"}


def _longrope(n, **extra):
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(n)],
            "long_factor": [2.0 + 0.3 * i for i in range(n)], **extra}  # fmt: skip


@pytest.mark.parametrize(
    "case,rope,top",
    [("original in rope_scaling, factor", dict(original_max_position_embeddings=32, factor=2.0), {}),
     ("original in rope_scaling, attention_factor", dict(original_max_position_embeddings=32, attention_factor=1.25), {}),
     ("top-level original, factor", dict(factor=2.0), {"original_max_position_embeddings": 48}),
     ("both originals, factor", dict(original_max_position_embeddings=32, factor=2.0), {"original_max_position_embeddings": 48}),
     ("both originals", dict(original_max_position_embeddings=32), {"original_max_position_embeddings": 48})],  # fmt: skip
)
@pytest.mark.parametrize("mt", ["llama", "qwen2", "qwen3", "gemma", "stablelm", "glm", "granite"])
def test_longrope_original_context_as_the_installed_transformers_reads_it(mt, case, rope, top):
    """transformers 4.x reads LongRoPE's original context from the config's top-level
    original_max_position_embeddings, else max_position_embeddings (never from rope_scaling),
    and then takes factor = max / original; 5.x reads rope_parameters (the top-level value wins).
    from_hf follows the installed version: attention factor, frequencies on both sides of the
    short/long switch, and the switch itself."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if mt not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"no {mt} in this transformers")
    n = rope_config_from_hf(_tiny(mt)).n_pairs
    cfg = _tiny(mt, scaling=_longrope(n, **rope), max_position_embeddings=128, **top)
    module = _rotary_module(cfg)
    for obj in (cfg, cfg.to_dict(), cfg.to_diff_dict() | {"model_type": mt}):
        got = rope_config_from_hf(obj)
        assert isinstance(got.scaling, LongRoPE)
        assert got.attention_factor == module.attention_scaling, (case, type(obj).__name__)
        for n_pos in (20, 40, 60, 100):  # around every candidate switch: 32, 48, 128
            pos = torch.arange(n_pos)[None]
            cos_t, sin_t = module_tables(module, pos)
            c32, s32 = transformers_cos_sin(got, pos, seq_len=n_pos)
            half = c32.shape[-1]  # the module's tables are cat(c, c) or (GLM, Cohere) repeat_interleave(c)
            assert any(torch.equal(c32, t) for t in (cos_t[..., :half], cos_t[..., ::2])), (case, type(obj).__name__, n_pos)


def test_legacy_rules_from_the_table_without_transformers_4x(monkeypatch, tmp_path):
    """With transformers 4.57.6 installed the family table's 4.57.6 rows answer with the 4.x
    rules (no import of transformers needed: shown here by claiming that version)."""
    from ropekit import _hf_table

    monkeypatch.setenv("ROPEKIT_CACHE_DIR", str(tmp_path))
    d = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 128,
         "rope_scaling": _longrope(8, original_max_position_embeddings=32, factor=2.0)}  # fmt: skip
    five = rope_config_from_hf(d, read_code=False)  # the config rules: 5.x, whatever is installed
    assert five.scaling.original_max_position == 32
    assert five.attention_factor == math.sqrt(1 + math.log(2.0) / math.log(32))
    monkeypatch.setattr(_hf_table, "installed_version", lambda: "4.57.6")
    four = rope_config_from_hf(d)
    assert four.scaling.original_max_position == 128 and four.scaling.factor == 2.0
    assert four.attention_factor == math.sqrt(1 + math.log(2.0) / math.log(128))
    top = rope_config_from_hf(dict(d, original_max_position_embeddings=48))
    assert (top.scaling.original_max_position, top.scaling.factor) == (48, 128 / 48)
    l3 = dict(d, original_max_position_embeddings=100,
              rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 16})  # fmt: skip
    assert rope_config_from_hf(l3).scaling.original_max_position == 16  # 4.x llama3: rope_scaling's only
    assert rope_config_from_hf(l3, read_code=False).scaling.original_max_position == 100  # 5.x: top-level wins
