"""Serving: RoPE fused with the KV-cache write, one scaling profile per sequence, and exact
re-rotation of keys where they live (dense, paged and packed caches).

Shapes: ``t`` tokens of a step (packed over the batch), ``hq``/``hk`` heads, ``d`` head dim,
``r`` rotary dim, ``N`` cache blocks of ``B`` slots, ``P`` scaling profiles, ``n`` table rows.

Caches (``cache_layout``):

- ``"nhd"``: ``[N, B, hk, d]`` (vLLM/FlashInfer's NHD paged layout); a dense ``[b, s_max, hk, d]``
  cache is the same thing with ``B = s_max`` (``"bshd"``: slot = ``i * s_max + position``);
- ``"hnd"``: ``[N, hk, B, d]``.

A slot is flat: ``block * B + offset``; a negative slot is not written (padding, rejected
speculative tokens). Any strides with a unit last stride: the K and V halves of a packed
cache are views of one buffer.

Per-sequence profiles: tables of ``P`` profiles stacked ``[P, n, r/2]``; sequence ``i`` reads
profile ``profile[i]``. :func:`apply_rotary_profiles` flattens the stack to ``[P*n, r/2]``
(a view) and offsets each position by ``profile * n``, so one call of the ordinary gather
operator serves the whole mixed batch (one integer add more than a single-profile call).

The LongRoPE rule (:func:`longrope_profile`): a sequence takes the long factors when its
*planned* total length (prompt + the most tokens it may generate) exceeds the model's
original context, else the short ones — decided once, when the sequence is admitted, and
kept for its lifetime, so its cached keys and its new queries always share one rotation.
A sequence that outgrows its plan switches explicitly: :func:`rerotate_cache` moves its
cached keys from the short to the long frequencies (``old_seq_len``/``new_seq_len``), then
its profile index becomes 1. Dynamic NTK the same way, one profile per length bucket.

Under torch.compile (``fullgraph=True`` too) a call refuses what the eager call refuses, with the
same RopeError, raised by the graph when it runs and before anything is written: tensor rules
on the traced tensors (``ropekit::refuse``), values in ``ropekit::serving_values``, Python's own
checks in ``ropekit::serving_refuse``. :func:`rerotate_cache` traces as one graph.

Example:
    >>> import torch, ropekit
    >>> from ropekit import serving
    >>> cfg = ropekit.RopeConfig(head_dim=64)
    >>> cos_t, sin_t = ropekit.cos_sin(cfg, torch.arange(256))               # [n, r/2]
    >>> k_cache = torch.zeros(4, 16, 2, 64)                                  # [N, B, hk, d] paged
    >>> q, k = torch.randn(3, 8, 64), torch.randn(3, 2, 64)                  # [t, h, d] decode
    >>> positions, slots = torch.tensor([5, 17, 0]), torch.tensor([5, 33, -1])
    >>> q = serving.apply_rotary_cache(q, k, cos_t, sin_t, positions, k_cache, slots=slots)
    >>> ref = ropekit.apply_rotary_gather(k[:1], k[:1], cos_t, sin_t, positions=positions[:1], format="thd")[1]
    >>> bool(torch.equal(k_cache[0, 5], ref[0]))                             # the same bits
    True
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import ops as _ops
from ._checks import integer
from ._errors import RopeError, fail
from ._tensor_checks import flags, host_readable, tensors, to_rope_error, tracing
from .config import MAX_EXACT_POSITION, RopeConfig, check_layout
from .functional import apply_gather, apply_rotary_gather
from .positions import split_qk_format
from .tables import check_positions, cos_sin, cos_sin_f64

__all__ = [
    "apply_rotary_cache",
    "rerotate_cache",
    "cache_rows",
    "stack_profiles",
    "profile_tables",
    "longrope_profile",
    "apply_rotary_profiles",
    "profile_positions",
]

_CACHE_LAYOUTS = ("nhd", "bshd", "hnd")


def _check_cache_layout(cache_layout) -> str:
    if cache_layout not in _CACHE_LAYOUTS:
        raise fail(f"cache_layout in {_CACHE_LAYOUTS}", repr(cache_layout),
                   "'nhd' for [num_blocks, block_size, h, d] ('bshd': a dense [b, s_max, h, d] cache), "
                   "'hnd' for [num_blocks, h, block_size, d]")
    return cache_layout


def _op_device(t: torch.Tensor) -> bool:
    """Whether ``ropekit::rotary_cache_`` has a kernel for ``t``'s device."""
    return _ops.LOADED and t.device.type in ("cpu", "cuda", "meta")


# --------------------------------------------------------------------------------------
# value checks: on the host in eager calls, inside the graph under torch.compile
# --------------------------------------------------------------------------------------


def _in_graph() -> bool:
    """Whether torch.compile traces the caller: the value checks then go into the graph as
    ``ropekit::serving_values`` (the pattern of ``ropekit::positions_in_range``), which raises
    the eager call's RopeError when the graph runs, before anything reads past a cache or table
    or writes. Not under torch.export (its programs stay plain aten)."""
    return tracing() and not torch.compiler.is_exporting()


