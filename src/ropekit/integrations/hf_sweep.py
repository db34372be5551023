"""Sweep every RoPE family of the installed transformers: configs, pairing, patching.

For every ``model_type`` whose modeling module defines a 1-D ``*RotaryEmbedding`` class,
on a tiny config built from the config class (never weights or hub files):

1. **config** — ``RopeConfig.from_hf(config)`` against the family's own code: the model's
   RoPE function, fed basis vectors with the model's own tables, must equal, bit for bit,
   the rotation ropekit's config describes (tables through
   :func:`ropekit.hf.transformers_cos_sin`, pairing, direction, rotary width, offset) —
   for every component (attention, indexer) and layer type. When the tiny model builds,
   the calls the model really makes during a forward are recorded and checked too (which
   function, the width and head slice of q). ``from_hf`` of the saved ``config.json`` must
   equal ``from_hf`` of the object.
2. **scaled** — the same comparison for the tiny config with scaled rope parameters
   (:data:`SCALINGS`: linear, and dynamic NTK with a context below the probe positions; LongRoPE
   where the config class takes neither): ``from_hf`` must give the model's rotation (the
   scaling applied, or dropped where the family's code ignores it) or a RopeError, never a
   scaled RoPE the model does not compute. A wrong scaled check counts as a wrong config.
3. **patch** — for models that build: ``patch(model, tables="transformers")`` must give
   bit-identical logits and identical greedy generation; ``unpatch`` must restore the
   unpatched logits bit for bit.

``--table`` writes the family table; each row's ``scaling`` fact (what the family's code does
with a scaled rope type, :func:`_scaling_fact`) is measured on the same scaled configs.

Results are rows (dicts); :func:`format_table` renders the table in
``docs/transformers.md``. Run it as ``ropekit hf-sweep``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import json
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

__all__ = [
    "Row", "families", "tiny_config", "scaled_configs", "SCALINGS", "check", "sweep", "format_table", "summary",
]  # fmt: skip

SMALL: Dict[str, Any] = dict(
    vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, n_embd=64, n_head=4, n_layer=2,
    n_positions=256, num_layers=2, d_model=64, ffn_dim=64, moe_intermediate_size=32, num_experts=4,
    n_routed_experts=4, num_local_experts=4, num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=16,
    q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, n_group=1,
    topk_group=1, shared_expert_intermediate_size=32, kv_channels=16, encoder_layers=2, decoder_layers=2,
    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
    index_head_dim=16, index_n_heads=2, index_topk=8, rotary_dim=8, global_head_dim=32,
    vocab_size_per_layer_input=128, depth=1, embed_dim=32, num_heads=4, out_hidden_size=64,
    vision_hidden_size=32, projector_hidden_size=64, text_hidden_size=64, encoder_num_attention_heads=4,
    decoder_num_attention_heads=4, encoder_num_key_value_heads=2, decoder_num_key_value_heads=2,
    encoder_num_hidden_layers=2, decoder_num_hidden_layers=2, hidden_size_per_layer_input=8, num_kv_shared_layers=0,
)  # fmt: skip
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
MAX_PARAMS = 3_000_000
S = 7  # probe positions (odd: never a head width)


@dataclasses.dataclass
class Row:
    """One ``model_type`` of the sweep.

    Attributes:
        model_type, family: the config's ``model_type`` and its modeling module's name.
        config: ``"exact"``, ``"refused"`` (a RopeError naming why), ``"wrong"``
            (a difference), ``"n/a"`` (no 1-D RoPE call in the language model's code: vision
            or audio towers, 2-D RoPE, inline RoPE, composite configs), or ``"untested"``
            (the config class rejected the sweep's tiny sizes).
        checked: ``"code+run"`` (also the recorded forward), ``"code"``.
        path_equal: ``from_hf(saved config.json) == from_hf(config)``.
        patch: ``"proven"``, ``"refused"``, ``"wrong"``, ``"not built"`` or ``"n/a"``.
        logits, generate: patched (``tables="transformers"``) logits bit-identical and
            greedy tokens identical; ``None`` when not run.
        detail: the config's difference / reason, one line.
        patch_detail: why the patch was refused / differs / was not run.
        exact: ``patch(model, tables="exact")``: ``"proven, logits within X"`` or
            ``"refused: why"``; empty when not run.
        bf16: ``patch(model)`` with default arguments on the model cast to bfloat16:
            ``"proven"`` (and ran) or ``"refused: why"``; empty when not run.
        seconds: time spent on this row.
        rounding: ``config`` is exact in pairing, direction, width and slice, but the
            model's own tables differ from :func:`ropekit.hf.transformers_cos_sin` by float32
            rounding (a different cos/sin routine, e.g. ``torch.polar``).
        scaled: ``from_hf`` of the tiny config with scaled rope parameters (:data:`SCALINGS`)
            against the family's code, as ``config``: ``"exact"`` (every scaled config the
            config class takes: the model's rotation, bit for bit, the scaling applied or, where
            the code ignores it, dropped), ``"refused"`` (a RopeError for one of them),
            ``"wrong"`` (a difference, or an answer for a config the family's rotary module
            refuses), ``"n/a"`` (no scaled config the class takes, or its module does not run at
            the probe positions); empty when ``config`` did not answer.
        scaled_detail: per scaled config: ``"linear exact"``, ``"dynamic exact, scaling
            ignored by the code"``, ``"linear refused: why"``, ``"linear wrong: difference"``,
            ``"dynamic n/a: why"``.
    """

    model_type: str
    family: str
    config: str = "n/a"
    checked: str = ""
    path_equal: Optional[bool] = None
    patch: str = "n/a"
    logits: Optional[bool] = None
    generate: Optional[bool] = None
    detail: str = ""
    seconds: float = 0.0
    rounding: bool = False
    patch_detail: str = ""
    exact: str = ""
    bf16: str = ""
    scaled: str = ""
    scaled_detail: str = ""

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- families
def families() -> List[Tuple[str, str]]:
    """``(model_type, modeling module)`` for every model type of the installed transformers
    whose modeling module defines a 1-D ``*RotaryEmbedding`` class."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from .. import _hf_code

    out = []
    for mt in CONFIG_MAPPING_NAMES:
        mod = _hf_code.modeling_module_for(mt)
        if mod is not None and _hf_code.rotary_classes(mod):
            out.append((mt, mod.__name__.rsplit(".", 1)[1].replace("modeling_", "")))
    return out


def _sub_classes(cls: type, default: Any) -> Dict[str, type]:
    subs = dict(getattr(cls, "sub_configs", {}) or {})
    for name, sub in list(subs.items()):
        cur = getattr(default, name, None) if default is not None else None
        if cur is not None and hasattr(cur, "to_dict") and (not isinstance(sub, type) or sub.__name__ == "AutoConfig"):
            subs[name] = type(cur)
        elif not isinstance(sub, type) or sub.__name__ == "AutoConfig":
            subs.pop(name)
    return subs


