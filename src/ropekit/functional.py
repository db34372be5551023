"""The one public apply: :func:`apply_rotary` and :func:`apply_rotary_qk`, with autograd.

This layer checks what only the Python API has (argument types, bool flags, ``inplace``
with ``out``), resolves the backend (:func:`ropekit.backends.resolve`) and calls its entry
point. The tensor rules belong to each op's one validator (``csrc/ops.cpp``), which every
backend applies (the compiled kernels themselves, the torch-only backends through
:func:`ropekit.ops.check`); a refusal reaches the caller as a :class:`~ropekit.RopeError`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import backends as _backends
from . import ops as _ops
from ._tensor_checks import check_norm_scalars, flags, tensors, to_rope_error, tracing
from ._errors import fail
from .config import RopeConfig, check_layout
from .positions import resolve_positions, split_format, split_qk_format, table_view
from .tables import check_positions, cos_sin_f64

__all__ = ["apply_rotary", "apply_rotary_qk", "apply_qk_norm_rotary", "apply_rotary_gather", "rerotate", "check_tables",
           "tracing"]


def check_tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, name: str = "x") -> int:
    """Validate ``x`` against half-width ``cos``/``sin`` (the ``rotary`` op's rules); return
    the rotary dim ``r``."""
    tensors(**{name: x, "cos": cos, "sin": sin})
    try:
        _ops.check("rotary", x, cos, sin)
    except ValueError as e:
        raise to_rope_error(e) from None
    return 2 * cos.shape[-1]


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
    (inductor fuses it), ``"reference"`` its float64 matrix, ``"cpu"`` (the CPU ``auto``)
    the operator ``ropekit::rotary``, and a registered plugin backend the opaque custom op
    ``ropekit::generic_rotate``. Aliasing of ``out`` with ``x`` is not
    checked while tracing.

    Example:
        >>> from ropekit import RopeConfig, cos_sin
        >>> q = torch.randn(2, 5, 4, 64)                      # [b, s, h, d]
        >>> cos, sin = cos_sin(RopeConfig(64), torch.arange(5))  # [s, r/2]
        >>> apply_rotary(q, cos[:, None], sin[:, None]).shape  # tables [s, 1, r/2]
        torch.Size([2, 5, 4, 64])
    """
    if not (isinstance(x, torch.Tensor) and isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor)):
        tensors(x=x, cos=cos, sin=sin)
    if not ((inplace is False or inplace is True) and (conjugate is False or conjugate is True)):
        flags(inplace=inplace, conjugate=conjugate)
    if out is not None:
        tensors(out=out)
        if inplace:
            raise fail("either inplace=True or out=", "both", "drop one of them")
        if out is x:
            inplace, out = True, None
    if layout != "half" and layout != "interleaved":
        check_layout(layout)
    be = _resolve(backend, x)
    try:
        return be.apply(x, cos, sin, layout, conjugate, inplace, out)
    except (ValueError, RuntimeError) as e:
        raise to_rope_error(e) from None


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
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(cos, torch.Tensor)
            and isinstance(sin, torch.Tensor)):
        tensors(q=q, k=k, cos=cos, sin=sin)
    if not ((inplace is False or inplace is True) and (conjugate is False or conjugate is True)):
        flags(inplace=inplace, conjugate=conjugate)
    if layout != "half" and layout != "interleaved":
        check_layout(layout)
    be = _resolve(backend, q, "q")
    try:
        return be.apply_qk(q, k, cos, sin, layout, conjugate, inplace)
    except (ValueError, RuntimeError) as e:
        raise to_rope_error(e) from None


