"""Hugging Face interop: ``RopeConfig`` from a transformers config, and transformers' float32 tables.

- :func:`rope_config_from_hf` (also ``RopeConfig.from_hf``) reads a ``PretrainedConfig``, a
  dict or a path to ``config.json``, with transformers 4.x names (``rope_scaling``,
  ``rope_theta``, ``partial_rotary_factor``, ``head_dim``, GPT-NeoX ``rotary_pct`` /
  ``rotary_emb_base``, GPT-J ``n_embd`` / ``n_head`` / ``rotary_dim``, the ``type`` alias,
  ``su``) and 5.x names (``rope_parameters``, also nested per layer type).
- :func:`transformers_cos_sin` reproduces, bit for bit, the cos/sin a transformers rotary
  module computes (float32 frequencies and float32 angles), for users who need outputs
  identical to an HF model rather than ropekit's exact float64 angles.

transformers itself is never imported here: configs are read as plain attributes/keys.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import warnings
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from ._checks import flag, integer, real
from ._errors import RopeError, fail
from . import _hf_table
from . import config as _config
from .config import RopeConfig
from .tables import transformers_cos_sin, transformers_inv_freq  # noqa: F401  (public here too)
from .scaling import NTK, DynamicNTK, Linear, Llama3, LongRoPE, Proportional, Scaling, YaRN

__all__ = [
    "rope_config_from_hf",
    "transformers_inv_freq",
    "transformers_cos_sin",
    "layout_for_model_type",
    "rope_facts",
    "KNOWN_ROPE_TYPES",
    "INTERLEAVED_MODEL_TYPES",
    "COMPONENTS",
    "UnknownFamilyWarning",
    "IgnoredScalingWarning",
    "IgnoredBaseWarning",
]

#: Names of the rotary components :func:`rope_config_from_hf` can return: the attention
#: layers, and the sparse-attention indexer of DeepSeek-V3.2-style models (own heads,
#: own pairing, same tables).
COMPONENTS = ("attention", "indexer")

#: ``rope_type`` values the loader understands (HF names, their aliases, and ropekit's ``ntk``).
KNOWN_ROPE_TYPES = (
    "default",
    "linear",
    "dynamic",
    "yarn",
    "longrope",
    "llama3",
    "proportional",
    "ntk",
    "ntk_alpha",
    "su",
    "mrope",
)

#: Fallback only, used when transformers' modeling code cannot be read (transformers not
#: installed, ``read_code=False``, or a model type it does not know): ``model_type`` values
#: whose transformers implementation pairs dims ``(2i, 2i+1)``. With the code available the
#: pairing is measured from it instead (:func:`rope_facts`). Checked against transformers 5.x: ``rotate_every_two`` (GPT-J, CodeGen),
#: ``rotate_half`` over ``x[..., ::2]`` with ``repeat_interleave``'d cos/sin (Cohere, GLM,
#: GLM-4, Ernie 4.5, Helium), ``view_as_complex`` (DeepSeek-V2, Llama 4), and ChatGLM's
#: remote code (pairs ``(2i, 2i+1)`` over half of each head).
INTERLEAVED_MODEL_TYPES = frozenset(
    {
        "gptj",
        "codegen",
        "cohere",
        "cohere2",
        "glm",
        "glm4",
        "glm4v",
        "chatglm",
        "ernie4_5",
        "ernie4_5_moe",
        "helium",
        "deepseek_v2",
        "deepseek_v32",
        "llama4",
        "llama4_text",
    }
)
#: ``model_type`` values whose layout follows the config's ``rope_interleave`` flag
#: (transformers default ``True``): DeepSeek-V3-style multi-head latent attention.
_ROPE_INTERLEAVE_FLAG = frozenset({"deepseek_v3", "kimi_k2", "glm4_moe_lite", "mistral4", "axk1"})

_CONFIG_FIELDS = ("head_dim", "base", "rotary_dim", "layout", "scaling", "rotary_offset", "direction")


class _Src:
    """Uniform read access to a dict or a config object; ``None`` counts as missing."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.is_dict = isinstance(obj, Mapping)

    def get(self, key: str, default: Any = None) -> Any:
        if self.is_dict:
            v = self.obj.get(key)
        else:
            try:
                v = getattr(self.obj, key, None)
            except Exception:  # some config properties raise when unset; heterogeneous
                v = vars(self.obj).get(key) if hasattr(self.obj, "__dict__") else None  # configs: the global value
        return default if v is None else v


def _load(obj: Any) -> Any:
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise fail("a path to a config.json (or its directory)", repr(os.fspath(obj)), "check the path")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise fail("a JSON config file", f"invalid JSON in {path} ({e})", "pass the model's config.json") from None
        if not isinstance(data, dict):
            raise fail("a JSON object in config.json", type(data).__name__, "pass the model's config.json")
        return data
    if isinstance(obj, Mapping):
        return obj
    if obj is None or isinstance(obj, (int, float, bool, list, tuple)):
        raise fail(
            "a transformers PretrainedConfig, a dict or a path to config.json",
            type(obj).__name__,
            "pass e.g. AutoConfig.from_pretrained(name) or the path of its config.json",
        )
    return obj


def layout_for_model_type(model_type: Optional[str], rope_interleave: Optional[bool] = None) -> str:
    """``"interleaved"`` or ``"half"`` for a transformers ``model_type``.

    Unknown model types default to ``"half"`` (HF Llama convention). For DeepSeek-V3-style
    models the config's ``rope_interleave`` flag decides (default ``True``).

    Example:
        >>> layout_for_model_type("gptj"), layout_for_model_type("llama")
        ('interleaved', 'half')
    """
    mt = (model_type or "").lower()
    if mt in INTERLEAVED_MODEL_TYPES:
        return "interleaved"
    if mt in _ROPE_INTERLEAVE_FLAG:
        return "interleaved" if (rope_interleave is None or rope_interleave) else "half"
    return "half"


def _known_error(kind: Any) -> RopeError:
    return fail(
        f"rope_type one of {list(KNOWN_ROPE_TYPES)}",
        repr(kind),
        "check the config's rope_scaling/rope_parameters; build the scheme by hand with ropekit.scaling "
        "if the model uses a custom one",
    )


def _num(p: Mapping, key: str, default: Any = None) -> Any:
    v = p.get(key)
    return default if v is None else v


def _require(p: Mapping, key: str, kind: str) -> Any:
    """``p[key]``; a RopeError when the key is absent (a null value goes on to the scheme's own
    check, which names it as null)."""
    if key not in p:
        raise fail(
            f"key {key!r} in the {kind} rope parameters",
            f"keys {sorted(p)}",
            f"add {key!r} to rope_scaling/rope_parameters (see the model's published config.json)",
        )
    return p[key]


