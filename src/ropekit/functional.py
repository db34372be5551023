"""The one public apply: :func:`apply_rotary` and :func:`apply_rotary_qk`, with autograd.

Backward of a rotation is the rotation by ``-θ`` (RoPE is orthogonal per pair), so the
fused backends save no activations: only ``cos``/``sin`` are kept for backward (and ``x``
only when ``cos``/``sin`` themselves require grad).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import backends as _backends
from . import reference as _reference
from ._errors import fail
from .backends import complex as _complex
from .backends import eager as _eager
from .config import check_layout

__all__ = ["apply_rotary", "apply_rotary_qk", "check_tables", "tracing"]

_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Backends written in plain torch ops: torch.compile/export trace straight through them.
# Any other backend (the ctypes CPU kernel, Triton) runs under tracing as the opaque
# custom op ``ropekit::rotate`` below, so a compiled graph never breaks on it.
_TRACEABLE = {"eager": _eager, "complex": _complex, "reference": _reference}


# backend names whose validated q/k calls may take the CPU kernel's per-signature fast path
_FAST_QK_BACKENDS = ("auto", "cpu")


_CPU = []


def _cpu_backend():
    """The ``cpu`` backend module (imported on first use; a function-level import costs ~0.4 µs a call)."""
    if not _CPU:
        from .backends import cpu

        _CPU.append(cpu)
    return _CPU[0]


def tracing() -> bool:
    """True while torch.compile / torch.export trace the caller (then no host syncs)."""
    return torch.compiler.is_compiling()


def _broadcast_ok(small, target) -> bool:
    """``small`` broadcasts to ``target`` without enlarging it (pure shape arithmetic, no try/except)."""
    if len(small) > len(target):
        return False
    for a, t in zip(reversed(tuple(small)), reversed(tuple(target))):
        if a != 1 and a != t:
            return False
    return True


def _provably_non_overlapping(t: torch.Tensor) -> bool:
    """Sufficient test that no two indices of ``t`` share memory, from sizes and strides only.

    Dims of size > 1 sorted by stride must each step past the whole extent of the previous
    ones (``stride[i+1] >= stride[i] * size[i]``). Every tensor torch creates without
    ``as_strided`` passes (contiguous, transposed, sliced, permuted views); ``expand``
    (stride 0) and ``unfold``/``as_strided`` windows that overlap fail. Exotic non-overlapping
    ``as_strided`` layouts also fail (a conservative false alarm, never a silent overwrite).
    """
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1)
    extent = 1  # elements spanned by the dims seen so far
    for st, sz in dims:
        if st < extent:
            return False
        extent = st * (sz - 1) + extent
    return True


def check_tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, name: str = "x") -> int:
    """Validate ``x`` against half-width ``cos``/``sin``; return the rotary dim ``r``."""
    for nm, t in ((name, x), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise fail(f"{nm} a torch.Tensor", type(t).__name__, f"convert {nm} with torch.as_tensor")
    if x.dtype not in _X_DTYPES:
        raise fail(
            f"{name} of a real floating dtype {_X_DTYPES}",
            f"{name}.dtype={x.dtype}",
            "rotate the real q/k tensors (view complex tensors with torch.view_as_real first)"
            if x.dtype.is_complex
            else f"convert {name} to float (e.g. {name}.float())",
        )
    for nm, t in (("cos", cos), ("sin", sin)):
        if t.dtype not in _X_DTYPES:
            raise fail(f"{nm} of a real floating dtype", f"{nm}.dtype={t.dtype}", "build tables with ropekit.cos_sin")
        if t.device != x.device:
            raise fail(f"{nm} on {name}'s device {x.device}", f"{nm} on {t.device}", f"move it: {nm}.to({name}.device)")
    if cos.shape != sin.shape:
        raise fail("cos and sin of the same shape", f"{tuple(cos.shape)} and {tuple(sin.shape)}", "build both with ropekit.cos_sin")
    if x.dim() < 1 or cos.dim() < 1 or cos.shape[-1] < 1:
        raise fail(
            f"{name} [..., d] and cos/sin [..., r/2] with r/2 >= 1",
            f"{name} {tuple(x.shape)}, cos {tuple(cos.shape)}",
            "pass half-width tables from ropekit.cos_sin",
        )
    half = cos.shape[-1]
    d = x.shape[-1]
    if 2 * half > d:
        hint = (
            "these look like full-width tables (transformers' form): convert with ropekit.from_full_width(cos, layout)"
            if half == d
            else "use tables built for this head dim (rotary_dim <= head_dim)"
        )
        raise fail(
            f"cos/sin of width r/2 <= d/2 = {d // 2} (half width: one value per frequency)",
            f"width {half} for {name} of head dim {d}",
            hint,
        )
    target = tuple(x.shape[:-1]) + (half,)
    if not _broadcast_ok(cos.shape, target):
        raise fail(
            f"cos/sin broadcastable to {name}.shape[:-1] + (r/2,) = {target}",
            f"cos/sin of shape {tuple(cos.shape)}",
            "index the tables with positions of the same batch/sequence layout as x and unsqueeze the heads dim "
            "(e.g. cos[:, :, None, :] for bshd)",
        )
    return 2 * half


def _check_out(x: torch.Tensor, out: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        got = (
            f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        )
        raise fail(
            f"out of x's shape/dtype/device {tuple(x.shape)} {x.dtype} on {x.device}",
            got,
            "allocate it with torch.empty_like(x)",
        )
    if tracing():
        return  # fake tensors have no storage address; aliasing cannot be checked while tracing
    if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() and not (
        out.data_ptr() == x.data_ptr() and out.stride() == x.stride()
    ):
        raise fail("out not overlapping x (or exactly x)", "out sharing x's storage", "use inplace=True or a fresh buffer")


def _check_writable(t: torch.Tensor, name: str) -> None:
    if t.numel() > 1 and not _provably_non_overlapping(t):
        raise fail(
            f"{name} whose elements do not alias (it is written in place)",
            f"{name} with overlapping memory (shape {tuple(t.shape)}, stride {t.stride()}, e.g. from expand or unfold)",
            f"pass {name}.contiguous() or use inplace=False",
        )


@torch.library.custom_op("ropekit::rotate", mutates_args=())
def _rotate_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, conjugate: bool, backend: str) -> torch.Tensor:
    """A non-traceable backend as one opaque graph node: ``rot(x)`` into a fresh tensor."""
    be = _backends.resolve(backend, x)
    return be.rotate(x, cos, sin, layout, conjugate, _new_out(be, x))


@_rotate_op.register_fake
def _(x, cos, sin, layout, conjugate, backend):
    return torch.empty_like(x)


def _rotate_op_setup(ctx, inputs, output):
    _, cos, sin, layout, conjugate, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.layout, ctx.conjugate, ctx.backend = layout, conjugate, backend


def _rotate_op_backward(ctx, g):
    cos, sin = ctx.saved_tensors
    # d/dx R(θ)x = R(-θ): the same op, conjugated (tables that need grad never take this path)
    return _rotate_op(g, cos, sin, ctx.layout, not ctx.conjugate, ctx.backend), None, None, None, None, None


_rotate_op.register_autograd(_rotate_op_backward, setup_context=_rotate_op_setup)


def _new_out(be, x: torch.Tensor) -> torch.Tensor:
    """A fresh output for backend ``be`` to write (its ``new_output`` hook, else ``empty_like``)."""
    hook = getattr(be, "new_output", None)
    return torch.empty_like(x) if hook is None else hook(x)


def _resolve(backend: str, x: torch.Tensor):
    """The backend module, or (while tracing) the name of an opaque one run as ``ropekit::rotate``.

    While tracing, ``"auto"`` is the ``eager`` formula: inductor fuses it into one kernel
    and it needs no host-side dispatch.
    """
    if not tracing():
        return _backends.resolve(backend, x)
    if backend == "auto":
        return _eager
    mod = _TRACEABLE.get(backend)
    if mod is not None:
        return mod
    if backend not in _backends.names():
        raise fail(f'backend in {["auto", *_backends.names()]}', repr(backend), 'use backend="auto" to let ropekit choose')
    return backend


def _rotate_functional(x, cos, sin, layout: str, conjugate: bool) -> torch.Tensor:
    """The eager backend's formula without writes into buffers (graphs trace and differentiate it).

    float32 products (float64 for float64 ``x``), one cast to ``x.dtype``; a new tensor.
    """
    r = 2 * cos.shape[-1]
    cdt = _eager.compute_dtype(x)
    c, s = cos.to(cdt), sin.to(cdt)
    if conjugate:
        s = -s
    x1, x2 = (t.to(cdt) for t in _eager.pair_views(x, r, layout))  # [..., r/2] each
    y1 = x1 * c - x2 * s
    y2 = x2 * c + x1 * s
    if layout == "half":
        y = torch.cat((y1, y2), dim=-1)  # [..., r]
    else:
        y = torch.stack((y1, y2), dim=-1).flatten(-2)  # [..., r/2, 2] -> [..., r]
    y = y.to(x.dtype)
    if x.shape[-1] > r:
        y = torch.cat((y, x[..., r:]), dim=-1)  # [..., d]
    return y


def _rotate_traced(x, cos, sin, layout: str, conjugate: bool, be) -> torch.Tensor:
    """Rotation for graphs (torch.compile/export): no storage checks, no host syncs, no
    writes into buffers. ``reference`` traces its float64 matrix; ``eager``/``complex``/
    ``auto`` trace the eager formula (:func:`_rotate_functional`); opaque backends are the
    custom op ``ropekit::rotate``, which carries the ``R(-θ)`` backward (tables that
    require grad take the traced formula instead).
    """
    if isinstance(be, str):
        if not (cos.requires_grad or sin.requires_grad):
            return _rotate_op(x, cos, sin, layout, conjugate, be)
        be = _eager
    if getattr(be, "DIFFERENTIABLE", False):
        return be.apply(x, cos, sin, layout, conjugate).to(x.dtype)
    return _rotate_functional(x, cos, sin, layout, conjugate)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, layout, backend, inplace):  # type: ignore[override]
        dst = x if inplace else _new_out(backend, x)
        backend.rotate(x, cos, sin, layout, False, dst)
        need_tables_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        saved_x = (x.clone() if inplace else x) if need_tables_grad else None
        if need_tables_grad:
            # x itself is needed only for d/dcos, d/dsin (learnable frequencies)
            ctx.save_for_backward(cos, sin, saved_x)
        else:
            ctx.save_for_backward(cos, sin)
        ctx.layout, ctx.backend, ctx.cos_shape = layout, backend, cos.shape
        if inplace:
            ctx.mark_dirty(x)
        return dst

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        saved = ctx.saved_tensors
        cos, sin = saved[0], saved[1]
        dx = dcos = dsin = None
        if ctx.needs_input_grad[0]:
            # d/dx of R(θ)x is R(θ)ᵀ = R(-θ): the forward with sin -> -sin
            dx = ctx.backend.rotate(g, cos, sin, ctx.layout, True, _new_out(ctx.backend, g))
        if len(saved) == 3:
            x = saved[2]
            r = 2 * cos.shape[-1]
            from .backends.eager import compute_dtype, pair_views

            cdt = compute_dtype(x)
            x1, x2 = (t.to(cdt) for t in pair_views(x, r, ctx.layout))
            g1, g2 = (t.to(cdt) for t in pair_views(g, r, ctx.layout))
            # y1 = x1 c - x2 s, y2 = x2 c + x1 s
            if ctx.needs_input_grad[1]:
                dcos = (g1 * x1 + g2 * x2).sum_to_size(ctx.cos_shape).to(cos.dtype)
            if ctx.needs_input_grad[2]:
                dsin = (g2 * x1 - g1 * x2).sum_to_size(ctx.cos_shape).to(sin.dtype)
        return dx, dcos, dsin, None, None, None


class _RotaryQK(torch.autograd.Function):
    """q and k through a backend's fused ``rotate_qk`` (one pass forward, one pass backward).

    Backward: ``(dq, dk) = R(-θ)(gq, gk)``, again one fused call; only the tables are saved.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, layout, backend, inplace):  # type: ignore[override]
        qo, ko = backend.rotate_qk(q, k, cos, sin, layout, inplace)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no launch for it
        ctx.save_for_backward(cos, sin)
        ctx.layout, ctx.backend = layout, backend
        if inplace:
            ctx.mark_dirty(q, k)
        return qo, ko

    @staticmethod
    def backward(ctx, gq, gk):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        be, layout = ctx.backend, ctx.layout
        if gq is not None and gk is not None and getattr(be, "ROTATE_QK_CONJUGATE", False):
            return (*be.rotate_qk(gq, gk, cos, sin, layout, False, conjugate=True), None, None, None, None, None)
        neg = -sin  # R(θ)ᵀ = R(-θ)
        if gq is not None and gk is not None:
            dq, dk = be.rotate_qk(gq, gk, cos, neg, layout, False)
        else:
            dq = None if gq is None else be.rotate(gq, cos, neg, layout, False, _new_out(be, gq))
            dk = None if gk is None else be.rotate(gk, cos, neg, layout, False, _new_out(be, gk))
        return dq, dk, None, None, None, None, None


