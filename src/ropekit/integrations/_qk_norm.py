"""``patch(model, fuse_qk_norm=True)``: a family's per-head q/k RMSNorm fused into its RoPE call.

Qwen3, Qwen3-MoE, Gemma 3 and many newer families normalise every head of q and k right
before RoPE::

    q = self.q_norm(self.q_proj(x).view(b, s, h, d)).transpose(1, 2)   # RMSNorm over d
    k = self.k_norm(self.k_proj(x).view(b, s, hk, d)).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)

:func:`ropekit.apply_qk_norm_rotary` does both in one pass over q and k.

**How it is wired in (and why this way).** The attention's code is not rewritten or copied:
a copied ``forward`` would have to follow every mask, cache, sliding-window, kv-sharing and
``output_attentions`` detail of every family and version. Instead, while a fused attention
runs, its ``q_norm``/``k_norm`` *defer*: they return their input unchanged and record
``(tensor, norm)`` in a per-call state (a ``ContextVar``); the RoPE function, which
:func:`~ropekit.integrations.transformers.patch` already routes to ropekit through its
dispatcher, finds its q/k arguments among the recorded tensors (the same memory, dims
permuted by ``transpose``, head dim last) and calls the fused op with the norms' weights and
epsilon. Every other line of the forward is transformers' own.

Deferring is sound only if the norm's output reaches RoPE and nothing else, so it is enabled
per attention only where that is read from the code and proven:

1. **code** (:func:`class_sites`): the attention's ``forward`` is parsed; each q/k argument
   of a RoPE call is traced back through ``T = T.transpose(i, j)`` to
   ``T = self.<norm>(E)`` (optionally ``.transpose(i, j)``). Between the two ``T`` is read
   nowhere else, there is no ``return``/``break``/``continue``, and the RoPE call assigns
   ``T``. The ``if`` tests the RoPE call sits under and the norm does not must be readable
   from the module alone (``self.sliding_window is not None``); they are evaluated per layer,
   so a layer whose RoPE is off (Exaone 4's NoPE layers) keeps its norm.
2. **module** (:func:`read_norm`): exactly one parameter, ``weight`` of shape ``[head_dim]``
   (a norm over all heads, OLMo 2's ``q_norm`` over ``h * d``, is refused), no bias, no
   buffers, no hooks; ``eps`` is the one float attribute the class's code reads
   (``variance_epsilon`` for Qwen3, ``eps`` for Gemma); the weight offset is measured with
   the weight set to zero (``0.0`` for ``x̂·w``, ``1.0`` for Gemma's ``x̂·(1 + w)``).
3. **numbers** (:func:`prove_norm`, and ``patch``'s proof of the whole prologue): the norm
   module against the fused op on float32 rows of magnitude 1, ``sqrt(eps)`` (where eps
   decides the result) and 30, with zero, random and the model's weights; then the model's
   own ``q_norm``/``k_norm`` followed by its own RoPE function against the fused replacement,
   with the model's tables (and ropekit's exact ones). Both must agree within :data:`TOL`.

At run time the state is checked as well: a deferred norm whose output does not reach RoPE
in the same forward is a RopeError, never a silently un-normalised q.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
import types
import contextvars
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .._errors import fail
from ..functional import apply_qk_norm_rotary

# While a fused attention runs (patch(..., fuse_qk_norm=True)), _DEFERRED holds that call's
# Deferred: the tensors its q_norm/k_norm returned un-normalised for RoPE to fuse. None
# inside any other RoPE caller of a fused model.
_DEFERRED: contextvars.ContextVar[Any] = contextvars.ContextVar("ropekit_hf_deferred", default=None)

__all__ = ["TOL", "NotFusable", "NormSite", "NormSpec", "class_sites", "read_norm", "prove_norm"]

#: Agreement required between the model's norm (+ RoPE) and the fused op on float32 probe
#: rows: ``|want - got| <= TOL * (1 + |want|)``; 2^-16·(1 + |y|) is 512 float32 ulps at
#: |y| = 1. The two sides differ only in the order of float32 roundings (the d-term mean of
#: squares, rsqrt, the weight and the rotation's multiply-adds). Measured on every fused
#: family of transformers 5.24: 0 with the float32 composition, <= 1.4e-6 with the fused CPU
#: operator at head dims up to 512 (>= 10x below the bound). A wrong eps (>= 2x off on the
#: sqrt(eps) rows), a wrong weight offset (off by x̂), a mean-subtracting LayerNorm (the probe
#: rows have mean 0.5) or a missing weight are off by 1e-2 or more.
TOL = 2.0**-16


class NotFusable(Exception):
    """Why one attention's q/k norm cannot be fused (one line)."""


# --------------------------------------------------------------------------- the code
@dataclasses.dataclass(frozen=True)
class NormSite:
    """One norm feeding one argument of a RoPE call in an attention's ``forward``.

    Attributes:
        norm: attribute name of the norm module (``"q_norm"``).
        fn: the RoPE function called (``"apply_rotary_pos_emb"``).
        arg: the argument of that call it feeds (0: q, 1: k).
        conditions: ``(test, value)`` of the ``if`` tests the RoPE call sits under and the
            norm does not; each reads only the module (evaluated per instance).
        line: the norm's line in the class's source.
    """

    norm: str
    fn: str
    arg: int
    conditions: Tuple[Tuple[ast.expr, bool], ...]
    line: int

    def describe(self) -> str:
        return f"self.{self.norm} -> {self.fn} argument {self.arg}"