def _scheme(
    p: Mapping,
    src: _Src,
    head_dim: int,
    rotary_dim: int,
    max_pos: Optional[int],
    legacy: bool = False,
    nested: bool = False,
) -> Tuple[Optional[Scaling], int]:
    """Scaling scheme for one rope-parameters dict; returns ``(scheme, rotary_dim)``.

    ``legacy``: the rules of transformers 4.x (the installed one, see :func:`_rules_of`), which
    read ``original_max_position_embeddings`` differently from 5.x (:func:`_original_4x`);
    ``nested``: ``p`` is one layer type's dict of per-layer-type rope parameters."""
    kind = p.get("rope_type", p.get("type"))
    kind = "default" if kind is None else kind
    if not isinstance(kind, str):
        raise _known_error(kind)
    kind = kind.lower()
    if kind in ("default", "mrope"):  # M-RoPE's section split is a positions matter (ropekit.multi_axis)
        return None, rotary_dim
    if kind == "su" or (kind == "yarn" and "short_factor" in p):  # Phi-3's legacy names for longrope
        kind = "longrope"
    if kind == "dynamic" and p.get("alpha") is not None:  # HunYuan: fixed alpha = static NTK
        kind = "ntk_alpha"

    # transformers 5.x standardize_rope_params: for llama3/yarn/longrope a top-level
    # original_max_position_embeddings (Phi-3) wins over the one in rope_parameters, for a flat
    # dict only (per-layer-type dicts keep their own); else max_position_embeddings.
    top_orig = None if nested else src.get("original_max_position_embeddings")

    def original() -> int:
        if legacy:
            return _original_4x(kind, p, src, max_pos)
        v = top_orig if top_orig is not None else p.get("original_max_position_embeddings", max_pos)
        if v is None:
            raise fail(
                f"original_max_position_embeddings for rope_type {kind!r}",
                "none in rope_scaling nor max_position_embeddings",
                "add original_max_position_embeddings to rope_scaling",
            )
        return v

    if kind == "linear":
        return Linear(factor=_require(p, "factor", kind)), rotary_dim
    if kind in ("ntk", "ntk_alpha"):
        key = "alpha" if kind == "ntk_alpha" else "factor"
        return NTK(factor=_require(p, key, kind)), rotary_dim
    if kind == "dynamic":
        if max_pos is None:
            raise fail("max_position_embeddings for dynamic NTK", "none", "add max_position_embeddings to the config")
        return DynamicNTK(factor=_require(p, "factor", kind), max_position=max_pos), rotary_dim
    if kind == "yarn":
        orig = original()
        factor = _require(p, "factor", kind)  # absent: transformers refuses too
        if factor is None:  # "factor": null: transformers uses the ratio of the two context lengths
            if max_pos is None:
                raise fail("yarn factor or max_position_embeddings", "neither", "add factor to rope_scaling")
            factor = max_pos / orig
        return (
            YaRN(
                factor=factor,
                original_max_position=orig,
                beta_fast=p.get("beta_fast") or 32.0,  # `or`: transformers treats 0/None as unset
                beta_slow=p.get("beta_slow") or 1.0,
                mscale=_num(p, "mscale", 1.0),
                mscale_all_dim=_num(p, "mscale_all_dim", 0.0),
                attention_factor=p.get("attention_factor"),
                truncate=flag("truncate", _num(p, "truncate", True)),
            ),
            rotary_dim,
        )
    if kind == "longrope":
        orig = original()
        factor = p.get("factor")
        if legacy and src.get("original_max_position_embeddings") and max_pos is not None:
            # 4.x _compute_longrope_parameters: with a top-level original the factor is always
            # max_position_embeddings / original (rope_scaling's factor is not read)
            factor = max_pos / orig
        elif factor is None and max_pos is not None and not legacy:
            factor = max_pos / orig
        if isinstance(factor, (int, float)) and not isinstance(factor, bool) and math.isfinite(factor) and factor < 1:
            # max_position_embeddings below the original context (or a factor < 1 in the file):
            # transformers (4.x and 5.x _compute_longrope_parameters) takes attention factor 1 for
            # any factor <= 1, and the factor enters nothing else; LongRoPE's factor 1 says the same
            factor = 1.0
        return (
            LongRoPE(
                short_factor=_require(p, "short_factor", kind),
                long_factor=_require(p, "long_factor", kind),
                original_max_position=orig,
                factor=factor,
                attention_factor=p.get("attention_factor"),
            ),
            rotary_dim,
        )
    if kind == "llama3":
        return (
            Llama3(
                factor=_require(p, "factor", kind),
                low_freq_factor=_require(p, "low_freq_factor", kind),
                high_freq_factor=_require(p, "high_freq_factor", kind),
                original_max_position=original(),
            ),
            rotary_dim,
        )
    if kind == "proportional":
        prf = p.get("partial_rotary_factor", src.get("partial_rotary_factor", 1.0))
        return Proportional(partial_rotary_factor=prf, factor=_num(p, "factor", 1.0)), head_dim
    raise _known_error(kind)


def _original_4x(kind: str, p: Mapping, src: _Src, max_pos: Optional[int]) -> int:
    """``original_max_position_embeddings`` as transformers 4.x (4.57) reads it, per rope type.

    - ``longrope`` (``_compute_longrope_parameters`` and the short/long switch of
      ``dynamic_rope_update``): the config's top-level ``original_max_position_embeddings``
      when set (Phi-3), else ``max_position_embeddings``; the key inside ``rope_scaling`` is
      never read.
    - ``yarn``: ``rope_scaling["original_max_position_embeddings"] or max_position_embeddings``
      (the top-level value is never read).
    - ``llama3``: ``rope_scaling["original_max_position_embeddings"]`` (required).
    """
    if kind == "longrope":
        v = src.get("original_max_position_embeddings") or max_pos
        where = "a top-level original_max_position_embeddings nor max_position_embeddings"
    elif kind == "llama3":
        v = _require(p, "original_max_position_embeddings", kind)
        where = "original_max_position_embeddings in rope_scaling"
    else:
        v = p.get("original_max_position_embeddings") or max_pos
        where = "original_max_position_embeddings in rope_scaling nor max_position_embeddings"
    if v is None:
        raise fail(
            f"original_max_position_embeddings for rope_type {kind!r} (transformers 4.x rules)",
            f"neither {where}",
            "add max_position_embeddings (or original_max_position_embeddings) to the config",
        )
    return v


def _rules_of(version: Optional[str]) -> bool:
    """Whether the installed transformers ``version`` reads rope parameters by the 4.x rules
    (``None``: not installed, or ``read_code=False``: the 5.x rules)."""
    return version is not None and _hf_table.version_key(version)[:1] < (5,)


def _sub_config_names(src: _Src) -> list:
    if src.is_dict:
        return [k for k, v in src.obj.items() if isinstance(v, Mapping) and ("model_type" in v or "hidden_size" in v)]
    return sorted(getattr(type(src.obj), "sub_configs", None) or {})


def _layer_src(src: _Src, layer_type: str) -> _Src:
    """Heterogeneous configs (per-layer attributes, transformers 5.x): the config of a
    layer of this type; otherwise ``src``."""
    if src.is_dict:
        return src
    plc = getattr(src.obj, "per_layer_config", None)
    types = src.get("layer_types")
    if plc is None or not isinstance(types, (list, tuple)) or layer_type not in types:
        return src
    try:
        return _Src(plc[list(types).index(layer_type)])
    except Exception:
        return src


def _head_dim(src: _Src, model_type: str) -> int:
    v = src.get("qk_rope_head_dim")  # multi-head latent attention: only this part rotates
    if v is None and model_type == "chatglm":
        v = src.get("kv_channels")
    if v is None:
        v = src.get("head_dim")
    if v is None:
        hidden = src.get("hidden_size", src.get("n_embd", src.get("d_model")))
        heads = src.get("num_attention_heads", src.get("n_head"))
        subs = [k for k in _sub_config_names(src) if k != "text_config"]
        if (hidden is None or heads is None) and subs:
            raise fail(
                "a config with one language model (its own heads, or a text_config)",
                f"{model_type or 'a config'} made of several models: {', '.join(subs)}",
                "pass the sub-config of the part you want, e.g. RopeConfig.from_hf(config." + subs[0] + ")",
            )
        if hidden is None or heads is None:
            raise fail(
                "head_dim, or hidden_size and num_attention_heads (GPT-J: n_embd and n_head)",
                "none of them",
                "pass head_dim=... as an override",
            )
        v = integer("hidden_size", hidden) // integer("num_attention_heads", heads)
    return integer("head_dim", v)