def apply_rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    layout: str = "half",
    inplace: bool = False,
    backend: str = "auto",
    out: Optional[torch.Tensor] = None,
    conjugate: bool = False,
) -> torch.Tensor:
    """Rotate the first ``r = 2 * cos.shape[-1]`` dims of ``x``; the rest pass through.

    Args:
        x: ``[..., d]`` float16/bfloat16/float32/float64, any strides (e.g. a ``bshd`` view
            of ``bhsd`` memory).
        cos, sin: half-width tables ``[..., r/2]`` from :func:`ropekit.cos_sin`,
            broadcastable to ``x.shape[:-1] + (r/2,)`` *without* enlarging ``x``
            (e.g. ``[s, 1, r/2]`` for ``x [b, s, h, d]``).
        layout: ``"half"`` pairs ``(i, i + r/2)`` (GPT-NeoX / HF Llama);
            ``"interleaved"`` pairs ``(2i, 2i + 1)`` (RoFormer / GPT-J / Meta llama).
        inplace: write the result into ``x`` and return it (autograd-safe: the backward
            needs no activations). Otherwise ``x`` is never modified.
        backend: ``"auto"``, ``"reference"`` (dense matrix, float64, the oracle),
            ``"complex"``, ``"eager"``, ``"cpu"``, ``"triton"``; see
            :func:`ropekit.backends.available`.
        out: optional preallocated output of ``x``'s shape and dtype (no autograd).
        conjugate: rotate by ``-θ`` instead (the inverse rotation).

    Returns:
        The rotated tensor, ``x``'s shape and dtype.

    Precision: computed in float32 (float64 for float64 ``x``) from the given tables and
    cast once to ``x.dtype``; the ``reference`` backend computes in float64.

    Under ``torch.compile``/``torch.export`` (fullgraph-safe, no graph breaks): ``"auto"``,
    ``"eager"`` and ``"complex"`` trace the eager float32 formula written functionally
    (inductor fuses it), ``"reference"`` its float64 matrix, and any other backend runs
    as the opaque custom op ``ropekit::rotate``. Aliasing of ``out`` with ``x`` is not
    checked while tracing.

    Example:
        >>> from ropekit import RopeConfig, cos_sin
        >>> q = torch.randn(2, 5, 4, 64)                      # [b, s, h, d]
        >>> cos, sin = cos_sin(RopeConfig(64), torch.arange(5))  # [s, r/2]
        >>> apply_rotary(q, cos[:, None], sin[:, None]).shape  # tables [s, 1, r/2]
        torch.Size([2, 5, 4, 64])
    """
    key, out0, inplace0 = None, out, inplace
    if backend in _FAST_QK_BACKENDS:
        # a call shaped like one already validated and run on the CPU kernel (see cpu.fast_rotate)
        try:
            if (
                type(x) is torch.Tensor
                and (out is None or (type(out) is torch.Tensor and not inplace))
                and not (torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad))
                and not tracing()
            ):
                _cpu = _cpu_backend()
                key = _cpu.rotate_key(x, cos, sin, out, layout, inplace, conjugate, backend)
                res = _cpu.fast_rotate(key, x, cos, sin, out, inplace)
                if res is not None:
                    return res
        except (AttributeError, TypeError):
            key = None  # not tensors / unhashable arguments: the checks below say what is wrong
    check_layout(layout)
    check_tables(x, cos, sin)
    be = _resolve(backend, x)
    if inplace and out is not None:
        raise fail("either inplace=True or out=", "both", "drop one of them")
    grad = torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad)
    if out is not None:
        _check_out(x, out)
        if grad:
            raise fail("out= without autograd", "inputs that require grad", "drop out= (or run under torch.no_grad())")
        if (out is x) if tracing() else (out.data_ptr() == x.data_ptr()):
            inplace, out = True, None
        else:
            _check_writable(out, "out")
    if inplace:
        _check_writable(x, "x")
        if grad and x.is_leaf and x.requires_grad:
            raise fail(
                "inplace=True on a tensor autograd may modify",
                "a leaf tensor that requires grad",
                "use inplace=False, or apply to a non-leaf (e.g. the output of the q projection)",
            )
    if x.numel() == 0:
        return x if inplace else (out if out is not None else x.clone())
    if tracing():
        y = _rotate_traced(x, cos, sin, layout, conjugate, be)
        if inplace:
            return x.copy_(y)
        if out is not None:
            return out.copy_(y)
        return y
    if getattr(be, "DIFFERENTIABLE", False):
        y = be.apply(x, cos, sin, layout, conjugate).to(x.dtype)
        if inplace:
            return x.copy_(y)
        if out is not None:
            return out.copy_(y)
        return y
    if out is not None or not grad:
        with torch.no_grad():
            dst = x if inplace else (out if out is not None else _new_out(be, x))
            y = be.rotate(x, cos, sin, layout, conjugate, dst)
        if key is not None and be.NAME == "cpu" and out is out0 and inplace == inplace0:
            be.remember_rotate(key, x, cos, sin, dst, layout, conjugate)  # the call was not rewritten
        return y
    if conjugate:
        sin = -sin
    return _Rotary.apply(x, cos, sin, layout, be, inplace)


