"""The one public apply: :func:`apply_rotary` and :func:`apply_rotary_qk`, with autograd.

This layer validates and resolves: it picks the backend (:func:`ropekit.backends.resolve`)
and calls its entry point; autograd, graphs and in-place handling belong to the backend
(the compiled operators do them in C++, the others share :mod:`ropekit.backends._generic`).
A backend that validates its inputs itself (``CHECKS = True``: the compiled ``cpu``
operators, whose checks run in C++) is called straight away, and a refusal is explained
here, after the fact, as a :class:`~ropekit.RopeError` with the same information as the
Python checks give every other backend.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import backends as _backends
from ._tensor_checks import check_inplace, check_qk_disjoint, check_apply, check_qk, check_tables, explain, tracing
from ._errors import fail

__all__ = ["apply_rotary", "apply_rotary_qk", "check_tables", "tracing"]


def _resolve(backend: str, x, name: str = "x") -> "object":
    if not isinstance(x, torch.Tensor):
        raise fail(f"{name} a torch.Tensor", type(x).__name__, f"convert {name} with torch.as_tensor")
    return _backends.resolve(backend, x)


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
    be = _resolve(backend, x)
    if be.CHECKS:
        try:
            return be.apply(x, cos, sin, layout, conjugate, inplace, out)
        except (ValueError, RuntimeError, TypeError) as e:
            raise explain(e, lambda: check_apply(x, cos, sin, layout, inplace, out)) from None
    check_apply(x, cos, sin, layout, inplace, out)
    if out is not None and ((out is x) if tracing() else out.data_ptr() == x.data_ptr()):
        inplace, out = True, None
    return be.apply(x, cos, sin, layout, conjugate, inplace, out)


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
    be = _resolve(backend, q, "q")
    if be.CHECKS:
        try:
            return be.apply_qk(q, k, cos, sin, layout, conjugate, inplace)
        except (ValueError, RuntimeError, TypeError) as e:
            raise explain(e, lambda: check_qk(q, k, cos, sin, layout, inplace)) from None
    check_qk(q, k, cos, sin, layout, inplace)
    return be.apply_qk(q, k, cos, sin, layout, conjugate, inplace)


def apply_gather(q, k, cos_table, sin_table, positions, *, format: str, layout: str, inplace: bool, backend: str,
                 conjugate: bool = False):
    """``(q_rot, k_rot)`` with the rows ``positions`` of ``[n, r/2]`` tables, picked inside the
    kernel where the backend can (used by :class:`ropekit.RotaryEmbedding`).

    Args:
        q: ``[b, s, hq, d]`` / ``[b, hq, s, d]`` / ``[s, b, hq, d]`` / ``[t, hq, d]`` by ``format``.
        k: the same format with ``hk`` heads.
        cos_table, sin_table: ``[n, r/2]`` tables for positions ``0 .. n-1``.
        positions: integer ``[s]`` (shared by the batch), ``[b, s]`` or ``[t]`` (``thd``),
            every value in ``[0, n)`` (a RopeError otherwise; the ``cpu`` operator checks
            them itself, the caller checks them for other backends).
    """
    be = _resolve(backend, q, "q")
    if be.CHECKS:
        try:
            return be.apply_gather(q, k, cos_table, sin_table, positions, format, layout, conjugate, inplace)
        except (ValueError, RuntimeError, TypeError) as e:
            raise explain(e, lambda: check_qk(q, k, cos_table[:1], sin_table[:1], layout, inplace)) from None
    if inplace:
        check_inplace(q, "q")
        check_inplace(k, "k")
        check_qk_disjoint(q, k)
    return be.apply_gather(q, k, cos_table, sin_table, positions, format, layout, conjugate, inplace)