def _one(
    src: _Src,
    p: Mapping,
    model_type: str,
    head_dim: int,
    max_pos: Optional[int],
    layout: str,
    rotary_dim: Optional[int] = None,
    legacy: bool = False,
    nested: bool = False,
) -> RopeConfig:
    # partial rotary: the model's own rotary module (rotary_dim, measured) > MLA's
    # qk_rope_head_dim (the rope part *is* the rotary width; a partial_rotary_factor there is
    # relative to the full head) > rope params (5.x) > top-level partial_rotary_factor >
    # GPT-NeoX rotary_pct
    proportional = str(p.get("rope_type", p.get("type"))) == "proportional"
    measured = rotary_dim
    if src.get("qk_rope_head_dim") is not None and not proportional:
        rotary_dim = integer("qk_rope_head_dim", src.get("qk_rope_head_dim"))
    elif model_type in ("gptj", "codegen"):
        rotary_dim = integer("rotary_dim", src.get("rotary_dim", head_dim))
    elif model_type == "chatglm":
        rotary_dim = head_dim // 2  # ChatGLM rotates half of each head (RotaryEmbedding(kv_channels // 2))
    else:
        prf = p.get("partial_rotary_factor", src.get("partial_rotary_factor", src.get("rotary_pct")))
        if prf is None:
            prf = 0.25 if model_type == "gpt_neox" else 1.0  # transformers' GPTNeoXConfig default
        prf = real("partial_rotary_factor", prf)
        rotary_dim = head_dim if proportional else int(head_dim * prf)
        if rotary_dim % 2 and not proportional:
            raise fail(
                "an even rotary dim int(head_dim * partial_rotary_factor)",
                f"{model_type or 'config'}: int({head_dim} * {prf}) = {rotary_dim}; transformers then uses "
                f"{(rotary_dim + 1) // 2} frequencies base^(-2i/{rotary_dim}), which no RopeConfig expresses",
                "pick head_dim and partial_rotary_factor with an even product, or build RopeConfig by hand",
            )
    if measured is not None and not proportional:
        rotary_dim = measured  # the model's own rotary module decides
    base = p.get("rope_theta", src.get("rope_theta", src.get("rotary_emb_base")))
    if base is None:
        base = 10000.0 * real("rope_ratio", src.get("rope_ratio", 1.0)) if model_type == "chatglm" else 10000.0
    scaling, rotary_dim = _scheme(p, src, head_dim, rotary_dim, max_pos, legacy, nested)
    return RopeConfig(head_dim=head_dim, base=real("rope_theta", base), rotary_dim=rotary_dim, layout=layout, scaling=scaling)


def _is_nested(p: Any) -> bool:
    return (
        isinstance(p, Mapping)
        and len(p) > 0
        and all(isinstance(v, Mapping) or v is None for v in p.values())
        and any(isinstance(v, Mapping) for v in p.values())
    )


def _layer_head_dim(src: _Src, model_type: str, layer_type: str, head_dim: int) -> int:
    # Heterogeneous 5.x config objects (Gemma 4) resolve head_dim per layer: read it from a
    # layer of this type (per_layer_config is indexed by layer; older releases by type).
    if not src.is_dict:
        plc = getattr(src.obj, "per_layer_config", None)
        types = src.get("layer_types")
        keys: list = []
        if plc is not None and isinstance(types, (list, tuple)):
            keys = [i for i, t in enumerate(types) if t == layer_type][:1]
        for key in keys + [layer_type]:
            try:
                g = plc[key].head_dim
            except Exception:
                g = None
            if isinstance(g, int) and not isinstance(g, bool):
                return g
    # Gemma 4 config.json: full-attention layers use `global_head_dim`.
    if model_type.startswith("gemma4") and layer_type == "full_attention":
        g = src.get("global_head_dim")
        if g is not None:
            return int(g)
    return head_dim


_SHAPE_KEYS = ("head_dim", "qk_rope_head_dim", "num_attention_heads", "n_head", "kv_channels")


def _is_sparse(d: Mapping) -> bool:
    """A published config.json that leaves the head shape to the model class's defaults."""
    lm = d.get("text_config") if isinstance(d.get("text_config"), Mapping) else d
    return all(lm.get(k) is None for k in _SHAPE_KEYS) and all(d.get(k) is None for k in _SHAPE_KEYS)


def _with_class_defaults(d: Mapping) -> Any:
    # Some published configs (e.g. google/gemma-3-4b-it) omit keys equal to the config
    # class defaults; transformers, when installed, fills them in. Without it the caller
    # gets the RopeError naming the missing keys.
    try:
        from transformers import AutoConfig  # lazy: optional dependency
    except Exception:  # pragma: no cover - transformers not installed
        return None
    # a deep copy: config classes standardise rope_scaling/rope_parameters in place (adding
    # rope_theta), which would change the caller's dict and answer later calls from it
    rest = copy.deepcopy(dict(d))
    model_type = rest.pop("model_type", None)
    if model_type is None:
        return None
    try:
        return AutoConfig.for_model(model_type, **rest)
    except Exception:
        return None


def rope_facts(
    config: Any, model_type: Optional[str] = None, layer_type: Optional[str] = None
) -> Optional[Dict[str, Any]]:
    """What transformers' own modeling code does with RoPE for this config, per component.

    Reads the family's modeling module (needs transformers): which RoPE function each
    attention (and indexer) class calls, under which config flag and on which slice of the
    head, then measures that function on basis vectors with the family's own rotary module
    and this config (see :mod:`ropekit._hf_code`).

    Args:
        config: a transformers ``PretrainedConfig`` (the language-model part).
        model_type: default ``config.model_type``.
        layer_type: for per-layer-type rope parameters, the layer type whose tables to
            probe (default: the first).

    Returns:
        ``{component: Component}`` (``"attention"``, ``"indexer"``), or ``None`` when the code
        cannot be read (transformers missing, no modeling module, a rotary module that does
        not take this config, or a function signature ropekit does not know).

    Raises:
        RopeError: the code is readable but its RoPE is not one ropekit can express (the
        message names the family and the reason).
    """
    from . import _hf_code

    mt = model_type or getattr(config, "model_type", None)
    if not mt:
        return None
    try:
        comps = _hf_code.derive(config, mt, layer_type=layer_type)
    except _hf_code.NotRope as e:
        raise fail(
            "a RoPE that ropekit can express (one rotation per pair, pairs (i, i+r/2) or (2i, 2i+1))",
            f"{mt}: {e}",
            "this family's rotary code does something else; build RopeConfig by hand if part of it is RoPE",
        ) from None
    except Exception:
        return None
    if not comps:
        return None
    return {c.name: c for c in comps}


def _place(cfg: RopeConfig, src: _Src, name: str, comp: Any, layout_given: bool) -> RopeConfig:
    """Head width, rotating slice and direction of one component (``comp`` from the code, or
    ``None``: config rules only)."""
    r = cfg.rotary_dim
    nope, rope = src.get("qk_nope_head_dim"), src.get("qk_rope_head_dim")
    if comp is None:
        if name == "attention" and nope is not None and rope is not None:
            # multi-head latent attention (DeepSeek-V2/V3 and descendants): the head is
            # [nope | rope]; only the last qk_rope_head_dim dims rotate
            return cfg.replace(head_dim=int(nope) + int(rope), rotary_offset=int(nope))
        return cfg
    m, site = comp.measured, comp.site
    cut = src.get("index_head_dim") if name == "indexer" else None
    if getattr(site, "tables_cut", False) and cut is not None and int(cut) < r:
        # the indexer passes cos[..., :index_head_dim]: narrower than the rotary width, the
        # lanes it keeps are not the (i, i + r/2) pairs of one rotation
        raise fail(
            f"index_head_dim >= the rotary width {r} (the indexer cuts the tables to index_head_dim)",
            f"index_head_dim={cut}",
            "this indexer's rotation is not one RoPE; build RopeConfig by hand if part of it is",
        )
    changes: Dict[str, Any] = {"direction": m.direction}
    if not layout_given:
        changes["layout"] = m.layout
    if site.head_slice in ("first", "last"):  # the attention splits the head, rotates one piece
        if name == "indexer":
            full = src.get("index_head_dim")
        else:
            full = int(nope) + int(rope) if nope is not None and rope is not None else None
        full = r if full is None else int(full)
        changes.update(head_dim=full, rotary_offset=full - r if site.head_slice == "last" else 0)
    elif getattr(comp, "table", False):  # a table row: the function takes the whole head
        full = src.get("index_head_dim") if name == "indexer" else None
        full = cfg.head_dim if full is None else int(full)
        off = 0 if comp.offset == "start" else full - r
        if full > r or off:
            changes.update(head_dim=full, rotary_offset=off)
    elif m.width > r or m.offset:  # the function itself takes the whole head
        changes.update(head_dim=m.width, rotary_offset=m.offset)
    if cfg.scaling is not None and type(cfg.scaling).__name__ == "Proportional" and "head_dim" in changes:
        changes.pop("head_dim")  # its frequencies are relative to head_dim: keep the table's
        changes.pop("rotary_offset", None)
    return cfg.replace(**changes)