_OPAQUE = None  # polarity of a loop / try block in a path: runs zero or more times


def _leaves(body: Sequence[ast.stmt], path: tuple, out: list) -> None:
    """Simple statements (and ``if`` tests) of a function body in execution order, each with
    the path of ``(test, value)`` blocks around it."""
    for st in body:
        if isinstance(st, ast.If):
            out.append((st.test, path))
            _leaves(st.body, path + ((st.test, True),), out)
            _leaves(st.orelse, path + ((st.test, False),), out)
        elif isinstance(st, (ast.With, ast.AsyncWith)):
            for item in st.items:
                out.append((item.context_expr, path))
            _leaves(st.body, path, out)
        elif isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue  # defined here, runs later (or never): not part of this order
        elif isinstance(st, (ast.For, ast.AsyncFor, ast.While, ast.Try)) or type(st).__name__ in ("Match", "TryStar"):
            inner = path + ((st, _OPAQUE),)
            for field in ("iter", "test", "subject"):
                if isinstance(getattr(st, field, None), ast.expr):
                    out.append((getattr(st, field), path))
            blocks = [getattr(st, f, []) for f in ("body", "orelse", "finalbody")]
            blocks += [h.body for h in getattr(st, "handlers", [])] + [c.body for c in getattr(st, "cases", [])]
            for blk in blocks:
                _leaves(blk, inner, out)
        else:
            out.append((st, path))


def _names(node: ast.AST, ctx: type) -> List[str]:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ctx)]


def _int_args(call: ast.Call) -> bool:
    def is_int(a):
        if isinstance(a, ast.UnaryOp) and isinstance(a.op, ast.USub):
            a = a.operand
        return isinstance(a, ast.Constant) and type(a.value) is int

    return len(call.args) == 2 and not call.keywords and all(is_int(a) for a in call.args)


def _transpose_of(node: ast.AST, inner: Callable[[ast.AST], Any]) -> Any:
    """``inner(node)`` or ``inner(X)`` for ``node = X.transpose(i, j)`` (int constants)."""
    got = inner(node)
    if got is not None:
        return got
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "transpose":
        if _int_args(node):
            return inner(node.func.value)
    return None


def _single_target(st: ast.AST, name: str) -> Optional[ast.expr]:
    """The value of ``name = <value>`` (one plain target), else None."""
    if isinstance(st, ast.Assign) and len(st.targets) == 1:
        t = st.targets[0]
        if isinstance(t, ast.Name) and t.id == name:
            return st.value
    return None


def _norm_of(value: ast.expr, self_name: str) -> Optional[str]:
    """``N`` for ``self.N(E)`` or ``self.N(E).transpose(i, j)``."""

    def call(node):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == self_name
            and len(node.args) == 1
            and not node.keywords
            and not isinstance(node.args[0], ast.Starred)
        ):
            return node.func.attr
        return None

    return _transpose_of(value, call)


def _is_retranspose(st: ast.AST, name: str) -> bool:
    """``T = T.transpose(i, j)``."""
    v = _single_target(st, name)
    return (
        isinstance(v, ast.Call)
        and isinstance(v.func, ast.Attribute)
        and v.func.attr == "transpose"
        and isinstance(v.func.value, ast.Name)
        and v.func.value.id == name
        and _int_args(v)
    )


def _self_attrs_stored(func: ast.AST, self_name: str) -> set:
    out = set()
    for n in ast.walk(func):
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
            v = n.value
            if isinstance(v, ast.Name) and v.id == self_name:
                out.add(n.attr)
    return out


_EVAL_NODES = (
    ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.Compare, ast.Is, ast.IsNot, ast.Eq,
    ast.NotEq, ast.In, ast.NotIn, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Attribute, ast.Name, ast.Constant,
    ast.Subscript, ast.Load, ast.Tuple, ast.List,
)  # fmt: skip


def _instance_readable(test: ast.expr, self_name: str, stored: set) -> Optional[str]:
    """None if ``test`` reads only ``self`` (attributes not assigned in ``forward``) and
    constants; else why not."""
    for n in ast.walk(test):
        if not isinstance(n, _EVAL_NODES):
            return f"`{ast.unparse(test)}` computes something ({type(n).__name__})"
        if isinstance(n, ast.Name) and n.id != self_name:
            return f"`{ast.unparse(test)}` reads `{n.id}`, known only at run time"
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == self_name:
            if n.attr in stored:
                return f"`{ast.unparse(test)}` reads self.{n.attr}, which forward assigns"
    return None


def evaluate(test: ast.expr, self_name: str, obj: Any) -> bool:
    """An instance-readable ``if`` test (see :func:`class_sites`) on the module ``obj``."""
    code = compile(ast.Expression(test), "<ropekit condition>", "eval")
    return bool(eval(code, {"__builtins__": {}}, {self_name: obj}))  # noqa: S307 - nodes restricted above


def _forward_function(cls: type) -> Optional[Callable]:
    for klass in cls.__mro__:
        if klass is torch.nn.Module or klass is object:
            return None
        if "forward" in vars(klass):
            fn = vars(klass)["forward"]
            try:
                return inspect.unwrap(fn)
            except ValueError:
                return fn
    return None