def _scaled_sections(sections: List[int], half: int) -> List[int]:
    n = len(sections)
    base = [half // n] * n
    for i in range(half - sum(base)):
        base[i] += 1
    return base


def _uses_mrope(cls: type, rp: Dict[str, Any]) -> bool:
    """Whether the config's model reads ``mrope_section`` (multimodal rotary sections)."""
    if "mrope_section" in rp:
        return True
    try:
        import importlib

        pkg = cls.__module__.rsplit(".", 1)[0]
        mod = importlib.import_module(f"{pkg}.modeling_{pkg.rsplit('.', 1)[1]}")
        return "mrope_section" in inspect.getsource(mod)
    except Exception:
        return False


def _shrink_kwargs(cls: type, depth: int = 0) -> Dict[str, Any]:
    try:
        default = cls()
    except Exception:
        default = None
    try:
        names = set(inspect.signature(cls.__init__).parameters)
    except (TypeError, ValueError):
        names = set()
    attrs = set(vars(default)) if default is not None else set()
    known = names | attrs
    kw = {k: v for k, v in SMALL.items() if k in known}
    if "qk_rope_head_dim" in known:
        # MLA: keep head_dim's relation to the rope/nope parts of the default config
        kw.pop("head_dim", None)
        try:
            hd, rope = getattr(default, "head_dim", None), getattr(default, "qk_rope_head_dim", None)
            nope = getattr(default, "qk_nope_head_dim", None)
        except Exception:
            hd = rope = nope = None
        if hd is not None and hd == rope:
            kw["head_dim"] = SMALL["qk_rope_head_dim"]
        elif hd is not None and rope is not None and nope is not None and hd == rope + nope:
            kw["head_dim"] = SMALL["qk_rope_head_dim"] + SMALL["qk_nope_head_dim"]
        if "num_key_value_heads" in kw:
            kw["num_key_value_heads"] = kw["num_attention_heads"]  # MLA: one latent per head
    for k, v in _TOKENS.items():
        if k in known:
            kw[k] = v
    if getattr(default, "per_layer_config", None) is not None and "per_layer_config" in known:
        kw["per_layer_config"] = None  # per-layer overrides keep full-size values: drop them
    rp = getattr(default, "rope_parameters", None) if default is not None else None
    if isinstance(rp, dict) and not any(isinstance(v, dict) for v in rp.values()) and _uses_mrope(cls, rp):
        r = kw.get("qk_rope_head_dim") or kw.get("head_dim") or 16
        prf = rp.get("partial_rotary_factor", 1.0) or 1.0
        sections = list(rp.get("mrope_section") or [16, 24, 24])
        kw["rope_parameters"] = dict(rp, mrope_section=_scaled_sections(sections, int(r * prf) // 2))
    prf = getattr(default, "partial_rotary_factor", None) if default is not None else None
    if isinstance(rp, dict):
        for v in [rp] + [v for v in rp.values() if isinstance(v, dict)]:
            f = v.get("partial_rotary_factor")
            if isinstance(f, float) and int(16 * f) % 2:
                prf = f
    if isinstance(prf, float) and "head_dim" in kw and int(kw["head_dim"] * prf) % 2:
        kw["head_dim"] = 32 if int(32 * prf) % 2 == 0 else 64  # an even rotary dim, as real checkpoints have
    types = getattr(default, "layer_types", None) if default is not None else None
    if isinstance(types, (list, tuple)) and "layer_types" in known:
        distinct = list(dict.fromkeys(types))
        n = max(2, len(distinct))
        for k in ("num_hidden_layers", "num_layers", "n_layer"):
            if k in kw:
                kw[k] = n
        kw["layer_types"] = (distinct * n)[:n]  # every layer type once: all rope parameters in use
    if depth < 2:
        for name, sub in _sub_classes(cls, default).items():
            try:
                kw[name] = _shrink_kwargs(sub, depth + 1)
                kw[name] = sub(**kw[name]).to_dict()
            except Exception:
                kw.pop(name, None)
    return kw


def tiny_config(model_type: str, scaling: Optional[Dict[str, Any]] = None, **top: Any) -> Any:
    """A small config of ``model_type``: the config class with hidden 64, 4 heads of 16,
    2 layers, vocab 128 (MLA: rope/nope parts of 8), whatever of those it has.

    ``scaling``: rope parameters such as ``{"rope_type": "linear", "factor": 2.0}`` for the
    language model, set the way the installed transformers takes them (5.x: in
    ``rope_parameters``, merged into the class's own — ``rope_theta``, partial factor,
    ``mrope_section`` kept; per layer type when nested; 4.x: ``rope_scaling``, with the ``type``
    alias); ``top``: other keys of the language model (``max_position_embeddings=4``). Raises
    what the config class raises when it refuses them."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    kw = _shrink_kwargs(cls)
    if scaling is not None or top:
        kw = _with_rope(cls, kw, scaling, top)
    return _build_config(cls, kw)


def _build_config(cls: type, kw: Dict[str, Any]) -> Any:
    import copy

    try:
        return cls(**copy.deepcopy(kw))
    except Exception:
        kw = copy.deepcopy(kw)
        kw.pop("layer_types", None)
        for k in ("head_dim", "global_head_dim", "rotary_dim"):  # validators tie these to others
            kw.pop(k, None)
        return cls(**kw)


def _with_rope(
    cls: type, kw: Dict[str, Any], scaling: Optional[Dict[str, Any]], top: Dict[str, Any], base: Any = False
) -> Dict[str, Any]:
    """``kw`` with ``scaling`` / ``top`` set on the language model's part (see :func:`tiny_config`);
    ``base``: the config ``kw`` builds, when known."""
    import copy

    import transformers

    kw = copy.deepcopy(kw)
    if base is False:
        try:
            base = cls(**copy.deepcopy(kw))
        except Exception:
            base = None
    text = _text(base) if base is not None else None
    target = kw
    if text is not None and text is not base:
        key = next((k for k in ("text_config",) if getattr(base, k, None) is text), None)
        if key is None:
            raise ValueError("the language model is not the config's text_config")
        target = kw[key] = dict(kw.get(key) or text.to_dict())
    if scaling is not None:
        if int(transformers.__version__.split(".")[0]) >= 5:
            rp = target.get("rope_parameters")
            if rp is None and text is not None:
                rp = copy.deepcopy(getattr(text, "rope_parameters", None))
            strip = lambda d: {k: v for k, v in d.items() if k not in ("rope_type", "type")}  # noqa: E731
            if isinstance(rp, dict) and rp and all(isinstance(v, dict) or v is None for v in rp.values()):
                target["rope_parameters"] = {lt: None if v is None else dict(strip(v), **scaling) for lt, v in rp.items()}
            else:
                target["rope_parameters"] = dict(strip(rp if isinstance(rp, dict) else {}), **scaling)
        else:
            rs = target.get("rope_scaling")
            if rs is None and text is not None:
                rs = copy.deepcopy(getattr(text, "rope_scaling", None))
            rs = {k: v for k, v in (rs if isinstance(rs, dict) else {}).items() if k not in ("rope_type", "type")}
            extra = {"type": scaling["rope_type"]} if "rope_type" in scaling else {}  # 4.57 Olmo2 reads "type"
            target["rope_scaling"] = dict(rs, **scaling, **extra)
    target.update(top)
    return kw


#: The scaled rope parameters the sweep checks ``from_hf`` with (``(name, rope parameters,
#: other keys of the language model)``), and the family table's ``scaling`` fact is verified on:
#: linear x2 moves every frequency at the probe positions; dynamic NTK x2 with a context of 4
#: (below the 7 probe positions) makes a family's length-dependent update run. A config class
#: that takes neither (Phi-3: LongRoPE only) is checked with LongRoPE instead
#: (:func:`scaled_configs`).
SCALINGS: Tuple[Tuple[str, Dict[str, Any], Dict[str, Any]], ...] = (
    ("linear", {"rope_type": "linear", "factor": 2.0}, {}),
    ("dynamic", {"rope_type": "dynamic", "factor": 2.0}, {"max_position_embeddings": 4}),
)


def _longrope(n_pairs: int) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    # a context of 4 (top level too: Phi-3 reads the top-level original_max_position_embeddings):
    # the probe positions use the long factors, factor = max / original > 1 sets the attention factor
    rp = {"rope_type": "longrope", "short_factor": [1.0 + 0.25 * i for i in range(n_pairs)],
          "long_factor": [2.0 + 0.5 * i for i in range(n_pairs)], "original_max_position_embeddings": 4}  # fmt: skip
    return "longrope", rp, {"original_max_position_embeddings": 4}


def scaled_configs(model_type: str, n_pairs: Any = None) -> List[Tuple[str, Any]]:
    """``[(name, config or why not)]``: the tiny config of ``model_type`` with each of
    :data:`SCALINGS` (:func:`tiny_config`; the default-size config where the class rejects the
    tiny sizes); when the config class takes none of them and ``n_pairs`` (rotary pairs of the
    tiny config, or a function giving them) is given, with LongRoPE. ``why not``: the config
    class's refusal, one line."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = _shrink_kwargs(cls)
        try:
            base = _build_config(cls, kw)
            where = ""
        except Exception:  # the class rejects the tiny sizes: its default size, as the sweep checks it
            kw, where = {}, " at its default size"
            try:
                base = cls()
            except Exception:
                base = None
        out: List[Tuple[str, Any]] = []
        for name, rp, top in SCALINGS:
            out.append((name, _scaled_config(cls, kw, base, rp, top, where)))
        if n_pairs is not None and all(isinstance(c, str) for _, c in out):
            n = n_pairs() if callable(n_pairs) else n_pairs
            if n:
                name, rp, top = _longrope(n)
                out.append((name, _scaled_config(cls, kw, base, rp, top, where)))
    return out


def _scaled_config(cls: type, kw: Dict[str, Any], base: Any, rp: Dict[str, Any], top: Dict[str, Any], where: str) -> Any:
    import transformers

    def build(r: Dict[str, Any]) -> Any:
        return _build_config(cls, _with_rope(cls, kw, r, top, base))

    try:
        return build(rp)
    except Exception as e:
        if int(transformers.__version__.split(".")[0]) < 5:
            # 4.57 Chameleon, OLMo, OLMo 2, Open-Llama: {"type", "factor"} only; Phi-3: {"type",
            # "short_factor", "long_factor"} (the original context is the top-level key)
            minimal = {k: v for k, v in rp.items() if k not in ("rope_type", "original_max_position_embeddings")}
            try:
                return build(dict(minimal, type=rp["rope_type"]))
            except Exception:
                pass
        for extra in _REQUIRED_EXTRA:  # keys some classes require with any scaled type
            if any(k in str(e) for k in extra):
                try:
                    return build(dict(rp, **extra))
                except Exception:
                    pass
        msg = " ".join(str(e).split())
        return f"the config class refuses it{where} ({type(e).__name__}: {msg[-160:]})"


#: Rope parameters a config class requires with every scaled type, added when it says so:
#: Phi-3.5-MoE's per-length attention scales (its rotary module multiplies the tables by them
#: instead of the scheme's attention factor).
_REQUIRED_EXTRA = ({"short_mscale": 1.25, "long_mscale": 1.25, "original_max_position_embeddings": 256},)


def _text(cfg: Any) -> Any:
    if getattr(cfg, "text_config", None) is not None and getattr(cfg, "num_attention_heads", None) is None:
        return cfg.text_config
    return cfg


# --------------------------------------------------------------------------- config check
def _flat(result: Any) -> Dict[Tuple[str, Optional[str]], Any]:
    """from_hf result -> {(component, layer type): RopeConfig or None}."""
    from ..config import RopeConfig

    if isinstance(result, RopeConfig):
        return {("attention", None): result}
    out: Dict[Tuple[str, Optional[str]], Any] = {}
    comps = set(result) <= {"attention", "indexer"}
    for k, v in result.items():
        if comps:
            if isinstance(v, dict):
                for lt, c in v.items():
                    out[(k, lt)] = c
            else:
                out[(k, None)] = v
        else:
            out[("attention", k)] = v
    return out


def _static_check(cfg_text: Any, flat: Dict[Tuple[str, Optional[str]], Any]) -> Optional[str]:
    """The model's function with its own tables vs ropekit's rotation; ``None`` if equal."""
    from .. import _hf_code
    from ..hf import transformers_cos_sin

    mt = getattr(cfg_text, "model_type", "")
    module = _hf_code.modeling_module_for(mt)
    used = getattr(cfg_text, "layer_types", None)
    rots = _hf_code.rotary_classes(module)
    per_type = [lt for (_, lt), c in flat.items() if lt is not None and c is not None]
    if per_type and rots and "layer_type" not in inspect.signature(rots[0].forward).parameters:
        # transformers 4.x Gemma 3: one class, and the model builds a second instance for its
        # sliding layers from an edited config copy. The class built from the config gives
        # the global tables: one layer type must match it; each layer's own tables are
        # checked against its type's config by the run (_runtime_check).
        diffs = []
        for key in [k for k in flat if k[1] is not None]:
            d = _static_check(cfg_text, {(key[0], None): flat[key]})
            if d is None or d.startswith("ROUNDING "):
                return "LAYERS " + "per-layer tables checked by the run only (a 4.x rotary module without layer_type)"
            diffs.append(d)
        return diffs[0] if diffs else None
    for (name, lt), cfg in flat.items():
        if cfg is None or (lt is not None and isinstance(used, (list, tuple)) and lt not in used):
            continue  # a layer type no layer of this config has: its tables are never built
        comps = _hf_code.derive(cfg_text, mt, layer_type=lt)
        comp = next((c for c in comps or [] if c.name == name), None)
        if comp is None:
            return f"{name}: no call site found"
        rot = None
        for cls in _hf_code.rotary_classes(module):
            try:
                rot = cls(config=cfg_text)
                break
            except Exception:
                continue
        cos, sin = _hf_code.module_tables(rot, S, layer_type=lt, config=cfg_text)
        fn = _hf_code.unwrap_kernel_func(getattr(module, comp.site.fn))
        kind = _hf_code.signature_kind(fn)
        m, R = _hf_code.measure(fn, kind, cos, sin, comp.measured.width)
        arg_start = 0
        if m.width != cfg.head_dim and comp.site.head_slice == "last":
            arg_start = cfg.head_dim - m.width
        off = cfg.rotary_offset - arg_start
        if off < 0 or off + cfg.rotary_dim > m.width:
            return f"{name}/{lt}: ropekit rotates dims [{cfg.rotary_offset}, {cfg.rotary_offset + cfg.rotary_dim}), the model's q argument covers [{arg_start}, {arg_start + m.width})"
        c, s = transformers_cos_sin(cfg, torch.arange(S))
        E = _hf_code.expected_matrix(cfg.layout, cfg.direction, off, m.width, c, s)
        if not torch.equal(E, R):
            d = (E.double() - R.double()).abs()
            lane = int(d.amax(dim=(0, 1)).argmax())
            same = m.layout == cfg.layout and m.direction == cfg.direction and m.rotary_dim == cfg.rotary_dim
            if same and m.offset == off and d.max().item() <= 2.0**-21:
                return (
                    f"ROUNDING {name}/{lt}: pairing, direction, width right; tables differ by "
                    f"{d.max().item():.2g} (the model computes cos/sin another way, e.g. torch.polar)"
                )
            return (
                f"{name}/{lt}: max |difference| {d.max().item():.3g} at lane {lane}; model: {m.layout}, "
                f"direction {m.direction:+d}, r {m.rotary_dim} at {m.offset} of {m.width}; ropekit: {cfg.layout}, "
                f"direction {cfg.direction:+d}, r {cfg.rotary_dim} at {off}"
            )
    return None


def _path_equal(cfg: Any, result: Any) -> Tuple[bool, str]:
    from ..hf import rope_config_from_hf

    with tempfile.TemporaryDirectory() as d:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg.save_pretrained(d)
        try:
            back = rope_config_from_hf(d)
        except Exception as e:
            return False, f"from_hf(path) failed: {type(e).__name__}: {str(e)[:120]}"
    if back == result:
        return True, ""
    fa, fb = _flat(result), _flat(back)
    diff = [f"{k}: {fa.get(k)} vs {fb.get(k)}" for k in sorted(set(fa) | set(fb), key=str) if fa.get(k) != fb.get(k)]
    return False, "path differs: " + (diff[0] if diff else "structure")[:200]


# --------------------------------------------------------------------------- model checks
_CALLER: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("ropekit_sweep_caller", default=None)


@contextlib.contextmanager
def _recording(model: torch.nn.Module, calls: list) -> Any:
    """Record the RoPE calls the model makes: (caller class, function, bound arguments)."""
    from .. import _hf_code
    from . import transformers as rt

    keys = set()
    wrapped = []
    for m in model.modules():
        ks = rt._rope_calls(m)
        if not ks:
            continue
        keys.update(ks)
        inner = m.forward

        def fwd(*a, _inner=inner, _name=(type(m).__name__, getattr(m, "layer_idx", None)), **k):
            tok = _CALLER.set(_name)
            try:
                return _inner(*a, **k)
            finally:
                _CALLER.reset(tok)

        had = "forward" in m.__dict__
        wrapped.append((m, had, m.__dict__.get("forward")))
        m.forward = fwd
    saved = []
    for modname, fname in keys:
        module = sys.modules[modname]
        orig = getattr(module, fname)
        plain = _hf_code.unwrap_kernel_func(orig)  # transformers 5.25: hub-kernel wrapper
        sig = inspect.signature(plain)

        def rec(*a, _orig=orig, _plain=plain, _sig=sig, _f=fname, **k):
            if len(calls) < 64:
                try:
                    b = _sig.bind(*a, **k)
                    b.apply_defaults()
                    caller, layer = _CALLER.get() or (None, None)
                    calls.append((caller, _f, _plain, dict(b.arguments), layer))
                except TypeError:
                    pass
            return _orig(*a, **k)

        saved.append((module, fname, orig))
        setattr(module, fname, rec)
    try:
        yield
    finally:
        for module, fname, orig in saved:
            setattr(module, fname, orig)
        for m, had, prev in wrapped:
            if had:
                m.__dict__["forward"] = prev
            else:
                del m.__dict__["forward"]


def _head_offset(q: torch.Tensor) -> Tuple[int, Optional[int]]:
    """``(offset of q's first lane inside its head, head width)`` when q is a lane slice
    of a wider head (a view), else ``(0, None)``."""
    if q._base is None or q.stride(-1) != 1:
        return 0, None
    strides = [st for st, n in zip(q.stride()[:-1], q.shape[:-1]) if n > 1]
    hw = min(strides) if strides else None
    if not hw or hw <= q.shape[-1]:
        return 0, None
    return int(q.storage_offset()) % hw, hw


def _runtime_check(
    calls: list, flat: Dict[Tuple[str, Optional[str]], Any], layer_types: Any = None
) -> Optional[str]:
    """The RoPE calls recorded in a forward against ``from_hf``: pairing, direction, width and
    slice of each call; and, where the caller knows its layer (``layer_idx``) and the config
    its layer types, the call's own tables against that layer type's config (transformers 4.x
    Gemma 3 builds a second rotary module for its sliding layers, which no per-class probe sees)."""
    from .. import _hf_code
    from ..hf import transformers_cos_sin

    seen = set()
    for caller, fname, fn, args, layer in calls:
        name = _hf_code.component_name(caller or "")
        lt = None
        if isinstance(layer, int) and isinstance(layer_types, (list, tuple)) and layer < len(layer_types):
            lt = layer_types[layer]
        if (name, fname, lt) in seen:
            continue
        seen.add((name, fname, lt))
        kind = _hf_code.signature_kind(fn)
        if kind is None:
            return f"{caller} calls {fname} with a signature ropekit does not know"
        names = list(args)
        q = args[names[0]]
        if kind == "complex":
            cos, sin = args[names[2]], None
        else:
            cos, sin = args["cos"], args["sin"]
        cos = cos[:1] if cos.dim() == 3 else cos
        sin = sin[:1] if sin is not None and sin.dim() == 3 else sin
        if cos.dim() != 3:
            continue  # multi-axis tables ([3, b, s, t]) or other layouts: covered by the code check
        try:
            m, R = _hf_code.measure(fn, kind, cos, sin, q.shape[-1])
        except _hf_code.NotRope as e:
            return f"{caller}.{fname}: {e}"
        except Exception:
            continue
        module = sys.modules.get(getattr(fn, "__module__", ""), None)
        sites = _hf_code.call_sites(module) if module is not None else ()
        split = any(st.cls == caller and st.fn == fname and st.head_slice != "all" for st in sites)
        # the view trick reads the slice only where the code splits the head (MLA); a fused
        # qkv projection makes any other q a view too
        off_head, hw = _head_offset(q) if split else (0, None)
        cands = [c for (n, t), c in flat.items() if n == name and c is not None and (lt is None or t in (lt, None))]
        if not cands:
            return f"{caller} ({name}) calls {fname}, but from_hf has no {name} component"
        head = hw or q.shape[-1]
        ok = False
        for c in cands:
            r_ok = m.rotary_dim == c.rotary_dim or (
                c.scaling is not None and type(c.scaling).__name__ == "Proportional" and m.rotary_dim <= c.rotary_dim
            )
            lay_ok = m.layout == c.layout or m.rotary_dim == 2
            head_ok = (hw is None and head in (c.head_dim, c.rotary_dim) or head <= c.head_dim) or (
                hw is not None and hw >= c.head_dim
            )  # a fused projection may make the storage row wider than one head
            off_ok = off_head + m.offset == c.rotary_offset or (hw is None and head != c.head_dim and m.offset == 0)
            if r_ok and lay_ok and head_ok and off_ok and m.direction == c.direction:
                ok = True
                off = c.rotary_offset if m.width == c.head_dim else 0 if m.width == c.rotary_dim else None
                prop = c.scaling is not None and type(c.scaling).__name__ == "Proportional"
                if lt is not None and (name, lt) in flat and R.shape[0] == S and off is not None and not prop:
                    # this layer's own tables: the call's map at positions 0..S-1 against the config's
                    E = _hf_code.expected_matrix(c.layout, c.direction, off, m.width, *transformers_cos_sin(c, torch.arange(S)))
                    d = (E.double() - R.double()).abs().max().item()
                    if d > 2.0**-21:
                        return f"{caller}.{fname} of a {lt} layer: its tables differ from from_hf's by {d:.3g}"
                break
        if not ok:
            c = cands[0]
            return (
                f"{caller}.{fname} in the forward: {m.layout}, direction {m.direction:+d}, r {m.rotary_dim} at "
                f"{off_head + m.offset} of a {head}-dim head; from_hf: {c.layout}, direction {c.direction:+d}, "
                f"r {c.rotary_dim} at {c.rotary_offset} of {c.head_dim}"
            )
    return None


def _scaled_check(model_type: str, default: Any) -> Tuple[str, str]:
    """``(Row.scaled, Row.scaled_detail)``: ``from_hf`` of each of :func:`scaled_configs` against
    the family's code, as the config check does (the model's function with its own tables, bit
    for bit; ``from_hf(path) == from_hf(config)``); ``default``: from_hf of the tiny config."""
    from .. import _hf_code
    from .._errors import RopeError
    from ..hf import rope_config_from_hf

    pairs = [c.n_pairs for c in _flat(default).values() if c is not None]
    parts: List[Tuple[str, str, str]] = []
    for name, cfg in scaled_configs(model_type, pairs[0] if pairs else None):
        if isinstance(cfg, str):
            parts.append((name, "n/a", cfg))
            continue
        text = _text(cfg)
        mt = getattr(text, "model_type", model_type)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = rope_config_from_hf(cfg)
        except RopeError as e:
            parts.append((name, "refused", str(e).split(", got ", 1)[-1].split(". Fix:")[0][:200]))
            continue
        except Exception as e:
            parts.append((name, "wrong", f"{type(e).__name__}: {str(e)[:160]}"))
            continue
        why = _hf_code.rotary_refusal(text, mt)
        if why:
            parts.append((name, "wrong", f"from_hf answers; the family's rotary module refuses the config: {why[:160]}"))
            continue
        module = _hf_code.modeling_module_for(mt)
        try:  # the family's own module must run at the probe positions (GPT-J: a table of 4 positions)
            rot, _ = _hf_code.build_rotary(module, text)
            used = getattr(text, "layer_types", None)
            for lt in _hf_code.layer_types_of(text):
                if lt is None or not isinstance(used, (list, tuple)) or lt in used:  # as _static_check
                    _hf_code.module_tables(rot, S, layer_type=lt, config=text)
        except Exception as e:
            parts.append((name, "n/a", f"its rotary module does not run at positions 0..{S - 1}: {type(e).__name__}"))
            continue
        flat = _flat(result)
        try:
            diff = _static_check(text, flat)
        except Exception as e:
            diff = f"check failed: {type(e).__name__}: {str(e)[:150]}"
        if diff and not diff.startswith(("ROUNDING ", "LAYERS ")):
            parts.append((name, "wrong", diff[:200]))
            continue
        try:
            same, why = _path_equal(cfg, result)
        except Exception as e:
            same, why = False, f"{type(e).__name__}: {str(e)[:100]}"
        if not same:
            parts.append((name, "wrong", why))
            continue
        dropped = all(c is None or c.scaling is None for c in flat.values())
        parts.append((name, "exact", "scaling ignored by the code" if dropped else ""))
    kinds = [k for _, k, _ in parts]
    verdict = next((k for k in ("wrong", "refused", "exact") if k in kinds), "n/a")
    detail = "; ".join(f"{n} {k}" + (f": {d}" if d and k != "exact" else f", {d}" if d else "") for n, k, d in parts)
    return verdict, detail


def _model_class(model_type: str) -> Tuple[Optional[type], bool]:
    import transformers
    from transformers.models.auto import modeling_auto as ma

    for mapping, causal in ((ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, True), (ma.MODEL_MAPPING_NAMES, False)):
        name = mapping.get(model_type)
        if name is None:
            continue
        name = name if isinstance(name, str) else name[0]
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls, causal
    return None, False


def _ids(vocab: int, b: int = 2, s: int = S, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(vocab, 100), (b, s), generator=g)


def _logits(out: Any) -> torch.Tensor:
    for k in ("logits", "last_hidden_state"):
        v = getattr(out, k, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, (tuple, list)) and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError("no logits in the output")


def _build(model_type: str, cfg: Any) -> Tuple[Optional[torch.nn.Module], bool, str]:
    cls, causal = _model_class(model_type)
    if cls is None:
        return None, False, "no model class"
    try:
        with torch.device("meta"):
            meta = cls(cfg)
        n = sum(p.numel() for p in meta.parameters())
        del meta
    except Exception as e:
        return None, False, f"{type(e).__name__}: {str(e)[:100]}"
    if n > MAX_PARAMS:
        return None, False, f"{n / 1e6:.0f}M parameters at this size (limit {MAX_PARAMS / 1e6:.0f}M)"
    try:
        torch.manual_seed(0)
        model = cls(cfg).eval()
    except Exception as e:
        return None, False, f"{type(e).__name__}: {str(e)[:100]}"
    return model, causal, ""


def _run(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _logits(model(input_ids=ids))


# --------------------------------------------------------------------------- one row
def check(model_type: str, family: str = "", *, models: bool = True, generate: bool = True) -> Row:
    """Sweep one ``model_type`` (see the module docstring); never raises."""
    from ..hf import rope_config_from_hf
    from . import transformers as rt

    t0 = time.perf_counter()
    row = Row(model_type, family or model_type)
    default_size = ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = tiny_config(model_type)
    except Exception as e:
        try:  # the config class rejects the tiny sizes: check the config at its default size
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = CONFIG_MAPPING[model_type]()
            default_size = "default-size config (tiny sizes rejected by the config class)"
        except Exception:
            row.config = "untested"
            row.detail = f"no tiny config: {type(e).__name__}: {str(e)[:120]}"
            row.seconds = time.perf_counter() - t0
            return row
    text = _text(cfg)
    from .. import _hf_code
    from .._errors import RopeError

    try:
        facts = _hf_code.derive(text, getattr(text, "model_type", model_type))
    except _hf_code.NotRope:
        facts = ["not rope"]  # from_hf must refuse it by name
    except Exception:
        facts = None
    result = None
    if not facts:
        row.config = "n/a"
        row.detail = "no 1-D RoPE call in the language model's code ropekit can read (vision-only, inline, or other)"
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = rope_config_from_hf(cfg)
        except Exception as e:
            row.config = "refused" if isinstance(e, RopeError) else "wrong"
            row.detail = f"{type(e).__name__}: {str(e)[:220]}"
            if isinstance(e, RopeError) and _hf_code.sub_config_of(text) is not None:
                row.config = "n/a"  # not the language model: refused by name, counted apart
                row.detail = "non-text sub-config, refused by name: " + row.detail
    if result is not None:
        flat = _flat(result)
        try:
            diff = _static_check(text, flat)
        except Exception as e:
            diff = f"check failed: {type(e).__name__}: {str(e)[:150]}"
        if diff and diff.startswith("ROUNDING "):
            row.config, row.checked, row.detail = "exact", "code", diff[len("ROUNDING "):]
            row.rounding = True
        elif diff and diff.startswith("LAYERS "):  # exact on the code's module; the run checks the rest
            row.config, row.checked, row.detail = "exact", "code (one layer type)", diff[len("LAYERS "):]
        else:
            row.config, row.checked = ("wrong", "code") if diff else ("exact", "code")
            row.detail = diff or ""
        try:
            row.path_equal, why = _path_equal(cfg, result)
        except Exception as e:
            row.path_equal, why = False, f"{type(e).__name__}: {str(e)[:100]}"
        if not row.path_equal and not row.detail:
            row.detail = why
    if result is not None:
        row.scaled, row.scaled_detail = _scaled_check(model_type, result)
    if default_size:
        row.detail = "; ".join(t for t in (default_size, row.detail) if t)
    if not models:
        row.seconds = time.perf_counter() - t0
        return row
    model, causal, why = _build(model_type, cfg)
    if model is None:
        row.patch = "not built"
        row.patch_detail = why
        row.seconds = time.perf_counter() - t0
        return row
    vocab = int(getattr(text, "vocab_size", None) or getattr(cfg, "vocab_size", 128) or 128)
    ids = _ids(vocab)
    calls: list = []
    try:
        with _recording(model, calls):
            ref = _run(model, ids)
    except Exception as e:
        row.patch = "not built"
        row.patch_detail = f"forward failed: {type(e).__name__}: {str(e)[:120]}"
        row.seconds = time.perf_counter() - t0
        return row
    if result is not None and row.config == "exact" and calls:
        diff = _runtime_check(calls, _flat(result), getattr(text, "layer_types", None))
        if diff:
            row.config, row.detail = "wrong", diff
        else:
            row.checked = "code+run"
    if not calls:
        row.patch = "n/a"
        row.patch_detail = "the forward calls no module-level RoPE function"
        row.seconds = time.perf_counter() - t0
        return row
    try:
        rt.patch(model, tables="transformers")
    except Exception as e:
        row.patch = "refused"
        row.patch_detail = f"{type(e).__name__}: {str(e)[:220]}"
        row.seconds = time.perf_counter() - t0
        return row
    try:
        out = _run(model, ids)
        row.logits = bool(torch.equal(out, ref))
        if generate and causal and hasattr(model, "generate"):
            kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
            with torch.no_grad():
                got = model.generate(ids, **kw)
                rt.unpatch(model)
                want = model.generate(ids, **kw)
            row.generate = bool(torch.equal(got, want))
        else:
            rt.unpatch(model)
        back = _run(model, ids)
        restored = bool(torch.equal(back, ref))
        try:  # ropekit's exact tables: proven at patch time; logits move by float32 rounding
            rt.patch(model, tables="exact")
            try:
                gap = (_run(model, ids) - ref).abs().max().item()
            finally:
                rt.unpatch(model)
            row.exact = f"proven, logits within {gap:.1e}"
        except Exception as e:
            row.exact = "refused: " + str(e).split(", got ", 1)[-1].split(". Fix:")[0][:120]
        row.bf16 = _bf16_default(rt, model, ids)
        ok = row.logits and restored and row.generate is not False
        row.patch = "proven" if ok else "wrong"
        if not ok:
            row.patch_detail = (
                f"patched logits differ by {(out - ref).abs().max().item():.3g}" if not row.logits
                else "greedy tokens differ" if row.generate is False else "unpatch did not restore the logits"
            )
    except Exception as e:
        if rt.is_patched(model):
            rt.unpatch(model)
        row.patch = "wrong"
        row.patch_detail = f"patched run failed: {type(e).__name__}: {str(e)[:150]}"
    row.seconds = time.perf_counter() - t0
    return row


def _bf16_default(rt: Any, model: torch.nn.Module, ids: torch.Tensor) -> str:
    """``patch(model)`` with default arguments on the model cast to bfloat16 (then cast back)."""
    model.to(torch.bfloat16)
    try:
        rt.patch(model)
    except Exception as e:
        model.float()
        return "refused: " + str(e).split(", got ", 1)[-1].split(". Fix:")[0][:120]
    try:
        out = _run(model, ids)
        return "proven" if bool(torch.isfinite(out).all()) else "proven, non-finite logits"
    except Exception as e:
        return f"proven, run failed: {type(e).__name__}: {str(e)[:80]}"
    finally:
        rt.unpatch(model)
        model.float()


def sweep(
    model_types: Optional[Iterable[str]] = None,
    *,
    models: bool = True,
    generate: bool = True,
    progress: Optional[Callable[[Row], None]] = None,
) -> List[Row]:
    """Sweep ``model_types`` (default: all of :func:`families`); one :class:`Row` each."""
    import transformers

    transformers.logging.set_verbosity_error()
    fams = dict(families())
    todo = list(fams) if model_types is None else list(model_types)
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    try:
        for mt in todo:
            row = check(mt, fams.get(mt, mt), models=models, generate=generate)
            rows.append(row)
            if progress is not None:
                progress(row)
    finally:
        torch.set_num_threads(threads)
    return rows


# --------------------------------------------------------------------------- report
def summary(rows: List[Row]) -> Dict[str, Any]:
    """Counts per model type and per family (a family is exact when all its model types
    that apply are; proven when at least one of its model types is). ``config_wrong_*`` counts
    a model type whose scaled check (``Row.scaled``) is wrong too: ``hf-sweep`` exits 1 on it."""
    def fam_count(pred) -> int:
        return len({r.family for r in rows if pred(r)})

    applicable = [r for r in rows if r.config not in ("n/a", "untested")]
    fam_config: Dict[str, str] = {}
    for r in applicable:
        prev = fam_config.get(r.family)
        order = {"wrong": 0, "refused": 1, "exact": 2}
        cur = "wrong" if r.scaled == "wrong" else r.config  # a wrong scaled config is a wrong config
        if prev is None or order[cur] < order[prev]:
            fam_config[r.family] = cur
    return {
        "model_types": len(rows),
        "families": len({r.family for r in rows}),
        "applicable_model_types": len(applicable),
        "applicable_families": len(fam_config),
        "untested_model_types": sum(r.config == "untested" for r in rows),
        "config_exact_model_types": sum(r.config == "exact" for r in rows),
        "config_exact_tables_rounding_model_types": sum(r.config == "exact" and r.rounding for r in rows),
        "config_refused_model_types": sum(r.config == "refused" for r in rows),
        "config_wrong_model_types": sum(r.config == "wrong" or r.scaled == "wrong" for r in rows),
        "config_exact_families": sum(v == "exact" for v in fam_config.values()),
        "config_refused_families": sum(v == "refused" for v in fam_config.values()),
        "config_wrong_families": sum(v == "wrong" for v in fam_config.values()),
        "path_differs_model_types": sum(r.path_equal is False for r in rows),
        "scaled_exact_model_types": sum(r.scaled == "exact" for r in rows),
        "scaled_exact_scaling_ignored_model_types": sum(
            r.scaled == "exact" and "scaling ignored" in r.scaled_detail for r in rows
        ),
        "scaled_refused_model_types": sum(r.scaled == "refused" for r in rows),
        "scaled_wrong_model_types": sum(r.scaled == "wrong" for r in rows),
        "scaled_na_model_types": sum(r.scaled == "n/a" for r in rows),
        "patch_proven_model_types": sum(r.patch == "proven" for r in rows),
        "patch_proven_families": fam_count(lambda r: r.patch == "proven"),
        "patch_refused_model_types": sum(r.patch == "refused" for r in rows),
        "exact_tables_proven_model_types": sum(r.exact.startswith("proven") for r in rows),
        "exact_tables_proven_families": fam_count(lambda r: r.exact.startswith("proven")),
        "exact_tables_refused_model_types": sum(r.exact.startswith("refused") for r in rows),
        "bf16_default_proven_model_types": sum(r.bf16 == "proven" for r in rows),
        "bf16_default_proven_families": fam_count(lambda r: r.bf16 == "proven"),
        "bf16_default_refused_model_types": sum(r.bf16.startswith("refused") for r in rows),
        "patch_wrong_model_types": sum(r.patch == "wrong" for r in rows),
        "not_built_model_types": sum(r.patch == "not built" for r in rows),
    }


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if v is True:
        return "yes"
    if v is False:
        return "**no**"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _scaled_cell(r: Row) -> Optional[str]:
    if not r.scaled:
        return None
    return r.scaled + (" (ignored)" if r.scaled == "exact" and "scaling ignored" in r.scaled_detail else "")


def format_table(rows: List[Row]) -> str:
    """Markdown: one line per model type (config result, path == object, patch result,
    logits, generation, the difference or reason)."""
    head = (
        "| model_type | family | config | scaled | path = object | patch | logits | generate | "
        'tables="exact" | bf16 patch(model) | difference / reason |'
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.family, r.model_type)):
        cfg = r.config + (f" ({r.checked})" if r.checked and r.config == "exact" else "") + (" ≈" if r.rounding else "")
        lines.append(
            "| " + " | ".join(
                _cell(x) for x in (r.model_type, r.family, cfg, _scaled_cell(r), r.path_equal, r.patch, r.logits,
                                   r.generate, r.exact or None, r.bf16 or None,
                                   "; ".join(t for t in (r.detail[:160], r.patch_detail[:160],
                                                         r.scaled_detail[:160] if r.scaled in ("wrong", "refused") else "") if t))
            ) + " |"
        )  # fmt: skip
    return "\n".join(lines)


def write(rows: List[Row], path: str) -> None:
    """Write the rows as JSON (``.json``) or the markdown table with the summary."""
    if path.endswith(".json"):
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"summary": summary(rows), "rows": [r.as_dict() for r in rows]}, f, indent=1)
        return
    s = summary(rows)
    with open(path, "w", encoding="utf-8") as f:
        f.write("Summary: " + ", ".join(f"{k} {v}" for k, v in s.items()) + "\n\n")
        f.write(format_table(rows) + "\n")


# --------------------------------------------------------------------------- family table
#: Config keys the config rules of ``from_hf`` read; the table keeps their config-class
#: defaults (constants only: a default derived in ``__init__`` is left to the config).
DEFAULT_KEYS = (
    "head_dim", "qk_rope_head_dim", "qk_nope_head_dim", "kv_channels", "hidden_size", "n_embd", "d_model",
    "num_attention_heads", "n_head", "partial_rotary_factor", "rotary_pct", "rotary_dim", "rope_theta",
    "rotary_emb_base", "rope_ratio", "rope_parameters", "rope_scaling", "original_max_position_embeddings",
    "max_position_embeddings", "n_positions", "seq_length", "rope_local_base_freq", "rope_interleave",
    "index_head_dim", "global_head_dim",
)  # fmt: skip


def _constant_defaults(cls: type) -> Dict[str, Any]:
    """Defaults of :data:`DEFAULT_KEYS` that ``cls`` states as constants (signature defaults
    of 4.x configs, class attributes of 5.x dataclass configs, ``default_theta``)."""
    out: Dict[str, Any] = {}
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        params = {}
    ok = (int, float, bool, str, dict)
    for k in DEFAULT_KEYS:
        v = vars(cls).get(k, None) if k in vars(cls) else None
        if v is None and k in params and params[k].default is not inspect.Parameter.empty:
            v = params[k].default
        if isinstance(v, ok) and not isinstance(v, type):
            out[k] = json.loads(json.dumps(v))
    theta = getattr(cls, "default_theta", None)
    if "rope_theta" not in out and isinstance(theta, (int, float)) and not isinstance(theta, bool):
        out["rope_theta"] = float(theta)
    return out


def _instance_defaults(cls: type, default: Any) -> Tuple[Dict[str, Any], set]:
    """``(values, varying keys)``: values of :data:`DEFAULT_KEYS` that the default config holds
    and that stay the same when one of its sizes changes (hidden size, heads, context) — class
    defaults — and the keys whose value moves (derived: never filled in from the row)."""
    base = default.to_dict()
    hidden, heads = base.get("hidden_size") or 64, base.get("num_attention_heads") or 4
    others = []
    # each size changed alone: a value derived from a ratio (head_dim = hidden // heads) moves
    ctx = base.get("max_position_embeddings") or 512
    for kw in ({"hidden_size": 2 * hidden, "num_attention_heads": heads, "max_position_embeddings": ctx},
               {"hidden_size": hidden, "num_attention_heads": 2 * heads, "max_position_embeddings": ctx},
               {"hidden_size": hidden, "num_attention_heads": heads, "max_position_embeddings": 3 * ctx}):
        try:
            others.append(cls(**kw).to_dict())
        except Exception:
            return {}, set(DEFAULT_KEYS) - {"hidden_size", "num_attention_heads", "max_position_embeddings"}
    out, varying = {}, set()
    for k in DEFAULT_KEYS:
        if k in ("hidden_size", "num_attention_heads", "max_position_embeddings"):
            continue
        v = base.get(k)
        if v is not None and all(o.get(k) == v for o in others):
            out[k] = json.loads(json.dumps(v))
        elif any(o.get(k) != v for o in others):
            varying.add(k)
    return out, varying


def _sparse(diff: Dict[str, Any], row: Dict[str, Any]) -> Dict[str, Any]:
    """A config.json without the keys equal to the row's defaults (a hand-trimmed file)."""
    d = row.get("defaults") or {}
    out = {k: v for k, v in diff.items() if not (k in d and d[k] == v)}
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = {k: v for k, v in out["text_config"].items() if not (k in d and d[k] == v)}
    return out


def _component_row(comp: Any, module: Any) -> Dict[str, Any]:
    from .. import _hf_code
    from . import _qk_norm

    m, site = comp.measured, comp.site
    if m.offset == 0:
        offset = "start"
    elif m.offset + m.rotary_dim == m.width:
        offset = "end"
    else:
        raise ValueError(f"{comp.name}: rotating span at {m.offset} of a {m.width}-lane argument")
    norms: List[str] = []
    try:
        cls = getattr(module, site.cls)
        kind = "qk" if _hf_code.signature_kind(_hf_code.unwrap_kernel_func(getattr(module, site.fn))) == "qk" else "x"
        norms = sorted({s.norm for s in _qk_norm.class_sites(cls, ((site.fn, kind),)).sites})
    except Exception:
        pass
    return {
        "layout": m.layout, "direction": m.direction, "head_slice": site.head_slice, "offset": offset,
        "function": site.fn, "caller": site.cls, "qk_norm_fusable": norms, "tables_cut": site.tables_cut,
    }  # fmt: skip


def _answer(fn: Callable[[], Any]) -> Tuple[Any, str]:
    try:
        return fn(), ""
    except Exception as e:
        return None, type(e).__name__


def table_row(model_type: str) -> Tuple[str, Dict[str, Any]]:
    """``(model type from_hf reads, its family-table row)`` from the installed transformers:
    the facts are read from the family's code on a tiny config, then the row's answer is
    checked against the code's on the tiny and the default-size config (objects, their
    ``to_dict()`` and their ``to_diff_dict()`` — what ``save_pretrained`` writes — and each
    value of a flag that picks the RoPE function). A row that does not reproduce the code
    everywhere says ``"code"`` (``from_hf`` then always reads the code)."""
    import copy

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .. import _hf_code
    from .. import hf as _hf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cfg = tiny_config(model_type)
        except Exception:  # the config class rejects the tiny sizes: its default size
            cfg = CONFIG_MAPPING[model_type]()
    text = _text(cfg)
    eff = _hf._effective_model_type(cfg)
    module = _hf_code.modeling_module_for(eff)
    row: Dict[str, Any] = {"module": module.__name__.rsplit(".", 1)[1].replace("modeling_", "") if module else None}
    sites = _hf_code.text_sites(module, text) if module is not None else []
    flags = sorted({s.flag[0] for s in (_hf_code.call_sites(module) if module is not None else ()) if s.flag})
    try:
        default = CONFIG_MAPPING[model_type]()
    except Exception:
        default = None

    def comps_for(c: Any) -> Optional[Dict[str, Any]]:
        facts = _hf.rope_facts(c, eff)  # RopeError: not a RoPE ropekit expresses
        return None if facts is None else {n: _component_row(x, module) for n, x in facts.items()}

    variants: List[Tuple[Any, Any]] = [(cfg, None)]
    try:
        if flags and sites:
            attr = flags[0]
            row["flag"] = attr
            dflt = getattr(_text(default), attr, None) if default is not None else None
            row["flag_default"] = None if dflt is None else bool(dflt)
            row["by_flag"] = {}
            for v in (True, False):
                c = copy.deepcopy(cfg)
                setattr(_text(c), attr, v)
                row["by_flag"][json.dumps(v)] = comps_for(_text(c))
                variants.append((c, v))
        else:
            row["components"] = comps_for(text)
    except _hf.RopeError as e:
        row = {"module": row["module"], "refuse": str(e).split("got ", 1)[-1].split(". Fix:")[0]}
    except ValueError as e:
        row = {"module": row["module"], "code": str(e)}
    lts = _hf_code.layer_types_of(_text(default) if default is not None else text)
    row["layer_types"] = sorted(t for t in lts if t is not None)  # dict order varies between runs
    row["defaults"] = _constant_defaults(type(text))
    if default is not None:
        const, varying = _instance_defaults(type(_text(default)), _text(default))
        row["defaults"] = {k: v for k, v in row["defaults"].items() if k not in varying}
        row["defaults"].update(const)
    wants: Dict[int, Tuple[Any, str]] = {}
    if "code" not in row and "refuse" not in row and (row.get("components") or row.get("by_flag")):
        row["scaling"], scaled = _scaling_fact(model_type, cfg)
        for c, want in scaled:
            variants.append((c, None))
            wants[id(c)] = want
    elif "code" not in row and "refuse" not in row and module is not None and _hf_code.reads_scaling(module) is False:
        row["scaling"] = "ignored"  # the config rules answer; the modeling code never reads the scaling
    if "code" not in row:
        if default is not None:
            variants.append((default, None))
        for c, _ in variants:
            want = wants.get(id(c)) or _answer(lambda: _hf._read(c, None, "code", None, {}))
            diff = c.to_diff_dict()
            inputs = [("object", c), ("to_dict", c.to_dict()), ("config.json", diff), ("sparse config.json", _sparse(diff, row))]
            for kind, obj in inputs:
                got = _answer(lambda: _hf._read(obj, None, "table", row, {}))
                if got[1] == "_NeedCode":
                    continue  # the row defers this input to the code (its "scaling" fact is "code")
                if got != want:
                    row = {k: row[k] for k in ("module", "layer_types", "defaults")}
                    which = "default" if c is default else "scaled tiny" if id(c) in wants else "tiny"
                    row["code"] = f"the row's answer differs from the code's ({kind} of a {which} config)"
                    break
            if "code" in row:
                break
    row["verified"] = [transformers.__version__]
    return eff, row


def _scaling_fact(model_type: str, tiny: Any) -> Tuple[Any, List[Tuple[Any, Tuple[Any, str]]]]:
    """``(fact, [(scaled config, the code's answer)])``: what the family's code does with a scaled
    rope type, from ``from_hf``'s code mode on :func:`scaled_configs` (it measures the family's
    rotary module with each, :func:`ropekit.hf._code_effect`).

    The fact: ``"applied"`` (every scaled config measured: as transformers' rope functions compute
    it; taken for every rope type), ``"ignored"`` (every one: the default RoPE whatever the config
    says; taken for every rope type), ``"unverified"`` (none could be measured: answered as
    ``"applied"``), else ``{rope_type: "applied" | "ignored" | "refused: why" | "code"}`` for the
    rope types checked (a rotary module or config class that refuses a type may take another:
    transformers 4.57's Llama 4 reads any rope_scaling as llama3), every other type answered by
    the code. Config classes that refuse a scaled type count only when they refuse all of them.
    The configs whose effect was measured come back to verify the row on."""
    from .. import hf as _hf

    def n_pairs() -> Optional[int]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = _flat(_hf._pick(_hf._read(tiny, None, "code", None, {}), None))
            return next((c.n_pairs for c in res.values() if c is not None), None)
        except Exception:
            return None

    facts: Dict[str, str] = {}
    refusals: Dict[str, str] = {}
    checked: List[Tuple[Any, Tuple[Any, str]]] = []
    configs = scaled_configs(model_type, n_pairs)
    for name, c in configs:
        if isinstance(c, str):
            refusals[name] = "refused: " + c
            continue
        with _hf._collect_effects() as eff, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = _answer(lambda: _hf._read(c, None, "code", None, {}))
        decisive = [("refused" if e == "differs" else e, why) for e, why in eff if e in ("applied", "ignored", "refused", "differs")]
        if not decisive:  # "unknown": a module that does not run at the probe positions (GPT-J past its table)
            continue
        kinds = {e for e, _ in decisive}
        if kinds == {"refused"}:
            facts[name] = "refused: " + decisive[0][1][:300]
        else:
            facts[name] = kinds.pop() if len(kinds) == 1 else "code"
        if len(decisive) == len(eff):
            checked.append((c, want))  # the row must give the code's answer on it
    if not facts:
        if refusals and len(refusals) == len(configs):
            return {k: v[:300] for k, v in refusals.items()}, []
        return "unverified", []
    values = set(facts.values())
    if values in ({"applied"}, {"ignored"}):
        return values.pop(), checked
    return facts, checked


def _same(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    strip = lambda r: {k: v for k, v in r.items() if k != "verified"}  # noqa: E731
    return strip(a) == strip(b)


def write_table(path: str, model_types: Optional[Iterable[str]] = None,
                progress: Optional[Callable[[str, Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Add the installed transformers' rows to the family table at ``path``: a row equal to
    the stored one gains this version in ``verified``; a changed row replaces it (verified
    for this version only); rows of model types this version lacks stay."""
    import hashlib

    import transformers

    transformers.logging.set_verbosity(transformers.logging.CRITICAL)  # config classes log refused sizes
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        data = {"format": 2, "rows": {}}
    if data.get("format") != 2:
        data = {"format": 2, "rows": {}}
    rows = data["rows"]
    version = transformers.__version__
    todo = [mt for mt, _ in families()] if model_types is None else list(model_types)
    fresh: Dict[str, Dict[str, Any]] = {}
    for mt in todo:
        try:
            eff, new = table_row(mt)
        except Exception as e:  # the config class rejects every size: the code answers
            eff, new = mt, {"code": f"no config to verify a row on ({type(e).__name__})",
                            "verified": [transformers.__version__]}
        if eff in fresh and eff != mt:
            continue  # a wrapper's text model: its own model type's row answers
        fresh[eff] = new
        if progress is not None:
            progress(eff, new)
    for eff, new in fresh.items():  # one merge per model type: the file does not depend on its past
        entries = [dict(e, verified=[v for v in e["verified"] if v != version]) for e in rows.get(eff, [])]
        same = [e for e in entries if _same(e, new)]
        if same:
            same[0]["verified"] = sorted(set(same[0]["verified"]) | {version}, key=_vkey)
        else:
            entries.append(new)
        rows[eff] = sorted((e for e in entries if e["verified"]), key=lambda e: _vkey(e["verified"][-1]))
    data["rows"] = {k: rows[k] for k in sorted(rows)}
    body = json.dumps(data["rows"], sort_keys=True)
    data["digest"] = hashlib.sha256(body.encode()).hexdigest()[:16]
    data["generated_by"] = "ropekit hf-sweep --table src/ropekit/hf_families.json (once per transformers version)"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    return data


def _vkey(v: str) -> Tuple[int, ...]:
    return tuple(int(x) if x.isdigit() else -1 for x in v.split("."))
