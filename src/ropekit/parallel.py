"""Context (sequence) parallelism: which global positions each rank's tokens have.

When a sequence of ``S`` tokens is split across ``W`` ranks, RoPE must rotate each local
token by its *global* position. This module computes those positions and slices tensors
the same way, for the two layouts used by sequence-parallel attention:

``"contiguous"``
    rank ``r`` holds tokens ``[r·S/W, (r+1)·S/W)`` (all-to-all / Ulysses style, and
    ring attention without load balancing).
``"zigzag"``
    the sequence is cut into ``2W`` chunks of ``S/(2W)`` tokens and rank ``r`` holds
    chunks ``r`` and ``2W-1-r``: under a causal mask every rank then has the same amount
    of attention work (ring-flash-attention's zigzag, Megatron/TransformerEngine's
    load-balanced context parallelism).

Rotate q and k on each rank with its positions *before* any exchange: keys then travel
already rotated, and the score of a query at ``m`` with a key at ``n`` depends only on
``m - n`` wherever it is computed. Nothing here communicates; it is plain indexing, so it
works with any ``torch.distributed`` backend (and without one). See ``docs/parallel.md``.

Shapes: ``S`` global sequence length, ``W`` world size, ``s = S / W`` local length,
``t`` packed tokens.
"""

from __future__ import annotations

import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ._checks import describe, integer
from ._checks import device as check_device
from ._errors import fail
from .config import MAX_EXACT_POSITION, check_seq_len
from .positions import positions_from_cu_seqlens

__all__ = ["SCHEMES", "shard_positions", "shard", "unshard", "shard_packed", "rotate_dtensor"]

#: Sharding schemes of the sequence dimension.
SCHEMES = ("contiguous", "zigzag")


def _as_int(name: str, v, fix: str) -> int:
    """``v`` as an int (a Python, NumPy or 0-d tensor integer), never a bool, a float or a string."""
    if not isinstance(v, (bool, float, str, bytes)) and not (
        isinstance(v, torch.Tensor) and (v.dtype.is_floating_point or v.dtype == torch.bool)
    ):
        try:
            return operator.index(v)
        except (TypeError, ValueError, RuntimeError, NotImplementedError):  # not an integer; meta tensors
            pass
    raise fail(f"{name} an int", describe(v), fix)


def _check_world(world_size, rank, scheme) -> Tuple[int, int]:
    world_size = _as_int("world_size", world_size, "pass e.g. torch.distributed.get_world_size()")
    rank = _as_int("rank", rank, "pass e.g. torch.distributed.get_rank()")
    if world_size < 1:
        raise fail("world_size >= 1", str(world_size), "pass the size of the context-parallel group")
    if not 0 <= rank < world_size:
        raise fail(f"rank in [0, {world_size})", str(rank), "pass this process's rank in the context-parallel group")
    if scheme not in SCHEMES:
        raise fail(f"scheme in {SCHEMES}", repr(scheme), 'use "zigzag" for causal ring attention, else "contiguous"')
    return world_size, rank


def _chunks(seq_len: int, world_size: int, rank: int, scheme: str) -> List[Tuple[int, int]]:
    """``[(start, length), ...]`` of rank's pieces of a sequence of ``seq_len`` tokens."""
    world_size, rank = _check_world(world_size, rank, scheme)
    seq_len = _as_int("seq_len", seq_len, "pass the global sequence length")
    if not 0 <= seq_len <= MAX_EXACT_POSITION:
        raise fail("seq_len an int in [0, 2**53] (positions exact in the float64 angle m·θ)", str(seq_len),
                   "pass the global sequence length")
    parts = world_size if scheme == "contiguous" else 2 * world_size
    if seq_len % parts:
        raise fail(
            f"seq_len divisible by {parts} ({'world_size' if scheme == 'contiguous' else '2 * world_size'} for {scheme!r})",
            f"seq_len={seq_len}",
            f"pad the sequence to a multiple of {parts} (mask the padding in attention)",
        )
    c = seq_len // parts
    if scheme == "contiguous":
        return [(rank * c, c)]
    return [(rank * c, c), ((parts - 1 - rank) * c, c)]