def _is_int(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _uint64_slots(slots: torch.Tensor, nslots: int) -> None:
    """A uint64 slot of 2**63 or more would read as a negative slot (skipped) once converted to
    int64: refused as a slot past the cache."""
    if slots.dtype == torch.uint64 and slots.numel() and bool((slots.view(torch.int64) < 0).any()):
        raise fail(f"slots below num_blocks * block_size = {nslots} (negative: not written)",
                   "a uint64 slot of 2**63 or more", "pass int64 slots (block * block_size + offset, -1 to skip)")


def _cache_values(positions: torch.Tensor, slots: torch.Tensor, n: int, nslots: int) -> None:
    """``rotary_cache_``'s value rules with the CPU kernel's messages: positions in ``[0, n)``,
    slots below ``nslots``, no slot twice."""
    from .backends._triton_cache import _check_values_host

    _uint64_slots(slots, nslots)
    _check_values_host(positions.reshape(-1).to(torch.int64), slots.reshape(-1).to(torch.int64), n, nslots)


def _slots_below(slots: torch.Tensor, nb: int, bs: int) -> None:
    """Flat slots below ``N * B`` (negative: skipped), before a gather reads them."""
    if not slots.numel():
        return
    if slots.dtype == torch.uint64 and bool((slots.view(torch.int64) < 0).any()):
        got = "a uint64 slot of 2**63 or more"
    else:  # (torch has no max for uint16/32/64: read them as int64, exactly)
        top = int((slots if slots.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
                   else slots.to(torch.int64)).max())
        if top < nb * bs:
            return
        got = f"a slot of {top}"
    raise fail(f"slots below N * B = {nb * bs} (the cache's {nb} blocks of {bs} slots)", got,
               "pass flat slots block * B + offset of this cache")


def _rerotate_values(slots: torch.Tensor, old: torch.Tensor, new: torch.Tensor, nb: int, bs: int) -> None:
    check_positions(old, "old_positions")
    check_positions(new, "new_positions")
    _slots_below(slots, nb, bs)


def _rows_values(slots: torch.Tensor, nb: int, bs: int) -> None:
    _slots_below(slots, nb, bs)


def _profile_values(pos: torch.Tensor, prof: torch.Tensor, P: int, n: int) -> None:
    """Profile indices in ``[0, P)`` and positions in ``[0, n)`` (a position past ``n`` would read
    the next profile's row)."""
    for nm, t, hi in (("profile indices", prof, P), ("positions", pos, n)):
        if t.numel():
            if t.numel() <= 1024 and t.is_cpu:  # a few values: a list read costs less than an aten reduction
                vals = t.flatten().tolist()
                lo_v, hi_v = min(vals), max(vals)
            else:
                lo_v, hi_v = (int(x) for x in torch.aminmax(t))
            if lo_v < 0 or hi_v >= hi:
                raise fail(f"{nm} in [0, {hi})" + (" (the profile tables' length)" if nm == "positions" else ""),
                           f"{nm} from {lo_v} to {hi_v}",
                           "index the stacked tables' first dim" if nm != "positions" else "build longer tables")


_VALUE_CHECKS = {"cache": _cache_values, "uint64 slots": _uint64_slots, "rerotate": _rerotate_values,
                 "rows": _rows_values, "profiles": _profile_values}


def _serving_values_impl(check, ts, ints):
    _VALUE_CHECKS[check](*ts, *ints)
    return [t.clone() for t in ts]


# defined at import (Dynamo cannot trace a definition); the schema is given: this module's
# annotations are strings (``from __future__ import annotations``)
_serving_values = torch.library.custom_op("ropekit::serving_values", _serving_values_impl, mutates_args=(),
                                          schema="(str check, Tensor[] ts, int[] ints) -> Tensor[]")
_serving_values.register_fake(lambda check, ts, ints: [torch.empty_like(t) for t in ts])


def _graph_checked(check: str, ts: list, ints: list) -> list:
    """``ts`` through ``ropekit::serving_values``: copies the graph computes with, so that the
    check runs before what reads them."""
    return list(_serving_values(check, ts, ints))


def _serving_refuse_impl(message):
    raise RopeError(message)


# A RopeError of Python's checks (argument types, dtypes, shapes, flags, configs) found while
# torch.compile traces a call: the graph raises it when it runs, before the call would have
# written anything. TorchDynamo cannot let an exception leave a traced call (fullgraph=True
# would fail with its own Unsupported error instead); the op has a side effect, so the graph
# keeps it even where nothing reads the call's results.
_serving_refuse = torch.library.custom_op("ropekit::serving_refuse", _serving_refuse_impl, mutates_args=(),
                                          schema="(str message) -> ()")
_serving_refuse.register_fake(lambda message: None)
try:
    from torch._library.effects import EffectType

    torch.library._register_effectful_op("ropekit::serving_refuse", EffectType.ORDERED)
except (ImportError, AttributeError):  # older torch: FX's dead-code elimination keeps it
    from torch.fx.node import has_side_effect

    has_side_effect(torch.ops.ropekit.serving_refuse.default)


def _refuse_in_graph(err: RopeError) -> None:
    _serving_refuse(str(err))


def _standin(x):
    """What a refused traced call returns for the rest of the trace (never seen: the graph raises
    first)."""
    return x if isinstance(x, torch.Tensor) else torch.empty(0)


def _refused_by_graph(standin):
    """Decorate a public function whose RopeErrors found while torch.compile traces it are
    raised by the graph when it runs (``ropekit::serving_refuse``): the trace then goes on with
    ``standin(*args, **kwargs)`` (what the call would have returned, never seen). Eager calls
    raise as they are."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except RopeError as e:
                if not _in_graph():
                    raise
                _refuse_in_graph(e)
                return standin(*args, **kwargs)

        return call

    return wrap


@_refused_by_graph(lambda cache, *a, **kw: _standin(cache))
def cache_rows(cache: torch.Tensor, slots: torch.Tensor, cache_layout: str = "nhd") -> torch.Tensor:
    """The rows ``[len(slots), h, d]`` stored at flat ``slots`` (a gathered copy; negative
    slots read slot 0 — they are never written back).

    ``cache``: ``[N, B, h, d]`` (``"nhd"``/``"bshd"``) or ``[N, h, B, d]`` (``"hnd"``);
    ``slots``: integer, any shape (flattened). Raises RopeError for a slot past ``N * B``
    (read on the host; under torch.compile the graph checks it), float or bool slots (never
    truncated) and a cache of other than 4 dims."""
    tensors(cache=cache, slots=slots)
    _check_cache_layout(cache_layout)
    if cache.dim() != 4:
        raise fail("cache of 4 dims: [N, B, h, d] ('nhd'/'bshd') or [N, h, B, d] ('hnd')",
                   f"cache of shape {tuple(cache.shape)}", "pass the 4-D cache (a view of the keys)")
    if not _is_int(slots):
        raise fail("slots an integer tensor (flat slots block * B + offset)", f"dtype {slots.dtype}",
                   "pass int64 slots")
    nb, bs = cache.shape[0], cache.shape[2 if cache_layout == "hnd" else 1]
    if _in_graph():
        slots = _graph_checked("rows", [slots], [nb, bs])[0]
    elif host_readable(slots):
        _slots_below(slots, nb, bs)
    return _rows(cache, slots, cache_layout)


def _rows(cache: torch.Tensor, slots: torch.Tensor, cache_layout: str) -> torch.Tensor:
    """:func:`cache_rows` of checked arguments."""
    nb, bs = cache.shape[0], cache.shape[2 if cache_layout == "hnd" else 1]
    s = slots.reshape(-1).to(device=cache.device, dtype=torch.int64).clamp(min=0)
    if cache_layout != "hnd" and cache.stride(0) == bs * cache.stride(1):  # blocks and offsets merge: one index_select
        return cache.view(nb * bs, *cache.shape[2:]).index_select(0, s) if cache.is_contiguous() else \
            cache.flatten(0, 1).index_select(0, s)
    blk, off = torch.div(s, bs, rounding_mode="floor"), s % bs
    return cache[blk, :, off] if cache_layout == "hnd" else cache[blk, off]  # [t, h, d]


def _scatter_rows(cache, slots, rows, cache_layout) -> None:
    keep = slots.reshape(-1) >= 0
    s = slots.reshape(-1)[keep].to(torch.int64)
    bs = cache.shape[2 if cache_layout == "hnd" else 1]
    blk, off = torch.div(s, bs, rounding_mode="floor"), s % bs
    rows = rows.reshape(-1, *rows.shape[-2:])[keep]
    if cache_layout == "hnd":
        cache[blk, :, off] = rows
    else:
        cache[blk, off] = rows


def _cache_eager(q, k, cos_table, sin_table, positions, k_cache, slots, v, v_cache, k_out, cache_layout, layout):
    """The op's composition in torch (devices without a ropekit kernel, or no compiled ops)."""
    lead = q.shape[:-2]
    qf, kf = q.reshape(-1, *q.shape[-2:]), k.reshape(-1, *k.shape[-2:])
    pos = positions.reshape(-1)
    qr, kr = apply_rotary_gather(qf, kf, cos_table, sin_table, positions=pos, format="thd", layout=layout,
                                 backend="eager")
    q.copy_(qr.view(q.shape))
    _scatter_rows(k_cache, slots, kr, cache_layout)
    if v is not None:
        _scatter_rows(v_cache, slots, v.reshape(-1, *v.shape[-2:]), cache_layout)
    if k_out is not None:
        k_out.copy_(kr.view(*lead, *k.shape[-2:]))


@_refused_by_graph(lambda q, k, *a, return_k=False, **kw: (q, k) if return_k is True else q)
def apply_rotary_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    *,
    slots: torch.Tensor,
    v: Optional[torch.Tensor] = None,
    v_cache: Optional[torch.Tensor] = None,
    cache_layout: str = "nhd",
    layout: str = "half",
    inplace: bool = True,
    return_k: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Rotate ``q``, rotate ``k`` straight into the KV cache at ``slots`` (and copy ``v`` into
    ``v_cache``): one operator call, ``k`` read once (``torch.ops.ropekit.rotary_cache_``).

    Replaces "RoPE, then ``k_cache[slots] = k`` and ``v_cache[slots] = v``": the rotated key
    never exists outside the cache. Each rotated row has the same bits as
    :func:`ropekit.apply_rotary` of that row (float32 math, separately rounded products, one
    rounding to the cache dtype), on CPU and CUDA (Triton) alike.

    Args:
        q: ``[..., hq, d]`` (e.g. ``[t, hq, d]`` packed or ``[b, s, hq, d]``); the leading
            dims are the tokens.
        k: ``[..., hk, d]``, the same tokens (GQA: ``hk`` may differ from ``hq``).
        cos_table, sin_table: ``[n, r/2]`` half-width tables (``ropekit.cos_sin(cfg,
            torch.arange(n))``); partial rotary when ``r < d`` (dims past ``r`` copied).
        positions: integer ``[...]`` (q's token dims), each in ``[0, n)``.
        k_cache: ``[N, B, hk, d]`` (``"nhd"``/``"bshd"``) or ``[N, hk, B, d]`` (``"hnd"``), k's dtype.
        slots: integer ``[...]``, flat slot ``block * B + offset`` per token (negative: skipped);
            no slot twice in one call.
        v, v_cache: values ``[..., hk, dv]`` copied into ``v_cache`` (same layout, blocks and
            block size as ``k_cache``, v's dtype); both or neither.
        cache_layout: ``"nhd"``, ``"bshd"`` (a dense ``[b, s_max, h, d]`` cache) or ``"hnd"``.
        layout: ``"half"`` or ``"interleaved"`` pairs.
        inplace: rotate ``q`` in place (default, as serving engines do); ``False`` rotates a copy.
        return_k: also return the rotated keys ``[..., hk, d]`` (written in the same pass).

    Returns:
        ``q_rot`` (``q`` itself when ``inplace``), or ``(q_rot, k_rot)`` with ``return_k``.

    Raises RopeError (before anything is written) for slots outside ``[.., N*B)`` or repeated,
    positions outside the table, caches overlapping any input or each other, wrong
    dtypes/devices/shapes, and inputs that require grad (a cache write is not differentiable).
    """
    # the tensor rules, layouts included, are the op's validator (C++); here only what Python has
    tensors(q=q, k=k, cos_table=cos_table, sin_table=sin_table, positions=positions, k_cache=k_cache, slots=slots)
    if not ((inplace is True or inplace is False) and (return_k is True or return_k is False)):
        flags(inplace=inplace, return_k=return_k)
    if type(cache_layout) is not str or type(layout) is not str:  # (the op's schema takes strings only)
        _check_cache_layout(cache_layout)
        check_layout(layout)
    if v is not None or v_cache is not None:
        tensors(**{nm: t for nm, t in (("v", v), ("v_cache", v_cache)) if t is not None})
    if not inplace:
        q = q.clone()
    k_out = torch.empty_like(k) if return_k else None
    kernel = _op_device(q)
    try:
        if _in_graph():
            # torch.compile: the validator runs on the traced tensors, and a refusal is raised by the
            # graph as the eager call's RopeError (ops.refusal), not as the kernel's ValueError
            bad = _ops.refusal("rotary_cache_", (q, k, cos_table, sin_table, positions, k_cache, slots, v, v_cache,
                                                 k_out, cache_layout, layout), (q, k))
            if bad is not None:
                q = q.copy_(bad[0])
                return (q, k_out.copy_(bad[1])) if return_k else q
            if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in
                                               (q, k, cos_table, sin_table, k_cache, v, v_cache)):
                raise _grad_refusal()  # (the op's autograd kernel refuses them; in a graph: while it is traced)
            if not kernel:
                check_layout(layout)
                _check_cache_layout(cache_layout)
            # values: the graph checks them with the eager messages (CPU; a composition on any
            # device); CUDA's kernel checks them on the device, with no host sync, as eagerly
            if not kernel or q.device.type == "cpu":
                positions, slots = _graph_checked("cache", [positions, slots],
                                                  [cos_table.shape[0], _nslots(k_cache, cache_layout)])
            elif slots.dtype == torch.uint64:
                slots = _graph_checked("uint64 slots", [slots], [_nslots(k_cache, cache_layout)])[0]
        elif slots.dtype == torch.uint64 and host_readable(slots):  # (the kernels read slots as int64)
            _uint64_slots(slots, _nslots(k_cache, cache_layout))
        if kernel:
            torch.ops.ropekit.rotary_cache_(q, k, cos_table, sin_table, positions, k_cache, slots, v, v_cache, k_out,
                                            cache_layout, layout)
        else:
            check_layout(layout)
            _check_cache_layout(cache_layout)
            # the op's validator (shapes, dtypes, devices, aliasing), then the kernel's value checks
            _ops.check("rotary_cache_", q, k, cos_table, sin_table, positions, k_cache, slots, v, v_cache, k_out,
                       cache_layout, layout)
            if host_readable(slots) and host_readable(positions):
                _cache_values(positions, slots, cos_table.shape[0], _nslots(k_cache, cache_layout))
            _cache_eager(q, k, cos_table, sin_table, positions, k_cache, slots, v, v_cache, k_out, cache_layout, layout)
    except (ValueError, RuntimeError) as e:
        raise to_rope_error(e) from None
    return (q, k_out) if return_k else q


def _grad_refusal() -> RopeError:
    """The refusal of the op's autograd kernel (csrc/ops.cpp), for a compiled graph to raise."""
    return fail(
        "inputs of ropekit::rotary_cache_ that do not require grad (it writes a KV cache in place: an inference step "
        "whose stored keys autograd cannot follow into the attention kernels)", "inputs that require grad",
        "run it under torch.no_grad() / torch.inference_mode(), or use ropekit.apply_rotary_gather (differentiable) "
        "and write the cache yourself")


def _nslots(k_cache: torch.Tensor, cache_layout: str) -> int:
    """``N * B``: the flat slots of a cache (0 for a cache the validator refuses)."""
    if k_cache.dim() != 4:
        return 0
    return k_cache.shape[0] * k_cache.shape[2 if cache_layout == "hnd" else 1]


# --------------------------------------------------------------------------------------
# re-rotation inside the cache
# --------------------------------------------------------------------------------------


def _positions(p, name: str, n_axes: int, n: int, device: torch.device) -> torch.Tensor:
    """``p`` checked (as given: its values are read as int64 after the check); eagerly its values
    in ``[0, 2**53]`` (θ_new(p_new) − θ_old(p_old) never wraps), under torch.compile by the graph."""
    check_positions(p, name)  # an integer tensor; the values where they can be read
    want = (n,) if n_axes == 0 else (n_axes, n)
    if tuple(p.shape) != want:
        raise fail(f"{name} of shape {list(want)}" + (" (one row per M-RoPE axis)" if n_axes else " (one per slot)"),
                   f"shape {list(p.shape)}", "one position per re-rotated slot" + (", per axis" if n_axes else ""))
    if p.device != device and p.device.type != "cpu":
        raise fail(f"{name} on k_cache's device {device} (or the CPU)", f"{name} on {p.device}",
                   f"move them: {name}.to(k_cache.device)")
    return p


def _angles(cfg: RopeConfig, pos: torch.Tensor, seq_len, axes) -> torch.Tensor:
    """θ(pos) in float64 ``[n, r/2]``: pos ``[n]``, or ``[n_axes, n]`` with each pair's axis."""
    inv = cfg.inv_freq(seq_len).to(pos.device)  # [r/2] float64
    if axes is None:
        return pos.to(torch.float64)[:, None] * inv  # [n, r/2]
    per_pair = pos.index_select(0, axes.to(pos.device))  # [r/2, n]: each pair's axis position
    return per_pair.T.to(torch.float64) * inv  # [n, r/2]


@_refused_by_graph(lambda k_cache, *a, **kw: k_cache)
def rerotate_cache(
    k_cache: torch.Tensor,
    slots: torch.Tensor,
    old_positions: torch.Tensor,
    new_positions: torch.Tensor,
    cfg: RopeConfig,
    *,
    cache_layout: str = "nhd",
    new_cfg: Optional[RopeConfig] = None,
    old_seq_len: Optional[int] = None,
    new_seq_len: Optional[int] = None,
    head_stride: Optional[int] = None,
    layout: Optional[str] = None,
    mrope_section: Optional[Sequence[int]] = None,
    mrope_interleaved: bool = False,
) -> torch.Tensor:
    """Rotate the keys stored at ``slots`` in place from their old rotation to a new one:
    StreamingLLM sink eviction, cache compaction, KV reuse at other positions, a LongRoPE
    sequence crossing its switch.

    Each key at slot ``j`` was stored as ``a_old · R(θ_old(p_old[j])) k``; it becomes
    ``a_new · R(θ_new(p_new[j])) k`` by one rotation by ``δ = θ_new(p_new) − θ_old(p_old)``
    scaled by ``a_new / a_old`` (attention factors; 1 unless the configs differ there). ``δ``
    is formed in float64 from exact integer positions, its cos/sin rounded once to float32
    (float64 for a float64 cache), and the rows go through ``rotary_cache_`` (gathered,
    rotated and written back in one call): one rounding to the cache dtype. θ may differ
    between old and new (``new_cfg``, or ``old_seq_len``/``new_seq_len`` for length-dependent
    scaling: LongRoPE short -> long, dynamic NTK), so it is not limited to additive shifts.
    With ``direction = -1`` (keys stored as ``R(-θ(p)) k``) the rotation is by
    ``dir_new·θ_new(p_new) − dir_old·θ_old(p_old)`` (a change of direction is exact too); with
    ``rotary_offset = o`` (MLA heads ``[nope | rope]``) only dims ``o .. o + r - 1`` move.

    Args:
        k_cache: ``[N, B, h, d]`` (``"nhd"``/``"bshd"``) or ``[N, h, B, d]`` (``"hnd"``), any
            strides with unit last stride (a packed cache's K half as a view works); with
            ``head_stride``: ``[N, B, h * head_stride]`` rows whose heads each start with
            their ``d = cfg.head_dim`` keys (K and V interleaved per head, nhd only).
        slots: integer ``[n]`` flat slots (negative: skipped), no slot twice.
        old_positions, new_positions: integer ``[n]``, or ``[n_axes, n]`` per M-RoPE axis.
        cfg: the config the keys were rotated with (``d = cfg.head_dim``); ``new_cfg`` the one
            to rotate them to (default ``cfg``): the same ``head_dim``, ``rotary_dim``, ``layout``
            and ``rotary_offset`` (another layout or offset pairs other dims: a permutation of the
            head, not a rotation).
        old_seq_len, new_seq_len: the sequence lengths that chose the frequencies of
            length-dependent scaling (LongRoPE, dynamic NTK) before and after.
        layout: pair layout (default ``cfg.layout``).
        mrope_section: rotary pairs per axis for M-RoPE positions (``mrope_interleaved``:
            Qwen3-VL's pair order).

    Returns ``k_cache`` (rotated in place).

    Raises RopeError (before anything is written) for positions outside ``[0, 2**53]``, slots
    past ``N*B`` or repeated, a cache whose head width is not ``cfg.head_dim``, and a
    ``new_cfg`` of other widths, layout or offset.

    Example:
        >>> import torch, ropekit
        >>> cfg = ropekit.RopeConfig(head_dim=64)
        >>> cache = torch.zeros(2, 8, 1, 64)
        >>> k = torch.randn(3, 1, 64)
        >>> c, s = ropekit.cos_sin(cfg, torch.arange(16))
        >>> _ = apply_rotary_cache(torch.empty(3, 0, 64), k, c, s, torch.tensor([4, 5, 6]), cache, slots=torch.tensor([4, 5, 6]))
        >>> _ = rerotate_cache(cache, torch.tensor([4, 5, 6]), torch.tensor([4, 5, 6]), torch.tensor([1, 2, 3]), cfg)
        >>> _ = apply_rotary_cache(torch.empty(3, 0, 64), k, c, s, torch.tensor([1, 2, 3]), ref := torch.zeros(2, 8, 1, 64), slots=torch.tensor([4, 5, 6]))
        >>> bool((cache - ref).abs().max() < 1e-6)
        True
    """
    tensors(k_cache=k_cache, slots=slots)
    if not isinstance(cfg, RopeConfig) or not (new_cfg is None or isinstance(new_cfg, RopeConfig)):
        raise fail("cfg (and new_cfg) a ropekit.RopeConfig", f"{type(cfg).__name__}, {type(new_cfg).__name__}",
                   "pass the config the keys were rotated with (and the one to rotate them to)")
    new_cfg = cfg if new_cfg is None else new_cfg
    if new_cfg.rotary_dim != cfg.rotary_dim or new_cfg.head_dim != cfg.head_dim:
        raise fail("new_cfg of cfg's head_dim and rotary_dim", f"({cfg.head_dim}, {cfg.rotary_dim}) -> "
                   f"({new_cfg.head_dim}, {new_cfg.rotary_dim})", "re-rotation changes angles, not widths")
    if new_cfg.layout != cfg.layout or new_cfg.rotary_offset != cfg.rotary_offset:
        raise fail("new_cfg of cfg's layout and rotary_offset",
                   ", ".join(f"{a} {getattr(cfg, a)!r} -> {getattr(new_cfg, a)!r}" for a in ("layout", "rotary_offset")
                             if getattr(cfg, a) != getattr(new_cfg, a)),
                   "re-rotation changes angles, not which dims form the pairs: another layout or offset is a "
                   "permutation of the head's dims, not a rotation (permute the cached keys' dims yourself, or "
                   "recompute them)")
    _check_cache_layout(cache_layout)
    layout = cfg.layout if layout is None else layout
    check_layout(layout)
    flags(mrope_interleaved=mrope_interleaved)
    d, o = cfg.head_dim, cfg.rotary_offset
    cache = k_cache
    if head_stride is not None:
        if cache_layout == "hnd" or k_cache.dim() != 3 or isinstance(head_stride, bool) or not isinstance(head_stride, int) \
                or head_stride < d or k_cache.shape[-1] % head_stride:
            raise fail(f"head_stride an int >= head_dim = {d} dividing the row width of an nhd cache [N, B, h * head_stride]",
                       f"head_stride={head_stride!r} for k_cache {tuple(k_cache.shape)} ({cache_layout})",
                       "pass the packed buffer [N, B, h * head_stride] (K first in every head), or a 4-D view of the keys")
        cache = k_cache.unflatten(-1, (k_cache.shape[-1] // head_stride, head_stride))[..., :d]  # [N, B, h, d] view
    elif k_cache.dim() != 4:
        raise fail("k_cache of 4 dims: [N, B, h, d] ('nhd'/'bshd') or [N, h, B, d] ('hnd')",
                   f"k_cache of shape {tuple(k_cache.shape)}",
                   "pass the 4-D cache (a view of the keys), or head_stride= for a packed [N, B, h * head_stride] "
                   "buffer")
    if not k_cache.dtype.is_floating_point:
        raise fail("k_cache of a real floating dtype (float16, bfloat16, float32, float64)",
                   f"k_cache.dtype={k_cache.dtype}", "pass the key cache itself (keys are stored as floats)")
    if head_stride is None and cfg.rotary_dim < d and cache.shape[-1] == cfg.rotary_dim:
        o = 0  # the rope part alone (MLA's separately cached k_pe): every dim rotates
    elif cache.shape[-1] != d:
        raise fail(f"k_cache with the config's head width cfg.head_dim = {d}"
                   + (f" (or its rope part alone, cfg.rotary_dim = {cfg.rotary_dim})" if cfg.rotary_dim < d else ""),
                   f"k_cache of head width {cache.shape[-1]} (shape {tuple(k_cache.shape)})",
                   f"pass the config the keys were rotated with (head_dim={cache.shape[-1]} for this cache), or "
                   "head_stride= for a packed [N, B, h * head_stride] buffer")
    if slots.dim() != 1 or slots.dtype.is_floating_point or slots.dtype.is_complex or slots.dtype == torch.bool:
        raise fail("slots an integer tensor of shape [n]", f"{slots.dtype} of shape {list(slots.shape)}",
                   "pass one flat int64 slot per key to move")
    n = slots.shape[0]
    axes = None
    if mrope_section is not None:
        from .multi_axis import pair_axes

        if not isinstance(mrope_section, (list, tuple)):
            raise fail("mrope_section a list of ints (rotary pairs per axis)", repr(mrope_section),
                       "pass the model's mrope_section, e.g. [16, 24, 24]")
        axes = pair_axes(list(mrope_section), interleaved=mrope_interleaved)
        if axes.numel() != cfg.rotary_dim // 2:
            raise fail(f"mrope_section summing to r/2 = {cfg.rotary_dim // 2}", repr(list(mrope_section)),
                       "pass the model's mrope_section")
    n_axes = 0 if mrope_section is None else len(mrope_section)
    old = _positions(old_positions, "old_positions", n_axes, n, cache.device)
    new = _positions(new_positions, "new_positions", n_axes, n, cache.device)
    if slots.device != cache.device:
        raise fail(f"slots on k_cache's device {cache.device}", f"slots on {slots.device}",
                   "move them: slots.to(k_cache.device)")
    nb, bs = cache.shape[0], cache.shape[2 if cache_layout == "hnd" else 1]
    # values, before the gather reads the slots: positions in [0, 2**53] (read by _positions where
    # they can be), slots below N * B (the kernel refuses a slot twice, before it writes)
    if _in_graph():
        slots, old, new = _graph_checked("rerotate", [slots, old, new], [nb, bs])
    elif host_readable(slots):
        _slots_below(slots, nb, bs)
    old, new = old.to(device=cache.device, dtype=torch.int64), new.to(device=cache.device, dtype=torch.int64)
    delta = _delta(cfg, new_cfg, old, new, old_seq_len, new_seq_len, axes)  # [n, r/2] float64
    scale = new_cfg.attention_factor / cfg.attention_factor
    tdt = torch.float64 if cache.dtype == torch.float64 else torch.float32
    cos, sin = cos_sin_f64(delta)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    cos, sin = cos.to(tdt), sin.to(tdt)  # [n, r/2]: row j rotates slot j
    if o:
        cache = cache[..., o:]  # MLA heads [nope | rope]: dims o .. o + r - 1 rotate, the nope dims are not touched
    rows = _rows(cache, slots, cache_layout)  # [n, h, d - o] gathered copy
    q = rows.new_empty(n, 0, rows.shape[-1])  # no queries
    apply_rotary_cache(q, rows, cos, sin, torch.arange(n, device=cache.device), cache, slots=slots,
                       cache_layout=cache_layout, layout=layout)
    return k_cache


def _delta(cfg: RopeConfig, new_cfg: RopeConfig, old: torch.Tensor, new: torch.Tensor, old_seq_len, new_seq_len,
           axes) -> torch.Tensor:
    """The rotation ``δ`` ``[n, r/2]`` in float64 that moves keys from ``cfg`` at ``old`` to
    ``new_cfg`` at ``new``. The same frequencies (and direction): ``direction·(p_new − p_old)·θ``,
    an exact integer shift times θ (one rounding); else ``dir_new·θ_new(p_new) −
    dir_old·θ_old(p_old)`` (exact integer positions: one rounding each, then the difference).
    Whether the frequencies agree is a comparison of the configs' float64 frequencies; under
    torch.compile it is made in the graph (``torch.where`` of both forms, the same bits), not on
    the host."""

    def shift():
        d = _angles(cfg, new - old, old_seq_len, axes)
        return -d if cfg.direction == -1 else d  # (exact)

    def general():
        return new_cfg.direction * _angles(new_cfg, new, new_seq_len, axes) \
            - cfg.direction * _angles(cfg, old, old_seq_len, axes)

    if new_cfg.direction != cfg.direction or new_cfg.table_key(new_seq_len) != cfg.table_key(old_seq_len):
        return general()
    if new_cfg is cfg:  # one config, one table key: the same frequencies
        return shift()
    inv_new, inv_old = new_cfg.inv_freq(new_seq_len), cfg.inv_freq(old_seq_len)  # float64 [r/2] on the CPU
    if not tracing():
        return shift() if inv_new.equal(inv_old) else general()
    return torch.where(torch.eq(inv_new, inv_old).all().to(old.device), shift(), general())


# --------------------------------------------------------------------------------------
# per-sequence scaling profiles
# --------------------------------------------------------------------------------------


def longrope_profile(cfg: RopeConfig, planned_len: int) -> int:
    """LongRoPE's profile for a sequence: ``1`` (long factors) when its planned total length
    (prompt + the most tokens it may generate) exceeds ``original_max_position``, else ``0``
    (short). Decide once per sequence and keep it (see the module docstring)."""
    if not isinstance(cfg, RopeConfig):
        raise fail("cfg a ropekit.RopeConfig with LongRoPE scaling", type(cfg).__name__, "pass the model's RopeConfig")
    sc = cfg.scaling
    if sc is None or type(sc).__name__ != "LongRoPE":
        raise fail("a RopeConfig with LongRoPE scaling", type(sc).__name__ if sc is not None else "no scaling",
                   "profiles of other schemes are chosen by profile_tables(cfg, seq_lens=...)")
    planned_len = integer("planned_len", planned_len, minimum=1,
                          fix="pass the sequence's planned total length (prompt + the most tokens it may generate)")
    return int(sc.is_long(planned_len))


def stack_profiles(tables: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[(cos, sin), ...]`` of ``P`` profiles, each ``[n, r/2]`` -> ``(cos, sin)`` ``[P, n, r/2]``."""
    if not isinstance(tables, (list, tuple)) or not tables:
        got = "none" if isinstance(tables, (list, tuple)) else type(tables).__name__
        raise fail("at least one profile's (cos, sin)", got, "pass one [n, r/2] table pair per profile")
    ref = tables[0][0] if isinstance(tables[0], (list, tuple)) and tables[0] else None
    for i, pair in enumerate(tables):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(ref, torch.Tensor) and ref.dim() == 2
                and all(isinstance(t, torch.Tensor) and t.shape == ref.shape and t.dtype == ref.dtype
                        and t.device == ref.device for t in pair)):
            got = [f"{tuple(t.shape)} {t.dtype} {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
                   for t in (pair if isinstance(pair, (list, tuple)) else [pair])]
            raise fail("every profile's (cos, sin) two tensors of one shape [n, r/2], dtype and device (profile 0's: "
                       + (f"{tuple(ref.shape)} {ref.dtype} {ref.device})" if isinstance(ref, torch.Tensor) else "?)"),
                       f"profile {i}: {', '.join(got)}",
                       "build every profile's tables for the same positions 0 .. n-1 (profile_tables)")
    return torch.stack([c for c, _ in tables]), torch.stack([s for _, s in tables])


def profile_tables(
    cfgs: Union[RopeConfig, Sequence[RopeConfig]],
    n: int,
    *,
    seq_lens: Optional[Sequence[int]] = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Stacked tables ``[P, n, r/2]`` for positions ``0 .. n-1`` and, with ``seq_lens``, the
    profile index of each sequence.

    - several configs (YaRN factors, linear scales, ...): profile ``i`` is ``cfgs[i]``;
      the caller picks indices.
    - one length-dependent config (LongRoPE, dynamic NTK) with ``seq_lens`` ``[b]`` (each
      sequence's planned total length): one profile per distinct frequency set (LongRoPE:
      at most two; dynamic NTK: one per distinct length above ``max_position``), and the
      index ``[b]`` int64 of each sequence.

    Returns ``(cos, sin, index)`` (``index`` is ``None`` without ``seq_lens``).
    """
    if isinstance(cfgs, RopeConfig):
        cfgs = [cfgs]
    if not isinstance(cfgs, (list, tuple)) or not cfgs or not all(isinstance(c, RopeConfig) for c in cfgs):
        raise fail("cfgs a RopeConfig or a list of them", repr(cfgs)[:80], "pass one RopeConfig per profile")
    cfgs = list(cfgs)
    n = integer("n", n, minimum=1, maximum=MAX_EXACT_POSITION + 1,
                fix="pass the table length (rows for positions 0 .. n-1)")
    if isinstance(seq_lens, torch.Tensor):
        seq_lens = seq_lens.tolist()
    if seq_lens is not None and not isinstance(seq_lens, (list, tuple)):
        raise fail("seq_lens a list or tensor of ints (one planned length per sequence)", repr(seq_lens)[:80],
                   "pass each sequence's planned total length (prompt + max new tokens)")
    pos = torch.arange(n, device=device)
    if seq_lens is None:
        tabs = [cos_sin(c, pos, dtype=dtype, seq_len=None) for c in cfgs]
        return (*stack_profiles(tabs), None)
    if len(cfgs) != 1:
        raise fail("one config with seq_lens=", f"{len(cfgs)} configs", "index several configs yourself (seq_lens=None)")
    cfg = cfgs[0]
    keys: List = []
    lens_of_key: List[int] = []
    index = []
    for L in [integer("seq_lens[i]", x, minimum=1, fix="pass each sequence's planned total length") for x in seq_lens]:
        key = cfg.table_key(L)
        if key not in keys:
            keys.append(key)
            lens_of_key.append(L)
        index.append(keys.index(key))
    tabs = [cos_sin(cfg, pos, dtype=dtype, seq_len=L) for L in lens_of_key]
    return (*stack_profiles(tabs), torch.tensor(index, dtype=torch.int64, device=device))


_SEQ_DIMS = {"bshd": 1, "bhsd": 2, "sbhd": 0}  # the sequence dim of q in each 4-D format


@_refused_by_graph(lambda q, k, *a, **kw: (q, k))
def apply_rotary_profiles(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    profile: torch.Tensor,
    *,
    positions: torch.Tensor,
    format: str = "bshd",
    layout: str = "half",
    inplace: bool = False,
    backend: str = "auto",
    check: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q``/``k`` with each sequence's own profile of stacked tables, in one gather call.

    Args:
        q, k: ``[b, s, h, d]`` (``bshd``; or ``bhsd``/``sbhd``), or ``[t, h, d]`` (``thd``).
        cos, sin: ``[P, n, r/2]`` stacked profiles (:func:`profile_tables`), contiguous.
        profile: integer ``[b]`` (one profile per sequence), or per token ``[b, s]`` / ``[t]``.
        positions: integer ``[b, s]`` (``[s]`` shared), or ``[t]`` for ``thd``; in ``[0, n)``.
        check: refuse out-of-range positions and profiles (:func:`profile_positions`): read on
            the host, or checked by the graph under torch.compile.

    Returns ``(q_rot, k_rot)``: the same bits as rotating each sequence alone with its
    profile's ``[n, r/2]`` tables.
    """
    tensors(q=q, k=k, cos=cos, sin=sin, profile=profile, positions=positions)
    if cos.dim() != 3 or sin.shape != cos.shape:
        raise fail("cos and sin stacked profiles of one shape [P, n, r/2]", f"{tuple(cos.shape)} and {tuple(sin.shape)}",
                   "stack per-profile tables with profile_tables / stack_profiles")
    flags(check=check)
    P, n, half = cos.shape
    sd = _SEQ_DIMS.get(format)
    qs, ks = q.shape, k.shape
    if sd is not None and len(qs) == len(ks) == 4 and qs[sd] == ks[sd] and qs[1 if sd == 0 else 0] == ks[1 if sd == 0 else 0]:
        b, s = qs[1 if sd == 0 else 0], qs[sd]  # (the common 4-D case without the general split's cost)
    else:
        b, s = split_qk_format(q, k, format)
    ok = ((b,), (b, s)) if format != "thd" else ((s,),)
    if tuple(profile.shape) not in ok:
        raise fail("profile of shape " + (f"[b] = [{b}] (one per sequence) or [b, s] = [{b}, {s}] (one per token)"
                                          if format != "thd" else f"[t] = [{s}] (one per packed token)"),
                   f"profile of shape {list(profile.shape)} for q {tuple(qs)} in format {format!r}",
                   "pass one profile index per sequence of q/k (or per token)")
    flat = profile_positions(positions, profile, P, n, s=None if format == "thd" else s, check=check)
    # the op's own position forms ([s], [b, s], [t]): straight to the gather entry point
    return apply_gather(q, k, cos.reshape(P * n, half), sin.reshape(P * n, half), flat, format=format, layout=layout,
                        inplace=inplace, backend=backend)


@_refused_by_graph(lambda positions, *a, **kw: _standin(positions))
def profile_positions(positions: torch.Tensor, profile: torch.Tensor, P: int, n: int, *, s: Optional[int] = None,
                      check: bool = True) -> torch.Tensor:
    """Rows of the flattened ``[P*n, r/2]`` stack: ``position + profile * n`` (one integer op).

    ``profile`` ``[b]`` (per sequence) broadcasts over ``[b, s]`` positions (``s``: the
    sequence length of a ``bshd`` batch, to read ``[s]`` shared and ``[b]`` decode positions);
    per-token profiles take the positions' shape. An engine that builds its positions every
    step folds the offset in there and calls the gather op directly, at the cost of a
    single-profile call. ``check``: positions in ``[0, n)`` and profiles in ``[0, P)`` (a
    position past ``n`` would silently read the next profile's row; the gather op itself only
    bounds the flat row by ``P*n``), read on the host; under torch.compile the graph checks
    them (``ropekit::serving_values``) and raises the same RopeError. Positions and profiles of
    a float dtype, or of shapes that do not pair up, are a RopeError (never truncated or
    broadcast)."""
    tensors(positions=positions, profile=profile)
    if isinstance(P, bool) or isinstance(n, bool) or not isinstance(P, (int, torch.SymInt)) \
            or not isinstance(n, (int, torch.SymInt)):
        fix = "pass the stacked tables' profile count P and rows per profile n (cos.shape[:2])"
        P, n = integer("P", P, minimum=1, fix=fix), integer("n", n, minimum=1, fix=fix)
    check_positions(positions, check_values=False)  # an integer dtype (the values: below, with check)
    if profile.dtype.is_floating_point or profile.dtype.is_complex or profile.dtype == torch.bool:
        raise fail("profile with an integer dtype (profile indices)", f"dtype {profile.dtype}",
                   "pass int64 profile indices (profile_tables returns them)")
    pos = positions if positions.dtype == torch.int64 else positions.to(torch.int64)
    prof = profile.to(device=pos.device, dtype=torch.int64)
    if s is not None:
        if prof.dim() == 1:  # one profile per sequence: [b] -> [b, 1]
            prof = prof[:, None]
        if pos.dim() == 1:  # [s] shared by the batch -> [1, s]; [b] one token per sequence (s == 1) -> [b, 1]
            pos = pos[None] if pos.shape[0] == s else pos[:, None]
        ok = pos.dim() == prof.dim() == 2 and pos.shape[0] in (1, prof.shape[0]) and prof.shape[1] in (1, pos.shape[1])
    else:
        ok = pos.shape == prof.shape
    if not ok:
        raise fail(f"positions [s] = [{s}], [b, s] or [b] (s == 1) with profile [b] (one per sequence) or [b, s]"
                   if s is not None else "positions and profile of one shape (one profile per token)",
                   f"positions of shape {list(positions.shape)} and profile of shape {list(profile.shape)}",
                   "pass one position per token, and one profile index per sequence (or per token)")
    if check:
        if _in_graph():  # the graph checks them (the eager messages), before the gather reads a row
            pos, prof = _graph_checked("profiles", [pos, prof], [P, n])
        elif host_readable(pos) and host_readable(prof):
            _profile_values(pos, prof, P, n)
    return torch.add(pos, prof, alpha=n)  # row of (profile, position) in the flattened stack
