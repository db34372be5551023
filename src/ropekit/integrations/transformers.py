"""Drop-in for Hugging Face transformers: route a model's RoPE through ropekit.

Usage (one line)::

    from ropekit.integrations.transformers import patch
    patch(model)                      # exact float64-angle tables + ropekit's fused apply

Three pieces:

- :func:`apply_rotary_pos_emb` — transformers' function (same signature and semantics, the
  full-width ``cos``/``sin`` their rotary modules build), running on
  :func:`ropekit.apply_rotary_qk` with ``backend="auto"`` (the fused CPU kernel on CPU,
  Triton on CUDA when available, else eager).
- :func:`patch` / :func:`unpatch` / :func:`patched` — per model *instance*: the modules
  whose code calls a RoPE function of their modeling module (attention layers, indexers)
  are wrapped so that, while one of them runs, that function (replaced once by a
  dispatcher) goes to ropekit; every other model keeps transformers' code. What to patch
  and how is read from the model's classes and measured on its own tables, and each
  replacement is proven on probe tensors before anything changes (:class:`Plan`). With
  ``tables="exact"`` the forward of the model's rotary-embedding module(s) is also
  replaced by ropekit's tables (float64 angles, one rounding); ``tables="transformers"``
  keeps the model's own tables.
- :func:`supported_model_types` — the model types whose code has such an attention.

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

transformers versions: the code was tested with :data:`TESTED_VERSIONS`. A version outside
:data:`SUPPORTED` (``>= 4.57, < 6``) is rejected with a :class:`~ropekit.RopeError` naming the
range; a supported version outside the tested ones patches but warns once
(:class:`UntestedVersionWarning`), because the patch depends on function and class names
inside transformers' modeling files. ``patch`` measures and proves every function it
replaces, so changed modeling code is an error, not a silent wrong answer.

Shapes: ``b`` batch, ``s`` sequence, ``h`` heads, ``d`` head dim, ``r`` rotary dim.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import math
import sys
import threading
import types
import warnings
import weakref
from types import ModuleType
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .._errors import fail
from ..config import MAX_EXACT_POSITION, RopeConfig
from ..functional import apply_rotary, apply_rotary_qk
from ..scaling import LongRoPE
from ..tables import TableCache, check_positions, cos_sin, cos_sin_f64, to_full_width

__all__ = [
    "apply_rotary_pos_emb",
    "apply_rotary_pos_emb_interleave",
    "patch",
    "unpatch",
    "patched",
    "is_patched",
    "PatchReport",
    "Plan",
    "supported_model_types",
    "TABLE_MODES",
    "TESTED_VERSIONS",
    "SUPPORTED",
    "UntestedVersionWarning",
    "check_transformers_version",
]

#: ``tables=`` values of :func:`patch`.
TABLE_MODES = ("exact", "transformers")
#: transformers versions the integration tests ran against (``major.minor``).
TESTED_VERSIONS = ("4.57", "5.23", "5.24", "5.25")
#: ``[lowest, first unsupported)`` transformers ``(major, minor)``: 4.57 is the last 4.x line
#: (its modeling code already has the 5.x structure ropekit reads); 6 does not exist yet.
SUPPORTED = ((4, 57), (6, 0))


class UntestedVersionWarning(UserWarning):
    """transformers is a supported release (:data:`SUPPORTED`) outside :data:`TESTED_VERSIONS`."""


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


# --------------------------------------------------------------------------- discovery
# Which modules of a model to patch is read from transformers' code, not from a list of
# model types: a module is a "RoPE caller" when one of its class's methods names a
# module-level RoPE function of the modeling module that defines the method.


def _rope_calls_of_class(cls: type) -> Tuple[Tuple[str, str], ...]:
    """``(modeling module, function)`` pairs the methods of ``cls`` call (1-D RoPE only)."""
    from .. import _hf_code

    found = []
    for klass in cls.__mro__:
        if klass is torch.nn.Module or klass is object:
            break
        for attr in vars(klass).values():
            fn = getattr(attr, "__func__", attr)
            try:
                fn = inspect.unwrap(fn) if callable(fn) else fn  # decorators (deprecate_kwarg, ...)
            except ValueError:
                pass
            code = getattr(fn, "__code__", None)
            modname = getattr(fn, "__module__", None)
            if code is None or modname not in sys.modules:
                continue
            module = sys.modules[modname]
            fns = _hf_code.rope_functions(module)
            for name in code.co_names:
                low = name.lower()
                if name in fns and "vision" not in low and "2d" not in low and "multidimensional" not in low:
                    found.append((modname, name))
    return tuple(dict.fromkeys(found))


_CLASS_CACHE: Dict[type, Tuple[Tuple[str, str], ...]] = {}


def _rope_calls(mod: torch.nn.Module) -> Tuple[Tuple[str, str], ...]:
    cls = type(mod)
    if cls not in _CLASS_CACHE:
        _CLASS_CACHE[cls] = _rope_calls_of_class(cls)
    return _CLASS_CACHE[cls]


def _is_rotary(mod: torch.nn.Module) -> bool:
    name = type(mod).__name__
    return name.endswith("RotaryEmbedding") and "Vision" not in name


def _family(model: Any) -> str:
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    if not isinstance(mt, str) or not mt:
        raise fail(
            "a transformers model (an nn.Module with .config.model_type)",
            type(model).__name__,
            "pass the model object, e.g. AutoModelForCausalLM.from_config(config)",
        )
    return mt


@functools.lru_cache(maxsize=None)
def supported_model_types() -> List[str]:
    """Model types whose modeling code has an attention that calls a module-level 1-D RoPE
    function of a signature ropekit can route, sorted (read from the installed transformers;
    :func:`patch` still proves each function before replacing it).

    Example:
        >>> "llama" in supported_model_types()
        True
    """
    from .. import _hf_code

    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except Exception:  # pragma: no cover - transformers not installed
        return []
    out = []
    for mt in CONFIG_MAPPING_NAMES:
        module = _hf_code.modeling_module_for(mt)
        if module is None or not _hf_code.rotary_classes(module):
            continue
        sites = [
            s
            for s in _hf_code.call_sites(module)
            if "vision" not in (s.fn + s.cls).lower() and "2d" not in s.fn.lower()
        ]
        if any(_hf_code.signature_kind(_hf_code.unwrap_kernel_func(getattr(module, s.fn, None))) for s in sites):
            out.append(mt)
    return sorted(out)


# --------------------------------------------------------------------------- plans
@dataclasses.dataclass(frozen=True)
class Plan:
    """How one RoPE function of a modeling module is replaced, as measured on its code.

    Attributes:
        module, name: the modeling module and the function.
        kind: call signature (``"qk"``, ``"x"``, ``"sincos"``, ``"complex"``; see
            :func:`ropekit._hf_code.signature_kind`).
        qlayout: ``"bhsd"`` or ``"bshd"`` (where the heads are for the tables' broadcast).
        layout, direction: the pairing and the sign of the angle.
        place: which lanes of the q argument rotate: ``"all"``, ``"leading"`` (first ``r``,
            the rest pass through), ``"trailing"`` (last ``r``).
        lane_start, lane_step: pair ``i`` reads table lane ``lane_start + i * lane_step``.
        pairs_per_lane: ``r/2`` divided by the table width (``1/2`` for ``cat(f, f)`` and
            ``repeat_interleave`` tables, ``1`` for half-width tables), as a ``(num, den)``.
        deinterleave: the output comes back ``[even lanes | odd lanes]`` (DeepSeek).
        table_order: ``"cos_sin"``, ``"sin_cos"`` (GPT-J) or ``"complex"`` (Llama 4).
    """

    module: str
    name: str
    kind: str
    qlayout: str
    layout: str
    direction: int
    place: str
    lane_start: int
    lane_step: int
    pairs_per_lane: Tuple[int, int]
    deinterleave: bool

    def describe(self) -> str:
        bits = [self.layout, "-θ" if self.direction < 0 else "+θ", self.place]
        if self.deinterleave:
            bits.append("output [even | odd]")
        return f"{self.name} ({', '.join(bits)})"


def _plan_from(module: str, name: str, kind: str, m: Any, table_width: int) -> Plan:
    from .._hf_code import NotRope

    r = m.rotary_dim
    if m.offset == 0 and r == m.width:
        place = "all"
    elif m.offset == 0:
        place = "leading"
    elif m.offset + r == m.width:
        place = "trailing"
    else:
        raise NotRope(f"rotates lanes [{m.offset}, {m.offset + r}) in the middle of its {m.width}-lane argument")
    lanes = list(m.lanes)
    step = lanes[1] - lanes[0] if len(lanes) > 1 else 1
    if step <= 0 or lanes != list(range(lanes[0], lanes[0] + step * len(lanes), step)):
        raise NotRope(f"pairs read table lanes {lanes}, not an arithmetic progression")
    deinter = False
    if m.out_perm is not None:
        lo, hi = m.offset, m.offset + r
        want = list(range(m.width))
        # output lane of each input lane when [x0 x1 x2 x3 ...] comes back as [x0 x2 .. | x1 x3 ..]
        for i in range(r):
            want[lo + i] = lo + (i // 2 if i % 2 == 0 else r // 2 + i // 2)
        if list(m.out_perm) != want or m.layout != "interleaved":
            raise NotRope(f"returns its lanes in the order {list(m.out_perm)}")
        deinter = True
    g = math.gcd(r // 2, table_width)
    return Plan(
        module, name, kind, m.qlayout, m.layout, m.direction, place, lanes[0], step,
        (r // 2 // g, table_width // g), deinter,
    )  # fmt: skip


def _half_from_table(plan: Plan, t: torch.Tensor) -> torch.Tensor:
    """The model's table ``[..., T]`` -> half width ``[..., r/2]`` (a strided view)."""
    num, den = plan.pairs_per_lane
    T = t.shape[-1]
    if (T * num) % den:
        raise fail(
            f"a table whose width fits the measured pattern ({num}/{den} pairs per lane)",
            f"width {T}",
            "the model's rotary module changed shape; unpatch and report the model",
        )
    n = T * num // den
    return t[..., plan.lane_start : plan.lane_start + plan.lane_step * (n - 1) + 1 : plan.lane_step]


def _unsq(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.unsqueeze(dim)


def _rotate(plan: Plan, x: Optional[torch.Tensor], c: torch.Tensor, s: torch.Tensor) -> Optional[torch.Tensor]:
    """Rotate one q/k tensor with broadcast-ready half tables ``c``, ``s`` ``[..., r/2]``."""
    if x is None:
        return None
    r = 2 * c.shape[-1]
    w = x.shape[-1]
    if r > w:
        raise fail(
            f"q/k with at least r = {r} lanes (twice the half table width)",
            f"last dim {w}",
            "the tables do not belong to this tensor",
        )
    off = w - r if plan.place == "trailing" else 0
    xr = x if r == w else x[..., off : off + r]
    y = apply_rotary(xr, c, s, layout=plan.layout, conjugate=plan.direction < 0)
    if plan.deinterleave:
        y = torch.cat((y[..., 0::2], y[..., 1::2]), dim=-1)
    if r == w:
        return y
    return torch.cat([t for t in (x[..., :off], y, x[..., off + r :]) if t.shape[-1]], dim=-1)


def _replacement(plan: Plan, original: Callable) -> Callable:
    """A function with ``original``'s signature that runs ``plan`` on ropekit."""
    sig = inspect.signature(original)
    names = list(sig.parameters)

    def call(*args, **kwargs):
        b = sig.bind(*args, **kwargs)
        b.apply_defaults()
        a = b.arguments
        if plan.kind in ("qk", "x"):
            ud = a.get("unsqueeze_dim", 1)
            c = _unsq(_half_from_table(plan, a["cos"]), ud)
            s = _unsq(_half_from_table(plan, a["sin"]), ud)
        elif plan.kind == "sincos":
            c = _half_from_table(plan, a["cos"])[:, :, None, :]
            s = _half_from_table(plan, a["sin"])[:, :, None, :]
        else:  # complex freqs_cis
            f = a[names[2]]
            ud = 2 if plan.qlayout == "bshd" else 1
            c, s = _unsq(_half_from_table(plan, f.real), ud), _unsq(_half_from_table(plan, f.imag), ud)
        if plan.kind == "qk":
            return _rotate(plan, a[names[0]], c, s), _rotate(plan, a[names[1]], c, s)
        if plan.kind == "complex":
            return _rotate(plan, a[names[0]], c, s), _rotate(plan, a[names[1]], c, s)
        return _rotate(plan, a[names[0]], c, s)

    return call


def _probe_tensors(plan: Plan, S: int, w: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if plan.qlayout == "bshd":
        return torch.randn(2, S, 3, w, generator=g), torch.randn(2, S, 2, w, generator=g)
    return torch.randn(2, 3, S, w, generator=g), torch.randn(2, 2, S, w, generator=g)


def _outputs(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def _diff_text(want: torch.Tensor, got: torch.Tensor) -> str:
    if want.shape != got.shape:
        return f"shape {tuple(got.shape)} instead of {tuple(want.shape)}"
    d = (want.double() - got.double()).abs()
    lane = int(d.reshape(-1, d.shape[-1]).amax(0).argmax())
    return f"max |difference| {d.max().item():.3g} (worst lane {lane} of {d.shape[-1]})"


def _prove(family: str, plan: Plan, original: Callable, cos: Any, sin: Any, widths: List[int],
           tables: Optional[Tuple[Any, Any]] = None, tol: float = 0.0) -> None:  # fmt: skip
    """Run ``original`` and the replacement on random q/k; RopeError unless identical
    (``tables`` given: the replacement with those tables, within ``tol``·|x|)."""
    from .._hf_code import run_fn

    rep = _replacement(plan, original)
    S = cos.shape[-2]
    c2, s2 = tables if tables is not None else (cos, sin)
    for w in widths:
        q, k = _probe_tensors(plan, S, w)
        with torch.no_grad():
            want = _outputs(run_fn(original, plan.kind, q, k, cos, sin))
            got = _outputs(run_fn(rep, plan.kind, q, k, c2, s2))
        for wt, gt in zip(want, got):
            ok = wt.shape == gt.shape and wt.dtype == gt.dtype
            if ok and tables is None:
                ok = torch.equal(wt, gt)
            elif ok:
                ok = bool(((wt.double() - gt.double()).abs() <= tol * (1 + wt.double().abs())).all())
            if not ok:
                mode = "exact tables" if tables is not None else "the model's tables"
                raise fail(
                    f"ropekit's replacement of {plan.module}.{plan.name} to match it on probe tensors ({mode})",
                    f"{family}: {_diff_text(wt, gt)} at q width {w}",
                    'nothing was changed; use tables="transformers" or leave this model unpatched',
                )
        if len(want) != len(got):
            raise fail(f"{plan.name} outputs", f"{family}: {len(got)} instead of {len(want)}", "report this model")

# --------------------------------------------------------------------------- accuracy proof
#: Slack of :func:`_prove_accuracy`, in units of ``A·max|x|`` (``A`` the largest |table|
#: entry, ``x`` the probe head). ropekit rotates in float32 from float32 tables (16-bit and
#: float32 activations): with unit roundoff ``u = 2^-24`` the unrounded result ``ŷ`` is
#: within ``η = 4u·A·(|x_a| + |x_b|) <= 2^-21·A·max|x|`` of the exact rotation ``y`` (table
#: rounding, two products, one sum). Rounding ``ŷ`` to the activation dtype picks the
#: nearest representable value, so ``|ours - y| <= |m - y| + 2η`` for any representable ``m``,
#: the model's own output included. The oracle ``o`` is the model's function in float64 on
#: float64 tables; where that function casts to float32 inside (Llama 4's complex path) it is
#: itself within ``η`` of ``y``. Hence ``|ours - o| <= |model - o| + 2η + 2η = 2^-19·A·max|x|``
#: — far below one rounding of a float32 (2^-24 relative) times the head's dynamic range,
#: and 2^-11 of a bfloat16 rounding: it cannot hide a wrong pairing, width or direction.
ACCURACY_SLACK = 2.0**-19


def _model_dtype(attn: List[Tuple[str, torch.nn.Module]]) -> torch.dtype:
    """The activation dtype of the attention modules (their first floating parameter)."""
    for _, m in attn:
        for p in m.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.complex128) if t.is_complex() else t.double()


def _instance_tables(rot: torch.nn.Module, lt: Any, order: str, dtype: torch.dtype) -> Tuple[Any, Any]:
    """The module's own tables for probe positions, called with activations of ``dtype``
    (as the model calls it), in the ``(cos, sin)`` / ``(freqs_cis, None)`` order."""
    from .._hf_code import module_tables

    cos, sin = module_tables(rot, _PROBE_S, layer_type=lt, config=getattr(rot, "config", None), dtype=dtype)
    return (cos, None) if order == "complex" else (cos, sin)


def _prove_accuracy(
    family: str, plan: Plan, original: Callable, w: int, dtype: torch.dtype,
    theirs: Tuple[Any, Any], ours: Tuple[Any, Any], oracle: Tuple[Any, Any], what: str,
) -> float:  # fmt: skip
    """Prove the replacement no less accurate than the model's own code, element-wise.

    On random q/k of ``dtype`` (``w`` lanes): the model's function with its own tables
    ``theirs``, the replacement with ``ours``, and the oracle — the model's function in
    float64 on the float64 tables ``oracle``. RopeError unless every element satisfies
    ``|ours - o| <= |model - o| + ACCURACY_SLACK·A·max|x|`` (see :data:`ACCURACY_SLACK`).
    Returns the largest ``|ours - o|``.
    """
    from .._hf_code import run_fn

    rep = _replacement(plan, original)
    q, k = (t.to(dtype) for t in _probe_tensors(plan, _PROBE_S, w))
    with torch.no_grad():
        model_out = _outputs(run_fn(original, plan.kind, q, k, *theirs))
        our_out = _outputs(run_fn(rep, plan.kind, q, k, *ours))
        exact = _outputs(run_fn(original, plan.kind, q.double(), k.double(), *oracle))
    a = max(float(t.abs().max()) for t in oracle if t is not None)
    worst = 0.0
    for x, o, m, y in zip((q, k), exact, model_out, our_out):
        if y.shape != m.shape or y.dtype != m.dtype:
            raise fail(
                f"ropekit's replacement of {plan.module}.{plan.name} returning the model's shapes and dtypes",
                f"{family}: {tuple(y.shape)} {y.dtype} instead of {tuple(m.shape)} {m.dtype}",
                "nothing was changed; leave this model unpatched and report it",
            )
        o = o.double()
        slack = ACCURACY_SLACK * a * x.double().abs().amax(-1, keepdim=True)  # [..., 1]
        ours_err, model_err = (y.double() - o).abs(), (m.double() - o).abs()
        excess = ours_err - model_err - slack
        if not bool((excess <= 0).all()):
            raise fail(
                f"ropekit's replacement of {plan.module}.{plan.name} ({what}) to be no less accurate than the "
                f"model's own code against a float64 oracle, element-wise in {dtype} (slack {ACCURACY_SLACK:g}·A·max|x|)",
                f"{family}: max |ours - oracle| {ours_err.max().item():.3g}, the model's {model_err.max().item():.3g}, "
                f"worst excess {excess.max().item():.3g} at q width {w}",
                'nothing was changed; use tables="transformers" or leave this model unpatched',
            )
        worst = max(worst, ours_err.max().item())
    return worst


def _float32_reference(rot: torch.nn.Module, model: Any, lt: Any, order: str, probe: Tuple[Any, Any]) -> Tuple[Any, ...]:
    """The tables of the model's rotary code at float32 precision, for probe positions.

    A model cast to bfloat16/float16 holds ``inv_freq`` rounded to that dtype, so its own
    tables are off by up to ``m·θ·2^-8``; the config is checked against a fresh float32
    instance of the same class built from the module's config instead, and the instance
    must agree with it within the rounding of its buffers (a module edited by hand, e.g. a
    changed ``inv_freq``, is refused, not replaced)."""
    from .._hf_code import module_tables

    have = (probe[0],) if order == "complex" else probe
    low = [b.dtype for b in rot.buffers() if b.is_floating_point() and b.dtype not in (torch.float32, torch.float64)]
    if not low:
        return have
    cfg = _config_of(rot, model)
    try:
        with torch.device("cpu"):
            fresh = type(rot)(config=cfg)
        ref = module_tables(fresh, _PROBE_S, layer_type=lt, config=cfg)
    except Exception as e:
        raise fail(
            f"a float32 {type(rot).__name__} built from the model's config (its {low[0]} buffers lost precision)",
            f"{type(e).__name__}: {e}",
            'use tables="transformers", or build the model in float32 and cast after patch()',
        ) from None
    ref = (ref[0],) if order == "complex" else ref
    top = max(float(t.abs().max()) for t in ref)
    theta = max(float(b.float().abs().max()) for b in rot.buffers() if b.is_floating_point())
    tol = top * (_PROBE_S - 1) * theta * torch.finfo(low[0]).eps + 2.0**-20
    for a, b in zip(have, ref):
        d = (a.to(b.device).to(_upcast(b).dtype) - _upcast(b)).abs().max().item()
        if d > tol:
            raise fail(
                f"{type(rot).__name__}'s tables within the rounding of its {low[0]} buffers ({tol:.3g}) of a fresh one",
                f"max |difference| {d:.3g}",
                "the module was changed after it was built; nothing was changed",
            )
    return ref


def _prove_exact_tables(
    mt: str, model: Any, probes: List[Any], used: Dict[str, Any], proofs: Dict[Any, List[Any]], dtype: torch.dtype
) -> Tuple[List[Tuple[torch.nn.Module, Callable]], Dict[Tuple[str, Any], Any], Dict[Tuple[str, Any], Any]]:
    """``tables="exact"``: for each rotary module and layer type, check that ropekit's config
    reproduces the model's float32 tables, then prove each replacement on ropekit's tables in
    the model's dtype (:func:`_prove_accuracy`). Returns the ``forward`` replacements, the
    exact float32 probe tables and the float32 reference tables they were checked against
    (:func:`_float32_reference`: the module's own, or a fresh float32 module's where the
    model's buffers were cast to 16 bits), both for the q/k-norm fusion proofs."""
    from ..hf import transformers_cos_sin

    exact_forwards: List[Tuple[torch.nn.Module, Callable]] = []
    exact_new: Dict[Tuple[str, Any], Any] = {}
    refs: Dict[Tuple[str, Any], Any] = {}
    pos = torch.arange(_PROBE_S)[None]
    for n, rot, cos, sin, order, lt in probes:
        if n not in used:
            continue
        r, fmt = used[n]
        if fmt is None:
            raise fail(
                "a rotary module whose table layout ropekit can rebuild (cat, repeat_interleave or half)",
                f"{mt}: {type(rot).__name__}",
                'nothing was changed; use tables="transformers"',
            )
        try:
            conf = _rope_config(_config_of(rot, model))
        except Exception as e:
            raise fail(f"RopeConfig.from_hf to read the {mt} config", str(e), 'use tables="transformers"') from None
        cfg = conf.get(lt) if isinstance(conf, dict) else conf
        if not isinstance(cfg, RopeConfig):
            raise fail(f"one rope config for layer type {lt!r}", f"{mt}: {cfg!r}", 'use tables="transformers"')
        have = _float32_reference(rot, model, lt, order, (cos, sin))
        if getattr(rot, "mrope_section", None) is None:
            # the config must reproduce the module's own tables bit for bit, or within float32
            # rounding where the module computes cos/sin another way (Llama 4's torch.polar)
            want = fmt.build(*transformers_cos_sin(cfg, pos, dtype=torch.float32))
            want = (want,) if isinstance(want, torch.Tensor) else (want[1], want[0]) if order == "sin_cos" else want
            if not all(
                a.shape == b.shape and (a.double() - b.double()).abs().max().item() <= 2.0**-21 if not a.is_complex()
                else a.shape == b.shape and (a - b).abs().max().item() <= 2.0**-21
                for a, b in zip(want, have)
            ):
                diff = "; ".join(_diff_text(b, a) if not a.is_complex() else f"max |difference| {(a - b).abs().max().item():.3g}" for a, b in zip(want, have))
                raise fail(
                    "RopeConfig.from_hf + transformers_cos_sin reproducing the model's tables "
                    "(bit for bit, or within float32 rounding)",
                    f"{mt} ({type(rot).__name__}, layer type {lt}): {diff}",
                    'nothing was changed; use tables="transformers"',
                )
        fwd = _exact_forward(rot, fmt=fmt, config=_config_of(rot, model))
        kw = {"layer_type": lt} if lt is not None else {}

        def tabs(dt: torch.dtype) -> Tuple[Any, Any]:
            with torch.no_grad():
                out = fwd(torch.zeros(1, dtype=dt), pos, **kw)
            return (out, None) if order == "complex" else ((out[1], out[0]) if order == "sin_cos" else out)

        oracle = tabs(torch.float64)
        # the oracle's tables (float64 angles) against the model's float32 ones: transformers'
        # float32 angle m·θ is within 2^-23·|m·θ| and cos/sin within 2^-24 (times the attention factor)
        top = max(float(t.abs().max()) for t in oracle if t is not None)
        tol = top * 2.0**-22 * (1 + (_PROBE_S - 1) * float(cfg.inv_freq().max()))
        for a, b in zip(have, oracle):
            d = (_upcast(a) - b).abs().max().item()
            if d > tol:
                raise fail(
                    f"ropekit's exact tables within float32 rounding ({tol:.3g}) of the model's",
                    f"{mt} ({type(rot).__name__}, layer type {lt}): max |difference| {d:.3g}",
                    'nothing was changed; use tables="transformers"',
                )
        exact_new[(n, lt)] = tabs(torch.float32)
        refs[(n, lt)] = have
        theirs, ours = _instance_tables(rot, lt, order, dtype), tabs(dtype)
        for key, plan, original, w in proofs.get((n, lt), []):
            _prove_accuracy(mt, plan, original, w, dtype, theirs, ours, oracle, "exact tables")
        if all(r is not m for m, _ in exact_forwards):
            exact_forwards.append((r, fwd))
    return exact_forwards, exact_new, refs


# --------------------------------------------------------------------------- version
_version_warned = False


def _version_tuple(version: str) -> Tuple[int, int]:
    parts = str(version).split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or -1)
    except (ValueError, IndexError):
        return (-1, -1)


def check_transformers_version(version: Optional[str] = None) -> str:
    """Check the installed (or given) transformers version against :data:`SUPPORTED`; return it.

    Outside ``>= 4.57, < 6``: :class:`~ropekit.RopeError` naming the range. Inside it but not
    one of :data:`TESTED_VERSIONS`: one :class:`UntestedVersionWarning` per process (every
    replacement is still measured and proven, so changed code is refused, not patched wrongly).

    Example:
        >>> check_transformers_version("5.23.0")
        '5.23.0'
        >>> check_transformers_version("4.46.0")
        Traceback (most recent call last):
        ...
        ropekit._errors.RopeError: expected transformers >= 4.57, < 6 ...
    """
    global _version_warned
    if version is None:
        import transformers

        version = transformers.__version__
    v = _version_tuple(version)
    lo, hi = SUPPORTED
    if not (lo <= v < hi):
        raise fail(
            f"transformers >= {lo[0]}.{lo[1]}, < {hi[0]} (tested: {', '.join(TESTED_VERSIONS)})",
            f"transformers {version}",
            f'install a supported release, e.g. pip install "transformers=={TESTED_VERSIONS[-1]}.*"',
        )
    minor = f"{v[0]}.{v[1]}"
    if minor not in TESTED_VERSIONS and not _version_warned:
        _version_warned = True
        warnings.warn(
            f"ropekit's transformers integration was tested with transformers {', '.join(TESTED_VERSIONS)}; "
            f"found {version}. patch() checks the functions it replaces, but run your own parity check "
            "(logits patched vs unpatched) or `ropekit hf-sweep` before trusting it.",
            UntestedVersionWarning,
            stacklevel=3,
        )
    return str(version)


# --------------------------------------------------------------------------- dispatcher
# While a patched attention module runs, _ACTIVE holds its model's plans
# {(module, function): replacement} (per thread / asyncio task: a ContextVar).
_ACTIVE: contextvars.ContextVar[Optional[Dict[Tuple[str, str], Callable]]] = contextvars.ContextVar(
    "ropekit_hf_active", default=None
)
_LOCK = threading.RLock()
# The same while torch.compile traces a patched attention (dynamo traces list appends, not
# ContextVar.set); the compiled graph has the replacement inlined, so nothing reads it at run time.
_TRACING: List[Dict[Tuple[str, str], Callable]] = []


@dataclasses.dataclass
class _Install:
    module: ModuleType
    name: str
    original: Callable
    dispatcher: Callable
    count: int = 0


_INSTALLED: Dict[Tuple[str, str], _Install] = {}


def _make_dispatcher(module: ModuleType, name: str, original: Callable) -> Callable:
    key = (module.__name__, name)

    @functools.wraps(original)
    def dispatch(*args, **kwargs):
        if torch.compiler.is_compiling():
            plans = _TRACING[-1] if _TRACING else None
        else:
            plans = _ACTIVE.get()
        if plans is not None:
            rep = plans.get(key)
            if rep is not None:
                return rep(*args, **kwargs)
        return original(*args, **kwargs)

    dispatch._ropekit_original = original  # type: ignore[attr-defined]
    return dispatch


def _original(module: ModuleType, name: str) -> Callable:
    from .. import _hf_code

    inst = _INSTALLED.get((module.__name__, name))
    # transformers 5.25 (kernels): a hub-kernel wrapper holds the function; measure and call that
    return _hf_code.unwrap_kernel_func(inst.original if inst is not None else getattr(module, name))


def _acquire(module: ModuleType, name: str) -> _Install:
    key = (module.__name__, name)
    inst = _INSTALLED.get(key)
    if inst is None:
        original = getattr(module, name)
        inst = _Install(module, name, original, _make_dispatcher(module, name, original))
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
    """ropekit tables for one :class:`RopeConfig`, returned in transformers' full-width form.

    Row ``m`` holds cos/sin of the float64 angle ``m·θ_i`` (``θ`` the config's float64
    frequencies), times the attention factor, rounded once to the table dtype. Negative
    positions (left padding with ``position_ids = attention_mask.cumsum(-1) - 1`` gives -1 at
    the padded slots, which transformers accepts) are exact too: ``float64(-m)·θ = -(m·θ)``
    exactly, so row ``-m`` is row ``m`` with the sine negated (``cos(-a) = cos(a)``,
    ``sin(-a) = -sin(a)``; negation commutes with the one rounding). Rows of non-negative
    positions are unchanged by that.
    """

    def __init__(self, cfg: RopeConfig) -> None:
        self.cfg = cfg
        self.length_dependent = cfg.scaling is not None and cfg.scaling.length_dependent
        self.cache = None if self.length_dependent else TableCache(cfg)
        # what tables.angles multiplies the positions by (float64 [r/2]), for the traced path
        self.inv = None if self.length_dependent else cfg.inv_freq().to(torch.float64)
        self.factor = float(cfg.attention_factor)
        # LongRoPE: two frequency sets, long for seq_len > original_max_position (the traced
        # path selects between them in the graph); dynamic NTK's depend on seq_len continuously
        self.longrope = None
        if isinstance(cfg.scaling, LongRoPE):
            n = cfg.scaling.original_max_position
            self.longrope = (n, cfg.inv_freq(n).to(torch.float64), cfg.inv_freq(n + 1).to(torch.float64))

    def half(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """Half-width ``(cos, sin)`` ``[*position_ids.shape, r/2]`` of ``dtype``."""
        if torch.compiler.is_compiling():
            return self._traced(position_ids, dtype)
        check_positions(position_ids, "position_ids", check_values=False)  # integer dtype
        p = position_ids if position_ids.dtype == torch.int64 else position_ids.to(torch.int64)
        if p.numel() == 0 or p.device.type == "meta":
            lo, hi = 0, 0
        else:
            lo, hi = (int(v) for v in torch.aminmax(p))  # one pass, one sync
        if hi > MAX_EXACT_POSITION or -lo > MAX_EXACT_POSITION:
            raise fail(
                "|position_ids| <= 2**53 (exact in the float64 angle m·θ)",
                f"values in [{lo}, {hi}]",
                "positions are token indices; check how they were computed",
            )
        neg = lo < 0
        a = p.abs() if neg else p
        if self.cache is None:
            # LongRoPE / dynamic NTK: the frequencies depend on seq_len = max(position_ids) + 1
            # of this call (what transformers uses); no cache, one float64 evaluation.
            c, s = cos_sin(self.cfg, a, dtype=dtype, seq_len=max(hi + 1, 0) if neg else None)
        else:
            n = max(hi, -lo) + 1 if a.numel() else 1
            ct, st = self.cache.get(n, device=a.device, dtype=dtype)  # [n', r/2], rounded once
            c, s = ct[a], st[a]  # [..., r/2]
        if neg:
            s = torch.where(p.unsqueeze(-1) < 0, -s, s)
        return c, s

    def _traced(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """The rows :meth:`half` gathers, computed in the graph while torch.compile/export
        traces (the table's length would need a host read of the positions): the same
        float64 product, cos/sin, attention factor and rounding, element for element, so the
        compiled model gives the eager patched model's bits."""
        p = position_ids.to(torch.int64)
        if self.inv is not None:
            inv = self.inv.to(p.device)
        elif self.longrope is not None:  # eager: cfg.inv_freq(seq_len = max(position_ids) + 1)
            n, short, long = self.longrope
            inv = torch.where(p.max() + 1 > n, long.to(p.device), short.to(p.device))
        else:
            raise fail(
                f"frequencies that do not depend on the sequence length continuously under torch.compile "
                f"(not {type(self.cfg.scaling).__name__})",
                "a length-dependent scaling: its seq_len = max(position_ids) + 1 is a host read",
                "run it eagerly (transformers' own dynamic rotary module does not trace with fullgraph either)",
            )
        a = p.abs().to(torch.float64).unsqueeze(-1) * inv  # float64 [..., r/2], exact positions
        c, s = cos_sin_f64(a)
        if self.factor != 1.0:
            c, s = c * self.factor, s * self.factor
        c, s = c.to(dtype), s.to(dtype)
        return c, torch.where(p.unsqueeze(-1) < 0, -s, s)

    def full(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        c, s = self.half(position_ids, dtype)
        return to_full_width(c), to_full_width(s)  # [..., r], cat(f, f) like transformers


def _rope_config(config: Any) -> Any:
    from ..hf import rope_config_from_hf

    conf = rope_config_from_hf(config)
    if isinstance(conf, dict) and "attention" in conf and set(conf) <= {"attention", "indexer"}:
        conf = conf["attention"]  # components share the rotary module's tables
    return conf


@dataclasses.dataclass(frozen=True)
class _TableFormat:
    """How a rotary module lays out its output: ``order`` ``"cos_sin"``/``"sin_cos"``/
    ``"complex"``; ``shape`` ``"cat"`` (``cat(f, f)``), ``"repeat"`` (``repeat_interleave``)
    or ``"half"``."""

    order: str
    shape: str

    def build(self, c: torch.Tensor, s: torch.Tensor) -> Any:
        if self.shape == "cat":
            c, s = to_full_width(c), to_full_width(s)
        elif self.shape == "repeat":
            c, s = c.repeat_interleave(2, dim=-1), s.repeat_interleave(2, dim=-1)
        if self.order == "complex":  # complex64 (complex128 for the float64 oracle)
            return torch.complex(c, s) if c.dtype == torch.float64 else torch.complex(c.float(), s.float())
        return (s, c) if self.order == "sin_cos" else (c, s)


def _table_format(plan: Plan, order: str) -> Optional[_TableFormat]:
    num, den = plan.pairs_per_lane
    if (num, den) == (1, 1) and plan.lane_start == 0 and plan.lane_step == 1:
        return _TableFormat(order, "half")
    if (num, den) == (1, 2) and plan.lane_start == 0 and plan.lane_step == 1:
        return _TableFormat(order, "cat")
    if (num, den) == (1, 2) and plan.lane_start == 0 and plan.lane_step == 2:
        return _TableFormat(order, "repeat")
    return None


def _config_of(rot: torch.nn.Module, model: Any = None) -> Any:
    """The config a rotary module was built from (GPT-J's keeps none: the model's text config)."""
    cfg = getattr(rot, "config", None)
    if cfg is None and model is not None:
        cfg = model.config
        get_text = getattr(cfg, "get_text_config", None)
        cfg = get_text() if callable(get_text) else cfg
    return cfg


def _table_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of ropekit's exact tables for activations of ``dtype``: float32 for 16-bit
    activations. The replacement rotates in float32 anyway, so float32 tables make its one
    rounding (to the activation dtype) the only one — whereas transformers rounds cos/sin
    to the activation dtype first and then rounds each product and the sum. Float32 and
    float64 activations get tables of their own dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _exact_forward(
    rot: torch.nn.Module, kind: Any = "rope", fmt: Optional[_TableFormat] = None, config: Any = None
) -> Callable:
    """A replacement ``forward`` for one rotary-embedding module instance: ropekit's exact
    tables (one config, per layer type, or M-RoPE) in the module's own format."""
    fmt = fmt or _TableFormat("cos_sin", "cat")
    conf = _rope_config(config if config is not None else rot.config)
    params = inspect.signature(rot.forward).parameters
    if isinstance(conf, dict):
        tables = {lt: _ExactTables(c) for lt, c in conf.items() if c is not None}
        if "layer_type" not in params:
            raise fail("a rotary module taking layer_type", f"{type(rot).__name__} without it", "report this model")

        @torch.no_grad()
        def forward(x, position_ids, layer_type=None, **kw):
            if layer_type not in tables:
                raise fail(f"layer_type in {sorted(tables)}", repr(layer_type), "pass a layer type of the config")
            out = fmt.build(*tables[layer_type].half(position_ids, _table_dtype(x.dtype)))
            return out.to(x.device) if isinstance(out, torch.Tensor) else tuple(t.to(x.device) for t in out)

        return forward
    sections = getattr(rot, "mrope_section", None)
    if sections is not None:
        from ..multi_axis import multi_axis_cos_sin, pair_axes

        sections = [int(v) for v in sections]
        axes = pair_axes(sections)  # [r/2]: the axis each pair reads its position from
        length_dependent = conf.scaling is not None and conf.scaling.length_dependent

        @torch.no_grad()
        def forward(x, position_ids, **kw):
            pos = position_ids
            if pos.dim() == 2:  # text-only [b, s]: same position on every axis
                pos = pos[None].expand(len(sections), -1, -1)  # [3, b, s]
            pos = pos.movedim(0, -1)  # [b, s, 3]
            seq = None
            if pos.dtype.is_floating_point or pos.dtype.is_complex or pos.dtype == torch.bool:
                neg = None  # refused by multi_axis_cos_sin
            else:  # negative positions (left padding): sin(-a) = -sin(a), as _ExactTables
                neg = (pos < 0).index_select(-1, axes.to(pos.device))  # [b, s, r/2]
                if length_dependent and pos.numel() and not torch.compiler.is_compiling():
                    seq = max(int(pos.max()) + 1, 0)  # of the signed positions, as transformers
                pos = pos.abs()
            c, s = multi_axis_cos_sin(conf, pos, sections, dtype=_table_dtype(x.dtype), seq_len=seq)  # [b, s, r/2]
            if neg is not None:
                s = torch.where(neg, -s, s)
            out = fmt.build(c, s)
            return out.to(x.device) if isinstance(out, torch.Tensor) else tuple(t.to(x.device) for t in out)

        return forward
    tab = _ExactTables(conf)

    @torch.no_grad()
    def forward(x, position_ids, **kw):
        out = fmt.build(*tab.half(position_ids, _table_dtype(x.dtype)))
        return out.to(x.device) if isinstance(out, torch.Tensor) else tuple(t.to(x.device) for t in out)

    return forward


# --------------------------------------------------------------------------- patch state
@dataclasses.dataclass(frozen=True)
class PatchReport:
    """What :func:`patch` changed.

    Attributes:
        model_type: the model's ``config.model_type``.
        tables: ``"exact"`` or ``"transformers"``.
        attention: qualified names of the wrapped modules (those whose code calls a RoPE
            function: attention layers, indexers).
        rotary: qualified names of the modules whose tables were replaced (``"exact"``).
        functions: ``module.function`` names now routed through ropekit while this model runs.
        backend: the backend ``"auto"`` picks for the model's parameters (device, dtype).
        plans: one line per function: what was measured and proven (pairing, direction,
            which lanes rotate).
        fuse_qk_norm: whether ``patch`` was asked to fuse the q/k norms.
        fused: qualified names of the attention modules whose q/k norm now runs inside
            :func:`ropekit.apply_qk_norm_rotary` (``fuse_qk_norm=True``).
        norms: one line per attention class and norm: the norm read (class, eps and the
            attribute it came from, weight offset), the RoPE function it is fused into, and
            the max difference of its proofs.
    """

    model_type: str
    tables: str
    attention: Tuple[str, ...]
    rotary: Tuple[str, ...]
    functions: Tuple[str, ...]
    backend: str
    plans: Tuple[str, ...] = ()
    fuse_qk_norm: bool = False
    fused: Tuple[str, ...] = ()
    norms: Tuple[str, ...] = ()


@dataclasses.dataclass
class _State:
    report: PatchReport
    installs: List[_Install]
    # (module, name, had_instance_attr, previous instance value, our wrapper)
    forwards: List[Tuple[torch.nn.Module, str, bool, Any, Callable]]
    finalizer: Any = None


_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, _State]" = weakref.WeakKeyDictionary()


def _unpatched_forward(mod: torch.nn.Module, prev: Any) -> Any:
    """What a copy of a patched module gets as ``forward``: the one it had before the patch."""
    return prev if prev is not None else types.MethodType(type(mod).forward, mod)


def _drop_copied_forwards(model: torch.nn.Module) -> None:
    """Remove the instance ``forward`` a copy of a patched model carries (the class's own
    forward bound to the module, see :class:`_Forward`): it only shadows the class."""
    for m in model.modules():
        f = m.__dict__.get("forward")
        if isinstance(f, types.MethodType) and f.__self__ is m and f.__func__ is getattr(type(m), "forward", None):
            del m.__dict__["forward"]


class _Forward:
    """A patched module's instance ``forward``: calls ``fn``.

    Copies of the module (``copy.deepcopy``, ``pickle``, ``torch.save``) get the forward the
    module had before :func:`patch` instead (``fn`` closes over this module's weights and
    the model's plans, which a copy must not share): a copy of a patched model is an
    unpatched model with its own weights; ``patch(copy)`` patches it again.
    """

    def __init__(self, module: torch.nn.Module, fn: Callable, prev: Any) -> None:
        self.__dict__.update(getattr(fn, "__dict__", {}))  # the function's markers (_ropekit_deferred, ...)
        self.module, self.fn, self.prev, self.__wrapped__ = module, fn, prev, fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


    def __reduce_ex__(self, protocol: Any) -> Any:
        return _unpatched_forward, (self.module, self.prev)


def _set_forward(mod: torch.nn.Module, fn: Callable, forwards: list) -> None:
    had = "forward" in mod.__dict__
    prev = mod.__dict__.get("forward")
    ours = _Forward(mod, fn, prev)
    forwards.append((mod, "forward", had, prev, ours))
    mod.forward = ours  # instance attribute: shadows the class's forward for this instance only


def _wrap_attention(
    mod: torch.nn.Module, plans: Dict[Tuple[str, str], Callable], fused: Optional[bool] = None
) -> Callable:
    """Instance ``forward`` activating ``plans`` while ``mod`` runs. ``fused`` (models patched
    with ``fuse_qk_norm``): True gives each call a fresh deferred-norm state and checks that
    RoPE consumed it; False clears the state for this module's calls."""
    inner = mod.forward  # bound method (or an earlier instance-level wrapper, e.g. accelerate's)
    if fused is None:

        @functools.wraps(inner)
        def forward(*args, **kwargs):
            if torch.compiler.is_compiling():  # dynamo cannot trace ContextVar.set: a plain stack
                _TRACING.append(plans)
                try:
                    return inner(*args, **kwargs)
                finally:
                    _TRACING.pop()
            token = _ACTIVE.set(plans)
            try:
                return inner(*args, **kwargs)
            finally:
                _ACTIVE.reset(token)

    else:
        from ._qk_norm import _DEFERRED, Deferred, unfinished

        @functools.wraps(inner)
        def forward(*args, **kwargs):
            if torch.compiler.is_compiling():
                # Dynamo cannot trace the deferral (ContextVar.set, a deferred tensor found
                # again by its data pointer): a traced call runs the norms' own forwards and
                # the plain RoPE replacement, the model patched without fuse_qk_norm (in one
                # graph, the compiler fuses the norm with the rotation itself)
                _TRACING.append(plans)
                try:
                    return inner(*args, **kwargs)
                finally:
                    _TRACING.pop()
            st = Deferred(mod) if fused else None
            token, dtoken = _ACTIVE.set(plans), _DEFERRED.set(st)
            try:
                out = inner(*args, **kwargs)
            finally:
                _DEFERRED.reset(dtoken)
                _ACTIVE.reset(token)
            if st is not None and st.records:
                raise fail(
                    f"the outputs of {unfinished(st)} (deferred by fuse_qk_norm) to reach RoPE in the same forward",
                    f"a {type(mod).__name__} forward that did not pass them to RoPE (the result would lack the norm)",
                    "unpatch(model) and patch(model) without fuse_qk_norm; please report the model",
                )
            return out

    forward._ropekit_wrapper = True  # type: ignore[attr-defined]
    return forward


_PROBE_S = 7  # odd: never equal to a (even) head width, so a wrong q layout cannot broadcast


def _rotary_probes(rots: List[Tuple[str, torch.nn.Module]]) -> List[Tuple[str, torch.nn.Module, Any, Any, str, Any]]:
    """``(name, module, cos, sin, order, layer_type)`` for every rotary module and layer type."""
    from .._hf_code import layer_types_of, module_tables

    out = []
    for n, rot in rots:
        lts = [None]
        if "layer_type" in inspect.signature(rot.forward).parameters:
            lts = layer_types_of(getattr(rot, "config", None))
        for lt in lts:
            try:
                cos, sin = module_tables(rot, _PROBE_S, layer_type=lt, config=getattr(rot, "config", None))
            except Exception:
                continue
            if sin is None:
                order = "complex"
            else:
                raw = rot.forward(torch.zeros(1), torch.arange(_PROBE_S)[None], **({"layer_type": lt} if lt else {}))
                order = "cos_sin" if raw[0] is cos or torch.equal(raw[0], cos) else "sin_cos"
            out.append((n, rot, cos, sin, order, lt))
    return out


def _head_widths(attn: List[Tuple[str, torch.nn.Module]]) -> List[int]:
    ws = []
    for _, m in attn:
        for k in ("head_dim", "qk_head_dim", "index_head_dim"):
            v = getattr(m, k, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                ws.append(v)
    return sorted(set(ws))


def patch(model: torch.nn.Module, *, tables: str = "exact", fuse_qk_norm: bool = False) -> PatchReport:
    """Route this model instance's RoPE through ropekit, after proving the replacement.

    Args:
        model: a transformers model (any head, multimodal wrappers included) whose
            attention calls a module-level RoPE function of its modeling module.
        tables: ``"exact"`` — replace the rotary modules' tables with ropekit's (float64
            angles, one rounding; for long contexts and new work); ``"transformers"`` —
            keep the model's own float32 tables bit for bit (for regression tests that
            compare against an unpatched model).
        fuse_qk_norm: also fold the attention's per-head q/k RMSNorm (Qwen3, Qwen3-MoE,
            Gemma 3, ...: ``q_norm``/``k_norm`` right before RoPE) into the RoPE call: one
            :func:`ropekit.apply_qk_norm_rotary` per attention instead of two norms and a
            rotation. Read from the code and proven like the rest (see below and
            ``ropekit.integrations._qk_norm``); a model whose attention has no such norm, or
            whose norm is over all heads (OLMo 2) or computes something else, is a RopeError.

    Returns:
        A :class:`PatchReport` naming every module and function it changed.

    What is patched is read from the model's code, not from its ``model_type``: every
    submodule whose class's methods call a 1-D RoPE function of their modeling module
    (``apply_rotary_pos_emb``, DeepSeek's ``apply_rotary_pos_emb_interleave``, GPT-J's
    ``(tensor, sin, cos)``, Llama 4's complex ``apply_rotary_emb``, ...). Each function is
    measured on basis vectors with the model's own tables (pairing, direction, which lanes
    rotate, table lanes, output order), and the replacement built from that measurement is
    *proven* on random probe tensors before anything changes: identical bits with the
    model's tables; with ``tables="exact"`` also ropekit's config must reproduce the
    model's tables bit for bit through :func:`ropekit.hf.transformers_cos_sin`, and the
    replacement on exact tables must agree within float32 rounding. Anything that fails
    is a RopeError naming the family and the difference, and the model is left unchanged.

    Only this instance changes: its RoPE-calling modules get an instance-level
    ``forward`` that activates ropekit's path while they run; the modeling module's
    function becomes a dispatcher that takes that path only then (installed once per
    function, removed when the last patched model is unpatched or garbage-collected).

    With ``fuse_qk_norm=True`` the attention code stays transformers': while a fused
    attention runs, its ``q_norm``/``k_norm`` return their input unchanged and record it,
    and the RoPE replacement normalises and rotates those tensors in one call (weights and
    eps read from the norm modules at every call). Deferring is enabled only where the code
    shows the norm's output goes to RoPE and nowhere else, the norm module is a per-head
    RMSNorm (one ``[head_dim]`` weight, eps its one float attribute, weight offset measured:
    0 for ``x̂·w``, 1 for Gemma's ``x̂·(1 + w)``), and, on float32 probe tensors, the
    model's own norms + its RoPE function and the fused call agree within
    ``2^-16·(1 + |y|)`` (float32 rounding: the two differ only in the order of roundings).
    ``PatchReport.fused`` and ``.norms`` say which attentions and what was read.

    Example:
        >>> import torch, transformers
        >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=4, intermediate_size=64, pad_token_id=0)
        >>> model = transformers.LlamaForCausalLM(cfg).eval()
        >>> ids = torch.randint(0, 64, (1, 8))
        >>> with torch.no_grad():
        ...     ref = model(ids).logits
        ...     report = patch(model, tables="transformers")
        ...     same = torch.equal(model(ids).logits, ref)
        >>> same, report.functions
        (True, ('transformers.models.llama.modeling_llama.apply_rotary_pos_emb',))
        >>> unpatch(model).attention
        ('model.layers.0.self_attn',)
    """
    from .. import _hf_code

    if tables not in TABLE_MODES:
        raise fail(
            f"tables in {TABLE_MODES}",
            repr(tables),
            '"exact" for ropekit\'s float64-angle tables, "transformers" for the model\'s own tables',
        )
    if not isinstance(fuse_qk_norm, bool):
        raise fail("fuse_qk_norm a bool", repr(fuse_qk_norm), "pass fuse_qk_norm=True or False")
    check_transformers_version()
    mt = _family(model)
    with _LOCK:
        if model in _STATES:
            raise fail(
                "a model that is not patched yet",
                f"a model already patched (tables={_STATES[model].report.tables!r})",
                "call unpatch(model) first",
            )
        _drop_copied_forwards(model)
        named = list(model.named_modules())
        callers = [(n, m, _rope_calls(m)) for n, m in named]
        callers = [(n, m, c) for n, m, c in callers if c]
        if not callers:
            raise fail(
                "a model whose attention calls a module-level RoPE function of its modeling module",
                f"{mt} ({type(model).__name__}): no module calls one",
                "this family computes RoPE inline or not at all; use ropekit.RotaryEmbedding in your own code",
            )
        rots = [(n, m) for n, m in named if _is_rotary(m)]
        probes = _rotary_probes(rots)
        if not probes:
            raise fail(
                f"a rotary-embedding module in the {mt} model whose forward(x, position_ids) ropekit can call",
                f"{[type(m).__name__ for _, m in rots] or 'none'}",
                "nothing was changed; this family's tables cannot be probed",
            )
        attn = [(n, m) for n, m, _ in callers]
        widths = _head_widths(attn)
        keys = list(dict.fromkeys(k for _, _, c in callers for k in c))
        plans: Dict[Tuple[str, str], Plan] = {}
        replacements: Dict[Tuple[str, str], Callable] = {}
        used: Dict[str, Tuple[torch.nn.Module, _TableFormat]] = {}
        proofs: Dict[Tuple[str, Any], List[Tuple[Tuple[str, str], Plan, Callable, int]]] = {}
        for key in keys:
            module = sys.modules[key[0]]
            original = _original(module, key[1])
            kind = _hf_code.signature_kind(original)
            if kind is None:
                raise fail(
                    f"{key[0]}.{key[1]} with a RoPE signature ropekit routes (q, k, cos, sin, ...), "
                    "(x, cos, sin, ...), (tensor, sin, cos) or (xq, xk, freqs_cis)",
                    f"{mt}: {inspect.signature(original)}",
                    "nothing was changed; leave this model unpatched",
                )
            found = []  # (plan, probe) for every rotary module/layer type this function works with
            reasons = []
            for probe in probes:
                n, rot, cos, sin, order, lt = probe
                tw = cos.shape[-1]
                m = None
                for w in dict.fromkeys(widths + [tw, 2 * tw]):
                    try:
                        m, _ = _hf_code.measure(original, kind, cos, sin, w)
                        break
                    except _hf_code.NotRope as e:
                        reasons.append(str(e))
                    except Exception:
                        continue
                if m is None:
                    continue
                try:
                    plan = _plan_from(key[0], key[1], kind, m, tw)
                except _hf_code.NotRope as e:
                    reasons.append(str(e))
                    continue
                found.append((plan, probe, m.width))
            if not found:
                raise fail(
                    f"{key[0]}.{key[1]} to act as RoPE with the model's own tables",
                    f"{mt}: {reasons[0] if reasons else 'no rotary module of the model fits it'}",
                    "nothing was changed; this family cannot be patched",
                )
            plan = found[0][0]
            if any(p != plan for p, _, _ in found[1:]):
                found = [f for f in found if f[0] == plan]
            for p, (n, rot, cos, sin, order, lt), w in found:
                _prove(mt, p, original, cos, sin, [w])
                proofs.setdefault((n, lt), []).append((key, p, original, w))
            plans[key] = plan
            for p, (n, rot, cos, sin, order, lt), w in found:
                fmt = _table_format(p, order)
                if n not in used and fmt is not None:
                    used[n] = (rot, fmt)
                elif n not in used:
                    used[n] = (rot, None)  # type: ignore[assignment]
            replacements[key] = _replacement(plan, original)
        dtype = _model_dtype(attn)
        exact_forwards, exact_new, refs = [], {}, {}
        if tables == "exact":
            exact_forwards, exact_new, refs = _prove_exact_tables(mt, model, probes, used, proofs, dtype)
        else:
            for n, rot, cos, sin, order, lt in probes:
                theirs = _instance_tables(rot, lt, order, dtype)
                oracle = tuple(None if t is None else _upcast(t) for t in theirs)
                for key, plan, original, w in proofs.get((n, lt), []):
                    _prove_accuracy(mt, plan, original, w, dtype, theirs, theirs, oracle, "the model's tables")
        fusion = None
        if fuse_qk_norm:
            from . import _qk_norm

            fuse_tables: Dict[Tuple[str, str], List[Tuple[Any, Any, Any, Any]]] = {}
            for key in plans:  # every table of the model: each attention is proven on its layer type's
                for n, rot, cos, sin, order, lt in probes:
                    if order != "complex":
                        # tables="exact": the float32 tables the exact ones were proven against, as
                        # for the unfused replacement; they are the module's own unless .to(bf16)
                        # rounded its inv_freq (then a fresh float32 module's, which the module's
                        # were checked to match within that rounding). The model's own tables are
                        # replaced then, so only their float32 values are a meaningful reference.
                        ref = refs.get((n, lt))
                        c, s = ref if ref is not None and len(ref) == 2 else (cos, sin)
                        fuse_tables.setdefault(key, []).append((lt, c, s, exact_new.get((n, lt))))
            originals = {key: _original(sys.modules[key[0]], key[1]) for key in plans}
            rotation = _qk_norm.Rotation(_half_from_table, _rotate, _unsq)
            fusion = _qk_norm.plan_fusion(mt, attn, plans, originals, replacements, fuse_tables, _rope_calls, rotation)
            for key in fusion.keys:
                replacements[key] = _qk_norm.fused_replacement(plans[key], originals[key], replacements[key], rotation)
        fused_ids = {id(m) for _, m in fusion.attention} if fusion is not None else set()
        state = _State(report=None, installs=[], forwards=[])  # type: ignore[arg-type]
        try:
            for key in plans:
                state.installs.append(_acquire(sys.modules[key[0]], key[1]))
            for _, m in attn:
                fused = None if fusion is None else id(m) in fused_ids
                _set_forward(m, _wrap_attention(m, replacements, fused), state.forwards)
            for m, fn in exact_forwards:
                _set_forward(m, fn, state.forwards)
            for m, fn in fusion.norms if fusion is not None else ():
                _set_forward(m, fn, state.forwards)
        except BaseException:
            _restore(state)
            raise
        param = next(model.parameters(), None)
        probe = param if param is not None else torch.empty(0)
        from .. import backends as _backends

        rot_names = {id(m): n for n, m in named}
        report = PatchReport(
            model_type=mt,
            tables=tables,
            attention=tuple(n for n, _ in attn),
            rotary=tuple(rot_names[id(m)] for m, _ in exact_forwards),
            functions=tuple(f"{i.module.__name__}.{i.name}" for i in state.installs),
            backend=_backends.resolve("auto", probe.detach()).NAME,
            plans=tuple(p.describe() for p in plans.values()),
            fuse_qk_norm=fuse_qk_norm,
            fused=tuple(n for n, _ in fusion.attention) if fusion is not None else (),
            norms=tuple(fusion.lines) if fusion is not None else (),
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
    _release_all(state.installs)


def unpatch(model: torch.nn.Module) -> PatchReport:
    """Undo :func:`patch` on this model; return the report of what was restored.

    Restores the wrapped modules' and rotary modules' original ``forward``, and — when no
    other patched model uses it — the modeling module's original function object.
    RopeError if the model is not patched.
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
def patched(model: torch.nn.Module, *, tables: str = "exact", fuse_qk_norm: bool = False) -> Iterator[PatchReport]:
    """Context manager form: ``with patched(model) as report: ...``; unpatches on exit,
    also when the body raises. Arguments as for :func:`patch`."""
    report = patch(model, tables=tables, fuse_qk_norm=fuse_qk_norm)
    try:
        yield report
    finally:
        unpatch(model)