@dataclasses.dataclass(frozen=True)
class ClassSites:
    """What :func:`class_sites` read from one attention class.

    Attributes:
        module: the modeling module defining its ``forward`` (where the RoPE function lives).
        self_name: the name of ``forward``'s first parameter (for the ``if`` tests).
        sites: the norms that can be deferred.
        notes: why other norm calls cannot (one line each).
        others: attribute names of norm calls that do not qualify (for a better message).
    """

    module: str
    self_name: str
    sites: Tuple[NormSite, ...]
    notes: Tuple[str, ...]
    others: Tuple[str, ...]


@functools.lru_cache(maxsize=None)
def class_sites(cls: type, fns: Tuple[Tuple[str, str], ...]) -> ClassSites:
    """Read an attention class's ``forward``: every norm that feeds a q/k argument of a call
    of one of ``fns`` (``(name, kind)``: kind ``"qk"`` feeds arguments 0 and 1, ``"x"``
    argument 0) in a way that makes deferring it sound, and a note for every norm-like call
    that does not qualify."""
    fn = _forward_function(cls)
    modname = getattr(fn, "__module__", "") or ""
    if fn is None:
        return ClassSites(modname, "self", (), (f"{cls.__name__} has no forward of its own",), ())
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError) as e:
        return ClassSites(modname, "self", (), (f"the source of {cls.__name__}.forward cannot be read ({e})",), ())
    func = tree.body[0]
    if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) or not func.args.args:
        return ClassSites(modname, "self", (), (f"{cls.__name__}.forward is not a method",), ())
    self_name = func.args.args[0].arg
    code = getattr(fn, "__code__", None)
    line0 = code.co_firstlineno - 1 if code is not None else 0
    kinds = dict(fns)
    stored = _self_attrs_stored(func, self_name)
    inner_fns = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
    nested = [n for n in ast.walk(func) if n is not func and isinstance(n, inner_fns)]
    closures = {x for n in nested for x in _names(n, ast.Load)}  # read by inner functions, whenever they run
    leaves: List[Tuple[ast.AST, tuple]] = []
    _leaves(func.body, (), leaves)
    sites: List[NormSite] = []
    notes: List[str] = []
    others: List[str] = []
    for i, (st, path_r) in enumerate(leaves):
        if not isinstance(st, ast.stmt):
            continue
        for call in ast.walk(st):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in kinds):
                continue
            name = call.func.id
            for arg in range(2 if kinds[name] == "qk" else 1):
                a = call.args[arg] if len(call.args) > arg else None
                if not isinstance(a, ast.Name):
                    continue
                if a.id in closures:
                    notes.append(f"`{a.id}` (argument {arg} of {name}) is also read by a function defined in forward")
                    continue
                site = _trace(leaves, i, st, path_r, a.id, name, arg, self_name, stored, notes, others)
                if site is not None:
                    sites.append(dataclasses.replace(site, line=line0 + site.line))
    found = {x.norm for x in sites}
    return ClassSites(
        modname, self_name, tuple(dict.fromkeys(sites)), tuple(dict.fromkeys(notes)),
        tuple(n for n in dict.fromkeys(others) if n not in found),
    )  # fmt: skip


def _trace(leaves, i, st, path_r, T, fn, arg, self_name, stored, notes, others) -> Optional[NormSite]:
    """The norm whose output reaches argument ``arg`` (variable ``T``) of the RoPE call in
    leaf ``i``, if deferring it is sound; else None (with a note when a norm was involved)."""
    j = i - 1
    norm = None
    while j >= 0:
        node, _ = leaves[j]
        if isinstance(node, ast.stmt) and T in _names(node, ast.Store):
            if _is_retranspose(node, T):
                j -= 1
                continue
            v = _single_target(node, T)
            norm = _norm_of(v, self_name) if v is not None else None
            if norm is None:
                # diagnostics: a norm applied to T further up, before a reshape (OLMo 2)
                for k in range(j - 1, -1, -1):
                    prev, _ = leaves[k]
                    pv = _single_target(prev, T) if isinstance(prev, ast.stmt) else None
                    pn = _norm_of(pv, self_name) if pv is not None else None
                    if pn is not None:
                        others.append(pn)
                        step = ast.unparse(node).strip()
                        notes.append(f"self.{pn} is applied before `{step}`, not right before {fn}")
                        break
                    if isinstance(prev, ast.stmt) and T in _names(prev, ast.Store):
                        break
                return None
            break
        j -= 1
    if norm is None:
        return None
    where = f"self.{norm} -> {fn}"
    path_n = leaves[j][1]
    for k in range(j + 1, i):
        node, _ = leaves[k]
        if isinstance(node, (ast.Return, ast.Break, ast.Continue)):
            others.append(norm)
            notes.append(f"{where}: a `{ast.unparse(node).strip()}` between the norm and RoPE")
            return None
        if T in _names(node, ast.Load) and not _is_retranspose(node, T):
            others.append(norm)
            notes.append(f"{where}: `{T}` is also read by `{ast.unparse(node).strip()}` before RoPE")
            return None
    if _names(st, ast.Load).count(T) != 1:
        others.append(norm)
        notes.append(f"{where}: `{T}` is read more than once by `{ast.unparse(st).strip()}`")
        return None
    if T not in _names(st, ast.Store):
        others.append(norm)
        notes.append(f"{where}: the RoPE call does not reassign `{T}` (its normalised value would be read later)")
        return None
    common = 0
    while common < min(len(path_n), len(path_r)) and path_n[common] == path_r[common]:
        common += 1  # the blocks around both (ast nodes compare by identity)
    conds = []
    for test, value in path_r[common:]:
        if value is _OPAQUE:
            others.append(norm)
            notes.append(f"{where}: the RoPE call is inside a loop or try block the norm is not in")
            return None
        why = _instance_readable(test, self_name, stored)
        if why is not None:
            others.append(norm)
            notes.append(f"{where}: RoPE runs only if {why}; the norm cannot be deferred")
            return None
        conds.append((test, value))
    return NormSite(norm, fn, arg, tuple(conds), leaves[j][0].lineno if hasattr(leaves[j][0], "lineno") else 0)


