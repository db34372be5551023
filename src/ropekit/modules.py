"""``RotaryEmbedding``: the module that owns the tables and applies them to q and k."""

from __future__ import annotations

import threading
from typing import Optional, Tuple, Union

import torch
from torch import nn

from ._errors import fail
from .config import RopeConfig
from . import backends as _backends
from .functional import apply_gather, apply_rotary_qk, tracing
from .positions import resolve_positions, split_format, split_qk_format, table_view
from .tables import MAX_EXACT_POSITION, cos_sin

__all__ = ["RotaryEmbedding"]

# A table row per position is worth it while the table stays small; beyond this many rows
# (and when the positions are sparse) cos/sin are computed for the given positions directly,
# with the same float64 formula, so a position like 10**12 never allocates a huge table.
TABLE_ROWS_LIMIT = 1 << 20


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            got = str(t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
            raise fail(f"{name} a real floating tensor", got, f"convert {name} to float")
    if q.device != k.device:
        raise fail("q and k on one device", f"{q.device} and {k.device}", "move them together")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding of q and k, with lazily grown, exact tables.

    Args:
        cfg: the :class:`~ropekit.RopeConfig` (layout, rotary dim, scaling).
        backend: apply backend (``"auto"`` picks the fastest available for the tensors).
        table_dtype: dtype of the cached cos/sin (float32 default; float64 for a float64
            model). ``module.to(torch.bfloat16)`` does not lower it: tables whose dtype
            was changed are rebuilt from float64 angles.
        max_position: initial table length (grown on demand, to the next power of two).
        attention_scaling: fold ``cfg.attention_factor`` into cos/sin (default, as
            transformers does).

    Tables are non-persistent buffers (never in ``state_dict``); :meth:`rope_init`
    rebuilds them after meta-device initialisation.

    Under ``torch.compile`` / ``torch.export`` (and for ``meta`` tensors) the module
    does not touch its cache: cos/sin are computed inside the graph from the positions
    with the same float64 formula (values equal to the table's up to float64 ``cos``/``sin``
    rounding, i.e. within 1 ulp of ``table_dtype``), so there is no host sync, no lock,
    no buffer reassignment, no table coverage to guarantee, and a change of sequence
    length needs no recompilation (with dynamic shapes). Position values are not
    validated there (no sync): pass non-negative positions. Length-dependent scaling
    (dynamic NTK, LongRoPE) needs ``seq_len=`` while tracing. The traced graph holds no
    host-side state and allocates only its outputs, so it is CUDA-graph safe
    (``mode="reduce-overhead"``).

    Example:
        >>> rope = RotaryEmbedding(RopeConfig(head_dim=64))
        >>> q, k = torch.randn(2, 10, 8, 64), torch.randn(2, 10, 2, 64)  # bshd, GQA
        >>> q2, k2 = rope(q, k, offsets=torch.tensor([0, 5]))
        >>> q2.shape, k2.shape
        (torch.Size([2, 10, 8, 64]), torch.Size([2, 10, 2, 64]))
    """

    cos_cached: Optional[torch.Tensor]
    sin_cached: Optional[torch.Tensor]

    def __init__(
        self,
        cfg: RopeConfig,
        *,
        backend: str = "auto",
        table_dtype: torch.dtype = torch.float32,
        max_position: int = 0,
        attention_scaling: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(cfg, RopeConfig):
            raise fail("cfg a ropekit.RopeConfig", type(cfg).__name__, "build one with RopeConfig(head_dim=...) or RopeConfig.from_hf(...)")
        self.cfg = cfg
        self.backend = backend
        self.table_dtype = table_dtype
        if isinstance(max_position, bool) or not isinstance(max_position, int) or max_position < 0:
            raise fail("max_position an int >= 0", repr(max_position), "pass the longest sequence you expect (or 0: grow on demand)")
        self.max_position = max_position
        self.attention_scaling = attention_scaling
        self._lock = threading.Lock()
        self._key: object = None
        self.register_buffer("cos_cached", None, persistent=False)
        self.register_buffer("sin_cached", None, persistent=False)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"head_dim={c.head_dim}, rotary_dim={c.rotary_dim}, base={c.base}, layout={c.layout!r}, scaling={c.scaling!r}"

    # -- pickling/deepcopy: locks are not picklable ------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def rope_init(self, device: Union[str, torch.device, None] = None) -> None:
        """(Re)build the tables, e.g. after constructing on the meta device."""
        dev = torch.device(device) if device is not None else (
            self.cos_cached.device if self.cos_cached is not None and self.cos_cached.device.type != "meta" else torch.device("cpu")
        )
        with self._lock:
            self.cos_cached = self.sin_cached = None
        if self.max_position:
            self.tables(self.max_position, device=dev)

    def tables(
        self, n: int, *, device: Union[str, torch.device], seq_len: Optional[int] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cached ``(cos, sin)``, each ``[n', r/2]`` with ``n' >= n``, for positions ``0 .. n'-1``."""
        device = torch.device(device)
        key = self.cfg.table_key(seq_len)
        with self._lock:
            cos, sin = self.cos_cached, self.sin_cached
            stale = (
                cos is None
                or sin is None
                or cos.device != device
                or cos.dtype != self.table_dtype
                or sin.dtype != self.table_dtype
                or cos.shape[0] < n
                or key != self._key
            )
            if stale:
                size = max(n, self.max_position, 1)
                size = 1 << (size - 1).bit_length()
                pos = torch.arange(size, device=device)
                cos, sin = cos_sin(
                    self.cfg, pos, dtype=self.table_dtype, seq_len=seq_len, attention_scaling=self.attention_scaling
                )
                self.cos_cached, self.sin_cached, self._key = cos, sin, key
        return cos, sin

    def _positions(self, q, positions, offsets, cu_seqlens, format, check_values=True):
        b, s = split_format(q, format)
        pos = resolve_positions(
            format, b, s, positions=positions, offsets=offsets, cu_seqlens=cu_seqlens, device=q.device,
            check_values=check_values,
        )
        if pos.dim() == 2 and pos.shape[0] == 1:
            pos = pos[0]
        return pos

    def _positions_and_tables(self, q, positions, offsets, cu_seqlens, format, seq_len):
        """Positions (``[s]``, ``[b, s]`` or ``[t]``, int64) and the table ``(cos_t, sin_t)``.

        The table covers every position, or is ``None`` when the positions are too large
        and sparse for a table (then cos/sin are computed for the positions themselves).
        """
        pos = self._positions(q, positions, offsets, cu_seqlens, format, check_values=False)
        n = 0
        if pos.numel():
            lo, hi = (int(v) for v in torch.aminmax(pos))  # one host sync for both ends
            if lo < 0:
                raise fail(
                    "positions >= 0 (offsets + 0..s-1, or the positions given)",
                    f"a minimum position of {lo}",
                    "positions count from 0; for left padding clamp padded positions to 0 (they are masked anyway)",
                )
            n = hi + 1
        if n - 1 > MAX_EXACT_POSITION:
            raise fail(
                "positions <= 2**53 (exact in the float64 angle m·θ)",
                f"a maximum position of {n - 1}",
                "positions are token indices; check how they were computed",
            )
        if seq_len is None and self.cfg.scaling is not None and self.cfg.scaling.length_dependent:
            seq_len = n
        if n > max(self.max_position, TABLE_ROWS_LIMIT) and n > 4 * pos.numel():
            return pos, None, seq_len
        cos_t, sin_t = self.tables(n, device=q.device, seq_len=seq_len)
        return pos, (cos_t, sin_t), seq_len

    def _direct_cos_sin(self, pos, q, seq_len):
        """cos/sin computed for ``pos`` itself (graphs, meta tensors, sparse huge positions)."""
        if seq_len is None and self.cfg.scaling is not None and self.cfg.scaling.length_dependent:
            raise fail(
                f"seq_len= for length-dependent scaling ({type(self.cfg.scaling).__name__}) under torch.compile/export",
                "seq_len=None",
                "pass seq_len= (the total length of the sequence) to the module call",
            )
        return cos_sin(self.cfg, pos, dtype=self.table_dtype, seq_len=seq_len, attention_scaling=self.attention_scaling)

    def _sync_free(self, q) -> bool:
        """Graphs (torch.compile/export, torch.jit.trace) and meta tensors: cos/sin from the
        positions inside the graph, no cache (a trace must not record a table build that only
        its first call makes)."""
        return tracing() or torch.jit.is_tracing() or q.device.type == "meta"

    def cos_sin_for(
        self,
        q: torch.Tensor,
        *,
        positions: Optional[torch.Tensor] = None,
        offsets: Union[int, torch.Tensor, None] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        format: str = "bshd",
        seq_len: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The gathered ``(cos, sin)`` for ``q`` in ``format``, broadcastable to ``q.shape[:-1] + (r/2,)``."""
        if self._sync_free(q):
            pos = self._positions(q, positions, offsets, cu_seqlens, format)
            cos, sin = self._direct_cos_sin(pos, q, seq_len)  # [*pos.shape, r/2]
        else:
            pos, table, seq_len = self._positions_and_tables(q, positions, offsets, cu_seqlens, format, seq_len)
            if table is None:
                cos, sin = self._direct_cos_sin(pos, q, seq_len)  # [*pos.shape, r/2]
            else:
                cos, sin = table[0][pos], table[1][pos]  # [*pos.shape, r/2]
        return table_view(cos, format, pos.dim()), table_view(sin, format, pos.dim())

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        positions: Optional[torch.Tensor] = None,
        offsets: Union[int, torch.Tensor, None] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        format: str = "bshd",
        seq_len: Optional[int] = None,
        inplace: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` and ``k``.

        Args:
            q: ``[b, s, hq, d]`` (or ``bhsd``/``sbhd`` by ``format``; ``[t, hq, d]`` for ``thd``).
            k: same layout as ``q`` with ``hk`` heads (``hk`` may differ from ``hq``).
            positions: ``[s]`` or ``[b, s]`` (``[t]`` for ``thd``) integer positions.
            offsets: int or ``[b]`` tensor added to ``0 .. s-1`` (KV-cache length per sample,
                e.g. decode with ``s = 1, b > 1``).
            cu_seqlens: ``[n+1]`` packed boundaries for ``thd``; positions restart per sequence
                (at ``offsets[i]`` when ``offsets``, an int or ``[n]``, is given too).
            format: ``"bshd"``, ``"bhsd"``, ``"sbhd"`` or ``"thd"``.
            seq_len: total length for length-dependent scaling (dynamic NTK, LongRoPE);
                default ``max(position) + 1``. Pass the final length of a generation to keep
                LongRoPE's factor fixed for the whole sequence.
            inplace: rotate q and k in place.

        Returns:
            ``(q_rot, k_rot)`` in the input format and dtypes.
        """
        if positions is None and cu_seqlens is None and seq_len is None and type(q) is torch.Tensor and not self._sync_free(q):
            fast = self._cached_gather(q, k, offsets, format, inplace)
            if fast is not None:
                return fast
        _check_qk(q, k)
        if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0):
            raise fail("seq_len an int >= 0 or None", repr(seq_len), "pass the total sequence length (e.g. prompt + generated)")
        split_qk_format(q, k, format)
        if self._sync_free(q):
            # graph path: no cache, no lock, no sync; cos/sin from positions inside the graph
            cos, sin = self.cos_sin_for(q, positions=positions, offsets=offsets, cu_seqlens=cu_seqlens, format=format, seq_len=seq_len)
            return apply_rotary_qk(q, k, cos, sin, layout=self.cfg.layout, inplace=inplace, backend=self.backend)
        pos, table, seq_len = self._positions_and_tables(q, positions, offsets, cu_seqlens, format, seq_len)
        if table is not None:
            # the table covers every position (checked above): rows picked inside the kernel
            return apply_gather(q, k, table[0], table[1], pos, format=format, layout=self.cfg.layout, inplace=inplace, backend=self.backend)
        cos, sin = self._direct_cos_sin(pos, q, seq_len)
        cos, sin = table_view(cos, format, pos.dim()), table_view(sin, format, pos.dim())
        return apply_rotary_qk(q, k, cos, sin, layout=self.cfg.layout, inplace=inplace, backend=self.backend)

    def rotate(
        self,
        x: torch.Tensor,
        *,
        positions: Optional[torch.Tensor] = None,
        offsets: Union[int, torch.Tensor, None] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        format: str = "bshd",
        seq_len: Optional[int] = None,
        inplace: bool = False,
    ) -> torch.Tensor:
        """Rotate one tensor (q or k alone), for models that rotate q and k at different places.

        Same positions, tables and backends as :meth:`forward` (the fused op runs with a
        0-head partner), so ``rope.rotate(q, ...)`` equals ``rope(q, k, ...)[0]`` bit for bit.

        Args:
            x: ``[b, s, h, d]`` (or ``bhsd``/``sbhd`` by ``format``; ``[t, h, d]`` for ``thd``).
            positions, offsets, cu_seqlens, format, seq_len, inplace: as in :meth:`forward`
                (``thd`` takes ``offsets`` of length ``len(cu_seqlens) - 1`` with ``cu_seqlens``).

        Returns:
            ``x`` rotated, its shape and dtype.

        Example:
            >>> rope = RotaryEmbedding(RopeConfig(head_dim=64))
            >>> q = torch.randn(5, 8, 64)                                  # [t, h, d]
            >>> cu, off = torch.tensor([0, 2, 5]), torch.tensor([7, 0])    # 2 packed sequences
            >>> rope.rotate(q, cu_seqlens=cu, offsets=off, format="thd").shape
            torch.Size([5, 8, 64])
        """
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            got = str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
            raise fail("x a real floating tensor", got, "convert x to float")
        split_format(x, format, "x")
        shape = list(x.shape)
        shape[1 if format in ("bhsd", "thd") else 2] = 0  # the heads dim
        y, _ = self.forward(
            x, x.new_empty(shape), positions=positions, offsets=offsets, cu_seqlens=cu_seqlens, format=format,
            seq_len=seq_len, inplace=inplace,
        )
        return y

    def _cached_gather(self, q, k, offsets, format, inplace):
        """The common call (positions from ``offsets``, length-independent scaling, tables
        already cached on q's device): positions built without a host sync and the cached
        tables passed as they are; the fused op checks every position against the table
        before writing. ``None`` when this shortcut does not apply or the op refused the
        call (e.g. a position past the table): the general path then grows the tables or
        explains the error."""
        sc = self.cfg.scaling
        if (sc is not None and sc.length_dependent) or type(q) is not torch.Tensor or type(k) is not torch.Tensor:
            return None
        cls = type(self)
        if cls.tables is not RotaryEmbedding.tables or cls._positions_and_tables is not RotaryEmbedding._positions_and_tables:
            return None  # a subclass that makes its own tables or positions: the general path
        if format not in ("bshd", "bhsd", "sbhd") or q.dim() != 4:
            return None
        if not _backends.resolve(self.backend, q).CHECKS:
            return None  # a backend that needs the positions checked before the call
        s = int(q.shape[2 if format == "bhsd" else 0 if format == "sbhd" else 1])
        static = offsets is None or type(offsets) is int
        if static and not 0 <= (offsets or 0) <= max(self.max_position, TABLE_ROWS_LIMIT) - s:
            return None  # negative, or past what a table should hold: the general path decides
        buf = self._buffers  # not self.cos_cached: nn.Module.__getattr__ costs ~1 µs per buffer
        cos_t, sin_t = buf["cos_cached"], buf["sin_cached"]
        fresh = (
            cos_t is None or sin_t is None or cos_t.device != q.device or cos_t.dtype != self.table_dtype
            or sin_t.dtype != self.table_dtype or self._key != self.cfg.table_key(None)
        )
        if static and (fresh or (offsets or 0) + s > cos_t.shape[0]):
            cos_t, sin_t = self.tables((offsets or 0) + s, device=q.device)  # first call: the same path as later ones
        elif fresh:
            return None
        if static:
            off = offsets or 0
            pos = self._arange(cos_t.shape[0], q.device)[off : off + s]  # [s]
        elif type(offsets) is torch.Tensor and offsets.dim() == 1 and offsets.dtype == torch.int64:
            pos = offsets[:, None] if s == 1 else offsets[:, None] + self._arange(cos_t.shape[0], q.device)[:s]  # [b, s]
        else:
            return None
        try:
            return apply_gather(q, k, cos_t, sin_t, pos, format=format, layout=self.cfg.layout, inplace=inplace, backend=self.backend)
        except ValueError:
            return None  # the general path below re-checks everything and grows or explains

    def _arange(self, n: int, device: torch.device) -> torch.Tensor:
        ar = self.__dict__.get("_arange_cache")
        if ar is None or ar.shape[0] < n or ar.device != device:
            ar = torch.arange(max(n, 1), device=device)
            self.__dict__["_arange_cache"] = ar
        return ar