def rope_config_from_hf(
    obj: Any,
    *,
    layout: Optional[str] = None,
    component: Optional[str] = None,
    read_code: bool = True,
    **overrides: Any,
) -> Union[RopeConfig, Dict[str, Any]]:
    """Build a :class:`~ropekit.RopeConfig` from a Hugging Face model config.

    Args:
        obj: a transformers ``PretrainedConfig`` (4.x or 5.x), a ``dict`` (the parsed
            ``config.json``) or a path to ``config.json`` / its directory. Multimodal configs
            are read from their ``text_config``.
        layout: ``"half"`` or ``"interleaved"`` to force the pairing; default: measured
            from the family's modeling code (:func:`rope_facts`), else (no transformers, or
            ``read_code=False``) the fallback rules of :func:`layout_for_model_type`.
        component: ``"attention"`` or ``"indexer"`` (see :data:`COMPONENTS`) to get one
            component of a model that has several; ``None`` returns all of them.
        read_code: read transformers' modeling code for the pairing, the direction, the
            rotary width and the head slice (default). ``False`` uses the config alone and
            never imports transformers.
        **overrides: any ``RopeConfig`` field (``head_dim``, ``base``, ``rotary_dim``,
            ``scaling``, ``rotary_offset``, ``direction``) to replace after loading, in
            every returned config.

    Returns:
        A ``RopeConfig``; or, for configs with per-layer-type rope parameters (transformers
        5.x nested ``rope_parameters``, or Gemma 3's ``rope_local_base_freq``), a dict
        ``{layer_type: RopeConfig or None}`` (``None`` = a layer type without RoPE); or, for
        models with more than one rotary component (DeepSeek-V3.2's MLA attention and its
        indexer), a dict ``{component: RopeConfig or per-layer dict}`` (``component=``
        picks one).

    Multi-head latent attention (DeepSeek-V2/V3, Kimi, Mistral 4, ...): ``head_dim`` is the
    whole query/key head ``qk_nope_head_dim + qk_rope_head_dim`` and ``rotary_offset`` says
    where the rotating ``qk_rope_head_dim`` dims start (see ``RopeConfig.rotary_slice``).

    With transformers installed a ``dict``/path is first turned into the family's config
    object (``AutoConfig.for_model``), so ``from_hf(path)`` and ``from_hf(config)`` read the
    same values (class defaults, derived attributes such as Gemma 4's per-layer head dims).

    Raises:
        RopeError: bad input, or a family whose RoPE ropekit cannot express (named).

    Warns:
        IgnoredScalingWarning: the config's rope scaling is one the family's code ignores.
        IgnoredBaseWarning: the config's base is one the family's code ignores.
        UnknownFamilyWarning: the family table does not know the model type.

    Read: ``head_dim`` (else ``hidden_size // num_attention_heads``, GPT-J ``n_embd //
    n_head``); rotary dim from the model's rotary module, else MLA ``qk_rope_head_dim``,
    ``partial_rotary_factor`` / ``rotary_pct`` / GPT-J ``rotary_dim``; base from
    ``rope_theta`` / ``rotary_emb_base``; scaling from ``rope_parameters`` /
    ``rope_scaling`` (``rope_type`` or ``type``; ``su`` and Phi-3's
    ``yarn``-with-factor-lists mean ``longrope``; ``dynamic`` with ``alpha`` is HunYuan's
    static NTK). Missing ``factor`` of YaRN/LongRoPE and where
    ``original_max_position_embeddings`` is read follow the installed transformers' rules
    (4.x LongRoPE: the top-level value, else ``max_position_embeddings``, never the key inside
    ``rope_scaling``; 5.x: the top-level value, else the one in the rope parameters, else
    ``max_position_embeddings``); ``read_code=False`` follows 5.x.

    A scaled ``rope_type`` is answered as the family's code computes it (the table row's
    ``scaling`` fact, measured by the sweep; else the family's rotary module built from this
    config): the scaled RoPE where the code applies it as transformers' rope functions do; the
    unscaled RoPE and an :class:`IgnoredScalingWarning` where the code ignores it (GPT-J,
    CodeGen, ESM; Nemotron on transformers 4.x); a RopeError where the code refuses it or
    computes other tables (Ernie 4.5 VL, Phi-3.5-MoE). An explicit ``scaling=`` override is
    kept as given.

    The base is the one the family's code computes with: the config's (``rope_theta``,
    ``rope_parameters["rope_theta"]``, ``rotary_emb_base``, ...) where the code reads it, as every
    family but these does; where the code ignores it — GPT-J and CodeGen compute their sinusoids
    from a hard-coded 10000, and so do ESM and IDEFICS on transformers 4.x — that constant, with
    an :class:`IgnoredBaseWarning` when the config asks for another. The table row answers the
    config's base where the family's code applies the rope parameters (the sweep's base check
    holds every family to it); where the code ignores them (the row's ``scaling`` fact says
    ``ignored``), a base other than the config class default is answered by the code. Another
    installed version checks an input with such a base against the code once (verdict key
    ``<model_type>+theta``). An explicit ``base=`` override is kept as given.

    A partial rotary factor other than the one the family's table row was verified on (the
    config class default) is checked against the family's code once per transformers version:
    transformers 5.x's Llama, Mistral, Qwen2/3, Gemma, ... ignore it for the default rope type
    (the whole head rotates) while Phi, StableLM, GPT-NeoX, GLM, ... and every scaled type apply it.

    Example:
        >>> cfg = rope_config_from_hf({"model_type": "llama", "hidden_size": 4096,
        ...     "num_attention_heads": 32, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        ...     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        ...                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
        ...     read_code=False)
        >>> cfg.head_dim, cfg.base, type(cfg.scaling).__name__, cfg.layout
        (128, 500000.0, 'Llama3', 'half')
    """
    bad = sorted(set(overrides) - set(_CONFIG_FIELDS))
    if bad:
        raise fail(f"overrides among {list(_CONFIG_FIELDS)}", repr(bad), "remove the unknown keyword arguments")
    if component is not None and component not in COMPONENTS:
        raise fail(f"component None or one of {list(COMPONENTS)}", repr(component), "pass e.g. component='indexer'")
    loaded = _load(obj)
    if not read_code:
        return _pick(_read(loaded, layout, "rules", None, overrides), component)
    model_type = _effective_model_type(loaded)
    version = _hf_table.installed_version()
    row = _hf_table.row(model_type, version)
    if row is None:
        _say_unknown(model_type, version)
        return _pick(_read(loaded, layout, "code", None, overrides), component)
    how = _hf_table.verdict(model_type, row, version)
    keys = [model_type]  # the verdict keys this input checks (all of them recorded)
    if how != "code" and version is not None:
        partial = _unverified_partial(loaded, model_type, row)
        if partial is not None:  # an input the row was never verified on: checked once per version
            keys = [partial]
            how = _hf_table.verdict(model_type, row, version, key=partial)
        if version not in row.get("verified", ()):
            # the row's scaling fact (applied / ignored / refused) and the base it reads are
            # verified per version: another version's code may differ (Nemotron ignores
            # rope_scaling in 4.x only; ESM and IDEFICS ignore rope_theta in 4.x only)
            if _has_scaling(loaded, row):
                keys.append(f"{keys[0]}+scaled")
            if _has_other_base(loaded, row):
                keys.append(f"{keys[0]}+theta")
            if len(keys) > 1:
                found = [_hf_table.verdict(model_type, row, version, key=k) for k in keys[1:]]
                how = "code" if "code" in found else "table" if set(found) == {"table"} else "check"
    deferred = ""
    if how == "table":
        try:
            return _pick(_read(loaded, layout, "table", row, overrides), component)
        except _NeedCode as e:
            how, deferred = "code", str(e)
    if how == "code":
        if version is None and model_type not in _SAID:
            _SAID.add(model_type)
            warnings.warn(
                f"ropekit's family table answers model_type {model_type!r} only from transformers' code "
                f"({row.get('code') or deferred or 'the code differs from the row'}), and transformers is not installed: "
                "the config alone answers, which may differ from the model; install transformers",
                UnknownFamilyWarning,
                stacklevel=2,
            )
        return _pick(_read(loaded, layout, "code", row, overrides), component)
    # a transformers version the row was not verified against: the family's code answers,
    # and the row is compared with it once (the verdict is cached per transformers version)
    answers = []
    for mode in ("code", "table"):
        try:
            with warnings.catch_warnings():
                if mode == "table":  # only compared: its warnings would repeat the code's
                    warnings.simplefilter("ignore")
                answers.append((_read(loaded, layout, mode, row, overrides), None))
        except (RopeError, _NeedCode) as e:
            answers.append((None, e))
    (code, err), (tab, terr) = answers
    if not isinstance(terr, _NeedCode):  # else this input says nothing about the row
        same = code == tab and (err is None) == (terr is None)
        for k in keys:  # a scaled input, or one with another base, checks the row's other facts too
            _hf_table.record(k, version or "none", same)
    if err is not None:
        raise err
    return _pick(code, component)