def shard_positions(
    seq_len: int,
    world_size: int,
    rank: int,
    *,
    scheme: str = "contiguous",
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """Global positions of the tokens rank ``rank`` holds: int64 ``[seq_len // world_size]``.

    Pass them to :class:`ropekit.RotaryEmbedding` as ``positions=`` together with
    ``seq_len=seq_len`` (the *global* length, plus any KV-cache offset added to the
    positions): length-dependent scaling (LongRoPE, dynamic NTK) picks its frequencies from
    ``seq_len``, whose default ``max(positions) + 1`` differs from rank to rank.

    Raises RopeError unless ``seq_len`` (at most ``2**53``) divides into ``world_size``
    (contiguous) or ``2 * world_size`` (zigzag) equal chunks. Ints may be Python, NumPy or
    0-d tensor integers.

    Example:
        >>> shard_positions(8, 2, 0, scheme="zigzag").tolist()
        [0, 1, 6, 7]
        >>> shard_positions(8, 2, 1).tolist()
        [4, 5, 6, 7]
    """
    device = torch.device("cpu") if device is None else check_device("device", device)  # never a meta context's device
    pieces = [torch.arange(a, a + n, device=device) for a, n in _chunks(seq_len, world_size, rank, scheme)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _check_dim(x: torch.Tensor, seq_dim: int, name: str = "x") -> int:
    if not isinstance(x, torch.Tensor):
        raise fail(f"{name} a torch.Tensor", type(x).__name__, "pass the full (unsharded) tensor")
    if x.dim() == 0:
        raise fail(f"{name} with a sequence dim (at least 1-D)", "a 0-d tensor (a scalar)",
                   "pass the full (unsharded) tensor, e.g. q of shape [b, S, h, d]")
    if isinstance(seq_dim, bool) or not isinstance(seq_dim, int) or not -x.dim() <= seq_dim < max(x.dim(), 1):
        raise fail(f"seq_dim in [-{x.dim()}, {x.dim()})", repr(seq_dim), "e.g. seq_dim=1 for bshd, 2 for bhsd, 0 for sbhd/thd")
    return seq_dim % x.dim()


def shard(x: torch.Tensor, world_size: int, rank: int, *, seq_dim: int, scheme: str = "contiguous") -> torch.Tensor:
    """Rank ``rank``'s slice of ``x`` along ``seq_dim``, matching :func:`shard_positions`.

    ``"contiguous"`` returns a view; ``"zigzag"`` concatenates two chunks (a copy).
    The size of ``seq_dim`` becomes ``S // world_size``.

    Example:
        >>> shard(torch.arange(8), 2, 0, seq_dim=0, scheme="zigzag").tolist()
        [0, 1, 6, 7]
    """
    dim = _check_dim(x, seq_dim)
    pieces = [x.narrow(dim, a, n) for a, n in _chunks(x.shape[dim], world_size, rank, scheme)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def unshard(shards: Sequence[torch.Tensor], *, seq_dim: int, scheme: str = "contiguous") -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from every rank's shard (rank order).

    E.g. the list filled by ``torch.distributed.all_gather``.

    Example:
        >>> x = torch.arange(12)
        >>> parts = [shard(x, 3, r, seq_dim=0, scheme="zigzag") for r in range(3)]
        >>> torch.equal(unshard(parts, seq_dim=0, scheme="zigzag"), x)
        True
    """
    if not isinstance(shards, (list, tuple)) or not shards:
        raise fail("a non-empty list of shards in rank order", type(shards).__name__, "pass the all_gather output list")
    w = len(shards)
    dim = _check_dim(shards[0], seq_dim, "shards[0]")
    s = shards[0].shape[dim]
    s0 = shards[0]
    for i, t in enumerate(shards):
        if not isinstance(t, torch.Tensor) or t.shape != s0.shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise fail(f"shards of one shape {tuple(s0.shape)}", f"shards[{i}] {got}", "gather the shards of one tensor")
        if t.dtype != s0.dtype or t.device != s0.device:  # torch.cat would promote or fail
            raise fail(f"shards of one dtype and device ({s0.dtype} on {s0.device}, as shards[0])",
                       f"shards[{i}] {t.dtype} on {t.device}", "gather the shards of one tensor (all_gather keeps both)")
    _check_world(w, 0, scheme)
    if scheme == "contiguous":
        return torch.cat(list(shards), dim=dim)
    if s % 2:
        raise fail("zigzag shards of even length (two chunks each)", f"length {s} on seq_dim", "shard with scheme='zigzag'")
    c = s // 2
    order = [None] * (2 * w)
    for r, t in enumerate(shards):
        order[r] = t.narrow(dim, 0, c)
        order[2 * w - 1 - r] = t.narrow(dim, c, c)
    return torch.cat(order, dim=dim)


def shard_packed(
    cu_seqlens: torch.Tensor, world_size: int, rank: int, *, scheme: str = "contiguous"
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shard packed (``thd``) sequences: every sequence is split across all ranks.

    Each sequence of the pack is sharded on its own (as TransformerEngine's THD context
    parallelism does), so each rank gets an equal share of every sequence; each length
    must divide into ``world_size`` (contiguous) or ``2 * world_size`` (zigzag) chunks.

    Args:
        cu_seqlens: ``[n+1]`` global boundaries (``cu_seqlens[-1] = t``).

    Returns:
        ``(index, positions, local_cu_seqlens)``: ``index [t/W]`` int64 rows of the packed
        tensor this rank holds (``q_local = q[index]``), ``positions [t/W]`` their
        positions inside their own sequence (pass as ``positions=`` with ``format="thd"``),
        and ``local_cu_seqlens [n+1]`` the boundaries of the local pack, in the dtype of
        ``cu_seqlens`` (int32 stays int32, as flash-attn's varlen kernels take it).

    Example:
        >>> idx, pos, cu = shard_packed(torch.tensor([0, 4, 8]), 2, 1, scheme="zigzag")
        >>> idx.tolist(), pos.tolist(), cu.tolist()
        ([1, 2, 5, 6], [1, 2, 1, 2], [0, 2, 4])
    """
    if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.device.type == "meta":
        raise fail("cu_seqlens with values (the split is computed on the host)", "cu_seqlens on the meta device",
                   "pass the real boundaries (on CPU or an accelerator)")
    pos_all = positions_from_cu_seqlens(cu_seqlens)  # [t], validates cu_seqlens
    _check_world(world_size, rank, scheme)
    cu = cu_seqlens.long().tolist()
    idx: List[torch.Tensor] = []
    local = [0]
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        try:
            pieces = _chunks(b - a, world_size, rank, scheme)
        except ValueError as e:
            raise fail(
                f"every packed sequence length divisible into the {scheme!r} chunks",
                f"sequence {i} of length {b - a} ({e})",
                "pad each sequence of the pack to a multiple of world_size (2 * world_size for zigzag)",
            ) from None
        for st, n in pieces:
            idx.append(torch.arange(a + st, a + st + n, device=cu_seqlens.device))
        local.append(local[-1] + sum(n for _, n in pieces))
    index = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64, device=cu_seqlens.device)
    return index, pos_all[index], torch.tensor(local, dtype=cu_seqlens.dtype, device=cu_seqlens.device)


def rotate_dtensor(rope, q, k, *, format: str = "bshd", offsets: Optional[int] = None, seq_len: Optional[int] = None):
    """Apply a :class:`ropekit.RotaryEmbedding` to DTensors sharded on the sequence dim.

    ``q`` and ``k`` are ``torch.distributed.tensor.DTensor`` on a 1-D device mesh with
    placement ``Shard(seq_dim)`` (``seq_dim`` from ``format``) or ``Replicate()``. Each
    rank rotates its local shard with its global positions (DTensor's ``torch.chunk``
    split: shard ``r`` starts at ``r · ceil(S / W)``, uneven tails allowed), without
    communication; the results keep the input placements. The result is bit-identical to
    ``rope(q.full_tensor(), k.full_tensor(), offsets=offsets, seq_len=seq_len)`` on one
    process, for every scaling (every rank passes the same global ``seq_len``).

    Args:
        rope: the module.
        q, k: DTensors ``[b, S, h, d]`` (or ``bhsd``/``sbhd``) on the same 1-D mesh, with
            the same placements (RopeError otherwise).
        offsets: an int added to every position (e.g. tokens already in the KV cache).
        seq_len: total length for length-dependent scaling (LongRoPE, dynamic NTK); default
            the global ``offsets + S`` (never a rank's local length), as the unsharded call.

    Returns:
        ``(q_rot, k_rot)`` DTensors.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not callable(rope):
        raise fail("rope a ropekit.RotaryEmbedding (the module that rotates each local shard)", describe(rope),
                   "pass the model's RotaryEmbedding, e.g. rotate_dtensor(rope, q, k)")
    if not isinstance(format, str) or format not in ("bshd", "bhsd", "sbhd"):
        raise fail("format bshd, bhsd or sbhd", repr(format), "DTensor sharding of packed (thd) tensors is not supported")
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, DTensor):
            raise fail(f"{name} a DTensor", type(t).__name__, "use rope(q, k) for plain tensors")
        if t.dim() != 4:
            raise fail(f"{name} with 4 dims for format {format!r}", f"shape {tuple(t.shape)}",
                       "pass [b, S, h, d] DTensors (or set format= to their layout)")
    seq_dim = format.index("s")
    S = q.shape[seq_dim]
    if q.device_mesh.ndim != 1 or k.device_mesh != q.device_mesh:
        raise fail(
            "q and k on one 1-D device mesh (each rank rotates its shard by the mesh's local rank)",
            f"q on {q.device_mesh} and k on {k.device_mesh}",
            "distribute q and k on the same 1-D mesh",
        )
    if q.placements != k.placements or k.shape[seq_dim] != S:
        raise fail(
            f"q and k with the same placements and sequence length (dim {seq_dim} for format {format!r})",
            f"placements {q.placements} and {k.placements}, sequence length {S} and {k.shape[seq_dim]}",
            "redistribute k like q, and check format= against the tensors' layout",
        )
    pl = q.placements[0]
    off = 0 if offsets is None else integer("offsets", offsets, minimum=0, maximum=MAX_EXACT_POSITION,
                                            fix="pass the number of tokens already in the KV cache (an int)")
    seq_len = check_seq_len(seq_len)
    ql, kl = q.to_local(), k.to_local()
    if isinstance(pl, Replicate):
        start = 0
    elif isinstance(pl, Shard) and pl.dim % q.dim() == seq_dim:
        w, r = q.device_mesh.size(), q.device_mesh.get_local_rank()
        start = min(r * (-(-S // w)), S)  # torch.chunk: ceil-sized shards, the tail shorter
    else:
        raise fail(f"placement Shard({seq_dim}) (the sequence dim) or Replicate()", str(pl), "redistribute q and k")
    pos = torch.arange(start, start + ql.shape[seq_dim], device=ql.device) + off  # [s_local]
    scaling = getattr(getattr(rope, "cfg", None), "scaling", None)
    if seq_len is None and getattr(scaling, "length_dependent", False):
        seq_len = off + S  # the global length on every rank (not the local max + 1): one spectrum everywhere
    kw_len = {} if seq_len is None else {"seq_len": seq_len}
    q2, k2 = rope(ql, kl, positions=pos, format=format, **kw_len)
    kw = dict(device_mesh=q.device_mesh, placements=q.placements, shape=q.shape, stride=q.stride())
    kk = dict(device_mesh=k.device_mesh, placements=k.placements, shape=k.shape, stride=k.stride())
    return DTensor.from_local(q2, **kw), DTensor.from_local(k2, **kk)
