"""Drop-in for Hugging Face transformers: route a model's RoPE through ropekit.

Usage (one line)::

    from ropekit.integrations.transformers import patch
    patch(model)                      # exact float64-angle tables + ropekit's fused apply

Three pieces:

- :func:`apply_rotary_pos_emb` — transformers' function (same signature and semantics, the
  full-width ``cos``/``sin`` their rotary modules build), running on
  :func:`ropekit.apply_rotary_qk` with ``backend="auto"`` (the fused CPU kernel on CPU,
  Triton on CUDA when available, else eager).
- :func:`patch` / :func:`unpatch` / :func:`patched` — per model *instance*: the model's
  attention modules are wrapped so that, while one of them runs, the modeling module's
  ``apply_rotary_pos_emb`` (replaced once per modeling module by a dispatcher) goes to
  ropekit; every other model keeps transformers' code. With ``tables="exact"`` the forward
  of the model's rotary-embedding module(s) is also replaced by ropekit's tables (float64
  angles, one rounding); ``tables="transformers"`` keeps the model's own tables.
- :data:`REGISTRY` — what is patched per ``model_type`` (:func:`supported_model_types`).

Precision:

- ``tables="transformers"``: the tables are the model's own (float32 angles, bit for bit);
  only the rotation changes. ropekit's rotation computes ``x1·c - x2·s`` / ``x2·c + x1·s``
  in float32 (float64 for float64 activations) and rounds once to the activation dtype;
  for float32 models it equals transformers' ``q·cos + rotate_half(q)·sin`` up to float32
  rounding (bit-identical with the ``cpu`` and ``eager`` backends, which do not fuse
  multiply-adds).
- ``tables="exact"``: cos/sin of float64 angles ``m·θ_i`` from exact integer positions,
  attention factor folded in, rounded once to the activation dtype. transformers rounds the
  position and the angle to float32, an absolute angle error up to ``~|m·θ|·2^-24`` that
  grows with the position (see ``docs/transformers.md`` for the measured errors at 2^17 and
  2^20 positions).

transformers versions: the code was tested with :data:`TESTED_VERSIONS`. A transformers
major version other than 5 is rejected with a :class:`~ropekit.RopeError` (4.x modeling
code and configs differ); a 5.x version outside the tested range patches but warns once
(:class:`UntestedVersionWarning`), because the patch depends on function and class names
inside transformers' modeling files. ``patch`` checks that every function it replaces
exists, so a renamed function is an error, not a silent no-op.

Shapes: ``b`` batch, ``s`` sequence, ``h`` heads, ``d`` head dim, ``r`` rotary dim.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import sys
import threading
import warnings
import weakref
from types import ModuleType
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .._errors import fail
from ..config import RopeConfig
from ..functional import apply_rotary, apply_rotary_qk
from ..tables import TableCache, check_positions, cos_sin, to_full_width

__all__ = [
    "apply_rotary_pos_emb",
    "apply_rotary_pos_emb_interleave",
    "patch",
    "unpatch",
    "patched",
    "is_patched",
    "PatchReport",
    "Family",
    "REGISTRY",
    "supported_model_types",
    "TABLE_MODES",
    "TESTED_VERSIONS",
    "UntestedVersionWarning",
    "check_transformers_version",
]

#: ``tables=`` values of :func:`patch`.
TABLE_MODES = ("exact", "transformers")
#: transformers versions the integration tests ran against (``major.minor``).
TESTED_VERSIONS = ("5.23", "5.24")
_SUPPORTED_MAJOR = 5


class UntestedVersionWarning(UserWarning):
    """transformers is a 5.x release outside :data:`TESTED_VERSIONS`."""


# --------------------------------------------------------------------------- drop-in apply
def _half_tables(cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Full-width ``[..., r]`` (``cat(f, f)``) -> half width ``[..., r/2]``, unsqueezed."""
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise fail(f"{name} a torch.Tensor", type(t).__name__, "pass the tables of the model's rotary module")
    if cos.shape != sin.shape or cos.dim() < 1 or cos.shape[-1] % 2:
        raise fail(
            "full-width cos and sin of one shape [..., r] with r even",
            f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}",
            "pass the (cos, sin) pair returned by the model's rotary-embedding module",
        )
    h = cos.shape[-1] // 2
    c, s = cos[..., :h], sin[..., :h]  # [..., r/2] views: taking the first copy is lossless
    # transformers builds cat(freqs, freqs), so the two copies are bit-identical and the
    # first half carries all the information. Verify it where it is free (CPU: no device
    # sync); a table in another layout would otherwise be applied wrongly without notice.
    if cos.device.type == "cpu" and not torch.compiler.is_compiling():
        if not (torch.equal(c, cos[..., h:]) and torch.equal(s, sin[..., h:])):
            raise fail(
                "full-width tables in transformers' half layout, cat(f, f) (two equal copies)",
                "tables whose two halves differ",
                "these look like interleaved (repeat_interleave) tables or not rotary tables at all; "
                "use ropekit.apply_rotary with half-width tables and layout='interleaved'",
            )
    try:
        return c.unsqueeze(unsqueeze_dim), s.unsqueeze(unsqueeze_dim)  # e.g. [b, 1, s, r/2]
    except (IndexError, RuntimeError) as e:
        raise fail(
            f"unsqueeze_dim valid for cos of {cos.dim()} dims",
            repr(unsqueeze_dim),
            "use 1 for q/k of shape [b, h, s, d] (transformers' default) or 2 for [b, s, h, d]",
        ) from e