# --------------------------------------------------------------------------- the module
@dataclasses.dataclass(frozen=True)
class NormSpec:
    """What a per-head RMSNorm module computes: ``x / sqrt(mean(x²) + eps) * (offset + w)``.

    Attributes:
        cls: the norm's class name; eps_attr: the attribute holding eps (read at every call);
        eps: its value at patch time; offset: the measured weight offset; width: ``d``.
    """

    cls: str
    eps_attr: str
    eps: float
    offset: float
    width: int

    def describe(self) -> str:
        return f"{self.cls}(eps={self.eps:g} from .{self.eps_attr}, weight_offset={self.offset:g})"


def _code_names(cls: type) -> set:
    names: set = set()

    def add(code):
        names.update(code.co_names)
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                add(c)

    for klass in cls.__mro__:
        if klass is torch.nn.Module or klass is object:
            break
        for v in vars(klass).values():
            f = getattr(v, "__func__", v)
            if isinstance(f, property):
                f = f.fget
            code = getattr(f, "__code__", None)
            if code is not None:
                add(code)
    return names


def _rows(d: int, eps: float, device: Any, heads: int = 3, seed: int = 0, S: int = 7) -> torch.Tensor:
    """Probe rows ``[2, heads, S, d]`` float32: mean 0.5 (a mean-subtracting norm differs),
    magnitudes 1, sqrt(eps), 4·sqrt(eps) and 30 (eps decides the small ones)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, heads, S, d, generator=g) + 0.5
    small = math.sqrt(eps) if eps > 0 else 1e-3
    scales = torch.tensor([1.0, small, 4 * small, 30.0])
    idx = torch.arange(2 * heads * S).reshape(2, heads, S, 1) % 4
    return (x * scales[idx]).to(device)


def close(want: torch.Tensor, got: torch.Tensor, tol: float = TOL) -> Tuple[bool, float]:
    """``(|want - got| <= tol·(1 + |want|) everywhere, max |want - got|)``."""
    if want.shape != got.shape or want.dtype != got.dtype:
        return False, math.inf
    d = (want.double() - got.double()).abs()
    return bool((d <= tol * (1 + want.double().abs())).all()), float(d.max()) if d.numel() else 0.0


def _norm_only(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """The fused op's norm: with cos = 1, sin = 0 on one pair its rotation is the identity."""
    one = torch.ones(1, dtype=torch.float32, device=x.device)
    return apply_qk_norm_rotary(x, x.narrow(1, 0, 0), w, w, one, one * 0, eps=eps, weight_offset=offset)[0]


def read_norm(norm: Any, head_dim: int, where: str) -> NormSpec:
    """Read a norm module's weight, eps and offset (:class:`NotFusable` if it is not a
    per-head RMSNorm with a ``[head_dim]`` weight); the numbers are checked by :func:`prove_norm`."""
    if not isinstance(norm, torch.nn.Module):
        raise NotFusable(f"{where} is {type(norm).__name__}, not a module")
    name = type(norm).__name__
    params = dict(norm.named_parameters())
    if "bias" in params or any(k.endswith(".bias") for k in params):
        raise NotFusable(f"{where} ({name}) has a bias (x̂·w + b); the fused op computes x̂·(offset + w)")
    w = params.get("weight")
    if w is None:
        raise NotFusable(f"{where} ({name}) has no weight (parameters: {sorted(params) or 'none'})")
    if set(params) != {"weight"}:
        raise NotFusable(f"{where} ({name}) has parameters {sorted(params)}; the fused op takes one weight")
    bufs = [k for k, _ in norm.named_buffers()]
    if bufs:
        raise NotFusable(f"{where} ({name}) has buffers {bufs}")
    if w.dim() != 1 or w.numel() != head_dim:
        if w.dim() == 1 and w.numel() > head_dim and w.numel() % head_dim == 0:
            raise NotFusable(
                f"{where} ({name}) normalises over all heads: weight [{w.numel()}] = "
                f"{w.numel() // head_dim} heads x head_dim {head_dim}; a per-head norm has weight [{head_dim}]"
            )
        raise NotFusable(f"{where} ({name}) has weight {list(w.shape)}; a per-head norm has weight [{head_dim}]")
    if norm._forward_hooks or norm._forward_pre_hooks or getattr(norm, "_forward_hooks_with_kwargs", None):
        raise NotFusable(f"{where} ({name}) has forward hooks, which would see the un-normalised tensor")
    if "forward" in vars(norm):
        raise NotFusable(f"{where} ({name}) already has an instance-level forward (another wrapper, e.g. offloading)")
    used = _code_names(type(norm))
    floats = [k for k, v in vars(norm).items() if isinstance(v, float) and k in used]
    if len(floats) != 1:
        raise NotFusable(
            f"{where} ({name}): expected one float epsilon attribute read by its code, found {floats or 'none'}"
        )
    eps = float(getattr(norm, floats[0]))
    if not (eps >= 0 and math.isfinite(eps)):
        raise NotFusable(f"{where} ({name}): eps {eps!r}")
    # the weight offset: with the weight set to zero the module returns offset * x̂
    x = _rows(head_dim, eps, w.device)
    with torch.no_grad():
        y0 = torch.func.functional_call(norm, {"weight": torch.zeros(head_dim, device=w.device)}, (x,))
    if not isinstance(y0, torch.Tensor) or y0.shape != x.shape:
        raise NotFusable(f"{where} ({name}) returned {type(y0).__name__} for a [.., {head_dim}] tensor")
    xd = x.double()
    xh = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + eps)
    off = float((y0.double() * xh).sum() / xh.square().sum())
    if not math.isfinite(off) or abs(off - round(off)) > 1e-3:
        raise NotFusable(f"{where} ({name}) with zero weight gives {off:.4g}·x̂, not an integer offset times x̂")
    return NormSpec(name, floats[0], eps, float(round(off)), head_dim)


