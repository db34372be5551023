"""Input checks of the apply API (tensors), in one place (each raises a RopeError in the house format).

Used by :mod:`ropekit.functional` before calling a backend that does not check its inputs
itself, and to explain a refusal of one that does (the compiled operators check in C++).
"""

from __future__ import annotations

import math

import torch

from ._errors import RopeError, fail
from .config import check_layout

__all__ = ["check_tables", "check_apply", "check_qk", "check_qk_norm", "check_norm_scalars", "explain", "disjoint"]

_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def disjoint(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` provably share no element (the compiled operators' test, in Python).

    Different storages or disjoint byte ranges; or (views of one fused qkv buffer) equal
    strides and sizes except along one dim ``j``, offset by a multiple of its stride so that
    both are disjoint index ranges of one non-overlapping strided tensor.
    """
    if a.numel() == 0 or b.numel() == 0 or tracing():
        return True
    sa, sb = a.untyped_storage(), b.untyped_storage()
    if sa.data_ptr() != sb.data_ptr():
        return True
    if sa.data_ptr() == 0 and sa._cdata != sb._cdata:  # meta tensors (no data): one storage object each
        return True
    es = a.element_size()
    pa, pb = a.storage_offset() * es, b.storage_offset() * b.element_size()  # bytes into the one storage

    def span(t):
        return (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()

    if pa + span(a) <= pb or pb + span(b) <= pa:
        return True
    if a.dim() != b.dim() or a.stride() != b.stride() or b.element_size() != es or (pb - pa) % es:
        return False
    delta = (pb - pa) // es
    for j, st in enumerate(a.stride()):
        if st <= 0 or delta % st or any(a.shape[i] != b.shape[i] for i in range(a.dim()) if i != j):
            continue
        c, n_lo, n_hi = delta // st, a.shape[j], b.shape[j]
        if c < 0:
            c, n_lo, n_hi = -c, n_hi, n_lo
        if c < n_lo:
            continue
        sizes = list(a.shape)
        sizes[j] = c + n_hi
        if _provably_non_overlapping(_Shape(sizes, a.stride())):
            return True
    return False


class _Shape:
    """Sizes and strides, enough for :func:`_provably_non_overlapping`."""

    def __init__(self, shape, stride):
        self.shape, self._stride = tuple(shape), tuple(stride)

    def stride(self):
        return self._stride


def check_inplace(t: torch.Tensor, name: str) -> None:
    _check_writable(t, name)
    if torch.is_grad_enabled() and t.is_leaf and t.requires_grad:
        raise fail(
            "inplace=True on a tensor autograd may modify",
            f"{name}: a leaf tensor that requires grad",
            "use inplace=False, or apply to a non-leaf (e.g. the output of the projection)",
        )


def check_apply(x, cos, sin, layout, inplace, out) -> None:
    """Every check of :func:`apply_rotary` (raises a RopeError)."""
    check_layout(layout)
    check_tables(x, cos, sin)
    if inplace and out is not None:
        raise fail("either inplace=True or out=", "both", "drop one of them")
    if out is not None:
        _check_out(x, out)
        if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):
            raise fail("out= without autograd", "inputs that require grad", "drop out= (or run under torch.no_grad())")
        if not ((out is x) if tracing() else (out.data_ptr() == x.data_ptr() and out.stride() == x.stride())):
            _check_writable(out, "out")
    if inplace:
        check_inplace(x, "x")


def check_qk(q, k, cos, sin, layout, inplace) -> None:
    """Every check of :func:`apply_rotary_qk` (raises a RopeError)."""
    check_layout(layout)
    check_tables(q, cos, sin, "q")
    check_tables(k, cos, sin, "k")
    if q.device != k.device:
        raise fail("q and k on one device", f"{q.device} and {k.device}", "move them together")
    if inplace:
        check_inplace(q, "q")
        check_inplace(k, "k")
        check_qk_disjoint(q, k)


def check_qk_disjoint(q, k) -> None:
    if not disjoint(q, k):
        raise fail(
            "q and k that share no memory when rotated in place",
            f"q {tuple(q.shape)} stride {q.stride()} and k {tuple(k.shape)} stride {k.stride()} overlapping in one "
            "storage (each shared element would be rotated twice)",
            "rotate q and k in separate calls, or use inplace=False",
        )


def explain(err: Exception, check) -> RopeError:
    """The RopeError for a call a backend's own checks refused with ``err``.

    ``check()`` runs the Python checks of the call: the RopeError they raise says what was
    wrong in the API's words. When they pass (a condition only the backend checks, e.g. q
    and k overlapping in place, or positions outside the table), the backend's own message
    (``"ropekit: expected ..., got .... Fix: ..."``) becomes the RopeError.
    """
    try:
        check()
    except RopeError as e:
        return e
    msg = str(err).split("\nException raised from")[0].strip()
    if msg.startswith("ropekit: "):
        return RopeError(msg[len("ropekit: "):])
    return fail("inputs the backend accepts", f"{type(err).__name__}: {msg}", "check the shapes, dtypes and devices of the inputs")


def check_gather_fake(q, k, cos_table, sin_table, positions, fmt, layout) -> None:
    """The shape checks of a fused gather for fake/meta tensors (values are not checked)."""
    from .positions import split_format

    check_layout(layout)
    b, s = split_format(q, fmt)
    if split_format(k, fmt, "k") != (b, s):
        raise fail(f"q and k with the same batch and sequence sizes in format {fmt!r}",
                   f"q {tuple(q.shape)} and k {tuple(k.shape)}", "rotate them in separate calls")
    for nm, t in (("cos_table", cos_table), ("sin_table", sin_table)):
        if t.dim() != 2 or 2 * t.shape[1] > q.shape[-1]:
            raise fail(f"{nm} a float [n, r/2] table with r/2 <= d/2", f"shape {tuple(t.shape)}",
                       "pass the tables of RotaryEmbedding.tables(n)")
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise fail("positions an integer tensor", str(positions.dtype), "pass int64 positions")


def check_qk_norm(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout, inplace) -> None:
    """Every check of :func:`ropekit.apply_qk_norm_rotary` (raises a RopeError)."""
    check_qk(q, k, cos, sin, layout, inplace)
    for nm, w, x in (("q_weight", q_weight, q), ("k_weight", k_weight, k)):
        xn = nm[0]
        if not isinstance(w, torch.Tensor):
            raise fail(f"{nm} a torch.Tensor of shape [{x.shape[-1]}]", type(w).__name__,
                       f"pass the norm's weight (e.g. attn.{xn}_norm.weight)")
        if w.dtype not in _X_DTYPES:
            raise fail(f"{nm} of a real floating dtype {_X_DTYPES}", f"{nm}.dtype={w.dtype}", f"convert it: {nm}.float()")
        if w.device != x.device:
            raise fail(f"{nm} on {xn}'s device {x.device}", f"{nm} on {w.device}", f"move it: {nm}.to({xn}.device)")
        if tuple(w.shape) != (x.shape[-1],):
            raise fail(
                f"{nm} of shape [{x.shape[-1]}] ({xn}'s head dim: one weight per dim, shared by every head)",
                f"shape {list(w.shape)}",
                "pass the per-head norm's weight [head_dim] (a norm over all heads, [h * d], is not a per-head norm)",
            )
    check_norm_scalars(eps, weight_offset)


def check_norm_scalars(eps, weight_offset):
    """``(eps, weight_offset)`` as floats: eps finite and >= 0, the offset finite (RopeError
    otherwise: a bool or a string is not a number). Plain floats pass without a call."""
    from ._checks import real

    if not (type(eps) is float and 0.0 <= eps < math.inf):
        eps = real("eps", eps, minimum=0.0, fix="pass the norm's epsilon, e.g. eps=1e-6")
    if not (type(weight_offset) is float and -math.inf < weight_offset < math.inf):
        weight_offset = real("weight_offset", weight_offset, fix="pass 0.0 (y = x̂·w) or 1.0 (Gemma: y = x̂·(1 + w))")
    return eps, weight_offset