def _check_position_ids(position_ids: Any) -> None:
    if position_ids is not None and not isinstance(position_ids, torch.Tensor):
        raise fail(
            "position_ids None or a tensor (it is unused, as in transformers)",
            repr(position_ids),
            "pass unsqueeze_dim by keyword: apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=...)",
        )


def apply_rotary_pos_emb(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    unsqueeze_dim: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` (Llama/GPT-NeoX "half" layout) on ropekit.

    Args:
        q: ``[b, h, s, d]`` (or ``[b, s, h, d]`` with ``unsqueeze_dim=2``).
        k: ``[b, hk, s, d]`` (``hk`` may differ from ``h``: GQA/MQA).
        cos, sin: full-width tables ``[b, s, r]`` (or ``[s, r]``) as transformers' rotary
            modules return them, ``cat(f, f)``; ``r <= d``. Only the first ``r`` dims of
            q/k rotate and the rest pass through (GPT-NeoX/Phi-3 partial rotary; with
            ``r == d`` this is Llama's function).
        position_ids: unused (kept from transformers' older signature).
        unsqueeze_dim: where the heads dim goes in ``cos``/``sin`` (1 for ``bhsd``).

    Returns:
        ``(q_embed, k_embed)``, shapes and dtypes of ``q`` and ``k``.

    The first half of ``cos``/``sin`` is the half-width table (lossless: transformers'
    tables are two identical copies, checked on CPU). The rotation runs on
    :func:`ropekit.apply_rotary_qk` (``backend="auto"``) in float32 (float64 for float64
    inputs), rounded once to the input dtype; inputs are never modified. Differentiable.

    Example:
        >>> import torch
        >>> q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)      # [b, h, s, d]
        >>> ang = torch.arange(5.0)[:, None] * 0.5 ** torch.arange(4.0)  # [s, r/2]
        >>> cos = torch.cat([ang.cos(), ang.cos()], -1)[None]            # [1, s, r]
        >>> sin = torch.cat([ang.sin(), ang.sin()], -1)[None]
        >>> qe, ke = apply_rotary_pos_emb(q, k, cos, sin)
        >>> rot = lambda x: torch.cat([-x[..., 4:], x[..., :4]], -1)     # rotate_half
        >>> torch.allclose(qe, q * cos[:, None] + rot(q) * sin[:, None], atol=1e-6)
        True
    """
    _check_position_ids(position_ids)
    c, s = _half_tables(cos, sin, unsqueeze_dim)
    return apply_rotary_qk(q, k, c, s, layout="half")


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...)`` -> ``(x0, x2, ..., x1, x3, ...)`` over the last dim."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def apply_rotary_pos_emb_interleave(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    unsqueeze_dim: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's ``apply_rotary_pos_emb_interleave`` (transformers) on ropekit.

    q/k hold interleaved pairs ``(2i, 2i+1)``; cos/sin are full width ``cat(f, f)`` as for
    :func:`apply_rotary_pos_emb`. Like transformers, the result comes back *de-interleaved*
    (``[even lanes | odd lanes]``, the "half" order): the rotation runs with
    ``layout="interleaved"`` and the output lanes are then gathered. Shapes: q ``[b, h, s, r]``,
    k ``[b, hk, s, r]``, cos/sin ``[b, s, r]``.

    Example:
        >>> import torch
        >>> q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4)
        >>> ang = torch.arange(3.0)[:, None] * torch.tensor([1.0, 0.01])
        >>> cos, sin = (torch.cat([f(ang), f(ang)], -1)[None] for f in (torch.cos, torch.sin))
        >>> qe, _ = apply_rotary_pos_emb_interleave(q, k, cos, sin)
        >>> c, s = cos[:, None, :, :2], sin[:, None, :, :2]
        >>> ref = torch.cat([q[..., 0::2] * c - q[..., 1::2] * s, q[..., 1::2] * c + q[..., 0::2] * s], -1)
        >>> torch.allclose(qe, ref, atol=1e-6)
        True
    """
    _check_position_ids(position_ids)
    c, s = _half_tables(cos, sin, unsqueeze_dim)
    r = 2 * c.shape[-1]
    if q.shape[-1] != r or k.shape[-1] != r:
        raise fail(
            f"q and k holding only the rotary dims (last dim r = {r}, the width of cos)",
            f"q {tuple(q.shape)}, k {tuple(k.shape)}",
            "split off the rotary part first (DeepSeek's q_rot/k_rot)",
        )
    qr, kr = apply_rotary_qk(q, k, c, s, layout="interleaved")
    return _deinterleave(qr), _deinterleave(kr)


def _gptj_apply(tensor: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """GPT-J's ``apply_rotary_pos_emb(tensor, sin, cos)``: x ``[b, s, h, r]``, half-width
    tables ``[b, s, r/2]``, interleaved pairs."""
    return apply_rotary(tensor, cos[:, :, None, :], sin[:, :, None, :], layout="interleaved")


# --------------------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class Family:
    """How one transformers model family is patched.

    Attributes:
        attention: class names of the attention modules whose forward calls the functions
            (subclasses match too).
        rotary: class names of the rotary-embedding modules (their forward is replaced with
            ``tables="exact"``); empty for GPT-J, whose tables are buffers of the attention.
        functions: ``(name, kind)`` of the module-level functions routed to ropekit, found
            in the modeling module that defines the attention's ``forward``. ``kind``:
            ``"hf"`` (:func:`apply_rotary_pos_emb`), ``"hf_interleave"``
            (:func:`apply_rotary_pos_emb_interleave`), ``"gptj"`` (GPT-J's signature).
        tables: how exact tables are built: ``"rope"`` (one config), ``"per_layer"``
            (Gemma 3: one config per layer type), ``"mrope"`` (Qwen2-VL: 3-axis M-RoPE),
            ``"gptj"`` (replace the ``embed_positions`` buffers: each attention's up to
            transformers 5.23, ``model.rotary_emb``'s from 5.24).
        note: one line for the docs.
    """

    attention: Tuple[str, ...]
    rotary: Tuple[str, ...]
    functions: Tuple[Tuple[str, str], ...]
    tables: str = "rope"
    note: str = ""


_HF = (("apply_rotary_pos_emb", "hf"),)


def _std(prefix: str, note: str) -> Family:
    return Family((f"{prefix}Attention",), (f"{prefix}RotaryEmbedding",), _HF, "rope", note)


#: ``model_type`` -> :class:`Family`. Checked against transformers 5.23 modeling files.
REGISTRY: Dict[str, Family] = {
    "llama": _std("Llama", "default/linear/dynamic/yarn/llama3 RoPE, half layout"),
    "mistral": _std("Mistral", "default RoPE, half layout"),
    "qwen2": _std("Qwen2", "default RoPE, half layout"),
    "qwen3": _std("Qwen3", "default RoPE after the q/k RMSNorm, half layout"),
    "phi3": _std("Phi3", "LongRoPE (short/long factors switched at original_max_position_embeddings), partial rotary"),
    "gemma3": Family(
        ("Gemma3Attention",), ("Gemma3RotaryEmbedding",), _HF, "per_layer", "per-layer-type RoPE (sliding/full bases)"
    ),
    "gpt_neox": _std("GPTNeoX", "partial rotary (rotary_pct), half layout"),
    "gptj": Family(
        ("GPTJAttention",), (), (("apply_rotary_pos_emb", "gptj"),), "gptj", "interleaved pairs, partial rotary_dim"
    ),
    "qwen2_vl": Family(
        ("Qwen2VLAttention",),
        ("Qwen2VLRotaryEmbedding",),
        _HF,
        "mrope",
        "text decoder's 3-axis M-RoPE (mrope_section); the vision tower is not patched",
    ),
    "deepseek_v3": Family(
        ("DeepseekV3Attention",),
        ("DeepseekV3RotaryEmbedding",),
        _HF + (("apply_rotary_pos_emb_interleave", "hf_interleave"),),
        "rope",
        "YaRN (mscale), interleaved pairs (rope_interleave) over qk_rope_head_dim",
    ),
}
REGISTRY["gemma3_text"] = REGISTRY["gemma3"]
REGISTRY["qwen2_vl_text"] = REGISTRY["qwen2_vl"]


def supported_model_types() -> List[str]:
    """The ``model_type`` values :func:`patch` accepts, sorted.

    Example:
        >>> "llama" in supported_model_types()
        True
    """
    return sorted(REGISTRY)


# --------------------------------------------------------------------------- version
_version_warned = False


def check_transformers_version(version: Optional[str] = None) -> str:
    """Check the installed (or given) transformers version; return it.

    Major version other than 5: :class:`~ropekit.RopeError`. A 5.x outside
    :data:`TESTED_VERSIONS`: one :class:`UntestedVersionWarning` per process.

    Example:
        >>> check_transformers_version("5.23.0")
        '5.23.0'
        >>> check_transformers_version("4.46.0")
        Traceback (most recent call last):
        ...
        ropekit._errors.RopeError: expected transformers 5.x ...
    """
    global _version_warned
    if version is None:
        import transformers

        version = transformers.__version__
    parts = str(version).split(".")
    try:
        major = int(parts[0])
    except ValueError:
        major = -1
    if major != _SUPPORTED_MAJOR:
        raise fail(
            f"transformers {_SUPPORTED_MAJOR}.x (tested: {', '.join(TESTED_VERSIONS)})",
            f"transformers {version}",
            f'install a tested release, e.g. pip install "transformers=={TESTED_VERSIONS[-1]}.*"',
        )
    minor = ".".join(parts[:2])
    if minor not in TESTED_VERSIONS and not _version_warned:
        _version_warned = True
        warnings.warn(
            f"ropekit's transformers integration was tested with transformers {', '.join(TESTED_VERSIONS)}; "
            f"found {version}. patch() checks the functions it replaces, but run your own parity check "
            "(logits patched vs unpatched) before trusting it.",
            UntestedVersionWarning,
            stacklevel=3,
        )
    return str(version)


# --------------------------------------------------------------------------- dispatcher
# True while a patched attention module runs (per thread / asyncio task: a ContextVar).
_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("ropekit_hf_active", default=False)
_LOCK = threading.RLock()


def _route_hf(names, args, kwargs):
    a = {**dict(zip(names, args)), **kwargs}
    return apply_rotary_pos_emb(a[names[0]], a[names[1]], a[names[2]], a[names[3]], unsqueeze_dim=a.get("unsqueeze_dim", 1))


def _route_hf_interleave(names, args, kwargs):
    a = {**dict(zip(names, args)), **kwargs}
    return apply_rotary_pos_emb_interleave(
        a[names[0]], a[names[1]], a[names[2]], a[names[3]], unsqueeze_dim=a.get("unsqueeze_dim", 1)
    )


def _route_gptj(names, args, kwargs):
    a = {**dict(zip(names, args)), **kwargs}
    return _gptj_apply(a[names[0]], a[names[1]], a[names[2]])  # (tensor, sin, cos)


_ROUTES: Dict[str, Callable] = {"hf": _route_hf, "hf_interleave": _route_hf_interleave, "gptj": _route_gptj}


@dataclasses.dataclass
class _Install:
    module: ModuleType
    name: str
    original: Callable
    dispatcher: Callable
    count: int = 0


_INSTALLED: Dict[Tuple[str, str], _Install] = {}


def _make_dispatcher(original: Callable, kind: str) -> Callable:
    names = list(inspect.signature(original).parameters)
    route = _ROUTES[kind]

    @functools.wraps(original)
    def dispatch(*args, **kwargs):
        if _ACTIVE.get():
            return route(names, args, kwargs)
        return original(*args, **kwargs)

    dispatch._ropekit_original = original  # type: ignore[attr-defined]
    return dispatch


def _acquire(module: ModuleType, name: str, kind: str) -> _Install:
    key = (module.__name__, name)
    inst = _INSTALLED.get(key)
    if inst is None:
        original = getattr(module, name)
        inst = _Install(module, name, original, _make_dispatcher(original, kind))
        setattr(module, name, inst.dispatcher)
        _INSTALLED[key] = inst
    inst.count += 1
    return inst


def _release(inst: _Install) -> None:
    inst.count -= 1
    if inst.count > 0:
        return
    key = (inst.module.__name__, inst.name)
    _INSTALLED.pop(key, None)
    if getattr(inst.module, inst.name, None) is inst.dispatcher:
        setattr(inst.module, inst.name, inst.original)
    else:
        warnings.warn(
            f"{inst.module.__name__}.{inst.name} was replaced by someone else after ropekit patched it; "
            "leaving the current function in place",
            RuntimeWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- exact tables
class _ExactTables:
    """ropekit tables for one :class:`RopeConfig`, returned in transformers' full-width form."""

    def __init__(self, cfg: RopeConfig) -> None:
        self.cfg = cfg
        self.length_dependent = cfg.scaling is not None and cfg.scaling.length_dependent
        self.cache = None if self.length_dependent else TableCache(cfg)

    def half(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """Half-width ``(cos, sin)`` ``[*position_ids.shape, r/2]`` of ``dtype``."""
        check_positions(position_ids, "position_ids")
        if self.cache is None:
            # LongRoPE / dynamic NTK: the frequencies depend on seq_len = max(position_ids) + 1
            # of this call (what transformers uses); no cache, one float64 evaluation.
            return cos_sin(self.cfg, position_ids, dtype=dtype)
        n = int(position_ids.max()) + 1 if position_ids.numel() else 1
        ct, st = self.cache.get(n, device=position_ids.device, dtype=dtype)  # [n', r/2], rounded once
        return ct[position_ids], st[position_ids]  # [..., r/2]

    def full(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        c, s = self.half(position_ids, dtype)
        return to_full_width(c), to_full_width(s)  # [..., r], cat(f, f) like transformers


def _rope_config(config: Any) -> Any:
    from ..hf import rope_config_from_hf

    return rope_config_from_hf(config)


def _exact_forward(rot: torch.nn.Module, kind: str) -> Callable:
    """A replacement ``forward`` for one rotary-embedding module instance."""
    conf = _rope_config(rot.config)
    if kind == "per_layer":
        if not isinstance(conf, dict):
            raise fail("per-layer-type rope parameters", type(conf).__name__, "report this model config")
        tables = {lt: _ExactTables(c) for lt, c in conf.items() if c is not None}

        @torch.no_grad()
        def forward(x, position_ids, layer_type=None):
            if layer_type not in tables:
                raise fail(f"layer_type in {sorted(tables)}", repr(layer_type), "pass a layer type of the config")
            return tuple(t.to(x.device) for t in tables[layer_type].full(position_ids, x.dtype))

        return forward
    if isinstance(conf, dict):
        raise fail("one set of rope parameters", f"per-layer {sorted(conf)}", "register the family as per_layer")
    if kind == "mrope":
        from ..multi_axis import multi_axis_cos_sin

        sections = [int(v) for v in rot.mrope_section]

        @torch.no_grad()
        def forward(x, position_ids):
            pos = position_ids
            if pos.dim() == 2:  # text-only [b, s]: same position on every axis
                pos = pos[None].expand(len(sections), -1, -1)  # [3, b, s]
            pos = pos.movedim(0, -1)  # [b, s, 3]
            c, s = multi_axis_cos_sin(conf, pos, sections, dtype=x.dtype)  # [b, s, r/2]
            return to_full_width(c).to(x.device), to_full_width(s).to(x.device)

        return forward
    tab = _ExactTables(conf)

    @torch.no_grad()
    def forward(x, position_ids):
        c, s = tab.full(position_ids, x.dtype)
        return c.to(x.device), s.to(x.device)

    return forward


def _gptj_holders(named) -> List[Tuple[str, torch.nn.Module]]:
    """The modules holding GPT-J's ``embed_positions`` table: each ``GPTJAttention`` up to
    transformers 5.23, the model's one ``GPTJRotaryEmbedding`` (``model.rotary_emb``) from 5.24."""
    return [
        (n, m) for n, m in named
        if type(m).__name__ in ("GPTJAttention", "GPTJRotaryEmbedding")
        and isinstance(getattr(m, "embed_positions", None), torch.Tensor)
    ]


def _gptj_exact_buffer(holder: torch.nn.Module, config: Any) -> torch.Tensor:
    """GPT-J's ``embed_positions`` ``[max_positions, r]`` = ``cat(sin, cos)``, exact angles."""
    cfg = _rope_config(config)
    old = holder.embed_positions
    if cfg.rotary_dim != old.shape[-1]:
        raise fail(
            f"GPT-J tables of width rotary_dim = {cfg.rotary_dim}",
            f"embed_positions of shape {tuple(old.shape)}",
            "check config.rotary_dim",
        )
    cos, sin = cos_sin(cfg, torch.arange(old.shape[0]), dtype=old.dtype)  # [max_pos, r/2]
    return torch.cat((sin, cos), dim=-1).to(old.device)  # [max_pos, r]


# --------------------------------------------------------------------------- patch state
@dataclasses.dataclass(frozen=True)
class PatchReport:
    """What :func:`patch` changed.

    Attributes:
        model_type: the registry key used.
        tables: ``"exact"`` or ``"transformers"``.
        attention: qualified names of the wrapped attention modules.
        rotary: qualified names of the modules whose tables were replaced (``"exact"``).
        functions: ``module.function`` names now routed through ropekit while this model runs.
        backend: the backend ``"auto"`` picks for the model's parameters (device, dtype).
    """

    model_type: str
    tables: str
    attention: Tuple[str, ...]
    rotary: Tuple[str, ...]
    functions: Tuple[str, ...]
    backend: str


@dataclasses.dataclass
class _State:
    report: PatchReport
    installs: List[_Install]
    # (module, name, had_instance_attr, previous instance value, our wrapper)
    forwards: List[Tuple[torch.nn.Module, str, bool, Any, Callable]]
    buffers: List[Tuple[torch.nn.Module, str, torch.Tensor]]
    finalizer: Any = None


_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, _State]" = weakref.WeakKeyDictionary()


def _matches(mod: torch.nn.Module, names: Tuple[str, ...]) -> bool:
    return any(c.__name__ in names for c in type(mod).__mro__)


def _set_forward(mod: torch.nn.Module, fn: Callable, forwards: list) -> None:
    had = "forward" in mod.__dict__
    forwards.append((mod, "forward", had, mod.__dict__.get("forward"), fn))
    mod.forward = fn  # instance attribute: shadows the class's forward for this instance only


def _wrap_attention(mod: torch.nn.Module) -> Callable:
    inner = mod.forward  # bound method (or an earlier instance-level wrapper, e.g. accelerate's)

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        token = _ACTIVE.set(True)
        try:
            return inner(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    forward._ropekit_wrapper = True  # type: ignore[attr-defined]
    return forward


def _model_type(model: Any) -> str:
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    if not isinstance(mt, str) or not mt:
        raise fail(
            "a transformers model (an nn.Module with .config.model_type)",
            type(model).__name__,
            "pass the model object, e.g. AutoModelForCausalLM.from_config(config)",
        )
    return mt


def patch(model: torch.nn.Module, *, tables: str = "exact") -> PatchReport:
    """Route this model instance's RoPE through ropekit.

    Args:
        model: a transformers model whose ``config.model_type`` is in
            :func:`supported_model_types` (any head: ``...ForCausalLM``, the base model,
            multimodal wrappers of Gemma 3 / Qwen2-VL).
        tables: ``"exact"`` — replace the rotary module's tables with ropekit's (float64
            angles, one rounding; for long contexts and new work); ``"transformers"`` —
            keep the model's own float32 tables bit for bit (for regression tests that
            compare against an unpatched model).

    Returns:
        A :class:`PatchReport` naming every module and function it changed.

    Only this instance changes: its attention modules get an instance-level ``forward``
    that marks "ropekit active" while they run, and the modeling module's
    ``apply_rotary_pos_emb`` becomes a dispatcher that takes ropekit's path only then
    (installed once per modeling module, removed when the last patched model is
    unpatched or garbage-collected). Raises RopeError for unknown model types, a model
    already patched, a transformers major version other than 5, or a model whose
    modules do not look like the registry expects.

    Example:
        >>> import torch, transformers
        >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=4, intermediate_size=64, pad_token_id=0)
        >>> model = transformers.LlamaForCausalLM(cfg).eval()
        >>> ids = torch.randint(0, 64, (1, 8))
        >>> with torch.no_grad():
        ...     ref = model(ids).logits
        ...     report = patch(model, tables="transformers")
        ...     same = torch.allclose(model(ids).logits, ref, atol=1e-6)
        >>> same, report.functions
        (True, ('transformers.models.llama.modeling_llama.apply_rotary_pos_emb',))
        >>> unpatch(model).attention
        ('model.layers.0.self_attn',)
    """
    if tables not in TABLE_MODES:
        raise fail(
            f"tables in {TABLE_MODES}",
            repr(tables),
            '"exact" for ropekit\'s float64-angle tables, "transformers" for the model\'s own tables',
        )
    check_transformers_version()
    mt = _model_type(model)
    fam = REGISTRY.get(mt)
    if fam is None:
        raise fail(
            f"a model_type ropekit can patch: {', '.join(supported_model_types())}",
            repr(mt),
            "use ropekit.integrations.transformers.apply_rotary_pos_emb by hand, or ropekit.RotaryEmbedding",
        )
    with _LOCK:
        if model in _STATES:
            raise fail(
                "a model that is not patched yet",
                f"a model already patched (tables={_STATES[model].report.tables!r})",
                "call unpatch(model) first",
            )
        named = list(model.named_modules())
        attn = [(n, m) for n, m in named if _matches(m, fam.attention)]
        if not attn:
            raise fail(
                f"attention modules of class {'/'.join(fam.attention)} in a {mt} model",
                "none",
                "the model's structure differs from transformers' 5.x code; check the transformers version",
            )
        rot = [(n, m) for n, m in named if fam.rotary and _matches(m, fam.rotary)]
        if tables == "exact" and fam.tables != "gptj" and not rot:
            raise fail(
                f"rotary-embedding modules of class {'/'.join(fam.rotary)}",
                "none",
                'use tables="transformers", or check the transformers version',
            )
        # modeling modules whose globals the attention forwards read
        modules: Dict[str, ModuleType] = {}
        for _, m in attn:
            fwd = type(m).forward
            modname = getattr(fwd, "__module__", None) or type(m).__module__
            modules[modname] = sys.modules[modname]
        for modname, module in modules.items():
            for fname, _ in fam.functions:
                if not callable(getattr(module, fname, None)):
                    raise fail(
                        f"function {fname} in {modname}",
                        "no such function",
                        "the transformers version differs from the tested one "
                        f"({', '.join(TESTED_VERSIONS)}); install a tested release",
                    )
        # build everything that can fail before changing anything
        exact_forwards = []
        exact_buffers = []
        if tables == "exact":
            if fam.tables == "gptj":
                holders = _gptj_holders(named)
                if not holders:
                    raise fail(
                        "GPT-J modules holding embed_positions (GPTJAttention or GPTJRotaryEmbedding)",
                        "none",
                        'use tables="transformers", or check the transformers version',
                    )
                exact_buffers = [(m, "embed_positions", _gptj_exact_buffer(m, model.config)) for _, m in holders]
            else:
                exact_forwards = [(m, _exact_forward(m, fam.tables)) for _, m in rot]
        state = _State(report=None, installs=[], forwards=[], buffers=[])  # type: ignore[arg-type]
        try:
            for modname, module in modules.items():
                for fname, kind in fam.functions:
                    state.installs.append(_acquire(module, fname, kind))
            for _, m in attn:
                _set_forward(m, _wrap_attention(m), state.forwards)
            for m, fn in exact_forwards:
                _set_forward(m, fn, state.forwards)
            for m, name, new in exact_buffers:
                state.buffers.append((m, name, getattr(m, name)))
                setattr(m, name, new)
        except BaseException:
            _restore(state)
            raise
        param = next(model.parameters(), None)
        probe = param if param is not None else torch.empty(0)
        from .. import backends as _backends

        report = PatchReport(
            model_type=mt,
            tables=tables,
            attention=tuple(n for n, _ in attn),
            rotary=tuple(n for n, _ in rot) if tables == "exact" else (),
            functions=tuple(f"{i.module.__name__}.{i.name}" for i in state.installs),
            backend=_backends.resolve("auto", probe.detach()).NAME,
        )
        state.report = report
        # a patched model that is garbage-collected without unpatch releases its dispatchers
        installs = state.installs
        state.finalizer = weakref.finalize(model, _release_all, installs)
        _STATES[model] = state
        return report


def _release_all(installs: List[_Install]) -> None:
    with _LOCK:
        for inst in installs:
            _release(inst)
        installs.clear()


def _restore(state: _State) -> None:
    for mod, name, had, prev, ours in reversed(state.forwards):
        if mod.__dict__.get(name) is not ours:
            warnings.warn(
                f"{type(mod).__name__}.{name} was replaced after ropekit patched it; leaving it in place",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        if had:
            mod.__dict__[name] = prev
        else:
            del mod.__dict__[name]
    state.forwards.clear()
    for mod, name, old in reversed(state.buffers):
        cur = getattr(mod, name)
        # the model may have moved (device/dtype) while patched: follow it
        if old.device != cur.device or old.dtype != cur.dtype:
            old = old.to(device=cur.device, dtype=cur.dtype)
        setattr(mod, name, old)
    state.buffers.clear()
    _release_all(state.installs)


def unpatch(model: torch.nn.Module) -> PatchReport:
    """Undo :func:`patch` on this model; return the report of what was restored.

    Restores the attention and rotary modules' original ``forward`` (and GPT-J's buffers),
    and — when no other patched model uses it — the modeling module's original
    ``apply_rotary_pos_emb`` function object. RopeError if the model is not patched.
    """
    with _LOCK:
        state = _STATES.pop(model, None)
        if state is None:
            raise fail("a model patched by ropekit", "a model that is not patched", "call patch(model) first")
        if state.finalizer is not None:
            state.finalizer.detach()
        _restore(state)
        return state.report


def is_patched(model: torch.nn.Module) -> bool:
    """Whether :func:`patch` is in effect on ``model``."""
    return model in _STATES


@contextlib.contextmanager
def patched(model: torch.nn.Module, *, tables: str = "exact") -> Iterator[PatchReport]:
    """Context manager form: ``with patched(model) as report: ...``; unpatches on exit,
    also when the body raises."""
    report = patch(model, tables=tables)
    try:
        yield report
    finally:
        unpatch(model)