def prove_norm(norm: torch.nn.Module, spec: NormSpec, where: str) -> float:
    """The norm module against the fused op's norm on float32 probe rows, with zero, random and
    the model's weights; :class:`NotFusable` with the difference unless within :data:`TOL`.
    Returns the max difference."""
    w = norm.weight
    x = _rows(spec.width, spec.eps, w.device)
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for label, wt in (
        ("zero", torch.zeros(spec.width)),
        ("random", torch.randn(spec.width, generator=g)),
        ("the model's", w.detach().float().cpu()),
    ):
        wt = wt.to(w.device)
        with torch.no_grad():
            want = torch.func.functional_call(norm, {"weight": wt}, (x,))
            got = _norm_only(x, wt, spec.eps, spec.offset)
        ok, d = close(want, got)
        if not ok:
            raise NotFusable(
                f"{where} ({spec.cls}) is not x / sqrt(mean(x²) + {spec.eps:g}) * ({spec.offset:g} + w) over the head "
                f"dim: max |difference| {d:.3g} with {label} weights (tolerance {TOL:.3g}·(1 + |y|))"
            )
        worst = max(worst, d)
    return worst


# --------------------------------------------------------------------------- run time
@dataclasses.dataclass(frozen=True)
class NormUse:
    """A deferred norm at run time: its module (weight read at every call), eps attribute,
    offset, and a name for messages."""

    module: torch.nn.Module
    eps_attr: str
    offset: float
    name: str

    def eps(self) -> float:
        return float(getattr(self.module, self.eps_attr))


class Deferred:
    """Per call of a fused attention: the tensors its norms returned un-normalised."""

    __slots__ = ("owner", "records")

    def __init__(self, owner: torch.nn.Module) -> None:
        self.owner = owner
        self.records: List[Tuple[torch.Tensor, NormUse]] = []

    def take(self, x: Any) -> Optional[NormUse]:
        """The norm of a recorded tensor ``x`` is a view of (same memory, dims permuted, the
        head dim last and untouched); the record is consumed."""
        if not isinstance(x, torch.Tensor):
            return None
        for i, (t, use) in enumerate(self.records):
            if x is t or _same_data(x, t):
                del self.records[i]
                return use
        return None


def _same_data(x: torch.Tensor, t: torch.Tensor) -> bool:
    return (
        x.dim() == t.dim()
        and x.dtype == t.dtype
        and x.device == t.device
        and x.data_ptr() == t.data_ptr()
        and x.shape[-1] == t.shape[-1]
        and x.stride(-1) == t.stride(-1)
        and sorted(zip(x.shape, x.stride())) == sorted(zip(t.shape, t.stride()))
    )


def deferred_forward(norm: torch.nn.Module, attn: torch.nn.Module, use: NormUse, state: Any) -> Callable:
    """An instance ``forward`` for a norm: inside ``attn``'s fused forward (``state`` is the
    ContextVar holding its :class:`Deferred`), return the input and record it; anywhere
    else, the norm's own forward."""
    inner = norm.forward

    def forward(x, *args, **kwargs):
        if torch.compiler.is_compiling():  # traced: nothing is deferred (see _wrap_attention)
            return inner(x, *args, **kwargs)
        st = state.get()
        if st is None or st.owner is not attn or args or kwargs or not isinstance(x, torch.Tensor):
            return inner(x, *args, **kwargs)
        st.records.append((x, use))
        return x

    forward._ropekit_deferred = True  # type: ignore[attr-defined]
    return forward