def apply_qk_norm_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    eps: float = 1e-6,
    weight_offset: float = 0.0,
    layout: str = "half",
    inplace: bool = False,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of ``q`` and ``k``, then RoPE: the attention prologue of Qwen3,
    Qwen3-MoE, Gemma 3, OLMo-style QK-norm models, in one pass over memory.

    Per head (each row of ``d`` elements)::

        y = x / sqrt(mean(x²) + eps) * (weight_offset + weight)     # over all d dims
        out = rot(y)                                                 # the first r dims; the rest pass

    Gemma's ``(1 + w)`` weight is ``weight_offset=1.0``.

    Args:
        q: ``[..., hq, d]`` (e.g. ``[b, s, hq, d]``), any strides, as :func:`apply_rotary_qk`.
        k: ``[..., hk, d]``; ``hk`` may differ from ``hq`` (GQA/MQA).
        q_weight, k_weight: ``[d]`` norm weights (shared by every head), any float dtype.
        cos, sin: half-width tables ``[..., r/2]`` broadcastable to both ``q.shape[:-1] +
            (r/2,)`` and ``k.shape[:-1] + (r/2,)`` (``r <= d``: partial rotary).
        eps: added to the mean square (``>= 0``).
        weight_offset: added to the weights (``0.0``; ``1.0`` for Gemma).
        layout: ``"half"`` or ``"interleaved"``.
        inplace: write the results into ``q`` and ``k`` and return them.
        backend: ``"auto"`` (the fused ``cpu`` operator on CPU, the fused ``triton`` kernel on
            CUDA), or any backend of :func:`apply_rotary` (those without a fused kernel run
            the float32 norm in torch, then their rotation).

    Returns:
        ``(q_out, k_out)``, shapes and dtypes of ``q`` and ``k``.

    Precision: the mean square is accumulated in float32 (float64 for float64 inputs), the
    norm, weight and rotation are computed in float32 and rounded once to the output dtype.
    (transformers' Qwen3 norm rounds the normalised value to the input dtype before the
    weight and again before RoPE; in bfloat16 the fused result is the more exact one.)

    Autograd: differentiable in ``q``, ``k``, ``q_weight`` and ``k_weight``. The fused
    backends save ``q`` and ``k`` (a copy when ``inplace=True``: their values are
    overwritten), the weights, the tables and the inverse RMS of every head in float32
    (``q.numel() / d`` + ``k.numel() / d`` values: 4 bytes per head and token).

    Example:
        >>> from ropekit import RopeConfig, cos_sin
        >>> q, k = torch.randn(1, 5, 8, 64), torch.randn(1, 5, 2, 64)        # [b, s, h, d]
        >>> wq, wk = torch.ones(64), torch.ones(64)
        >>> cos, sin = cos_sin(RopeConfig(64), torch.arange(5))               # [s, r/2]
        >>> qo, ko = apply_qk_norm_rotary(q, k, wq, wk, cos[:, None], sin[:, None])
        >>> qo.shape, ko.shape
        (torch.Size([1, 5, 8, 64]), torch.Size([1, 5, 2, 64]))
    """
    eps, weight_offset = check_norm_scalars(eps, weight_offset)
    if inplace is not False and inplace is not True:
        flags(inplace=inplace)
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(q_weight, torch.Tensor)
            and isinstance(k_weight, torch.Tensor) and isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor)):
        tensors(q=q, k=k, q_weight=q_weight, k_weight=k_weight, cos=cos, sin=sin)
    if layout != "half" and layout != "interleaved":
        check_layout(layout)
    be = _resolve(backend, q, "q")
    try:
        return be.apply_qk_norm(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout, inplace)
    except (ValueError, RuntimeError) as e:
        raise to_rope_error(e) from None


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
    if not ((inplace is False or inplace is True) and (conjugate is False or conjugate is True)):
        flags(inplace=inplace, conjugate=conjugate)
    if layout != "half" and layout != "interleaved":
        check_layout(layout)
    be = _resolve(backend, q, "q")
    try:
        return be.apply_gather(q, k, cos_table, sin_table, positions, format, layout, conjugate, inplace)
    except (ValueError, RuntimeError) as e:
        raise to_rope_error(e) from None


def apply_rotary_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    *,
    positions: Optional[torch.Tensor] = None,
    offsets=None,
    cu_seqlens: Optional[torch.Tensor] = None,
    format: str = "bshd",
    layout: str = "half",
    inplace: bool = False,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` with the rows of user tables picked by position inside the kernel.

    The call of flash-attention's ``seqlen_offsets`` and vLLM's ``cos_sin_cache`` + positions:
    row ``p`` of the ``[n, r/2]`` tables holds cos/sin of position ``p``; each token takes
    the row of its position (the ``cpu`` and ``triton`` backends gather inside the kernel,
    the others gather in torch first). Dims past ``r`` pass through.

    Args:
        q: ``[b, s, hq, d]`` / ``[b, hq, s, d]`` / ``[s, b, hq, d]`` / ``[t, hq, d]`` by ``format``.
        k: the same format and sizes with ``hk`` heads (``hk`` may differ, and may be 0).
        cos_table, sin_table: ``[n, r/2]`` half-width tables for positions ``0 .. n-1``
            (e.g. ``ropekit.cos_sin(cfg, torch.arange(n))``; any float dtype).
        positions: integer ``[s]`` (shared by the batch), ``[b, s]``, or ``[t]`` (``thd``).
        offsets: int or ``[b]`` added to ``0 .. s-1``; for ``thd`` with ``cu_seqlens``,
            an int or ``[len(cu_seqlens) - 1]``: sequence ``i`` counts from ``offsets[i]``.
        cu_seqlens: ``[n_seqs + 1]`` packed boundaries (``thd``); positions restart per sequence.
            With none of positions/offsets/cu_seqlens, positions are ``0 .. s-1`` (not for
            ``thd``, which has no ``s``: it needs ``cu_seqlens`` or ``positions``, a RopeError
            otherwise).
        format: ``"bshd"``, ``"bhsd"``, ``"sbhd"`` or ``"thd"``.
        layout: ``"half"`` or ``"interleaved"``.
        inplace: write into ``q`` and ``k`` and return them.
        backend: as in :func:`apply_rotary`.

    Returns:
        ``(q_rot, k_rot)``, shapes and dtypes of ``q`` and ``k``. Differentiable in ``q``
        and ``k`` (the backward is the same gather by ``-θ``).

    Raises RopeError for a position outside ``[0, n)`` (before anything is written).

    Example:
        >>> from ropekit import RopeConfig, cos_sin
        >>> cos_t, sin_t = cos_sin(RopeConfig(64), torch.arange(128))        # [n, r/2]
        >>> q, k = torch.randn(6, 4, 64), torch.randn(6, 2, 64)               # [t, h, d]
        >>> cu = torch.tensor([0, 2, 6])                                       # two sequences
        >>> q2, k2 = apply_rotary_gather(q, k, cos_t, sin_t, cu_seqlens=cu, offsets=torch.tensor([10, 0]), format="thd")
        >>> q2.shape, k2.shape
        (torch.Size([6, 4, 64]), torch.Size([6, 2, 64]))
    """
    tensors(q=q, k=k, cos_table=cos_table, sin_table=sin_table)
    flags(inplace=inplace)
    check_layout(layout)
    b, s = split_qk_format(q, k, format)
    pos = resolve_positions(format, b, s, positions=positions, offsets=offsets, cu_seqlens=cu_seqlens, device=q.device,
                            check_values=False)
    if pos.dim() == 2 and pos.shape[0] == 1:
        pos = pos[0]
    return apply_gather(q, k, cos_table, sin_table, pos, format=format, layout=layout, inplace=inplace, backend=backend)


