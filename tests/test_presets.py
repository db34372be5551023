"""Presets: plain data, each naming its source, and meaning the same to transformers."""

from __future__ import annotations

import pytest
import torch

from ropekit import RopeConfig, RopeError, presets

REQUIRED = ["llama-2-7b", "llama-3.1-8b", "llama-3.2-1b", "llama-4-scout", "mistral-7b-v0.1", "qwen2.5-7b",
            "qwen2.5-7b-yarn", "qwen3-8b", "qwen2-vl-7b", "phi-3.5-mini", "phi-4-mini", "deepseek-v3",
            "pythia-6.9b", "gpt-j-6b", "gemma-3-4b", "gpt-oss-20b"]  # fmt: skip


def test_names_cover_the_required_families():
    names = presets.names()
    assert len(names) >= 15 and names == sorted(names)
    assert set(REQUIRED) <= set(names)


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_loads_and_names_its_source(name):
    info = presets.info(name)
    assert set(info) >= {"source", "context", "config"}
    assert "/" in info["source"]  # a hub model id
    assert info["context"] == presets.max_position(name) > 0
    cfgs = info["config"] if isinstance(info["config"], dict) else {None: info["config"]}
    for cfg in cfgs.values():
        assert isinstance(cfg, RopeConfig)
        assert torch.isfinite(cfg.inv_freq()).all() and torch.isfinite(cfg.inv_freq(info["context"])).all()
    assert presets.get(name) == info["config"]


def test_known_values():
    # spot checks against the published configs (see each preset's source)
    assert presets.get("gpt-j-6b") == RopeConfig(256, 10000.0, rotary_dim=64, layout="interleaved")
    assert presets.get("pythia-6.9b") == RopeConfig(128, 10000.0, rotary_dim=32)
    assert presets.get("llama-4-scout").layout == "interleaved"
    assert presets.get("phi-4-mini").rotary_dim == 96
    assert presets.get("gpt-oss-20b").scaling.truncate is False
    g = presets.get("gemma-3-4b")
    assert g["full_attention"].base == 1e6 and g["sliding_attention"].scaling is None


def test_unknown_name():
    with pytest.raises(RopeError, match="llama-3.1-8b"):
        presets.get("llama-9")


def test_presets_are_not_mutated_by_callers():
    info = presets.info("phi-3.5-mini")
    info["hf_config"]["rope_scaling"]["long_factor"][0] = 99.0
    assert presets.get("phi-3.5-mini").scaling.long_factor[0] != 99.0


@pytest.mark.parametrize("name", presets.names())
def test_transformers_reads_the_same_frequencies(name):
    # Build transformers' own config class from the preset's keys and compare its rotary
    # module's inv_freq and attention scaling with ours (float32 there: rel 1e-6).
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw = presets.info(name)["hf_config"]
    mt = raw.pop("model_type")
    try:
        hf = transformers.AutoConfig.for_model(mt, **raw)
    except ValueError:
        pytest.skip(f"transformers {transformers.__version__} has no model_type {mt!r}")
    if hasattr(hf, "get_text_config"):
        hf = hf.get_text_config()
    rp = getattr(hf, "rope_parameters", None)
    if not rp:
        pytest.skip(f"{mt} keeps no rope parameters in transformers (GPT-J: see test_hf_config's sinusoid test)")
    ours = presets.get(name)
    nested = isinstance(ours, dict)
    for layer_type, cfg in (ours.items() if nested else [(None, ours)]):
        p = rp[layer_type] if nested else rp
        kind = p.get("rope_type", "default")
        if kind in ("default", "mrope"):
            i2 = torch.arange(0, cfg.rotary_dim, 2, dtype=torch.float) / cfg.rotary_dim
            inv, att = 1.0 / (p["rope_theta"] ** i2), 1.0
            assert p["rope_theta"] == cfg.base
        else:
            inv, att = ROPE_INIT_FUNCTIONS[kind](hf, None, layer_type=layer_type) if nested else \
                ROPE_INIT_FUNCTIONS[kind](hf, None)
        ref = inv.double()
        assert ref.shape == (cfg.rotary_dim // 2,)
        assert float(((cfg.inv_freq() - ref).abs() / ref).max()) <= 1e-6
        assert abs(cfg.attention_factor - float(att)) <= 1e-9