def norm_rotate(
    layout: str, xs: List[torch.Tensor], uses: List[NormUse], c: torch.Tensor, s: torch.Tensor, heads_dim: int
) -> List[torch.Tensor]:
    """``apply_qk_norm_rotary`` on the deferred tensors ``xs`` (one call for q and k when
    their norms share eps and offset; otherwise one each, with an empty partner)."""
    if len(xs) == 2 and uses[0].eps() == uses[1].eps() and uses[0].offset == uses[1].offset:
        q, k = apply_qk_norm_rotary(
            xs[0], xs[1], uses[0].module.weight, uses[1].module.weight, c, s,
            eps=uses[0].eps(), weight_offset=uses[0].offset, layout=layout,
        )  # fmt: skip
        return [q, k]
    out = []
    for x, u in zip(xs, uses):
        hd = heads_dim if heads_dim >= 0 else heads_dim + x.dim()
        w = u.module.weight
        empty = x.narrow(hd, 0, 0)  # no heads: the fused op on x alone
        y, _ = apply_qk_norm_rotary(x, empty, w, w, c, s, eps=u.eps(), weight_offset=u.offset, layout=layout)
        out.append(y)
    return out


def unfinished(st: Deferred) -> Optional[str]:
    """A message if deferred norms of this call never reached RoPE."""
    if not st.records:
        return None
    return ", ".join(sorted({u.name for _, u in st.records}))


class Rotation(NamedTuple):
    """The plain-RoPE helpers of :mod:`ropekit.integrations.transformers`, passed in (this
    module does not import that one: the layers point one way)."""

    half_from_table: Callable  # (plan, full-width table) -> half-width table
    rotate: Callable  # (plan, x, cos, sin) -> rotated x
    unsq: Callable  # (tensor, dim) -> tensor unsqueezed at dim


def fused_replacement(plan: Any, original: Callable, plain: Callable, rotation: Rotation) -> Callable:
    """A function with ``original``'s signature: inside a fused attention, the arguments that
    are deferred norm outputs go through :func:`norm_rotate` (the rest through ``plan``'s
    rotation); with nothing deferred it is ``plain``, the replacement :func:`patch` proved."""
    _half_from_table, _rotate, _unsq = rotation

    sig = inspect.signature(original)
    names = list(sig.parameters)
    n = 2 if plan.kind == "qk" else 1

    def call(*args, **kwargs):
        if torch.compiler.is_compiling():  # traced: nothing was deferred (see _wrap_attention)
            return plain(*args, **kwargs)
        st = _DEFERRED.get()
        if st is None or not st.records:
            return plain(*args, **kwargs)
        b = sig.bind(*args, **kwargs)
        b.apply_defaults()
        a = b.arguments
        xs = [a[names[i]] for i in range(n)]
        uses = [st.take(x) for x in xs]
        if all(u is None for u in uses):
            return plain(*args, **kwargs)
        ud = a.get("unsqueeze_dim", 1)
        c = _unsq(_half_from_table(plan, a["cos"]), ud)  # [b, 1, s, r/2] for unsqueeze_dim=1
        s = _unsq(_half_from_table(plan, a["sin"]), ud)
        idx = [i for i, u in enumerate(uses) if u is not None]
        out: List[Any] = [None] * n
        for i, y in zip(idx, norm_rotate(plan.layout, [xs[i] for i in idx], [uses[i] for i in idx], c, s, ud)):
            out[i] = y
        for i in range(n):
            if out[i] is None:
                out[i] = _rotate(plan, xs[i], c, s)
        return tuple(out) if plan.kind == "qk" else out[0]

    return call


def fusable(plan: Any) -> Optional[str]:
    """None if ``apply_qk_norm_rotary`` can run this RoPE plan, else why not."""
    if plan.kind not in ("qk", "x"):
        return f"{plan.name} takes {plan.kind!r} arguments, not (q, k, cos, sin) or (x, cos, sin)"
    if plan.direction < 0:
        return f"{plan.name} rotates by -θ; the fused op rotates by +θ"
    if plan.place not in ("all", "leading"):
        return f"{plan.name} rotates the {plan.place} lanes of the head; the fused op rotates the first r"
    if plan.deinterleave or plan.qlayout != "bhsd":
        return f"{plan.name} ({plan.describe()}) returns lanes in another order or layout"
    return None


@dataclasses.dataclass
class Fusion:
    """What :func:`plan_fusion` decided and proved for one model.

    Attributes:
        attention: the fused attention modules ``(name, module)``.
        norms: ``(norm module, deferred forward)`` to install.
        keys: the RoPE functions ``(module, name)`` that get :func:`fused_replacement`.
        lines: one line per attention class and norm: what was read and the proof's max difference.
    """

    attention: List[Tuple[str, torch.nn.Module]]
    norms: List[Tuple[torch.nn.Module, Callable]]
    keys: List[Tuple[str, str]]
    lines: List[str]


def norm_like(mod: Any) -> bool:
    """A module that may be a normalisation, to be read (and refused with a reason) by
    :func:`read_norm`: a leaf module other than ``nn.Identity`` whose class name says "norm",
    or whose parameters are all 1-D. Projections (2-D weights) and identities are not."""
    if not isinstance(mod, torch.nn.Module) or isinstance(mod, torch.nn.Identity) or any(True for _ in mod.children()):
        return False
    if "norm" in type(mod).__name__.lower():
        return True
    params = list(mod.parameters())
    return bool(params) and all(p.dim() == 1 for p in params)


