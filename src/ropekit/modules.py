"""``RotaryEmbedding``: the module that owns the tables and applies them to q and k."""

from __future__ import annotations

import threading
from typing import Optional, Tuple, Union

import torch
from torch import nn

from ._errors import fail
from ._checks import flag, integer
from .config import RopeConfig, check_head_width
from . import backends as _backends
from ._tensor_checks import host_readable, to_rope_error
from .functional import apply_rotary_qk, tracing
from .positions import resolve_positions, split_format, split_qk_format, table_view
from .tables import MAX_EXACT_POSITION, build_table, check_dtype, cos_sin

__all__ = ["RotaryEmbedding"]

# A table row per position is worth it while the table stays small; beyond this many rows
# (and when the positions are sparse) cos/sin are computed for the given positions directly,
# with the same float64 formula, so a position like 10**12 never allocates a huge table.
TABLE_ROWS_LIMIT = 1 << 20

_SEQ_DIM = {"bshd": 1, "bhsd": 2, "sbhd": 0}  # the sequence dim of q in each 4-D format
_UNSET = object()


def _host_reads_cheap(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values on the host costs no device synchronisation (CPU)."""
    return t.is_cpu


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
        table_dtype: dtype of the cached cos/sin; default (``None``) float32, and float64
            for float64 q/k (so float64 stays float64). ``module.to(torch.bfloat16)`` does
            not lower it: tables whose dtype was changed are rebuilt from float64 angles.
        max_position: initial table length (grown on demand, to the next power of two).
        attention_scaling: fold ``cfg.attention_factor`` into cos/sin (default, as
            transformers does).
        angles: ``"exact"`` (float64 angles from integer positions, the default) or
            ``"transformers"`` (transformers' float32 ``inv_freq · position``, for bit
            parity with a model's own rotary embedding; see :func:`ropekit.cos_sin`).

    q and k must have the config's head width (``cfg.head_dim``): a RopeError otherwise.

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
        table_dtype: Optional[torch.dtype] = None,
        max_position: int = 0,
        attention_scaling: bool = True,
        angles: str = "exact",
    ) -> None:
        super().__init__()
        if isinstance(cfg, dict) and cfg and all(isinstance(c, RopeConfig) or c is None for c in cfg.values()):
            keys = ", ".join(repr(k) for k in cfg)
            raise fail(
                "cfg a ropekit.RopeConfig (one per module)",
                f"a dict of configs per layer type ({keys}), as RopeConfig.from_hf returns for models whose "
                "layer types use different RoPE",
                "build one module per layer type: {k: RotaryEmbedding(c) for k, c in cfgs.items() if c is not None}",
            )
        if not isinstance(cfg, RopeConfig):
            raise fail("cfg a ropekit.RopeConfig", type(cfg).__name__, "build one with RopeConfig(head_dim=...) or RopeConfig.from_hf(...)")
        if not isinstance(backend, str) or backend not in ("auto", *_backends.names()):
            raise fail(f'backend in {["auto", *_backends.names()]}', repr(backend), 'use backend="auto" to let ropekit choose')
        if table_dtype is not None:
            check_dtype(table_dtype)
        if angles not in ("exact", "transformers"):
            raise fail('angles "exact" or "transformers"', repr(angles),
                       'use "exact" (float64 angles) or "transformers" (bit parity with transformers\' float32 angles)')
        self.cfg = cfg
        self.backend = backend
        self.table_dtype = table_dtype
        self.max_position = integer("max_position", max_position, minimum=0, maximum=MAX_EXACT_POSITION + 1,
                                    fix="pass the longest sequence you expect (or 0: grow on demand)")
        self.attention_scaling = flag("attention_scaling", attention_scaling)
        self.angles = angles
        self._lock = threading.Lock()
        self._key: object = None
        self._built: Optional[torch.dtype] = None  # the dtype the cached tables were built in
        self.register_buffer("cos_cached", None, persistent=False)
        self.register_buffer("sin_cached", None, persistent=False)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"head_dim={c.head_dim}, rotary_dim={c.rotary_dim}, base={c.base}, layout={c.layout!r}, scaling={c.scaling!r}"

    # -- pickling/deepcopy: locks are not picklable ------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state.pop("_be", None)  # a resolved backend module (not picklable): resolved again on use
        state.pop("_decode", None)  # (holds a backend entry point): recorded again on use
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("_built", None)
        self._lock = threading.Lock()

    def _apply(self, fn, recurse=True):
        """``module.to(...)``/``.half()``/``.float()``/``.to_empty(...)``/...: a conversion that
        replaces the tables marks them stale, so they are rebuilt from the float64 angles on
        their next use (the same bits on any device): ``module.half().float()`` must not leave
        float32 tables rounded through float16, nor ``to_empty`` uninitialised memory."""
        before = self._buffers.get("cos_cached"), self._buffers.get("sin_cached")
        out = super()._apply(fn, recurse)
        after = self._buffers.get("cos_cached"), self._buffers.get("sin_cached")
        if any(a is not None and a is not b for a, b in zip(after, before)):
            self.__dict__["_built"] = None  # replaced (cast, moved, emptied): no lookup trusts it
        return out

    def rope_init(self, device: Union[str, torch.device, None] = None) -> None:
        """(Re)build the tables, e.g. after constructing on the meta device."""
        dev = torch.device(device) if device is not None else (
            self.cos_cached.device if self.cos_cached is not None and self.cos_cached.device.type != "meta" else torch.device("cpu")
        )
        with self._lock:
            self.cos_cached = self.sin_cached = None
        if self.max_position:
            self.tables(self.max_position, device=dev)

    def _dtype_for(self, q: torch.Tensor) -> torch.dtype:
        """The table dtype for ``q``: ``table_dtype``, else float64 for float64 q, else float32."""
        if self.table_dtype is not None:
            return self.table_dtype
        return torch.float64 if q.dtype == torch.float64 else torch.float32

    def _tables_for(self, q, n, seq_len, dev=None):
        """:meth:`tables` in q's table dtype (``dtype=`` only when it is not the default, so a
        subclass overriding ``tables(n, *, device, seq_len)`` keeps working)."""
        dtype = self._dtype_for(q)
        dev = q.device if dev is None else dev
        if dtype == (self.table_dtype or torch.float32):
            return self.tables(n, device=dev, seq_len=seq_len)
        return self.tables(n, device=dev, seq_len=seq_len, dtype=dtype)

    def tables(
        self, n: int, *, device: Union[str, torch.device], seq_len: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cached ``(cos, sin)``, each ``[n', r/2]`` with ``n' >= n``, for positions ``0 .. n'-1``
        (``dtype``: default ``table_dtype``, else float32).

        The frequencies are ``cfg.inv_freq(seq_len)``, those of the table's key
        ``cfg.table_key(seq_len)``: for length-dependent scaling ``seq_len=None`` means
        "within the original context" however long the table is (not ``n'``)."""
        device = device if type(device) is torch.device else torch.device(device)
        dtype = dtype or self.table_dtype or torch.float32
        key = self.cfg.table_key(seq_len) if seq_len is not None else self._key_none()
        buf = self._buffers  # not self.cos_cached: nn.Module.__getattr__ costs ~1 µs per buffer
        cos, sin = buf["cos_cached"], buf["sin_cached"]
        if (cos is not None and sin is not None and cos.device == device and cos.dtype == dtype and sin.dtype == dtype
                and self._built == dtype and cos.shape[0] >= n and key == self._key):
            return cos, sin  # current: no lock needed to read it (a rebuild swaps both under the lock)
        with self._lock:
            cos, sin = self.cos_cached, self.sin_cached
            stale = (
                cos is None
                or sin is None
                or cos.device != device
                or cos.dtype != dtype
                or sin.dtype != dtype
                or self._built != dtype  # module.to(dtype) cast the buffers: rebuild from the angles
                or cos.shape[0] < n
                or key != self._key
            )
            if stale:
                size = max(n, self.max_position, 1)
                size = 1 << (size - 1).bit_length()
                cos, sin = build_table(
                    self.cfg, size, dtype=dtype, device=device, seq_len=seq_len,
                    attention_scaling=self.attention_scaling, angles=self.angles,
                )
                self.cos_cached, self.sin_cached, self._key, self._built = cos, sin, key, dtype
        return cos, sin

    def _key_none(self):
        """``cfg.table_key(None)`` (the config is frozen: computed once)."""
        key = self.__dict__.get("_key_none_cache", _UNSET)
        if key is _UNSET:
            key = self.__dict__["_key_none_cache"] = self.cfg.table_key(None)
        return key

    def _positions(self, q, positions, offsets, cu_seqlens, format, check_values=True):
        b, s = split_format(q, format)
        pos = resolve_positions(
            format, b, s, positions=positions, offsets=offsets, cu_seqlens=cu_seqlens, device=q.device,
            check_values=check_values,
        )
        if pos.dim() == 2 and pos.shape[0] == 1:
            pos = pos[0]
        return pos

    def _positions_and_tables(self, q, positions, offsets, cu_seqlens, format, seq_len, flat_decode=False):
        """Positions (``[s]``, ``[b, s]`` or ``[t]``, int64) and the table ``(cos_t, sin_t)``.

        The table covers every position, or is ``None`` when the positions are too large
        and sparse for a table (then cos/sin are computed for the positions themselves).
        With ``flat_decode`` (the caller hands the positions to a backend's gather, which
        reads ``[b]`` positions as ``[b, 1]`` when ``s == 1``) per-sample ``[b]`` offsets with
        ``s == 1`` may come back as ``[b]`` when a table covers them; otherwise positions of
        a 4-D format are always ``[s]`` (shared by the batch) or ``[b, s]``.
        """
        lengthdep = self.cfg.scaling is not None and self.cfg.scaling.length_dependent
        if positions is None and cu_seqlens is None and format in _SEQ_DIM and q.dim() == 4:
            s = q.shape[_SEQ_DIM[format]]
            if offsets is None or type(offsets) is int:
                # positions off .. off+s-1, known on the host: no read of any tensor
                off = offsets or 0
                if off < 0 or off + max(s - 1, 0) > MAX_EXACT_POSITION or off + s > max(self.max_position, TABLE_ROWS_LIMIT):
                    pass  # the general path below words the refusal or computes cos/sin directly
                else:
                    if seq_len is None and lengthdep:
                        seq_len = off + s
                    cos_t, sin_t = self._tables_for(q, off + s, seq_len)
                    return self._arange(cos_t.shape[0], q.device)[off: off + s], (cos_t, sin_t), seq_len
            elif (type(offsets) is torch.Tensor and offsets.dtype == torch.int64 and offsets.dim() == 1
                  and not (seq_len is None and lengthdep)):
                dev = q.device
                b = q.shape[1 if format == "sbhd" else 0]
                if offsets.shape[0] == b and offsets.device == dev:
                    # one offset per sample (decode): [b] positions for s == 1 when the table serves
                    # a gather (the op reads them as [b, 1]); [b, 1] otherwise (a [b] tensor would
                    # read as [s] positions shared by the batch)
                    table, seq_len = self._covering(q, offsets, s, seq_len, dev)
                    if s != 1:
                        pos = offsets[:, None] + self._arange(s, dev)[:s]
                    elif flat_decode and table is not None:
                        pos = offsets
                    else:
                        pos = offsets[:, None]
                    return pos, table, seq_len
        if (isinstance(offsets, torch.Tensor) and offsets.numel() and offsets.dtype.is_signed
                and not offsets.dtype.is_floating_point and offsets.device.type != "meta"):
            top = int(offsets.max())  # before offsets + 0..s-1 is formed: an offset near 2**63 would wrap
            if top > MAX_EXACT_POSITION:
                raise fail("positions <= 2**53 (exact in the float64 angle m·θ)", f"an offset of {top}",
                           "offsets are the number of tokens already in the KV cache; check how they were computed")
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
        cos_t, sin_t = self._tables_for(q, n, seq_len)
        return pos, (cos_t, sin_t), seq_len

    def _direct_cos_sin(self, pos, q, seq_len):
        """cos/sin computed for ``pos`` itself (graphs, meta tensors, sparse huge positions)."""
        if seq_len is None and self.cfg.scaling is not None and self.cfg.scaling.length_dependent:
            raise fail(
                f"seq_len= for length-dependent scaling ({type(self.cfg.scaling).__name__}) under torch.compile/export",
                "seq_len=None",
                "pass seq_len= (the total length of the sequence) to the module call",
            )
        return cos_sin(self.cfg, pos, dtype=self._dtype_for(q), seq_len=seq_len, attention_scaling=self.attention_scaling,
                       angles=self.angles)

    def _sync_free(self, q, *ts) -> bool:
        """Graphs (torch.compile/export, torch.jit.trace) and meta tensors: cos/sin from the
        positions inside the graph, no cache (a trace must not record a table build that only
        its first call makes). So too for position tensors ``ts`` whose values the host cannot
        read (vmapped by ``torch.func.vmap``, ``make_fx``'s proxies under
        ``torch.func.linearize``): the table's size would need them."""
        if q.is_meta or torch._C._get_tracing_state() is not None or tracing():
            return True
        K = torch._C._TorchDispatchModeKey  # make_fx (torch.func.linearize, aot tracing): no cache either
        if torch._C._get_dispatch_mode(K.PROXY) is not None or torch._C._get_dispatch_mode(K.FAKE) is not None:
            return True
        return any(type(t) is not int and isinstance(t, torch.Tensor) and not host_readable(t) for t in ts)

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
        check_head_width(self.cfg, q=q)
        return self._cos_sin_for(q, positions, offsets, cu_seqlens, format, seq_len)

    def _cos_sin_for(self, q, positions, offsets, cu_seqlens, format, seq_len):
        if self._sync_free(q, positions, offsets, cu_seqlens):
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
        seq_lens=None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` and ``k``.

        Args:
            q: ``[b, s, hq, d]`` (or ``bhsd``/``sbhd`` by ``format``; ``[t, hq, d]`` for ``thd``).
            k: same layout as ``q`` with ``hk`` heads (``hk`` may differ from ``hq``).
            positions: ``[s]`` or ``[b, s]`` (``[t]`` for ``thd``) integer positions.
            offsets: int or ``[b]`` tensor added to ``0 .. s-1`` (KV-cache length per sample,
                e.g. decode with ``s = 1, b > 1``). A ``[b]`` tensor on a GPU is not read
                back (no host synchronisation: the call can be captured in a CUDA graph): the
                tables then hold ``max_position`` rows and the kernel checks the positions
                against them (a position past them is a device-side error) — construct the
                module with ``max_position`` at least the KV-cache size. On CPU the offsets
                are read and the tables grow as needed.
            cu_seqlens: ``[n+1]`` packed boundaries for ``thd``; positions restart per sequence
                (at ``offsets[i]`` when ``offsets``, an int or ``[n]``, is given too).
            format: ``"bshd"``, ``"bhsd"``, ``"sbhd"`` or ``"thd"``.
            seq_len: total length for length-dependent scaling (dynamic NTK, LongRoPE);
                default ``max(position) + 1``. Pass the final length of a generation to keep
                LongRoPE's factor fixed for the whole sequence.
            inplace: rotate q and k in place.
            seq_lens: ``[b]`` planned total length of each sequence (a list of ints or an
                integer tensor), for length-dependent scaling in a batch that mixes short and
                long sequences: each sequence gets the tables of its own length (LongRoPE:
                short or long factors; dynamic NTK: its own base), all in one kernel call (the
                profiles' tables stacked, each sequence's positions offset into its profile).
                Rule: a sequence's profile is fixed by the length given here; keep passing the
                same value for its whole lifetime (e.g. prompt + max new tokens), so keys
                already cached keep their rotation. Moving a sequence to another profile is an
                explicit re-rotation of its cached keys (:func:`ropekit.rerotate_cache`). 4-D
                formats only; not with ``seq_len``.

        Returns:
            ``(q_rot, k_rot)`` in the input format and dtypes.

        With ``cfg.rotary_offset = o`` (MLA heads ``[nope | rope]``) only dims
        ``o .. o + r - 1`` of the ``cfg.head_dim``-wide heads rotate; with
        ``cfg.direction = -1`` the rotation is by ``-m·θ``.
        """
        if inplace is not False and inplace is not True:
            flag("inplace", inplace)
        if (type(k) is torch.Tensor and k.dtype is torch.float64 and type(q) is torch.Tensor
                and q.dtype is not torch.float64 and self.table_dtype is None):
            # the tables follow the wider of q and k (float64 k keeps float64 tables; float64
            # tables give a float32 q the bits of float32 ones): q and k rotate alike, so swap them
            ko, qo = self.forward(k, q, positions=positions, offsets=offsets, cu_seqlens=cu_seqlens, format=format,
                                  seq_len=seq_len, inplace=inplace, seq_lens=seq_lens)
            return qo, ko
        dec = self.__dict__.get("_decode") if type(offsets) is torch.Tensor and not tracing() else None
        if (dec is not None and positions is None and cu_seqlens is None
                and seq_len is None and seq_lens is None and type(format) is str and type(q) is torch.Tensor
                and type(k) is torch.Tensor and q.dtype is dec[0] and self._buffers["cos_cached"] is dec[2]
                and self._buffers["sin_cached"] is dec[3] and self.backend is dec[7]):
            # [b] offsets (decode, chunked prefill) served from the table a call of this kind used
            # before: the backend checks the range and dispatches the gather op in one step; None
            # when the general path below is needed (a table to grow, a refusal to word)
            try:
                out = dec[1](q, k, dec[2], dec[3], offsets, dec[4], format, dec[5], dec[6], inplace)
            except (ValueError, RuntimeError) as e:
                raise to_rope_error(e) from None
            if out is not None:
                return out
        if seq_lens is not None:
            return self._per_sequence(q, k, positions, offsets, cu_seqlens, format, seq_len, inplace, seq_lens)
        o = self.cfg.rotary_offset
        if not o:
            return self._rotate_heads(q, k, positions, offsets, cu_seqlens, format, seq_len, inplace, self.cfg.head_dim)
        _check_qk(q, k)
        check_head_width(self.cfg, q=q, k=k)
        qo, ko = (q, k) if inplace else (q.clone(), k.clone())  # the nope dims pass through
        self._rotate_heads(qo[..., o:], ko[..., o:], positions, offsets, cu_seqlens, format, seq_len, True, self.cfg.head_dim - o)
        return qo, ko

    def _backend(self, q):
        """The resolved backend module for q's kind of tensor (resolved once per dtype/device kind)."""
        bk = (q.dtype, q.is_cpu, q.is_cuda, self.backend)
        be = self.__dict__.get("_be")
        if be is None or be[0] != bk:
            be = self.__dict__["_be"] = (bk, _backends.resolve(self.backend, q))
        return be[1]

    def _per_sequence(self, q, k, positions, offsets, cu_seqlens, format, seq_len, inplace, seq_lens):
        """forward with one scaling profile per sequence (see ``seq_lens`` in :meth:`forward`)."""
        if format not in _SEQ_DIM or cu_seqlens is not None or seq_len is not None or self.cfg.rotary_offset:
            raise fail("seq_lens= with a 4-D format (bshd, bhsd, sbhd), no cu_seqlens/seq_len, no rotary_offset",
                       f"format={format!r}, cu_seqlens={'set' if cu_seqlens is not None else None}, seq_len={seq_len}, "
                       f"rotary_offset={self.cfg.rotary_offset}",
                       "pass q/k as [b, s, h, d] with one planned length per sequence")
        if type(q) is not torch.Tensor or type(k) is not torch.Tensor:
            _check_qk(q, k)  # (dtypes and devices of plain tensors: the op's validator)
        qs, ks = q.shape, k.shape
        w = self.cfg.head_dim
        sd = _SEQ_DIM[format]
        bd = 1 if sd == 0 else 0  # the batch dim (sbhd: 1)
        if not (len(qs) == 4 and len(ks) == 4 and qs[-1] == w and ks[-1] == w and qs[sd] == ks[sd] and qs[bd] == ks[bd]):
            check_head_width(self.cfg, q=q, k=k)
            split_qk_format(q, k, format)  # the general checks (and their messages)
        b, s = qs[bd], qs[sd]
        lens = seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else seq_lens
        if not isinstance(lens, (list, tuple)) or len(lens) != b:
            raise fail(f"seq_lens a list or tensor of {b} ints (one planned length per sequence)", repr(seq_lens)[:80],
                       "pass each sequence's planned total length (prompt + max new tokens)")
        lens = tuple(lens)
        plan = self.__dict__.get("_profile_plan")
        if plan is None or plan[0] != lens:  # the batch's profiles, decided once per set of planned lengths
            checked = [integer("seq_lens[i]", v, minimum=1, fix="pass each sequence's planned total length") for v in lens]
            keys = [self.cfg.table_key(L) for L in checked]
            distinct = list(dict.fromkeys(keys))  # profiles in order of first use
            first_len = {key: L for key, L in zip(reversed(keys), reversed(checked))}
            index = [distinct.index(key) for key in keys]
            plan = self.__dict__["_profile_plan"] = (lens, tuple(distinct), [first_len[key] for key in distinct], index)
        _, distinct, profile_lens, index = plan
        if (positions is None and type(offsets) is torch.Tensor and offsets.dtype == torch.int64 and offsets.dim() == 1
                and offsets.shape[0] == b and offsets.device == q.device and b <= 1024):
            # per-sample offsets (decode, chunked prefill): the range from the b offsets
            vals = offsets.tolist()
            lo, hi = min(vals), max(vals) + s - 1
            pos = offsets[:, None] + self._arange(s, q.device)[:s] if s != 1 else offsets[:, None]  # [b, s]
        else:
            pos = self._positions(q, positions, offsets, None, format, check_values=False)  # [s] or [b, s]
            pos = pos.expand(b, s) if pos.dim() == 1 else pos
            if pos.numel() <= 1024:
                vals = pos.flatten().tolist()
                lo, hi = (min(vals), max(vals)) if vals else (0, 0)
            else:
                lo, hi = (int(v) for v in torch.aminmax(pos))
        if lo < 0 or hi > MAX_EXACT_POSITION:
            self._refuse_range(lo, hi)
        dtype = self._dtype_for(q)
        if hi + 1 > max(self.max_position, TABLE_ROWS_LIMIT) and hi + 1 > 4 * pos.numel():
            # large, sparse positions (as one call per sequence): cos/sin of the positions themselves, each token's
            # from its sequence's profile (the tables' float64 formula, the same bits), row j for token j
            prof = torch.tensor(index, dtype=torch.int64, device=q.device)[:, None].expand(b, s).reshape(-1)  # [b*s]
            cos_f = torch.empty(b * s, self.cfg.rotary_dim // 2, dtype=dtype, device=q.device)  # [b*s, r/2]
            sin_f = torch.empty_like(cos_f)
            for i, L in enumerate(profile_lens):
                sel = (prof == i).nonzero().squeeze(1)
                cos_f[sel], sin_f[sel] = cos_sin(self.cfg, pos.reshape(-1)[sel], dtype=dtype, seq_len=L,
                                                 attention_scaling=self.attention_scaling, angles=self.angles)
            flat = torch.arange(b * s, device=q.device).view(b, s)
        else:
            n = 1 << max(hi, self.max_position - 1, 0).bit_length()  # rows per profile: a power of two
            cache = self.__dict__.get("_profile_cache")
            ck = (distinct, n, dtype, q.device)
            if cache is None or cache[0] != ck:
                tabs = [build_table(self.cfg, n, dtype=dtype, device=q.device, seq_len=L,
                                    attention_scaling=self.attention_scaling, angles=self.angles) for L in profile_lens]
                cache = (ck, torch.stack([c for c, _ in tabs]).flatten(0, 1),
                         torch.stack([t for _, t in tabs]).flatten(0, 1), {})
                self.__dict__["_profile_cache"] = cache
            base = cache[3].get(lens)
            if base is None:  # each sequence's first row in the stacked [P * n, r/2] tables
                base = cache[3][lens] = torch.tensor(index, dtype=torch.int64, device=q.device)[:, None] * n
            cos_f, sin_f, flat = cache[1], cache[2], pos + base  # flat [b, s]
        be = self._backend(q)
        try:
            return be.apply_gather(q, k, cos_f, sin_f, flat, format, self.cfg.layout, self.cfg.direction == -1, inplace)
        except (ValueError, RuntimeError) as e:
            raise to_rope_error(e) from None

    def _rotate_heads(self, q, k, positions, offsets, cu_seqlens, format, seq_len, inplace, width):
        """forward on heads of ``width`` dims whose first ``rotary_dim`` rotate."""
        conj = self.cfg.direction == -1
        if type(q) is not torch.Tensor or type(k) is not torch.Tensor:
            _check_qk(q, k)  # (dtypes and devices of plain tensors: the op's validator)
        qs, ks = q.shape, k.shape
        if width == self.cfg.head_dim and not (len(qs) and len(ks) and qs[-1] == width and ks[-1] == width):
            check_head_width(self.cfg, q=q, k=k)
        if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0):
            raise fail("seq_len an int >= 0 or None", repr(seq_len), "pass the total sequence length (e.g. prompt + generated)")
        sd = _SEQ_DIM.get(format)
        bd = 1 if sd == 0 else 0  # the batch dim (sbhd: 1)
        if not (sd is not None and len(qs) == 4 and len(ks) == 4 and qs[sd] == ks[sd] and qs[bd] == ks[bd]):
            split_qk_format(q, k, format)  # the general check (and its message)
        if self._sync_free(q, positions, offsets, cu_seqlens):
            # graph path: no cache, no lock, no sync; cos/sin from positions inside the graph
            cos, sin = self._cos_sin_for(q, positions, offsets, cu_seqlens, format, seq_len)
            return apply_rotary_qk(q, k, cos, sin, layout=self.cfg.layout, inplace=inplace, backend=self.backend, conjugate=conj)
        pos, table, seq_len = self._positions_and_tables(q, positions, offsets, cu_seqlens, format, seq_len,
                                                         flat_decode=True)
        if table is not None:
            # the table covers every position (checked above): rows picked inside the kernel, by
            # the backend's gather entry point (the flags and layout are the module's own, checked)
            be = self._backend(q)
            try:
                out = be.apply_gather(q, k, table[0], table[1], pos, format, self.cfg.layout, conj, inplace)
            except (ValueError, RuntimeError) as e:
                raise to_rope_error(e) from None
            step = getattr(be, "apply_offsets", None)
            if (step is not None and format in _SEQ_DIM and type(offsets) is torch.Tensor and width == self.cfg.head_dim
                    and not (self.cfg.scaling is not None and self.cfg.scaling.length_dependent)
                    and self._buffers["cos_cached"] is table[0] and self._buffers["sin_cached"] is table[1]):
                # served from the module's own table: later calls with offsets go to the backend's
                # one-step entry (forward), while that table is the module's
                self.__dict__["_decode"] = (q.dtype, step, table[0], table[1], width, self.cfg.layout, conj,
                                            self.backend)
            return out
        cos, sin = self._direct_cos_sin(pos, q, seq_len)
        cos, sin = table_view(cos, format, pos.dim()), table_view(sin, format, pos.dim())
        return apply_rotary_qk(q, k, cos, sin, layout=self.cfg.layout, inplace=inplace, backend=self.backend, conjugate=conj)

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

    def _covering(self, q, offsets, s, seq_len, dev):
        """The table for positions ``offsets[:, None] + 0 .. s-1`` (``offsets`` a ``[b]`` tensor
        whose largest value the host does not know): on CPU one read of the ``b`` offsets
        (cheap: no device), on other devices the table as it is (at least ``max_position``
        rows) with the range checked inside the kernel (no host synchronisation: CUDA graphs
        can capture the call)."""
        if _host_reads_cheap(q):
            if offsets.shape[0] <= 256:  # a few values: a list read costs less than an aten reduction
                vals = offsets.tolist()
                lo, hi = (min(vals), max(vals)) if vals else (0, -1)
            else:
                lo, hi = (int(v) for v in torch.aminmax(offsets))
            hi += s - 1
            if lo < 0 or hi > min(MAX_EXACT_POSITION, max(self.max_position, TABLE_ROWS_LIMIT) - 1):
                return self._refuse_range(lo, hi), seq_len
            return self._tables_for(q, hi + 1, seq_len, dev), seq_len
        return self._tables_for(q, max(self.max_position, 1), seq_len, dev), seq_len

    def _refuse_range(self, lo, hi):
        if lo < 0:
            raise fail(
                "positions >= 0 (offsets + 0..s-1, or the positions given)",
                f"a minimum position of {lo}",
                "positions count from 0; for left padding clamp padded positions to 0 (they are masked anyway)",
            )
        if hi > MAX_EXACT_POSITION:
            raise fail("positions <= 2**53 (exact in the float64 angle m·θ)", f"a maximum position of {hi}",
                       "positions are token indices; check how they were computed")
        return None  # past what a table should hold: cos/sin computed for the positions themselves

    def _arange(self, n: int, device: torch.device) -> torch.Tensor:
        ar = self.__dict__.get("_arange_cache")
        if ar is None or ar.shape[0] < n or ar.device != device:
            ar = torch.arange(max(n, 1), device=device)
            self.__dict__["_arange_cache"] = ar
        return ar
