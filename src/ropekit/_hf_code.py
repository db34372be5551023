"""Read a transformers family's RoPE from its own code, not from a list of model types.

Two tools, both lazy about transformers (nothing here imports it at module load):

- :func:`call_sites` parses a modeling module (``ast``) and lists which module-level RoPE
  functions each class calls, under which config flag (``if self.config.rope_interleave:``)
  and on which slice of the head (``q_pass, q_rot = torch.split(q, [nope, rope])``).
- :func:`measure` feeds basis vectors through one of those functions with the model's own
  ``(cos, sin)`` and reads off what it does to the lanes of q: which lanes rotate, how they
  pair (``(i, i + r/2)`` or ``(2i, 2i + 1)``), the direction (``+θ`` or ``-θ``), the output
  lane order, and which table lane feeds each pair. A function whose effect is not a RoPE
  rotation raises :class:`NotRope` with the reason.

Shapes: ``S`` probe positions, ``w`` lanes of the q argument, ``r`` rotary dim.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import re
import textwrap
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

__all__ = [
    "NotRope",
    "CallSite",
    "Measured",
    "modeling_module_for",
    "rope_functions",
    "call_sites",
    "signature_kind",
    "run_fn",
    "measure",
    "expected_matrix",
    "rope_matrix",
    "build_rotary",
    "rotary_refusal",
    "reads_scaling",
    "reads_base",
    "coded_base",
    "unscaled_copy",
    "table_gap",
]

_ROPE_NAME = re.compile(r"(rotary|rope)", re.I)


class NotRope(Exception):
    """A function (or table) whose effect on the probe is not one RoPE rotation."""


# --------------------------------------------------------------------------- modules
def modeling_module_for(model_type: str) -> Optional[ModuleType]:
    """transformers' modeling module of a ``model_type`` (``None`` if it has none)."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING, model_type_to_module_name
    except Exception:  # pragma: no cover - transformers not installed
        return None
    names = []
    try:
        cls = CONFIG_MAPPING[model_type]
        pkg = cls.__module__.rsplit(".", 1)[0]  # transformers.models.<x>
        names.append(f"{pkg}.modeling_{pkg.rsplit('.', 1)[1]}")
    except Exception:
        pass
    try:
        n = model_type_to_module_name(model_type)
        names.append(f"transformers.models.{n}.modeling_{n}")
    except Exception:
        pass
    names.append(_mapped_module_name(model_type))  # a type that runs another family's code
    for name in names:
        try:
            return importlib.import_module(name)
        except Exception:
            continue
    return None


def _mapped_module_name(model_type: str) -> str:
    """The module of the model class transformers' auto mapping gives ``model_type`` (e.g.
    ``sarvam_mla`` -> DeepSeek-V3's modeling code); ``""`` if none."""
    try:
        import transformers
        from transformers.models.auto import modeling_auto as ma

        for mapping in (ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, ma.MODEL_MAPPING_NAMES):
            name = mapping.get(model_type)
            if name is not None:
                name = name if isinstance(name, str) else name[0]
                return getattr(transformers, name).__module__
    except Exception:
        pass
    return ""


def unwrap_kernel_func(obj: Any) -> Any:
    """The plain function inside a hub-kernel wrapper, else ``obj``.

    transformers 5.25 requires the ``kernels`` package, whose ``use_kernel_forward_from_hub``
    turns a decorated module-level function (``apply_rotary_pos_emb``) into an ``nn.Module``
    instance whose ``forward`` calls the function (held in its closure) unless a hub kernel
    was selected for the model; ropekit reads and replaces the function."""
    if inspect.isfunction(obj) or not isinstance(obj, torch.nn.Module):
        return obj
    fwd = getattr(type(obj), "forward", None)
    cells = getattr(fwd, "__closure__", None) or ()
    inner = [c.cell_contents for c in cells if inspect.isfunction(_cell(c))]
    named = [f for f in inner if _ROPE_NAME.search(f.__name__)]
    return named[0] if len(named) == 1 else obj


def _cell(c: Any) -> Any:
    try:
        return c.cell_contents
    except ValueError:  # an empty cell
        return None


def rope_functions(module: ModuleType) -> Dict[str, Callable]:
    """Module-level functions whose name says RoPE and that take tables (cos/sin/freqs);
    hub-kernel wrappers (:func:`unwrap_kernel_func`) count as their function."""
    out = {}
    for name, fn in vars(module).items():
        fn = unwrap_kernel_func(fn)
        if not inspect.isfunction(fn) or not _ROPE_NAME.search(name) or name.startswith("rotate"):
            continue
        try:
            params = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            continue
        if {"cos", "sin"} <= set(params) or any("freqs" in p for p in params):
            out[name] = fn
    return out