def _head_dim(m: torch.nn.Module, norm: torch.nn.Module) -> int:
    hd = getattr(m, "head_dim", None)
    if isinstance(hd, int) and not isinstance(hd, bool) and hd > 0:
        return hd
    w = getattr(norm, "weight", None)
    return int(w.shape[-1]) if isinstance(w, torch.Tensor) and w.dim() >= 1 else 0


def plan_fusion(
    family: str,
    attn: List[Tuple[str, torch.nn.Module]],
    plans: Dict[Tuple[str, str], Any],
    originals: Dict[Tuple[str, str], Callable],
    replacements: Dict[Tuple[str, str], Callable],
    tables: Dict[Tuple[str, str], List[Tuple[Any, Any, Any, Optional[Tuple[Any, Any]]]]],
    rope_calls: Callable[[torch.nn.Module], Tuple[Tuple[str, str], ...]],
    rotation: "Rotation",
) -> Fusion:
    """Read, check and prove the q/k-norm fusion of a model (nothing is changed here).

    Args:
        family: ``model_type`` for messages.
        attn: the RoPE-calling modules :func:`patch` wraps.
        plans, originals, replacements: per RoPE function, the proven plan, transformers'
            function and ropekit's plain replacement.
        tables: per RoPE function, ``(layer type, cos, sin, exact)`` probe tables of the
            model's rotary modules (``exact``: ropekit's tables for the same positions, or None).
        rope_calls: the RoPE functions a module calls (``transformers._rope_calls``).
        rotation: the plain-RoPE helpers for :func:`fused_replacement`.

    Raises:
        RopeError: naming the family and the reason, when an attention's norm feeds RoPE but
        cannot be fused (norm over all heads, another norm, a difference on the probes), or
        when no attention of the model has a per-head q/k norm right before RoPE.
    """
    from .._hf_code import run_fn

    fix = "patch(model) without fuse_qk_norm (RoPE is still routed to ropekit; the norms stay transformers')"
    fused: List[Tuple[str, torch.nn.Module]] = []
    installs: List[Tuple[torch.nn.Module, Callable]] = []
    keys: Dict[Tuple[str, str], None] = {}
    lines: Dict[str, float] = {}  # one line per attention class and norm -> max difference of its proofs
    proven: Dict[int, float] = {}
    notes: List[str] = []
    others: List[Tuple[torch.nn.Module, str, str]] = []
    specs: Dict[int, NormSpec] = {}
    for aname, m in attn:
        calls = [k for k in rope_calls(m) if k in plans]
        cs = class_sites(type(m), tuple((k[1], plans[k].kind) for k in calls if plans[k].kind in ("qk", "x")))
        notes.extend(cs.notes)
        others.extend((m, o, aname) for o in cs.others)
        uses: Dict[Tuple[Tuple[str, str], int], Dict[str, Tuple[torch.nn.Module, NormSpec, NormUse]]] = {}
        for site in cs.sites:
            key = (cs.module, site.fn)
            if key not in plans:
                continue
            norm = getattr(m, site.norm, None)
            if norm is None:
                continue  # this layer has no such module (Gemma 3n's kv-shared layers): that code never runs
            if not norm_like(norm):
                notes.append(f"self.{site.norm} ({type(norm).__name__}) before {site.fn} is not a normalisation")
                continue
            try:
                if not all(evaluate(t, cs.self_name, m) == v for t, v in site.conditions):
                    continue  # RoPE is off in this layer (Exaone 4's NoPE layers): its norm stays
            except Exception as e:
                raise fail(
                    "the `if` tests around the RoPE call readable from the attention module",
                    f"{family} ({type(m).__name__}): {type(e).__name__}: {e}",
                    fix,
                ) from None
            where = f"{type(m).__name__}.{site.norm}"
            why = fusable(plans[key])
            try:
                if why is not None:
                    raise NotFusable(why)
                spec = specs.get(id(norm))
                if spec is None:
                    spec = specs[id(norm)] = read_norm(norm, _head_dim(m, norm), where)
                    proven[id(norm)] = prove_norm(norm, spec, where)
            except NotFusable as e:
                raise fail(
                    "a per-head q/k RMSNorm right before RoPE that apply_qk_norm_rotary computes "
                    "(x / sqrt(mean(x²) + eps) * (offset + w) over the head dim)",
                    f"{family}: {e}",
                    fix,
                ) from None
            use = NormUse(norm, spec.eps_attr, spec.offset, f"{aname}.{site.norm}")
            uses.setdefault((key, site.arg), {})[site.norm] = (norm, spec, use)
            line = f"{where}: {spec.describe()} -> {site.fn}"
            lines[line] = max(lines.get(line, 0.0), proven[id(norm)])
        if not uses:
            continue
        for key in dict.fromkeys(k for k, _ in uses):
            # argument -> its norms (one each for (q, k, ...) functions; Gemma 3n's (x, cos, sin)
            # function gets q_norm and k_norm on argument 0, in two calls): one proof per norm
            by_arg = {arg: list(v.values()) for (k, arg), v in uses.items() if k == key}
            for i in range(max(len(v) for v in by_arg.values())):
                mine = {arg: v[min(i, len(v) - 1)] for arg, v in by_arg.items()}
                worst = _prove_prologue(family, m, plans[key], originals[key], replacements[key],
                                        tables.get(key, []), mine, run_fn, _DEFERRED, rotation)  # fmt: skip
                for norm, spec, use in mine.values():
                    line = f"{type(m).__name__}.{use.name.rsplit('.', 1)[1]}: {spec.describe()} -> {key[1]}"
                    lines[line] = max(lines[line], worst)
            keys[key] = None
        fused.append((aname, m))
        done = set()
        for v in uses.values():
            for norm, _, use in v.values():
                if id(norm) not in done:  # one deferred forward per module (a norm used twice records both calls)
                    done.add(id(norm))
                    installs.append((norm, deferred_forward(norm, m, use, _DEFERRED)))
    if not fused:
        reason = "no q/k norm feeds its RoPE call"
        notes = [x for x in notes if any(f"self.{o} " in x for m, o, _ in others if norm_like(getattr(m, o, None)))]
        for m, o, aname in others:  # a norm that is there but not right before RoPE: say what it is
            norm = getattr(m, o, None)
            if norm_like(norm):
                try:
                    read_norm(norm, _head_dim(m, norm), f"{type(m).__name__}.{o}")
                except NotFusable as e:
                    reason = str(e)
                    break
        notes = list(dict.fromkeys(notes))
        if notes and reason.startswith("no q/k norm"):
            reason = "its q/k norm cannot be deferred to RoPE: " + "; ".join(notes[:2])
        elif notes:
            reason += "; " + "; ".join(notes[:2])
        classes = sorted({type(m).__name__ for _, m in attn})
        raise fail(
            "an attention that applies a per-head q/k RMSNorm right before RoPE "
            "(q = self.q_norm(...), k = self.k_norm(...), then apply_rotary_pos_emb(q, k, cos, sin))",
            f"{family} ({', '.join(classes)}): {reason}",
            fix,
        )
    out = [f"{line} (proven: max |difference| {d:.2g})" for line, d in lines.items()]
    return Fusion(fused, installs, list(keys), out)


