"""RoPE settings of public models, as plain data.

Each preset is the rotary part of one public ``config.json`` (model id in ``"source"``),
written in transformers 4.x names and turned into a :class:`~ropekit.RopeConfig` by
:func:`ropekit.hf.rope_config_from_hf` — the same path a user's config takes, so a preset
can never disagree with loading the real file. Only RoPE-relevant keys are kept.

Example:
    >>> from ropekit import presets
    >>> "llama-3.1-8b" in presets.names()
    True
    >>> cfg = presets.get("llama-3.1-8b")
    >>> cfg.base, cfg.rotary_dim, type(cfg.scaling).__name__
    (500000.0, 128, 'Llama3')
    >>> presets.info("gpt-j-6b")["context"]
    2048
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Union

from ._errors import fail
from .config import RopeConfig

__all__ = ["names", "get", "info", "max_position", "PRESETS"]

# Phi-3.5-mini-instruct's LongRoPE factors, verbatim from microsoft/Phi-3.5-mini-instruct
# config.json (float32 values printed by Python).
_PHI35_LONG = [
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
    1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
    4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
    17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
    50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
    62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
    63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
    64.51000213623047, 64.52999877929688, 64.83999633789062,
]  # fmt: skip
_PHI35_SHORT = [
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979, 1.0999999046325684,
    1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662, 1.2899998426437378,
    1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
    1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533, 2.729999542236328,
    2.749999523162842, 2.8399994373321533,
]  # fmt: skip
# microsoft/Phi-4-mini-instruct config.json (rotary dim 96 -> 48 factors; short factors all 1).
_PHI4_MINI_LONG = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
    2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845,
    5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158,
    11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105,
    25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71,
    32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
]  # fmt: skip

_LLAMA31_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

#: name -> {"source": public model id, "config": RoPE-relevant keys of its config.json}.
PRESETS: Dict[str, Dict[str, Any]] = {
    "llama-2-7b": {
        "source": "meta-llama/Llama-2-7b-hf",
        "config": {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
                   "max_position_embeddings": 4096, "rope_theta": 10000.0, "rope_scaling": None},
    },
    "llama-3.1-8b": {
        "source": "meta-llama/Llama-3.1-8B",
        "config": {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
                   "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": _LLAMA31_SCALING},
    },
    "llama-3.2-1b": {
        "source": "meta-llama/Llama-3.2-1B",
        "config": {"model_type": "llama", "hidden_size": 2048, "num_attention_heads": 32, "head_dim": 64,
                   "max_position_embeddings": 131072, "rope_theta": 500000.0,
                   "rope_scaling": dict(_LLAMA31_SCALING, factor=32.0)},
    },
    "llama-4-scout": {
        "source": "meta-llama/Llama-4-Scout-17B-16E (text_config)",
        "config": {"model_type": "llama4_text", "hidden_size": 5120, "num_attention_heads": 40, "head_dim": 128,
                   "max_position_embeddings": 10485760, "rope_theta": 500000.0,
                   "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}},
    },
    "llama-4-maverick": {
        "source": "meta-llama/Llama-4-Maverick-17B-128E (text_config)",
        "config": {"model_type": "llama4_text", "hidden_size": 5120, "num_attention_heads": 40, "head_dim": 128,
                   "max_position_embeddings": 1048576, "rope_theta": 500000.0, "rope_scaling": None},
    },
    "mistral-7b-v0.1": {
        "source": "mistralai/Mistral-7B-v0.1",
        "config": {"model_type": "mistral", "hidden_size": 4096, "num_attention_heads": 32,
                   "max_position_embeddings": 32768, "rope_theta": 10000.0},
    },
    "qwen2.5-7b": {
        "source": "Qwen/Qwen2.5-7B-Instruct",
        "config": {"model_type": "qwen2", "hidden_size": 3584, "num_attention_heads": 28,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rope_scaling": None},
    },
    "qwen2.5-7b-yarn": {
        # The model card's opt-in for 128K context: add this rope_scaling to config.json.
        "source": "Qwen/Qwen2.5-7B-Instruct (model card YaRN opt-in)",
        "config": {"model_type": "qwen2", "hidden_size": 3584, "num_attention_heads": 28,
                   "max_position_embeddings": 131072, "rope_theta": 1000000.0,
                   "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
    },
    "qwen3-8b": {
        "source": "Qwen/Qwen3-8B",
        "config": {"model_type": "qwen3", "hidden_size": 4096, "num_attention_heads": 32, "head_dim": 128,
                   "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rope_scaling": None},
    },
    "qwen2-vl-7b": {
        # M-RoPE: the section split [16, 24, 24] (t, h, w) is applied by ropekit.multi_axis.
        "source": "Qwen/Qwen2-VL-7B-Instruct",
        "config": {"model_type": "qwen2_vl", "hidden_size": 3584, "num_attention_heads": 28,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                   "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
    },
    "phi-3.5-mini": {
        "source": "microsoft/Phi-3.5-mini-instruct",
        "config": {"model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 32,
                   "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                   "rope_theta": 10000.0,
                   "rope_scaling": {"type": "longrope", "long_factor": _PHI35_LONG, "short_factor": _PHI35_SHORT}},
    },
    "phi-4-mini": {
        "source": "microsoft/Phi-4-mini-instruct",
        "config": {"model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 24,
                   "partial_rotary_factor": 0.75, "max_position_embeddings": 131072,
                   "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
                   "rope_scaling": {"type": "longrope", "long_factor": _PHI4_MINI_LONG, "short_factor": [1.0] * 48}},
    },
    "deepseek-v3": {
        # Multi-head latent attention: only qk_rope_head_dim = 64 dims per head rotate.
        "source": "deepseek-ai/DeepSeek-V3",
        "config": {"model_type": "deepseek_v3", "hidden_size": 7168, "num_attention_heads": 128,
                   "qk_rope_head_dim": 64, "max_position_embeddings": 163840, "rope_theta": 10000.0,
                   "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}},
    },
    "pythia-6.9b": {
        "source": "EleutherAI/pythia-6.9b",
        "config": {"model_type": "gpt_neox", "hidden_size": 4096, "num_attention_heads": 32, "rotary_pct": 0.25,
                   "rotary_emb_base": 10000, "max_position_embeddings": 2048},
    },
    "gpt-neox-20b": {
        "source": "EleutherAI/gpt-neox-20b",
        "config": {"model_type": "gpt_neox", "hidden_size": 6144, "num_attention_heads": 64, "rotary_pct": 0.25,
                   "rotary_emb_base": 10000, "max_position_embeddings": 2048},
    },
    "gpt-j-6b": {
        "source": "EleutherAI/gpt-j-6b",
        "config": {"model_type": "gptj", "n_embd": 4096, "n_head": 16, "rotary_dim": 64, "n_positions": 2048},
    },
    "gemma-3-4b": {
        # Per layer type: global layers rope_theta=1e6 with linear x8, sliding layers 1e4.
        "source": "google/gemma-3-4b-it (text_config)",
        "config": {"model_type": "gemma3_text", "hidden_size": 2560, "num_attention_heads": 8, "head_dim": 256,
                   "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
                   "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    },
    "gpt-oss-20b": {
        "source": "openai/gpt-oss-20b",
        "config": {"model_type": "gpt_oss", "hidden_size": 2880, "num_attention_heads": 64, "head_dim": 64,
                   "max_position_embeddings": 131072, "rope_theta": 150000.0,
                   "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                    "original_max_position_embeddings": 4096, "truncate": False}},
    },
}  # fmt: skip


def names() -> List[str]:
    """Sorted preset names."""
    return sorted(PRESETS)


def _entry(name: str) -> Dict[str, Any]:
    if not isinstance(name, str) or name not in PRESETS:
        raise fail(f"a preset name, one of {names()}", repr(name), "see ropekit.presets.names()")
    return PRESETS[name]


def get(name: str) -> Union[RopeConfig, Dict[str, RopeConfig]]:
    """The preset's ``RopeConfig`` (a ``{layer_type: RopeConfig}`` dict for per-layer models).

    Read with the config rules alone (``read_code=False``), so a preset is the same with or
    without transformers installed, and whatever its version.
    """
    from .hf import rope_config_from_hf

    return rope_config_from_hf(copy.deepcopy(_entry(name)["config"]), read_code=False)  # type: ignore[return-value]


def max_position(name: str) -> int:
    """The context length the model advertises (``max_position_embeddings``)."""
    c = _entry(name)["config"]
    return int(c.get("max_position_embeddings") or c["n_positions"])


def info(name: str) -> Dict[str, Any]:
    """``{"name", "source", "context", "config", "hf_config"}`` for one preset.

    ``source`` is the public model id whose ``config.json`` the values come from,
    ``context`` its maximum positions, ``config`` what :func:`get` returns and
    ``hf_config`` a copy of the raw keys.
    """
    e = _entry(name)
    return {
        "name": name,
        "source": e["source"],
        "context": max_position(name),
        "config": get(name),
        "hf_config": copy.deepcopy(e["config"]),
    }