def _not_additive(cfg) -> Optional[str]:
    """Why positions of ``cfg`` do not combine additively (``None`` when they do)."""
    sc = cfg.scaling
    if sc is not None and getattr(sc, "length_dependent", False):
        name = type(sc).__name__
        return (
            f"{name} scaling, whose frequencies depend on the sequence length (dynamic NTK rescales the base as "
            "the sequence grows; LongRoPE switches factor sets past its original context), so θ(n) - θ(m) is not "
            "(n - m)·θ: keys rotated at m used other frequencies than a rotation to n would"
        )
    return None


def rerotate(
    x: torch.Tensor,
    cfg: RopeConfig,
    old_positions,
    new_positions,
    *,
    layout: Optional[str] = None,
    format: str = "bshd",
    inplace: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Move keys rotated at position ``m`` to position ``n``: rotate by exactly ``θ(n) - θ(m)``.

    For KV-cache eviction with attention sinks (StreamingLLM), key re-rotation after
    compression, llama.cpp's K-shift. The angle difference is formed in float64 from the
    integer positions, ``(n - m) · inv_freq``, and rounded once to the table dtype; the
    rotation is pure (no attention factor: a YaRN/LongRoPE ``mscale`` already folded into
    the keys is not applied again, and norms are preserved up to rounding), then applied
    through :func:`apply_rotary` (every backend, autograd, in place). Only the dims
    ``cfg.rotary_offset .. cfg.rotary_offset + cfg.rotary_dim - 1`` rotate (partial rotary,
    MLA heads ``[nope | rope]``); the rest pass through. Keys of a ``cfg.direction = -1``
    config (rotated by ``-m·θ``) move by ``-(θ(n) - θ(m))``.

    Args:
        x: keys ``[b, s, h, d]`` / ``[b, h, s, d]`` / ``[s, b, h, d]`` / ``[t, h, d]`` by ``format``,
            ``d = cfg.head_dim`` (a RopeError otherwise).
        cfg: the :class:`~ropekit.RopeConfig` the keys were rotated with.
        old_positions, new_positions: integer positions, each ``[s]`` (shared by the batch),
            ``[b, s]`` or ``[t]`` (``thd``) per token, or ``[b]`` per sequence (broadcast over
            ``s``; not for ``thd``). A 1-D tensor of length ``s`` is per token (also when
            ``b == s``). The two may take different forms (e.g. per-token old, per-sequence new).
        layout: pair layout; default ``cfg.layout``.
        format: ``"bshd"``, ``"bhsd"``, ``"sbhd"`` or ``"thd"``.
        inplace: rotate ``x`` in place.
        backend: as in :func:`apply_rotary`.

    Returns:
        The keys rotated to ``new_positions``, ``x``'s shape and dtype.

    Refused (RopeError): length-dependent scaling (dynamic NTK, LongRoPE), whose
    frequencies change with the sequence length, so angles do not add. (xPos is not a
    ``RopeConfig``: its key scale ``ζ^(-n/B)`` is not a rotation; re-build its keys.)

    Precision: the angle ``(n - m)·θ_i`` is one float64 product of an exact integer; the
    rotation runs in float32 (float64 for float64 ``x``) and rounds once to ``x.dtype``.
    Repeated small shifts of a bfloat16 cache still round once per shift (the cache is
    stored in bfloat16 in between); rerotating once from the original positions does not.

    Example:
        >>> from ropekit import RopeConfig, RotaryEmbedding
        >>> cfg = RopeConfig(head_dim=64)
        >>> q, k = RotaryEmbedding(cfg)(torch.randn(1, 8, 4, 64), torch.randn(1, 8, 2, 64))  # k at 0..7
        >>> k_moved = rerotate(k, cfg, torch.arange(8), torch.arange(8) + 100)               # now at 100..107
        >>> k_back = rerotate(k_moved, cfg, torch.arange(8) + 100, torch.arange(8))
        >>> bool(torch.allclose(k_back, k, atol=1e-5))
        True
    """
    if not isinstance(x, torch.Tensor):
        raise fail("x a torch.Tensor", type(x).__name__, "convert x with torch.as_tensor")
    flags(inplace=inplace)
    if not isinstance(cfg, RopeConfig):
        if all(hasattr(cfg, a) for a in ("cos_q", "sin_q", "cos_k", "sin_k")):
            raise fail(
                "cfg a ropekit.RopeConfig whose positions combine additively",
                "xPos tables",
                "xPos scales keys by ζ^(-(n-c)/B) besides rotating them, which is not a rotation by θ(n) - θ(m): "
                "recompute the keys from the unrotated projections with the new positions",
            )
        raise fail("cfg a ropekit.RopeConfig", type(cfg).__name__, "pass the config the keys were rotated with")
    why = _not_additive(cfg)
    if why is not None:
        raise fail(
            "a config whose positions combine additively (θ(n) - θ(m) = (n - m)·θ)",
            why,
            "recompute the keys from the unrotated projections at the new positions (or use a fixed-frequency "
            "scaling: Linear, NTK, YaRN, Llama3)",
        )
    layout = cfg.layout if layout is None else layout
    check_layout(layout)
    b, s = split_format(x, format, "x")
    # the rope part alone (MLA's separately cached k_pe: width rotary_dim < head_dim) rotates whole
    rope_only = bool(x.dim()) and cfg.rotary_dim < cfg.head_dim and x.shape[-1] == cfg.rotary_dim
    if x.dim() and x.shape[-1] != cfg.head_dim and not rope_only:
        raise fail(f"x with the config's head width cfg.head_dim = {cfg.head_dim}"
                   + (f" (or its rope part alone, cfg.rotary_dim = {cfg.rotary_dim})" if cfg.rotary_dim < cfg.head_dim
                      else ""),
                   f"x of head width {x.shape[-1]} (shape {tuple(x.shape)})",
                   "pass the config the keys were rotated with (its head_dim is the keys' last dim), or check the "
                   "[..., heads, head_dim] reshape of x")
    deltas = []
    for nm, p in (("old_positions", old_positions), ("new_positions", new_positions)):
        check_positions(p, nm)
        ok = [(s,)] if format == "thd" else [(s,), (b, s), (b,)]
        if tuple(p.shape) not in ok:
            raise fail(
                f"{nm} of shape {' or '.join(str(list(o)) for o in ok)} for x in format {format!r}"
                + ("" if format == "thd" else " (per token, or [b] per sequence)"),
                f"shape {list(p.shape)}",
                "one position per token (or per sequence), as the keys were rotated",
            )
        p = p.to(device=x.device, dtype=torch.int64)
        if format != "thd" and p.dim() == 1 and p.shape[0] != s:
            p = p[:, None]  # per sequence [b] -> [b, 1] (a 1-D tensor of length s, even when b == s, is per token)
        deltas.append(p)
    old, new = deltas
    if old.dim() != new.dim():  # [s] against [b, 1]/[b, s]: all as [b|1, s|1]
        old, new = (t[None] if t.dim() == 1 else t for t in (old, new))
    d = new - old  # exact int64 shift (positions <= 2**53)
    inv = cfg.inv_freq().to(x.device)  # [r/2] float64 (length-independent, checked above)
    ang = d.to(torch.float64).unsqueeze(-1) * inv  # [..., r/2] float64: (n - m)·θ, one rounding
    tdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = (t.to(tdt) for t in cos_sin_f64(ang))
    cos, sin = table_view(cos, format, d.dim()), table_view(sin, format, d.dim())  # broadcastable to x
    conj, o = cfg.direction == -1, 0 if rope_only else cfg.rotary_offset  # direction -1: by -(θ(n) - θ(m))
    if not o:
        return apply_rotary(x, cos, sin, layout=layout, inplace=inplace, backend=backend, conjugate=conj)
    out = x if inplace else x.clone()  # MLA heads [nope | rope]: dims o .. o + r - 1 rotate, the others pass through
    apply_rotary(out[..., o:], cos, sin, layout=layout, inplace=True, backend=backend, conjugate=conj)
    return out