def _partials(loaded: Any, row: Mapping[str, Any]) -> set:
    """``{(rope_type, partial_rotary_factor)}`` of the rope-parameters dicts of ``loaded`` whose
    factor the config rules read as other than 1, as the table mode sees the input (row
    defaults filled in); raises what :func:`_read` would raise on a bad input."""
    if isinstance(loaded, Mapping):
        loaded = _with_row_defaults(loaded, row)
    src = _Src(loaded)
    model_type = str(src.get("model_type", "")).lower()
    text = src.get("text_config")
    if text is not None and src.get("num_attention_heads") is None and src.get("n_head") is None:
        src = _Src(text)
        model_type = str(src.get("model_type", model_type)).lower()
    params = src.get("rope_parameters")
    if params is None:
        params = src.get("rope_scaling")
    if not isinstance(params, Mapping):
        params = {}
    if _is_nested(params):
        dicts = [(_layer_src(src, lt), p) for lt, p in params.items() if isinstance(p, Mapping)]
    else:
        dicts = [(src, params)]
    out = set()
    for lsrc, p in dicts:
        kind = p.get("rope_type", p.get("type"))
        prf = p.get("partial_rotary_factor", lsrc.get("partial_rotary_factor", lsrc.get("rotary_pct")))
        if prf is None:
            prf = 0.25 if model_type == "gpt_neox" else 1.0
        prf = float(prf)
        if prf != 1.0:
            out.add(("default" if kind is None else str(kind).lower(), prf))
    return out


def _has_scaling(loaded: Any, row: Mapping[str, Any]) -> bool:
    """Whether an input's rope parameters (row defaults filled in for a dict) name a scaled
    ``rope_type`` (not ``default`` / ``mrope``)."""
    try:
        if isinstance(loaded, Mapping):
            loaded = _with_row_defaults(loaded, row)
        src = _Src(loaded)
        text = src.get("text_config")
        if text is not None and src.get("num_attention_heads") is None and src.get("n_head") is None:
            src = _Src(text)
        params = src.get("rope_parameters")
        if params is None:
            params = src.get("rope_scaling")
    except Exception:  # a bad input, or one the row cannot read (_NeedCode): _read says so
        return False
    if not isinstance(params, Mapping):
        return False
    dicts = [p for p in params.values() if isinstance(p, Mapping)] if _is_nested(params) else [params]
    kinds = {str(p.get("rope_type", p.get("type")) or "default").lower() for p in dicts}
    return bool(kinds - {"default", "mrope"})


def _bases(loaded: Any, row: Mapping[str, Any]) -> Dict[Tuple[str, Optional[str]], float]:
    """``{(component, layer type): base}`` as the table mode reads ``loaded`` with ``row`` (before
    the base check itself); raises what :func:`_read` raises."""
    out: Dict[Tuple[str, Optional[str]], float] = {}
    for name, v in _read(loaded, None, "table", row, {}, base_check=False).items():
        for lt, cfg in (v.items() if isinstance(v, dict) else [(None, v)]):
            if cfg is not None:
                out[(name, lt)] = cfg.base
    return out


def _row_base(row: Mapping[str, Any], layer_type: Optional[str]) -> float:
    """The base the table mode reads for the row's own config (its config class defaults: what the
    sweep verified the row on), for one layer type, by the rules of :func:`_one` (per-layer-type
    rope parameters, Gemma 3's 4.x ``rope_local_base_freq``, ChatGLM's ``rope_ratio``)."""
    d = row.get("defaults") or {}
    rp = d.get("rope_parameters") if d.get("rope_parameters") is not None else d.get("rope_scaling")
    rp = rp if isinstance(rp, Mapping) else {}
    if _is_nested(rp):
        p = rp.get(layer_type) if isinstance(rp.get(layer_type), Mapping) else {}
    else:
        p = rp
        if layer_type == "sliding_attention" and d.get("rope_local_base_freq") is not None:
            return float(d["rope_local_base_freq"])
    v = p.get("rope_theta", d.get("rope_theta", d.get("rotary_emb_base")))
    if v is None:
        v = 10000.0 * float(d.get("rope_ratio") or 1.0)
    return float(v)


