"""Position inputs -> integer position tensors.

Every function returns int64 positions on the requested device; values are exact.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ._checks import device as check_device
from ._checks import integer
from ._errors import fail
from .config import CPU, MAX_EXACT_POSITION
from .tables import check_positions

__all__ = ["FORMATS", "check_format", "positions_from_cu_seqlens", "resolve_positions", "split_format", "split_qk_format"]

#: Tensor formats of q/k: batch, sequence, heads, head dim; ``thd`` is packed tokens.
FORMATS = ("bshd", "bhsd", "sbhd", "thd")


#: What a tensor of each format looks like, and how to get one (the fix of a wrong rank).
_FORMAT_HELP = {
    "bshd": "[batch, seq, heads, head_dim]",
    "bhsd": "[batch, heads, seq, head_dim]",
    "sbhd": "[seq, batch, heads, head_dim]",
    "thd": "[tokens, heads, head_dim] (packed, no batch dim)",
}


def check_format(fmt) -> str:
    """RopeError unless ``fmt`` is one of :data:`FORMATS`."""
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise fail(f"format in {FORMATS}", repr(fmt), 'use "bshd" for [batch, seq, heads, head_dim] tensors')
    return fmt


def split_format(x: torch.Tensor, fmt: str, name: str = "q"):
    """``(b, s)`` of ``x`` in format ``fmt`` (``b = None`` for ``thd``)."""
    check_format(fmt)
    if not isinstance(x, torch.Tensor):
        raise fail(f"{name} a torch.Tensor {_FORMAT_HELP[fmt]}", type(x).__name__, f"pass torch.as_tensor({name})")
    want = len(fmt)
    if x.dim() != want:
        if fmt == "thd":
            fix = (
                "pack the tokens to [t, heads, head_dim] (e.g. q.reshape(-1, heads, head_dim) of the "
                "unpadded tokens, with cu_seqlens), or pass format='bshd' / 'bhsd' / 'sbhd' for a batched tensor"
            )
        else:
            fix = f"reshape to {_FORMAT_HELP[fmt]}, or pass the format= that matches {name}'s layout ('thd' for packed [t, heads, head_dim])"
        raise fail(
            f"{name} with {want} dims for format {fmt!r} ({_FORMAT_HELP[fmt]})",
            f"{x.dim()} dims, shape {tuple(x.shape)}",
            fix,
        )
    if fmt == "thd":
        return None, x.shape[0]
    return x.shape[fmt.index("b")], x.shape[fmt.index("s")]


def split_qk_format(q: torch.Tensor, k: torch.Tensor, fmt: str):
    """``(b, s)`` shared by ``q`` and ``k`` in format ``fmt``; RopeError when they differ.

    q and k may differ in their heads dim only (GQA/MQA).
    """
    qb, qs = split_format(q, fmt)
    kb, ks = split_format(k, fmt, "k")
    if (qb, qs) != (kb, ks):
        raise fail(
            f"q and k with the same batch and sequence sizes in format {fmt!r}",
            f"q {tuple(q.shape)} and k {tuple(k.shape)}",
            "rotate new keys with their own call (e.g. offsets=cache_len)",
        )
    return qb, qs


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: Optional[int] = None) -> torch.Tensor:
    """Per-token positions of packed sequences: ``[n+1]`` boundaries -> ``[t]``.

    ``cu_seqlens = [0, 3, 5]`` gives ``[0, 1, 2, 0, 1]``: positions restart at each sequence.
    Raises RopeError unless ``cu_seqlens`` is 1-D integer, starts at 0, is non-decreasing
    and ends at ``total`` (when given) and at most at ``2**53``.

    On ``meta`` tensors and while torch.compile/export traces, the values are not checked
    (that needs a host sync) and ``total`` is required; the positions are then
    ``i - cu[searchsorted(cu, i, right=True) - 1]``, which has no data-dependent shape.

    Example:
        >>> positions_from_cu_seqlens(torch.tensor([0, 3, 3, 5])).tolist()
        [0, 1, 2, 0, 1]
    """
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        got = f"shape {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise fail("cu_seqlens a 1-D integer tensor [n_seqs + 1]", got, "pass e.g. torch.tensor([0, 3, 5])")
    check_positions(cu_seqlens, "cu_seqlens", check_values=False)
    if total is not None:
        total = integer("total", total, minimum=0, maximum=MAX_EXACT_POSITION, fix="pass the packed token count t = q.shape[0]")
    cu = cu_seqlens.long()
    if cu.device.type == "meta" or torch.compiler.is_compiling():
        if total is None:
            raise fail("total= (the packed token count) for meta tensors or under torch.compile", "None", "pass total=t")
        tok = torch.arange(total, device=cu.device)  # [t]
        seq = torch.searchsorted(cu, tok, right=True) - 1  # [t] index of each token's sequence
        return tok - cu[seq.clamp(0, cu.numel() - 1)]
    first, last = int(cu[0]), int(cu[-1])
    if first != 0 or (cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any())):
        raise fail(
            "cu_seqlens starting at 0 and non-decreasing",
            str(cu.tolist()[:8]) + ("..." if cu.numel() > 8 else ""),
            "pass cumulative lengths: torch.cat([zero, lengths.cumsum(0)])",
        )
    if last > MAX_EXACT_POSITION:  # (before allocating `last` positions)
        raise fail(
            "cu_seqlens[-1] <= 2**53 (positions exact in the float64 angle m·θ)",
            f"cu_seqlens[-1] == {last}",
            "cu_seqlens must be the cumulative token counts of the pack, torch.cat([zero, lengths.cumsum(0)])",
        )
    if total is not None and last != total:
        raise fail(
            f"cu_seqlens[-1] == t == {total} (the packed token count)",
            f"cu_seqlens[-1] == {last}",
            "cu_seqlens must describe exactly the packed tokens of q/k",
        )
    lengths = cu[1:] - cu[:-1]  # [n]
    starts = torch.repeat_interleave(cu[:-1], lengths, output_size=last)  # [t]
    return torch.arange(last, device=cu.device) - starts


def resolve_positions(
    fmt: str,
    b: Optional[int],
    s: int,
    *,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor, None] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    device: Union[str, torch.device, None] = None,
    check_values: bool = True,
) -> torch.Tensor:
    """Integer positions ``[s]`` (shared by the batch) or ``[b, s]`` (``[t]`` for ``thd``).

    At most one of ``positions``, ``offsets`` and ``cu_seqlens`` may be given, except
    ``offsets`` with ``cu_seqlens`` for ``thd`` (packed sequences that continue a cache:
    ``offsets`` an int or ``[len(cu_seqlens) - 1]``, sequence ``i`` counting from
    ``offsets[i]``); with none, positions are ``0 .. s-1``. They go to ``device`` (default:
    the given tensor's device, else CPU; never the device of an active ``torch.device(...)``
    context). ``check_values=False`` skips the (device-syncing) check
    that tensor positions/offsets are ``>= 0``: for callers that check the result's range.
    """
    given = [n for n, v in (("positions", positions), ("offsets", offsets), ("cu_seqlens", cu_seqlens)) if v is not None]
    packed_offsets = fmt == "thd" and given == ["offsets", "cu_seqlens"]  # per-sequence starts of packed sequences
    if len(given) > 1 and not packed_offsets:
        raise fail(
            "at most one of positions=, offsets=, cu_seqlens= (or offsets= with cu_seqlens= for format 'thd')",
            " and ".join(given),
            "add offsets into positions yourself",
        )
    if fmt == "thd":
        if offsets is not None and cu_seqlens is None:
            raise fail("cu_seqlens= with offsets= for format 'thd'", "offsets= alone", "pass the packed boundaries cu_seqlens too")
        if positions is None and cu_seqlens is None:
            raise fail("cu_seqlens= (or positions=) for format 'thd'", "neither", "pass the packed boundaries cu_seqlens")
    elif cu_seqlens is not None:
        raise fail("cu_seqlens only with format='thd'", f"format={fmt!r}", "pass format='thd' with q/k of shape [t, h, d]")

    if cu_seqlens is not None and not isinstance(cu_seqlens, torch.Tensor):  # (before it is moved to the device)
        raise fail("cu_seqlens an integer torch.Tensor [n_seqs + 1]", type(cu_seqlens).__name__,
                   "pass torch.tensor(cu_seqlens) (e.g. torch.tensor([0, 3, 5]))")
    dev = check_device("device", device)
    for name, v in (("positions", positions), ("offsets", offsets), ("cu_seqlens", cu_seqlens)):
        if isinstance(v, torch.Tensor) and v.device.type == "meta" and (dev is None or dev.type != "meta"):
            raise fail(f"{name} with values (q/k are on {dev})", f"{name} on the meta device", f"build {name} on q's device")
    if dev is None:  # explicit, never a torch.device(...) context's: the given tensor's device, else CPU
        dev = next((v.device for v in (positions, offsets, cu_seqlens) if isinstance(v, torch.Tensor)), CPU)
    device = dev
    if cu_seqlens is not None:
        pos = positions_from_cu_seqlens(cu_seqlens.to(device), total=s)  # [t]
        if offsets is None:
            return pos
        return pos + _packed_offsets(offsets, cu_seqlens.to(device).long(), s, check_values)
    if positions is not None:
        check_positions(positions, check_values=check_values)
        ok = ((s,),) if fmt == "thd" else ((s,), (b, s), (1, s))
        shape = tuple(positions.shape)
        # compare lengths before sizes: with symbolic sizes (torch.export) each size
        # comparison becomes a guard, and ``(2, s) == (s,)`` would guard ``s != 2``
        if not any(len(o) == len(shape) and all(a == c for a, c in zip(shape, o)) for o in ok):
            raise fail(
                f"positions of shape {' or '.join(str(list(o)) for o in ok)}",
                f"shape {list(positions.shape)}",
                "give one position per token (per sample if they differ)",
            )
        return positions.to(device=device, dtype=torch.int64)
    base = torch.arange(s, device=device, dtype=torch.int64)  # [s]
    if offsets is None:
        return base
    if isinstance(offsets, bool):
        raise fail("offsets an int or a [b] integer tensor", "a bool", "pass the KV-cache length")
    if isinstance(offsets, int):
        if offsets < 0:
            raise fail("offsets >= 0", str(offsets), "pass the number of tokens already in the KV cache")
        if offsets + max(s - 1, 0) > MAX_EXACT_POSITION:
            raise fail(
                "offsets + s - 1 <= 2**53 (positions exact in the float64 angle m·θ)",
                f"offsets={offsets} with s={s}",
                "pass the number of tokens already in the KV cache",
            )
        return base + offsets
    check_positions(offsets, "offsets", check_values=check_values)
    if offsets.dim() == 0:
        return base + offsets.to(device=device, dtype=torch.int64)
    if tuple(offsets.shape) != (b,):
        raise fail(f"offsets an int or a tensor of shape [b] = [{b}]", f"shape {list(offsets.shape)}", "one offset per sample")
    return offsets.to(device=device, dtype=torch.int64)[:, None] + base  # [b, s]


def _packed_offsets(offsets, cu: torch.Tensor, t: int, check_values: bool):
    """Per-token offsets ``[t]`` (or an int) of packed sequences: sequence ``i`` (tokens
    ``cu[i] .. cu[i+1]-1``) starts at position ``offsets[i]`` (chunked prefill)."""
    n = cu.numel() - 1
    if isinstance(offsets, bool):
        raise fail(f"offsets an int or an integer tensor [n_seqs] = [{n}]", "a bool", "pass each sequence's cached length")
    if isinstance(offsets, int):
        if offsets < 0:
            raise fail("offsets >= 0", str(offsets), "pass the number of tokens already in each sequence's KV cache")
        if offsets > MAX_EXACT_POSITION:  # (before it meets an int64 tensor: no wrap, no OverflowError)
            raise fail("offsets <= 2**53 (positions exact in the float64 angle m·θ)", f"offsets={offsets}",
                       "pass the number of tokens already in each sequence's KV cache")
        return offsets
    check_positions(offsets, "offsets", check_values=check_values)
    if offsets.dim() == 0:
        return offsets.to(device=cu.device, dtype=torch.int64)
    if tuple(offsets.shape) != (n,):
        raise fail(
            f"offsets an int or a tensor of shape [len(cu_seqlens) - 1] = [{n}] (one start per packed sequence)",
            f"shape {list(offsets.shape)}",
            "one offset per sequence of cu_seqlens",
        )
    off = offsets.to(device=cu.device, dtype=torch.int64)
    if cu.device.type == "meta" or torch.compiler.is_compiling():
        tok = torch.arange(t, device=cu.device)
        seq = (torch.searchsorted(cu, tok, right=True) - 1).clamp(0, max(n - 1, 0))  # [t]
        return off[seq] if n else torch.zeros(t, dtype=torch.int64, device=cu.device)
    return torch.repeat_interleave(off, cu[1:] - cu[:-1], output_size=t)  # [t]


def table_view(t: torch.Tensor, fmt: str, pos_dims: int) -> torch.Tensor:
    """Gathered table ``[s, r/2]`` / ``[b, s, r/2]`` / ``[t, r/2]`` -> broadcastable to q in ``fmt``."""
    if fmt == "thd":
        return t[:, None, :]  # [t, 1, r/2]
    if pos_dims == 1:  # shared by the batch
        if fmt == "bshd":
            return t[:, None, :]  # [s, 1, r/2]
        if fmt == "bhsd":
            return t  # [s, r/2]
        return t[:, None, None, :]  # sbhd: [s, 1, 1, r/2]
    if fmt == "bshd":
        return t[:, :, None, :]  # [b, s, 1, r/2]
    if fmt == "bhsd":
        return t[:, None, :, :]  # [b, 1, s, r/2]
    return t.transpose(0, 1)[:, :, None, :]  # sbhd: [s, b, 1, r/2]