def _prove_prologue(family, m, plan, original, plain, tables, uses, run_fn, state, rotation) -> float:
    """The model's own norms then its own RoPE function, against :func:`fused_replacement`,
    on probe rows with the model's tables (and ropekit's exact tables): within :data:`TOL`
    (exact tables: plus the 2^-18 the plain proof allows them). Returns the max difference
    with the model's tables."""
    rep = fused_replacement(plan, original, plain, rotation)
    worst, ran = 0.0, 0
    d = next(iter(uses.values()))[1].width
    dev = next(iter(uses.values()))[0].weight.device
    lt = getattr(m, "layer_type", None)
    mine = [t for t in tables if t[0] == lt] or tables  # this layer's tables where the model has several
    for _, cos, sin, exact in mine:
        S = cos.shape[-2]
        q = _rows(d, uses[0][1].eps if 0 in uses else 1e-6, dev, heads=3, seed=2, S=S)  # [2, 3, S, d]
        k = _rows(d, uses[1][1].eps if 1 in uses else 1e-6, dev, heads=2, seed=3, S=S)  # [2, 2, S, d]
        with torch.no_grad():
            nq = uses[0][0](q) if 0 in uses else q
            nk = uses[1][0](k) if 1 in uses else k
            try:
                want = run_fn(original, plan.kind, nq, nk, cos.to(dev), sin.to(dev))
            except RuntimeError:
                continue  # tables of another layer type (another head width): not this attention's
            for tabs, tol in (((cos, sin), TOL), (exact, TOL + 2.0**-18)):
                if tabs is None:
                    continue
                st = Deferred(m)
                st.records.extend((x, uses[arg][2]) for arg, x in ((0, q), (1, k)) if arg in uses)
                token = state.set(st)
                try:
                    got = run_fn(rep, plan.kind, q, k, tabs[0].to(dev), tabs[1].to(dev))
                finally:
                    state.reset(token)
                if st.records:
                    raise fail(
                        f"the fused replacement of {plan.name} to consume the deferred norms",
                        f"{family} ({type(m).__name__}): {unfinished(st)} left over",
                        "patch(model) without fuse_qk_norm; please report the model",
                    )
                for name, wt, gt in zip(("q", "k"), want, got):
                    ok, diff = close(wt, gt, tol)
                    if not ok:
                        which = "ropekit's exact" if tabs is exact else "the model's"
                        raise fail(
                            f"{type(m).__name__}'s own q_norm/k_norm + {plan.name} and apply_qk_norm_rotary to agree "
                            f"on probe tensors within {tol:.3g}·(1 + |y|) ({which} tables)",
                            f"{family}: {name} max |difference| {diff:.3g}",
                            "patch(model) without fuse_qk_norm (RoPE is still routed to ropekit; the norms stay "
                            "transformers')",
                        )
                    if tabs is not exact:  # reported: the norm + rotation numerics, same tables
                        worst = max(worst, diff)
                ran += 1
    if not ran:
        raise fail(
            f"a rotary table of the {family} model that {plan.name} of {type(m).__name__} takes (head dim {d})",
            f"none of {len(tables)}",
            "patch(model) without fuse_qk_norm",
        )
    return worst