@dataclasses.dataclass(frozen=True)
class CallSite:
    """One call of a RoPE function inside a class of a modeling module.

    Attributes:
        cls: the class whose method makes the call.
        fn: the function called.
        flag: ``(config attribute, value)`` when the call sits under ``if ...<attribute>:``
            (``value`` False in the ``else`` branch); ``None`` if unconditional.
        head_slice: ``"all"`` (the q argument is the whole head, or a leading slice made by
            the attention), ``"first"`` / ``"last"``: the q argument is the first / last
            piece of a ``torch.split`` of the head.
        tables_cut: the call passes a slice of the tables (MiniMax-M3's indexer:
            ``cos[..., : self.head_dim]``), so the rotary width is the slice's when narrower.
    """

    cls: str
    fn: str
    flag: Optional[Tuple[str, bool]]
    head_slice: str = "all"
    tables_cut: bool = False


def _flag_of(test: ast.expr) -> Optional[str]:
    # `self.config.rope_interleave`, `config.rope_interleave`, `self.rope_interleave`
    if isinstance(test, ast.Attribute) and "rope" in test.attr:
        return test.attr
    return None


def _split_position(func: ast.AST, name: str) -> str:
    """``"first"``/``"last"`` if ``name`` is assigned from a ``split`` in ``func``."""
    for node in ast.walk(func):
        if not isinstance(node, ast.Assign) or not isinstance(node.value, ast.Call):
            continue
        call = node.value.func
        if not (isinstance(call, ast.Attribute) and call.attr == "split"):
            continue
        sizes = node.value.args[1] if len(node.value.args) > 1 else node.value.args[0] if node.value.args else None
        if not isinstance(sizes, (ast.List, ast.Tuple)):
            continue  # a split into equal chunks (fused qkv), not [nope, rope] pieces of a head
        for tgt in node.targets:
            if isinstance(tgt, ast.Tuple):
                ids = [e.id if isinstance(e, ast.Name) else None for e in tgt.elts]
                if name in ids and len(ids) >= 2:
                    return "first" if ids.index(name) == 0 else "last" if ids.index(name) == len(ids) - 1 else "all"
    return "all"


@functools.lru_cache(maxsize=None)
def _call_sites_cached(module_name: str) -> Tuple[CallSite, ...]:
    module = importlib.import_module(module_name)
    fns = rope_functions(module)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(module)))
    except (OSError, TypeError, SyntaxError):
        return ()
    sites: List[CallSite] = []

    def visit(node: ast.AST, cls: Optional[str], func: Optional[ast.AST], flag: Optional[Tuple[str, bool]]):
        if isinstance(node, ast.ClassDef):
            for ch in node.body:
                visit(ch, node.name, None, None)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func = node if func is None else func
        if isinstance(node, ast.If):
            f = _flag_of(node.test)
            visit(node.test, cls, func, flag)
            for ch in node.body:
                visit(ch, cls, func, (f, True) if f else flag)
            for ch in node.orelse:
                visit(ch, cls, func, (f, False) if f else flag)
            return
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in fns and cls:
            q = node.args[0] if node.args else None
            pos = _split_position(func, q.id) if isinstance(q, ast.Name) and func is not None else "all"
            cut = any(isinstance(a, ast.Subscript) for a in node.args[1:4]) or any(
                isinstance(k.value, ast.Subscript) for k in node.keywords if k.arg in ("cos", "sin")
            )
            sites.append(CallSite(cls, node.func.id, flag, pos, cut))
        for ch in ast.iter_child_nodes(node):
            visit(ch, cls, func, flag)

    visit(tree, None, None, None)
    return tuple(dict.fromkeys(sites))


def call_sites(module: ModuleType) -> Tuple[CallSite, ...]:
    """Every call of a :func:`rope_functions` function made inside a class of ``module``."""
    return _call_sites_cached(module.__name__)