def _has_other_base(loaded: Any, row: Mapping[str, Any]) -> bool:
    """Whether an input's RoPE base (as the table mode reads it) differs from the one the row was
    verified on (the config class default)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = _bases(loaded, row)
    except Exception:  # a bad input, or one the row cannot read (_NeedCode): _read says so
        return False
    return any(_row_base(row, lt) != v for (_, lt), v in got.items())


def _unverified_partial(loaded: Any, model_type: str, row: Mapping[str, Any]) -> Optional[str]:
    """The verdict key of an input whose partial rotary factor the table row was never verified
    on (``None``: the row's own, or none).

    The sweep verifies a row on the family's tiny and default configs, so with the class default
    partial rotary factor (Phi 0.5, GPT-NeoX 0.25, most families none) and rope type. Whether a
    family applies another factor is its code's business, not a rule of the table: transformers
    4.x applies it for every rope type, 5.x only in the scaled types (linear, dynamic, yarn,
    llama3, longrope: ``modeling_rope_utils``) and in the families whose own
    ``compute_default_rope_parameters`` reads it (Phi, StableLM, GPT-NeoX, GLM, Qwen3-Next, ...),
    while Llama, Mistral, Qwen2/3, Gemma, ... rotate the whole head; MLA families apply it to
    ``qk_rope_head_dim`` in the scaled types only. So such an input is answered by the code, once
    per transformers version and key (``model_type+partial:rope_types``), and the row answers
    later ones when it gave the code's answer (:func:`ropekit._hf_table.verdict`)."""
    try:
        got = _partials(loaded, row)
        if not got:
            return None
        verified = _partials({"model_type": model_type}, row)
    except Exception:  # a bad input, or one the row cannot read (_NeedCode): _read says so
        return None
    extra = got - verified
    if not extra:
        return None
    return f"{model_type}+partial:{','.join(sorted({k for k, _ in extra}))}"


def _pick(results: Dict[str, Any], component: Optional[str]) -> Any:
    if component is not None:
        if component not in results:
            raise fail(
                f"a component of this model: {sorted(results)}",
                repr(component),
                "leave component=None to get every component",
            )
        return results[component]
    return results["attention"] if len(results) == 1 else results


def _effective_model_type(loaded: Any) -> str:
    """The ``model_type`` whose RoPE ``from_hf`` reads (a multimodal wrapper's text model)."""
    src = _Src(loaded)
    model_type = str(src.get("model_type", "")).lower()
    text = src.get("text_config")
    if text is not None and src.get("num_attention_heads") is None and src.get("n_head") is None:
        model_type = str(_Src(text).get("model_type", model_type)).lower()
    return model_type


_SAID: set = set()


def _say_unknown(model_type: str, version: Optional[str]) -> None:
    if model_type in _SAID:
        return
    _SAID.add(model_type)
    how = (
        "its RoPE is read from the installed transformers' modeling code (slower; `ropekit hf-sweep --only "
        + (model_type or "TYPE") + "` checks it against the model itself)"
        if version is not None
        else "transformers is not installed, so the config alone answers (pairing by model type)"
    )
    warnings.warn(
        f"ropekit's family table has no row for model_type {model_type!r}: {how}",
        UnknownFamilyWarning,
        stacklevel=3,
    )


class UnknownFamilyWarning(UserWarning):
    """``from_hf`` read a model type the family table does not know from transformers' code."""


class _Slice:
    def __init__(self, head_slice: str, tables_cut: bool) -> None:
        self.head_slice, self.tables_cut = head_slice, tables_cut


class _RowMeasured:
    def __init__(self, layout: str, direction: int) -> None:
        self.layout, self.direction, self.rotary_dim = layout, direction, None


class _RowComponent:
    """One component of a table row, in the shape :func:`_place` reads (``Component``)."""

    table = True

    def __init__(self, name: str, c: Mapping[str, Any]) -> None:
        self.name = name
        self.measured = _RowMeasured(c["layout"], int(c["direction"]))
        self.site = _Slice(c["head_slice"], bool(c.get("tables_cut")))
        self.offset = c.get("offset", "start")


def _row_facts(row: Mapping[str, Any], src: _Src) -> Optional[Dict[str, Any]]:
    """``{component: _RowComponent}`` of a table row for this config (``None``: the code has
    no RoPE ropekit reads, the config rules answer)."""
    if row.get("refuse"):
        raise fail(
            "a RoPE that ropekit can express",
            str(row["refuse"]),
            "build RopeConfig by hand for the part that is RoPE",
        )
    comps = row.get("components")
    flag = row.get("flag")
    if flag:
        v = src.get(flag)
        v = row.get("flag_default") if v is None else bool(v)
        comps = row.get("by_flag", {}).get(json.dumps(v))
    if not comps:
        return None
    return {name: _RowComponent(name, c) for name, c in comps.items()}


class _NeedCode(Exception):
    """A table row cannot answer this input; the family's code does (the message, if any, says why)."""


def _with_row_defaults(loaded: Mapping, row: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of a config dict with the row's config-class defaults filled in where absent
    (what ``AutoConfig.for_model`` would add), in the text part of a multimodal wrapper."""
    d = copy.deepcopy(dict(loaded))
    target = d
    if isinstance(d.get("text_config"), Mapping) and d.get("num_attention_heads") is None and d.get("n_head") is None:
        target = d["text_config"] = dict(d["text_config"])
    defaults = dict(row.get("defaults") or {})
    rp = defaults.get("rope_parameters")
    if target.get("rope_parameters") is None and target.get("rope_scaling") is not None and rp is not None:
        if _is_nested(rp):
            # 4.x names in a file for a class whose default rope parameters are 5.x (Gemma 3's
            # nested per-layer-type dict): only the config class knows how they merge
            raise _NeedCode()
        defaults.pop("rope_parameters")  # the file's rope_scaling is the scheme
        if isinstance(rp, Mapping) and rp.get("rope_theta") is not None:
            defaults.setdefault("rope_theta", rp["rope_theta"])
    rp = defaults.get("rope_parameters")
    if target.get("rope_parameters") is None and isinstance(rp, Mapping) and not _is_nested(rp):
        # the file's top-level values win over the ones inside the default rope parameters
        top = {"rope_theta": ("rope_theta", "rotary_emb_base"), "partial_rotary_factor": ("partial_rotary_factor", "rotary_pct")}
        defaults["rope_parameters"] = {
            k: v for k, v in rp.items() if not any(target.get(a) is not None for a in top.get(k, ()))
        }
    for key, aliases in _ALIASES.items():  # a 4.x / GPT-J name in the file wins over the default
        if any(target.get(a) is not None for a in aliases):
            defaults.pop(key, None)
    for k, v in defaults.items():
        if target.get(k) is None:
            target[k] = copy.deepcopy(v)
    return d


_ALIASES = {
    "rope_theta": ("rotary_emb_base",),
    "partial_rotary_factor": ("rotary_pct",),
    "hidden_size": ("n_embd", "d_model"),
    "num_attention_heads": ("n_head",),
    "max_position_embeddings": ("n_positions", "seq_length"),
}


def _read(
    loaded: Any, layout: Optional[str], mode: str, row: Any, overrides: Mapping[str, Any], *, base_check: bool = True
) -> Dict[str, Any]:
    """``{component: RopeConfig or per-layer dict}``; ``mode``: ``"rules"`` (the config
    alone), ``"code"`` (transformers' modeling code) or ``"table"`` (the family table's ``row``).

    The scaling parameters follow the installed transformers' rules (4.x or 5.x, see
    :func:`_original_4x`) in the ``"code"`` and ``"table"`` modes, the 5.x rules in ``"rules"``
    (no transformers involved: presets read the same everywhere). The base is the one the
    family's code computes with (:func:`_as_based`; ``base_check=False``: the config's)."""
    legacy = mode != "rules" and _rules_of(_hf_table.installed_version())
    if isinstance(loaded, Mapping):
        if mode == "table":
            loaded = _with_row_defaults(loaded, row)
        elif mode == "code" or _is_sparse(loaded):
            loaded = _with_class_defaults(loaded) or loaded
    src = _Src(loaded)
    model_type = str(src.get("model_type", "")).lower()
    text = src.get("text_config")
    if text is not None and src.get("num_attention_heads") is None and src.get("n_head") is None:
        src = _Src(text)  # multimodal wrapper (Llama 4, Gemma 3, Mistral 3, ...): read the LM part
        model_type = str(src.get("model_type", model_type)).lower()
    table_facts = _row_facts(row, src) if mode == "table" else None

    def facts_for(layer_type: Optional[str] = None) -> Dict[str, Any]:
        if mode == "table":
            return table_facts or {"attention": None}
        f = rope_facts(src.obj, model_type, layer_type) if mode == "code" and not src.is_dict else None
        return f or {"attention": None}

    layout_given = layout is not None
    if layout is None:
        layout = layout_for_model_type(model_type, src.get("rope_interleave"))
    head_dim = _head_dim(src, model_type)
    max_pos = src.get("max_position_embeddings", src.get("n_positions", src.get("seq_length")))
    max_pos = None if max_pos is None else integer("max_position_embeddings", max_pos)

    params = src.get("rope_parameters")
    if params is None:
        params = src.get("rope_scaling")
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise fail("rope_scaling/rope_parameters a dict or null", type(params).__name__, "fix the config")

    local_base = src.get("rope_local_base_freq")
    if not _is_nested(params) and local_base is not None and model_type.startswith("gemma3"):
        # transformers 4.x Gemma 3: global layers use rope_theta (+ rope_scaling), sliding
        # layers rope_local_base_freq without scaling. 5.x stores this nested.
        glob = dict(params)
        glob.setdefault("rope_theta", src.get("rope_theta", 1_000_000.0))
        params = {"full_attention": glob, "sliding_attention": {"rope_type": "default", "rope_theta": local_base}}

    def finish(cfg: RopeConfig, name: str, comp: Any, lsrc: _Src, layer_type: Optional[str] = None) -> RopeConfig:
        cfg = _place(cfg, lsrc, name, comp, layout_given)
        if base_check:  # first: a measured scaling effect needs the base the code uses
            cfg = _as_based(cfg, mode, src, model_type, layer_type, comp, row, overrides)
        cfg = _as_coded(cfg, mode, src, model_type, layer_type, comp, row, overrides)
        return cfg.replace(**overrides) if overrides else cfg

    results: Dict[str, Any] = {}
    if _is_nested(params):
        per_type = {lt: facts_for(lt) for lt, p in params.items() if p is not None}
        # a layer type the model does not use (absent from layer_types) cannot be probed:
        # its pairing and direction are the code's, read on another layer type
        known = next((f for f in per_type.values() if any(c is not None for c in f.values())), None)
        for layer_type, p in params.items():
            facts = per_type.get(layer_type) or {"attention": None}
            if known is not None and all(c is None for c in facts.values()):
                facts = known
            for name, comp in facts.items():
                out = results.setdefault(name, {})
                if p is None:
                    out[layer_type] = None
                    continue
                lay = layout if (layout_given or comp is None) else comp.measured.layout
                lsrc = _layer_src(src, layer_type)
                hd = _layer_head_dim(src, model_type, layer_type, _head_dim(lsrc, model_type))
                cfg = _one(lsrc, p, model_type, hd, max_pos, lay, legacy=legacy, nested=True)
                out[layer_type] = finish(cfg, name, comp, lsrc, layer_type)
        full = {lt for lt in params}
        for name, out in results.items():  # a component seen only on some layer types
            for lt in full - set(out):
                out[lt] = None
    else:
        for name, comp in facts_for().items():
            lay = layout if (layout_given or comp is None) else comp.measured.layout
            r = comp.measured.rotary_dim if comp is not None else None
            results[name] = finish(_one(src, params, model_type, head_dim, max_pos, lay, r, legacy=legacy), name, comp, src)
    return results


class IgnoredScalingWarning(UserWarning):
    """``from_hf`` read a rope scaling (``rope_scaling`` / ``rope_parameters`` with a scaled
    ``rope_type``) that the family's own code ignores: it returns the unscaled RoPE the model
    computes, which is probably not what the config's author meant."""