def apply_rotary_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    layout: str = "half",
    inplace: bool = False,
    backend: str = "auto",
    conjugate: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys with the same tables; see :func:`apply_rotary`.

    Args:
        q: ``[..., hq, d]`` (e.g. ``[b, s, hq, d]``).
        k: ``[..., hk, d]``; ``hk`` may differ from ``hq`` (GQA/MQA).
        cos, sin: half width, broadcastable to both ``q.shape[:-1] + (r/2,)`` and
            ``k.shape[:-1] + (r/2,)`` — so with a size-1 heads dim.

    Returns:
        ``(q_rot, k_rot)``.
    """
    if not conjugate and backend in _FAST_QK_BACKENDS:
        # a call shaped like one already validated and run on the CPU kernel (decode loops):
        # one dict lookup instead of the checks below (see cpu.fast_qk)
        try:
            plain = type(q) is torch.Tensor and type(k) is torch.Tensor
            if plain and not (
                torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or cos.requires_grad or sin.requires_grad)
            ):
                if not tracing():
                    _cpu = _cpu_backend()
                    key = _cpu.qk_key(q, k, cos, sin, layout, inplace, backend)
                    res = _cpu.fast_qk(key, q, k, cos, sin, inplace)
                    if res is not None:
                        return res
        except (AttributeError, TypeError):
            pass  # not tensors / unhashable layout: the checks below say what is wrong
    check_layout(layout)
    check_tables(q, cos, sin, "q")
    check_tables(k, cos, sin, "k")
    if q.device != k.device:
        raise fail("q and k on one device", f"{q.device} and {k.device}", "move them together")
    if tracing():
        kw = dict(layout=layout, inplace=inplace, backend=backend, conjugate=conjugate)
        return apply_rotary(q, cos, sin, **kw), apply_rotary(k, cos, sin, **kw)
    be = _backends.resolve(backend, q)
    qk = getattr(be, "rotate_qk", None)
    tables_grad = cos.requires_grad or sin.requires_grad
    if qk is not None and not tables_grad and q.numel() and k.numel():
        if inplace:
            for name, t in (("q", q), ("k", k)):
                _check_writable(t, name)
                if torch.is_grad_enabled() and t.is_leaf and t.requires_grad:
                    raise fail(
                        "inplace=True on a tensor autograd may modify",
                        f"{name}: a leaf tensor that requires grad",
                        "use inplace=False, or apply to a non-leaf (e.g. the output of the projection)",
                    )
        if conjugate:
            sin = -sin  # r/2 values per position: small next to q and k
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            return _RotaryQK.apply(q, k, cos, sin, layout, be, inplace)
        with torch.no_grad():
            qo, ko = qk(q, k, cos, sin, layout, inplace)
        if be.NAME == "cpu" and backend in _FAST_QK_BACKENDS and not conjugate and type(q) is torch.Tensor and type(k) is torch.Tensor:
            be.remember_qk(be.qk_key(q, k, cos, sin, layout, inplace, backend), q, k, cos, sin, qo, ko, layout)
        return qo, ko
    kw = dict(layout=layout, inplace=inplace, backend=be.NAME, conjugate=conjugate)
    return apply_rotary(q, cos, sin, **kw), apply_rotary(k, cos, sin, **kw)


class _GatherQK(torch.autograd.Function):
    """Autograd of a backend's fused gather (``rotate_qk_gather``: table rows picked by position).

    The backend module supplies one hook::

        backend._gather_rotate(xs, cos_table, sin_table, pos, fmt, layout, conjugate, inplace) -> list

    rotating each tensor of ``xs`` (1 or 2, in format ``fmt``) by the rows ``pos`` of the
    ``[n, r/2]`` tables (by ``-θ`` when ``conjugate``) and returning the results, ``xs``
    themselves when ``inplace``. With ``conjugate=True, inplace=False`` it must take
    gradients of any strides (expanded ones too, e.g. from ``.sum()``).

    Forward: the hook on ``[q, k]``. Backward: ``R(θ)ᵀ = R(-θ)``, so the same hook conjugated,
    out of place, on the gradients that exist and are needed; only the tables and positions
    are saved (positions are validated by the backend before ``apply``).
    """

    @staticmethod
    def forward(ctx, q, k, cos_table, sin_table, pos, fmt, layout, backend, inplace):  # type: ignore[override]
        qo, ko = backend._gather_rotate([q, k], cos_table, sin_table, pos, fmt, layout, False, inplace)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no launch for it
        ctx.save_for_backward(cos_table, sin_table, pos)
        ctx.fmt, ctx.layout, ctx.backend = fmt, layout, backend
        if inplace:
            ctx.mark_dirty(q, k)
        return qo, ko

    @staticmethod
    def backward(ctx, gq, gk):  # type: ignore[override]
        cos_table, sin_table, pos = ctx.saved_tensors
        grads = [gq, gk]
        idx = [i for i in (0, 1) if grads[i] is not None and ctx.needs_input_grad[i]]
        out = [None, None]
        if idx:
            res = ctx.backend._gather_rotate(
                [grads[i] for i in idx], cos_table, sin_table, pos, ctx.fmt, ctx.layout, True, False
            )
            for i, r in zip(idx, res):
                out[i] = r
        return out[0], out[1], None, None, None, None, None, None, None