# --------------------------------------------------------------------------- measuring
def signature_kind(fn: Callable) -> Optional[str]:
    """How to call a RoPE function: ``"qk"`` ``(q, k, cos, sin, [..], unsqueeze_dim)``,
    ``"x"`` ``(x, cos, sin, unsqueeze_dim)``, ``"sincos"`` GPT-J's ``(tensor, sin, cos)``,
    ``"complex"`` ``(xq, xk, freqs_cis)``; ``None`` for anything else."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    if len(params) >= 3 and "freqs_cis" in params[2] and len(params) == 3:
        return "complex"
    if len(params) >= 4 and params[2:4] == ["cos", "sin"] and "unsqueeze_dim" in params:
        return "qk"
    if len(params) >= 3 and params[1:3] == ["cos", "sin"] and "unsqueeze_dim" in params:
        return "x"
    if len(params) == 3 and params[1:3] == ["sin", "cos"]:
        return "sincos"
    return None


def run_fn(fn: Callable, kind: str, q: torch.Tensor, k: Optional[torch.Tensor], cos: Any, sin: Any) -> Any:
    """Call ``fn`` the way its attention does, q/k ``[b, h, s, w]`` (``"sincos"``:
    ``[b, s, h, w]``), tables ``[b, s, t]`` (``"complex"``: ``cos`` is ``freqs_cis``)."""
    if kind == "qk":
        return fn(q, k, cos, sin, unsqueeze_dim=1)
    if kind == "x":
        return fn(q, cos, sin, unsqueeze_dim=1), (None if k is None else fn(k, cos, sin, unsqueeze_dim=1))
    if kind == "sincos":
        return fn(q, sin, cos), (None if k is None else fn(k, sin, cos))
    if kind == "complex":
        return fn(q, q if k is None else k, cos)
    raise NotRope(f"unsupported signature kind {kind!r}")


@dataclasses.dataclass(frozen=True)
class Measured:
    """What one RoPE function does to the ``w`` lanes of its q argument.

    Attributes:
        width: lanes of the q argument probed.
        offset: first lane of the rotating span ``[offset, offset + rotary_dim)``.
        rotary_dim: ``r``.
        layout: ``"half"`` (pairs ``(i, i + r/2)``) or ``"interleaved"`` (``(2i, 2i + 1)``).
        direction: ``+1`` rotates by ``+θ`` (``x_lo' = x_lo·c - x_hi·s``), ``-1`` by ``-θ``.
        out_perm: output lane of each input lane, ``None`` when lanes stay in place
            (DeepSeek's interleave function returns ``[even lanes | odd lanes]``).
        lanes: table lane (index into the last dim of cos/sin) feeding each pair.
        qlayout: ``"bhsd"`` or ``"bshd"``: where the function expects the heads.
    """

    width: int
    offset: int
    rotary_dim: int
    layout: str
    direction: int
    out_perm: Optional[Tuple[int, ...]]
    lanes: Tuple[int, ...]
    qlayout: str = "bhsd"


def qk_layouts(kind: str) -> Tuple[str, ...]:
    """Layouts of q/k a function of this kind may take, most likely first: ``"bhsd"``
    (``unsqueeze_dim=1``) or ``"bshd"`` (GPT-J; Llama 4's complex ``freqs_cis``)."""
    if kind == "sincos":
        return ("bshd",)
    if kind == "complex":
        return ("bshd", "bhsd")
    return ("bhsd",)


def _probe_q(qlayout: str, w: int, S: int, dtype: torch.dtype) -> torch.Tensor:
    eye = torch.eye(w, dtype=dtype)
    if qlayout == "bshd":
        return eye[None, None].expand(1, S, w, w).contiguous()  # [1, S, heads=w, w]
    return eye[None, :, None, :].expand(1, w, S, w).contiguous()  # [1, heads=w, S, w]


def _matrix(out: torch.Tensor, qlayout: str) -> torch.Tensor:
    """Probe output -> ``[S, w_out, w_in]`` (column j = image of basis vector j)."""
    if qlayout == "bshd":
        return out[0].transpose(1, 2)  # [S, w, w_out] -> [S, w_out, w]
    return out[0].permute(1, 2, 0)  # [w, S, w_out] -> [S, w_out, w]


def rope_matrix(fn: Callable, kind: str, cos: Any, sin: Any, width: int) -> Tuple[torch.Tensor, str]:
    """``([S, w_out, w] matrices of fn on the q argument, q layout)`` from float32 basis vectors."""
    S = cos.shape[-2] if cos.dim() >= 2 else 1
    err: Optional[Exception] = None
    for qlayout in qk_layouts(kind):
        q = _probe_q(qlayout, width, S, torch.float32)
        try:
            with torch.no_grad():
                out = run_fn(fn, kind, q, q.clone(), cos, sin)[0]
        except Exception as e:  # e.g. the other layout's broadcast: try the next
            err = e
            continue
        if not isinstance(out, torch.Tensor):
            raise NotRope("the function did not return a tensor for q")
        return _matrix(out, qlayout), qlayout
    assert err is not None
    raise err


def _tables_2d(t: torch.Tensor) -> torch.Tensor:
    """``[.., S, t]`` table -> ``[S, t]`` (the probe uses batch 1)."""
    return t.reshape(-1, t.shape[-2], t.shape[-1])[0] if t.dim() >= 2 else t[None]


def measure(fn: Callable, kind: str, cos: Any, sin: Any, width: int) -> Tuple[Measured, torch.Tensor]:
    """Measure ``fn`` on ``width`` lanes with the model's tables at probe positions ``0..S-1``.

    Args:
        fn: the modeling module's function; kind: :func:`signature_kind`.
        cos, sin: the model's tables for positions ``0..S-1`` (batch 1), as its rotary module
            returns them (``"complex"``: ``cos`` is ``freqs_cis``, ``sin`` unused).
        width: lanes of the q argument.

    Returns:
        ``(Measured, R)`` with ``R`` ``[S, w, w]`` float32: the map in input lane order
        (``out_perm`` undone), scale included.
    """
    M, qlayout = rope_matrix(fn, kind, cos, sin, width)
    M = M.double()  # [S, w_out, w]
    S, w_out, w = M.shape
    if w_out != w:
        raise NotRope(f"q of {w} lanes came back with {w_out}")
    M0 = M[0]
    perm = M0.abs().argmax(dim=0)  # output row of each input lane
    a = M0[perm, torch.arange(w)]
    if sorted(perm.tolist()) != list(range(w)) or (a <= 0).any() or not torch.equal(a, a[:1].expand(w)):
        raise NotRope("at position 0 the function is not a scaled permutation of the lanes")
    if not torch.equal(M0.abs().sum(0), a):
        raise NotRope("at position 0 the function mixes lanes")
    R = M[:, perm, :]  # [S, w, w]: R[s][i, j], rows back in input lane order
    eye = torch.eye(w, dtype=R.dtype) * a[0]
    moving = (R != eye).any(dim=1).any(dim=0).nonzero().flatten().tolist()  # lanes whose column moves
    if not moving:
        raise NotRope("no lane rotates at the probe positions")
    off = min(moving)
    off_diag = R.abs().amax(dim=0)  # [w, w]: largest |R[i, j]| over positions
    off_diag.fill_diagonal_(-1)
    best = off_diag.argmax(dim=0).tolist()  # partner row of each input lane
    partner = {j: best[j] for j in moving}
    for j, p in partner.items():
        if partner.get(p) != j:
            raise NotRope(f"lane {j} mixes with lane {p}, which does not mix back")
    deltas = {abs(p - j) for j, p in partner.items()}
    if len(deltas) != 1:
        raise NotRope(f"pairs of different spans {sorted(deltas)}")
    delta = deltas.pop()
    lows = sorted(j for j, p in partner.items() if p > j)
    if delta == 1 and all(j % 2 == off % 2 for j in lows):
        layout = "interleaved"
        r = max(moving) + 1 - off
        r += r % 2
        lo_idx = torch.arange(off, off + r, 2)
        hi_idx = lo_idx + 1
    else:
        layout = "half"
        r = 2 * delta
        lo_idx = torch.arange(off, off + delta)
        hi_idx = lo_idx + delta
    if off + r > w or any(partner.get(lo, hi) != hi for lo, hi in zip(lo_idx.tolist(), hi_idx.tolist())):
        raise NotRope(f"rotating lanes {moving} are not one {layout} block")
    if r == 2:
        layout = "half"  # one pair: both layouts are the same map
    # direction and the per-pair rotation structure
    c_lo, c_hi = R[:, lo_idx, lo_idx], R[:, hi_idx, hi_idx]  # [S, r/2]
    s_hi, s_lo = R[:, hi_idx, lo_idx], R[:, lo_idx, hi_idx]
    bad = ~((c_lo == c_hi) & (s_hi == -s_lo)).all(dim=0)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise NotRope(f"pair ({int(lo_idx[i])}, {int(hi_idx[i])}) is not a rotation (its cos/sin lanes differ)")
    direction = 1
    if S > 1:
        nz = s_hi[1][s_hi[1] != 0]
        if nz.numel():
            if not ((nz > 0).all() or (nz < 0).all()):
                raise NotRope("pairs rotate in different directions")
            direction = 1 if bool(nz[0] > 0) else -1
    # which table lane feeds each pair
    if kind == "complex":
        ct, st = _tables_2d(cos.real).double(), _tables_2d(cos.imag).double()
    else:
        ct, st = _tables_2d(cos).double(), _tables_2d(sin).double()
    if ct.shape[0] != S:
        raise NotRope(f"tables of {ct.shape[0]} positions for a probe of {S}")
    hit = (ct[:, None, :] == c_lo[:, :, None]).all(0) & ((direction * st)[:, None, :] == s_hi[:, :, None]).all(0)
    if not hit.any(dim=1).all():  # hit [r/2, T]: table lane L gives the angles of pair i
        i = int((~hit.any(dim=1)).nonzero()[0])
        raise NotRope(f"no table lane gives the angles of pair ({int(lo_idx[i])}, {int(hi_idx[i])})")
    lanes = hit.int().argmax(dim=1).tolist()
    out_perm = None if perm.tolist() == list(range(w)) else tuple(perm.tolist())
    return Measured(w, off, r, layout, direction, out_perm, tuple(lanes), qlayout), R.float()


def expected_matrix(
    layout: str, direction: int, offset: int, width: int, cos_half: torch.Tensor, sin_half: torch.Tensor
) -> torch.Tensor:
    """The map ropekit applies: ``[S, w, w]`` for half-width tables ``[S, r/2]`` rotating
    lanes ``[offset, offset + r)`` of ``width`` with ``layout`` and ``direction``."""
    from .functional import apply_rotary

    S, h = cos_half.shape
    r = 2 * h
    x = torch.eye(width, dtype=torch.float32)[None, :, None, :].expand(1, width, S, width).contiguous()
    c = cos_half.to(torch.float32)[None, None]  # [1, 1, S, r/2]
    s = (sin_half.to(torch.float32) * direction)[None, None]
    out = x.clone()
    out[..., offset : offset + r] = apply_rotary(x[..., offset : offset + r], c, s, layout=layout)
    return out[0].permute(1, 2, 0)  # [S, w, w]


# --------------------------------------------------------------------------- a family's RoPE
@dataclasses.dataclass(frozen=True)
class Component:
    """One rotary component of a model, read from its modeling code.

    Attributes:
        name: ``"attention"`` (the attention layers) or ``"indexer"`` (a sparse-attention
            indexer with its own heads, DeepSeek-V3.2 style).
        site: the call site (class, function, flag, head slice).
        measured: what the function does with the model's own tables.
        inv_freq_len: ``r/2`` of the model's rotary module (its ``inv_freq`` length).
    """

    name: str
    site: CallSite
    measured: Measured
    inv_freq_len: Optional[int]


def rotary_classes(module: ModuleType) -> List[type]:
    """The 1-D rotary-embedding classes of a modeling module (vision ones excluded)."""
    return [
        v
        for k, v in vars(module).items()
        if inspect.isclass(v) and k.endswith("RotaryEmbedding") and "Vision" not in k and v.__module__ == module.__name__
    ]


def _positions(S: int) -> torch.Tensor:
    return torch.arange(S)[None]  # [1, S]


def layer_types_of(config: Any) -> List[Optional[str]]:
    """Layer types with their own rope parameters (nested ``rope_parameters``), else ``[None]``."""
    p = getattr(config, "rope_parameters", None)
    if isinstance(p, dict) and p and all(isinstance(v, dict) or v is None for v in p.values()):
        return [k for k, v in p.items() if v is not None]
    return [None]


def module_tables(
    rot: torch.nn.Module,
    S: int = 7,
    layer_type: Optional[str] = None,
    config: Any = None,
    dtype: torch.dtype = torch.float32,
    positions: Optional[torch.Tensor] = None,
) -> Tuple[Any, Any]:
    """``(cos, sin)`` of a rotary module for positions ``0..S-1`` (batch 1), in the order
    the attention unpacks them (GPT-J returns ``(sin, cos)``: swapped back here), or
    ``(freqs_cis, None)`` for complex tables. Multi-axis modules (M-RoPE) get the same
    position on every axis, as for text. ``dtype``: of the activations the module is called
    with (transformers' modules return their tables in it). ``positions``: ``[1, S]`` other
    positions (length-dependent schemes: past the context)."""
    params = inspect.signature(rot.forward).parameters
    x = torch.zeros(1, dtype=dtype)
    kw = {}
    if "layer_type" in params:
        if layer_type is None:
            layer_type = layer_types_of(config if config is not None else getattr(rot, "config", None))[0]
        if layer_type is not None or params["layer_type"].default is inspect.Parameter.empty:
            kw["layer_type"] = layer_type
    pos = _positions(S) if positions is None else positions.reshape(1, -1)
    S = pos.shape[-1]
    with torch.no_grad():
        try:
            out = rot.forward(x, pos, **kw)
        except Exception:
            out = None
            for axes in (3, 4, 2):
                try:
                    out = rot.forward(x, pos[None].expand(axes, 1, S), **kw)
                    break
                except Exception:
                    continue
            if out is None:
                raise
    if isinstance(out, torch.Tensor):
        if torch.is_complex(out):
            return out, None
        raise NotRope("the rotary module returned one real tensor")
    a, b = out[0], out[1]
    if torch.is_complex(a):
        return a, None
    a0, b0 = _tables_2d(a)[0], _tables_2d(b)[0]
    if bool((a0 == 0).all()) and not bool((b0 == 0).all()):
        return b, a  # (sin, cos) order
    return a, b


def _site_applies(site: CallSite, config: Any) -> bool:
    if site.flag is None:
        return True
    attr, value = site.flag
    try:
        cur = getattr(config, attr)
    except Exception:
        return True
    return bool(cur) == value if cur is not None else True


def component_name(cls_name: str) -> str:
    return "indexer" if "indexer" in cls_name.lower() else "attention"


def text_sites(module: ModuleType, config: Any) -> List[CallSite]:
    """Call sites of the language model: vision/2-D functions and vision classes dropped,
    flag-guarded branches resolved with ``config``."""
    out = []
    for s in call_sites(module):
        low = s.fn.lower()
        if "vision" in low or "2d" in low or "vision" in s.cls.lower() or "multidimensional" in low:
            continue
        fn = unwrap_kernel_func(getattr(module, s.fn, None))
        if fn is None or signature_kind(fn) is None or not _site_applies(s, config):
            continue
        out.append(s)
    return out


def head_width(config: Any, component: str) -> Optional[int]:
    """Head width of a component per the config (``index_head_dim`` for an indexer)."""
    def get(k):
        try:
            v = getattr(config, k, None)
        except Exception:
            v = None
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    if component == "indexer":
        return get("index_head_dim")
    hd = get("head_dim")
    if hd:
        return hd
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    return hidden // heads if hidden and heads else None


#: Sub-config keys whose model is the language model the call sites belong to.
TEXT_KEYS = ("text_config",)


def sub_config_of(config: Any) -> Optional[Tuple[str, str]]:
    """``(parent model_type, key)`` when ``config``'s class is a sub-config (other than
    :data:`TEXT_KEYS`) of a config class defined in the same module: e.g. dots3_note's
    ``audio_config``. Such a model shares the family's modeling module, whose call sites are
    the language model's: they say nothing about the sub-model's own RoPE."""
    import sys

    cls = type(config)
    mod = sys.modules.get(cls.__module__)
    if mod is None:
        return None
    for v in vars(mod).values():
        if not inspect.isclass(v) or v is cls:
            continue
        subs = getattr(v, "sub_configs", None)
        if not isinstance(subs, dict):
            continue
        for key, sub in subs.items():
            if sub is cls and key not in TEXT_KEYS:
                return str(getattr(v, "model_type", "") or v.__name__), key
    return None


def build_rotary(module: ModuleType, config: Any) -> Tuple[Optional[torch.nn.Module], List[str]]:
    """``(rotary module, [])``: the first 1-D rotary class of ``module`` that takes ``config``
    (as :func:`derive` builds it); ``(None, [why each class refused])`` when none does."""
    errors = []
    for cls in rotary_classes(module):
        try:
            return cls(config=config), []
        except Exception as e:
            errors.append(f"{cls.__name__}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    return None, errors


def rotary_refusal(config: Any, model_type: str) -> Optional[str]:
    """Why the family's 1-D rotary module refuses ``config`` for its rope scaling (e.g. Ernie
    4.5 VL: "requires the `default` rope type"): the family has RoPE call sites for the language
    model, no rotary class takes the config, and one takes it without the scaling
    (:func:`unscaled_copy`); ``None`` otherwise."""
    module = modeling_module_for(model_type)
    if module is None or not rotary_classes(module):
        return None
    try:
        if not text_sites(module, config):
            return None
    except Exception:
        return None
    rot, errors = build_rotary(module, config)
    if rot is not None or not errors:
        return None
    plain, _ = build_rotary(module, unscaled_copy(config))
    return "; ".join(errors) if plain is not None else None  # else it refuses this config anyway


def unscaled_copy(config: Any) -> Any:
    """A copy of a config object with its rope scaling taken out (rope type ``default``;
    ``rope_theta``, the partial factor and M-RoPE sections kept), set as attributes: no
    validation runs."""
    import copy

    keep = ("rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved")

    def plain(p: Any) -> Any:
        if not isinstance(p, dict):
            return p
        return dict({k: v for k, v in p.items() if k in keep}, rope_type="default")

    c = copy.deepcopy(config)
    rp = getattr(c, "rope_parameters", None)
    if isinstance(rp, dict) and rp:
        nested = all(isinstance(v, dict) or v is None for v in rp.values())
        object.__setattr__(c, "rope_parameters", {k: plain(v) for k, v in rp.items()} if nested else plain(rp))
    rs = None if isinstance(rp, dict) else getattr(c, "rope_scaling", None)  # 5.x: an alias of rope_parameters
    if isinstance(rs, dict):
        sections = {k: v for k, v in rs.items() if k == "mrope_section"}
        object.__setattr__(c, "rope_scaling", dict(sections, type="default", rope_type="default") if sections else None)
    return c


#: Names through which a transformers modeling module can apply a config's rope scaling.
_SCALING_NAMES = re.compile(r"\b(rope_scaling|rope_parameters|rope_type|ROPE_INIT_FUNCTIONS|dynamic_rope_update)\b")


@functools.lru_cache(maxsize=None)
def _names_in_source(module_name: str, names: "re.Pattern[str]") -> Optional[bool]:
    """Whether a modeling module's source matches ``names``, here or in the transformers module
    its rotary classes / RoPE functions are imported from; ``None``: no source."""
    try:
        module = importlib.import_module(module_name)
        src = inspect.getsource(module)
    except (OSError, TypeError, ImportError):
        return None
    if names.search(src):
        return True
    others = {
        getattr(v, "__module__", "") for k, v in vars(module).items()
        if (inspect.isclass(v) or inspect.isfunction(v)) and _ROPE_NAME.search(k)
    } - {module_name}
    for name in sorted(o for o in others if o.startswith("transformers.")):
        if name != "transformers.modeling_rope_utils" and _names_in_source(name, names) is not False:
            return True
    return False


def reads_scaling(module: ModuleType) -> Optional[bool]:
    """Whether a modeling module's source names the config's rope scaling at all
    (``rope_scaling``, ``rope_parameters``, ``rope_type``, ``ROPE_INIT_FUNCTIONS``,
    ``dynamic_rope_update``); ``False``: its RoPE cannot depend on it (transformers 4.57 GPT-J,
    CodeGen, ESM compute their sinusoids from fixed constants); ``None``: no source."""
    return _names_in_source(module.__name__, _SCALING_NAMES)


#: Names through which a transformers modeling module can read a config's RoPE base: ``rope_theta``
#: and its per-layer or per-attention variants (``global_rope_theta``, ``local_rope_theta``),
#: GPT-NeoX's ``rotary_emb_base``, Gemma 3's ``rope_local_base_freq``, ChatGLM's ``rope_ratio``,
#: the rope parameters, and transformers' rope functions (which read ``rope_theta`` themselves).
_BASE_NAMES = re.compile(
    r"\b(\w*rope_theta\w*|rotary_emb_base|rotary_base|rope_base|\w*base_freq\w*|rope_ratio|rope_parameters|"
    r"ROPE_INIT_FUNCTIONS|rope_init_fn|compute_default_rope_parameters)\b"
)


def reads_base(module: ModuleType) -> Optional[bool]:
    """Whether a modeling module's source names the config's RoPE base at all (``rope_theta``,
    ``rotary_emb_base``, ``rope_local_base_freq``, ``rope_parameters``, transformers' rope
    functions, ..., here or in the module its rotary code comes from); ``False``: its RoPE cannot
    depend on the config's base, the code computes with a constant (:func:`coded_base`):
    GPT-J and CodeGen (``create_sinusoidal_positions``: ``10000 ** ...``), and on transformers
    4.57 ESM (``RotaryEmbedding(dim)``) and IDEFICS (``IdeficsEmbedding(head_dim)``, ``base=10000``);
    ``None``: no source."""
    return _names_in_source(module.__name__, _BASE_NAMES)


def _numeric(node: Optional[ast.AST]) -> Optional[float]:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    return None


def _calls_arange(node: ast.AST) -> bool:
    return any(
        isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", None)) == "arange"
        for n in ast.walk(node)
    )


def _param_defaults(fn: ast.AST) -> Dict[str, float]:
    """Parameters of a function with a numeric default (``def __init__(self, dim, base=10000)``)."""
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return {}
    a = fn.args
    pos = a.posonlyargs + a.args
    pairs = list(zip(pos[len(pos) - len(a.defaults):], a.defaults)) + list(zip(a.kwonlyargs, a.kw_defaults))
    return {p.arg: v for p, d in pairs if (v := _numeric(d)) is not None}


@functools.lru_cache(maxsize=None)
def _coded_base_cached(module_name: str) -> Optional[float]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(importlib.import_module(module_name))))
    except (OSError, TypeError, SyntaxError, ImportError):
        return None
    values = set()

    def scan(scope: ast.AST, defaults: Dict[str, float]) -> None:
        for node in ast.walk(scope):
            if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) and _calls_arange(node.right)):
                continue
            left = node.left
            v = _numeric(left)
            if v is None and isinstance(left, ast.Name):
                v = defaults.get(left.id)
            elif v is None and isinstance(left, ast.Attribute) and getattr(left.value, "id", None) == "self":
                v = defaults.get(left.attr)  # self.base = base: the parameter's default
            if v is not None:
                values.add(v)

    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            init = next((f for f in node.body if getattr(f, "name", None) == "__init__"), None)
            scan(node, _param_defaults(init))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            scan(node, _param_defaults(node))
    return values.pop() if len(values) == 1 else None