class IgnoredBaseWarning(UserWarning):
    """``from_hf`` read a RoPE base (``rope_theta``, ``rope_parameters["rope_theta"]``,
    ``rotary_emb_base``) that the family's own code ignores: it returns the RoPE with the base
    the model computes with (GPT-J and CodeGen hard-code 10000, as ESM and IDEFICS do on
    transformers 4.x), which is probably not what the config's author meant."""


#: Scaling effects the code mode found, while :func:`_collect_effects` collects them (the sweep
#: derives a family-table row's ``scaling`` fact from them).
_EFFECTS: Optional[list] = None


@contextlib.contextmanager
def _collect_effects() -> Any:
    global _EFFECTS
    prev, _EFFECTS = _EFFECTS, []
    try:
        yield _EFFECTS
    finally:
        _EFFECTS = prev


def _caller_level() -> int:
    """``stacklevel`` of a warning that points at the caller of ``from_hf``."""
    import sys

    level, f = 1, sys._getframe(1)  # frame 1: the function that calls warnings.warn
    while f is not None and str(f.f_globals.get("__name__", "")).startswith("ropekit."):
        f, level = f.f_back, level + 1
    return level


def _say_ignored(model_type: str, kind: str, why: str) -> None:
    warnings.warn(
        f"the config of model_type {model_type!r} asks for rope_type {kind!r}, which transformers' {model_type} "
        f"code ignores ({why}): from_hf returns the unscaled RoPE the model computes. If you meant the scaling to "
        "apply, the model does not apply it either; pass scaling=... to from_hf to get it in ropekit anyway",
        IgnoredScalingWarning,
        stacklevel=_caller_level(),
    )


def _as_coded(
    cfg: RopeConfig,
    mode: str,
    src: _Src,
    model_type: str,
    layer_type: Optional[str],
    comp: Any,
    row: Any,
    overrides: Mapping[str, Any],
) -> RopeConfig:
    """``cfg`` with its scaling as the family's code applies it: kept (the code applies it the
    way transformers' rope functions do), dropped with an :class:`IgnoredScalingWarning` (the
    code computes the default RoPE whatever the config says: GPT-J, CodeGen, ESM on 5.x,
    Nemotron on 4.x), or a RopeError (the code refuses the config, Ernie 4.5 VL, or computes
    other frequencies). ``"table"`` mode reads the row's ``scaling`` fact (verified by the sweep
    on linear and dynamic scaling: one fact for every rope type where both agree, else one per
    rope type checked and the code for the others), ``"code"`` measures the family's rotary
    module with this config; ``"rules"`` (no transformers) keeps it. An explicit ``scaling=``
    override wins."""
    if cfg.scaling is None or mode == "rules" or "scaling" in overrides:
        return cfg
    kind = cfg.scaling.rope_type or type(cfg.scaling).__name__
    if mode == "table":
        fact = (row or {}).get("scaling", "applied")
        if isinstance(fact, Mapping):  # per rope type checked by the sweep; other types: the code
            fact = fact.get(kind, "code")
        if fact in ("applied", "unverified"):
            return cfg
        if fact == "ignored":
            _say_ignored(model_type, kind, "its rotary module computes the default RoPE whatever rope_type says")
            return cfg.replace(scaling=None)
        if isinstance(fact, str) and fact.startswith("refused: "):
            raise _scaling_refused(model_type, kind, fact[len("refused: "):])
        raise _NeedCode()  # "code" (or a fact this ropekit does not know): the code answers
    effect, why = _code_effect(src, model_type, layer_type, comp, cfg)
    if _EFFECTS is not None:
        _EFFECTS.append((effect, why))
    if effect == "ignored":
        _say_ignored(model_type, kind, why)
        return cfg.replace(scaling=None)
    if effect in ("refused", "differs"):
        raise _scaling_refused(model_type, kind, why)
    return cfg


def _say_ignored_base(model_type: str, given: float, used: float, why: str) -> None:
    warnings.warn(
        f"the config of model_type {model_type!r} asks for RoPE base {given:g} (rope_theta), which transformers' "
        f"{model_type} code ignores ({why}): from_hf returns the RoPE with base {used:g} the model computes. If you "
        "meant the base to apply, the model does not apply it either; pass base=... to from_hf to get it in ropekit "
        "anyway",
        IgnoredBaseWarning,
        stacklevel=_caller_level(),
    )