def coded_base(module: ModuleType) -> Optional[float]:
    """The constant base of a modeling module's sinusoids: the one number ``N`` of every
    ``N ** (... arange ...)`` in its source, a literal or the numeric default of the parameter it
    is read from (``def __init__(self, dim, base=10000)``); ``None`` when there is none or more
    than one. What a module that never reads the config's base (:func:`reads_base`) computes
    with."""
    return _coded_base_cached(module.__name__)


def table_gap(
    rot: torch.nn.Module,
    lanes: Tuple[int, ...],
    positions: torch.Tensor,
    cos_half: torch.Tensor,
    sin_half: torch.Tensor,
    layer_type: Optional[str] = None,
    config: Any = None,
) -> float:
    """Largest difference between a rotary module's tables at ``positions`` (``[S]``), read at the
    table lane of each pair (``Measured.lanes``), and half-width tables ``[S, r/2]`` (the sine up
    to its sign: the direction is the function's business). Raises what the module raises."""
    cos, sin = module_tables(rot, layer_type=layer_type, config=config, positions=positions)
    if sin is None:  # complex tables
        ct, st = _tables_2d(cos.real), _tables_2d(cos.imag)
    else:
        ct, st = _tables_2d(cos), _tables_2d(sin)
    idx = torch.tensor(lanes, dtype=torch.long)
    if int(idx.max()) >= ct.shape[-1] or len(lanes) != cos_half.shape[-1]:
        return float("inf")
    c, s = ct[:, idx].double(), st[:, idx].double()
    want_c, want_s = cos_half.double(), sin_half.double()
    gap_s = min((s - want_s).abs().max().item(), (s + want_s).abs().max().item())
    return max((c - want_c).abs().max().item(), gap_s)