def _ignores(fact: Any) -> bool:
    """Whether a row's ``scaling`` fact says the family's code ignores a scaled rope type."""
    return fact == "ignored" or (isinstance(fact, Mapping) and "ignored" in fact.values())


def _as_based(
    cfg: RopeConfig,
    mode: str,
    src: _Src,
    model_type: str,
    layer_type: Optional[str],
    comp: Any,
    row: Any,
    overrides: Mapping[str, Any],
) -> RopeConfig:
    """``cfg`` with the base the family's code computes with: the config's where the code reads
    it; where it does not (GPT-J, CodeGen; ESM and IDEFICS on transformers 4.x), the code's own
    constant, with an :class:`IgnoredBaseWarning` when the config asks for another.

    ``"code"`` reads the family's code (:func:`_code_base`); ``"rules"`` (no transformers) keeps
    the config's. ``"table"``: the sweep verifies a row on its config class default base; a
    family whose code ignores the rope parameters (the row's ``scaling`` fact says ``ignored``:
    it computes its own sinusoids, with the config's base or a constant) answers any other base
    from its code; the other rows read the base as the rope functions their code calls do (the
    sweep's base check, ``.ci/sweep-transformers``, holds every family to it). An explicit
    ``base=`` override wins."""
    if mode == "rules" or "base" in overrides:
        return cfg
    if mode == "table":
        if _ignores((row or {}).get("scaling")):
            verified = _row_base(row, layer_type)
            if cfg.base != verified:
                raise _NeedCode(
                    f"the base {cfg.base:g} is not the one the row was verified on, and the family's code ignores the "
                    "rope parameters: it may not read the base either"
                )
        return cfg
    used, why = _code_base(src, model_type, layer_type, comp, cfg)
    if used == cfg.base:
        return cfg
    _say_ignored_base(model_type, cfg.base, used, why)
    return cfg.replace(base=used)


def _code_base(src: _Src, model_type: str, layer_type: Optional[str], comp: Any, cfg: RopeConfig) -> Tuple[float, str]:
    """``(base, why)``: the base the family's code computes with for the config ``src.obj``;
    ``cfg.base`` where it reads the config's, or where the code cannot say (a dict the config
    class does not take, no modeling module, a module that does not run at positions 0..6).

    A modeling module whose source never names the config's base computes with its constant
    (:func:`ropekit._hf_code.reads_base`, :func:`ropekit._hf_code.coded_base`). Otherwise the
    family's rotary module built from the config is measured at positions ``0..6``: its tables
    are those of ``cfg`` (scaled or not: the scaling is decided next) with the config's base, or
    else with the module's constant or 10000, or neither (the config's base is kept)."""
    from . import _hf_code

    if src.is_dict:
        return cfg.base, ""
    module = _hf_code.modeling_module_for(model_type)
    if module is None:
        return cfg.base, ""
    coded = _hf_code.coded_base(module)
    if _hf_code.reads_base(module) is False:
        if coded is None:
            return cfg.base, ""
        return coded, f"its modeling code never reads rope_theta / rope_parameters; its sinusoids use base {coded:g}"
    others = [b for b in dict.fromkeys((coded, 10000.0)) if b is not None and b != cfg.base]
    if not others or comp is None or not getattr(getattr(comp, "measured", None), "lanes", None):
        return cfg.base, ""
    rot, _ = _hf_code.build_rotary(module, src.obj)
    if rot is None:
        return cfg.base, ""
    import torch

    pos = torch.arange(7)

    def matches(base: float) -> bool:
        for c in [cfg.replace(base=base)] + ([cfg.replace(base=base, scaling=None)] if cfg.scaling is not None else []):
            try:
                ch, sh = transformers_cos_sin(c, pos)
                g = _hf_code.table_gap(rot, comp.measured.lanes, pos, ch, sh, layer_type=layer_type, config=src.obj)
            except Exception:
                return False
            if g <= 2.0**-21:  # float32 rounding of another cos/sin routine (torch.polar)
                return True
        return False

    if matches(cfg.base):
        return cfg.base, ""
    for b in others:
        if matches(b):
            return b, f"its rotary module computes the tables of base {b:g} whatever the config says"
    return cfg.base, ""


def _scaling_refused(model_type: str, kind: str, why: str) -> RopeError:
    return fail(
        f"rope_type {kind!r} as transformers' {model_type} code computes it",
        f"{model_type}: {why}",
        "use the rope type the family's code supports (its config class default), or pass scaling=... "
        "to from_hf to get a RopeConfig the model does not compute",
    )


def _code_effect(src: _Src, model_type: str, layer_type: Optional[str], comp: Any, cfg: RopeConfig) -> Tuple[str, str]:
    """What the family's rotary module does with the scaled config ``src.obj``: ``("applied", "")``
    (its tables are ``transformers_cos_sin(cfg)``), ``("ignored", why)`` (they are those of ``cfg``
    without the scaling), ``("refused", why)`` (no rotary class takes the config),
    ``("differs", why)``, ``("either", why)`` (both agree wherever the module runs) or
    ``("unknown", why)`` (the code cannot be measured: a dict the config class refuses, no
    modeling module; the config rules answer, as before).

    Probed at positions ``0..6`` and, for length-dependent schemes, past the context
    (``max_position_embeddings`` / ``original_max_position_embeddings``)."""
    import torch

    from . import _hf_code

    if src.is_dict:
        return "unknown", "a dict the config class does not take"
    module = _hf_code.modeling_module_for(model_type)
    if module is None:
        return "unknown", "no modeling module"
    if _hf_code.reads_scaling(module) is False:
        return "ignored", "its modeling code never reads rope_scaling / rope_parameters"
    if comp is None or getattr(comp, "measured", None) is None or not getattr(comp.measured, "lanes", None):
        why = _hf_code.rotary_refusal(src.obj, model_type)
        return ("refused", f"its rotary module refuses the config ({why})") if why else ("unknown", "no call site read")
    rot, errors = _hf_code.build_rotary(module, src.obj)
    if rot is None:
        return "refused", f"its rotary module refuses the config ({'; '.join(errors)})"
    plain = cfg.replace(scaling=None)
    sets = [torch.arange(7)]
    if cfg.scaling.length_dependent:
        far = max(int(getattr(cfg.scaling, a, 0) or 0) for a in ("max_position", "original_max_position"))
        sets.append(torch.arange(7) + far + 1)
    gaps = {"applied": 0.0, "ignored": 0.0}
    ran = 0
    for pos in sets:
        for name, c in (("applied", cfg), ("ignored", plain)):
            try:
                ch, sh = transformers_cos_sin(c, pos)
                g = _hf_code.table_gap(rot, comp.measured.lanes, pos, ch, sh, layer_type=layer_type, config=src.obj)
            except Exception:
                g = None
            if g is None:
                break
            gaps[name] = max(gaps[name], g)
        else:
            ran += 1
            continue
        if ran == 0:  # not even positions 0..6: the code cannot be measured this way
            return "unknown", "the rotary module does not run at positions 0..6"
        break  # the module does not run past its context (GPT-J's position table): positions it runs
    tol = 2.0**-21  # float32 rounding of another cos/sin routine (torch.polar)
    if gaps["applied"] <= tol and gaps["ignored"] <= tol:
        return "either", "the scaling changes nothing at the positions the module runs"
    if gaps["applied"] <= tol:
        return "applied", ""
    if gaps["ignored"] <= tol:
        return "ignored", "its rotary module computes the default RoPE whatever rope_type says"
    return "differs", (
        f"its rotary module's tables differ from transformers' rope_type {cfg.scaling.rope_type!r} by "
        f"{gaps['applied']:.3g} and from the unscaled RoPE by {gaps['ignored']:.3g}"
    )


_config._HF_READER[:] = [rope_config_from_hf]  # RopeConfig.from_hf delegates here