def derive(config: Any, model_type: str, layer_type: Optional[str] = None) -> Optional[List[Component]]:
    """The rotary components of a family, from its code and config; ``None`` when the
    modeling module cannot be read (no transformers, no module, no rotary class that takes
    this config). Raises :class:`NotRope` when the code is readable but is not RoPE, or
    when ``config`` is a non-text sub-config of its family (:func:`sub_config_of`)."""
    module = modeling_module_for(model_type)
    if module is None:
        return None
    sites = text_sites(module, config)
    if not sites:
        return None
    parent = sub_config_of(config)
    if parent is not None:
        raise NotRope(
            f"a {parent[1]} of {parent[0]}: {module.__name__.rsplit('.', 1)[1]}'s RoPE calls "
            f"({', '.join(sorted({s.cls for s in sites}))}) cannot be told apart by sub-model, so the "
            f"{parent[1]}'s own RoPE (pairing, width) is not read from them"
        )
    rot, _ = build_rotary(module, config)
    if rot is None:
        return None
    cos, sin = module_tables(rot, layer_type=layer_type, config=config)
    inv = getattr(rot, "inv_freq", None)
    n_inv = int(inv.shape[-1]) if isinstance(inv, torch.Tensor) else None
    comps: Dict[str, Component] = {}
    for site in sites:
        name = component_name(site.cls)
        if name in comps:
            continue
        fn = unwrap_kernel_func(getattr(module, site.fn))
        kind = signature_kind(fn)
        m = None
        errors = []
        widths = [cos.shape[-1], 2 * cos.shape[-1]]
        if site.head_slice == "all":  # the function gets the whole head: probe that first
            head = head_width(config, name)
            if head:
                widths.insert(0, head)
        for tw in dict.fromkeys(widths):
            try:
                m, _ = measure(fn, kind, cos, sin, tw)
                break
            except NotRope as e:  # the function ran: its effect is not RoPE at this width
                errors.append(e)
            except Exception:  # a width the function does not take: try the next
                continue
        if m is None:
            if errors:
                raise errors[0]
            return None  # no probe width ran: the code cannot be read this way
        comps[name] = Component(name, site, m, n_inv)
    return list(comps.values())
