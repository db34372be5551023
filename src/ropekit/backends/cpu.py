"""Fast CPU backend ``"cpu"``: a fused C++ kernel, built at first use, called through ctypes.

The first call in a process without a cached build starts the compile (~1-2 s) in a
background thread and runs the ``eager`` backend until it is ready (``ROPEKIT_BUILD_WAIT=1``
waits instead; :func:`kernel_loaded` always waits).

One pass over ``x``: each row of ``d`` elements is read once and written once, both lanes
of every pair are loaded before either is stored (so in place is safe), the half-width
cos/sin row is shared by all heads of a token (it stays in L1), and rows are split across
``torch.get_num_threads()`` threads for large inputs (one thread below ~1 MB, where
starting threads costs more than it saves). q and k go through one call.

Precision: float32, bfloat16 and float16 inputs are computed in float32 — products
rounded separately, no FMA contraction — and rounded once to the input dtype
(round-to-nearest-even); float64 inputs are computed in float64. Tables are converted to
the compute dtype (a no-op for the usual float32 tables).

Strides: any strides on the leading dims (a ``bshd`` view of ``bhsd`` memory is used as
is, broadcast tables keep their zero strides, leading dims that are contiguous for every
operand are merged). An input or table whose last dim is not unit-stride is read from a
compact copy; an output whose last dim is not unit-stride, more than eight leading dims
that cannot be merged, or a kernel that could not be built (no compiler: one warning)
fall back to the ``eager`` backend, which gives the same results up to float32 rounding.

Why plain C++ compiled with the system compiler and loaded with ctypes (``KERNELS.md``):
no torch headers, no recompiles per shape, ~1 s CPU for a cold build of this kernel and
~15 ms for a cached load (numba: 2-5 s cold; ``load_inline``: 21 s; ``torch.compile``:
10 s and ~20 µs per call), and a ctypes call costs ~0.2 µs (one packed int64 argument
block). See :mod:`ropekit.backends._cpu_build` and ``docs/performance.md``.

Out-of-place calls writing >= :data:`NT_BYTES` use streaming stores (no read of the output
lines before writing them). ctypes releases the GIL during the kernel.

Example:
    >>> import torch, ropekit
    >>> q = torch.randn(1, 6, 4, 64)                                   # [b, s, h, d]
    >>> cos, sin = ropekit.cos_sin(ropekit.RopeConfig(64), torch.arange(6))  # [s, r/2]
    >>> y = ropekit.apply_rotary(q, cos[:, None], sin[:, None], backend="cpu")
    >>> ref = ropekit.apply_rotary(q, cos[:, None], sin[:, None], backend="reference")
    >>> torch.allclose(y, ref, atol=1e-5)
    True
"""

from __future__ import annotations

import os
import struct
from typing import Optional

import torch

from .._errors import fail
from ..positions import split_format
from . import _cpu_build
from . import eager as _eager

NAME = "cpu"
DIFFERENTIABLE = False
ROTATE_QK_CONJUGATE = True  # rotate_qk takes conjugate= (the backward uses it)

__all__ = ["NAME", "available", "supports", "rotate", "rotate_qk", "rotate_qk_gather", "kernel_loaded", "new_output"]

# dtype -> kernel code; float64 is computed in float64, the others in float32
_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
_LAYOUT = {"half": 0, "interleaved": 1}
_F32, _F64, _I64 = torch.float32, torch.float64, torch.int64
#: Below this many bytes (x plus output, all jobs) the kernel runs on one thread:
#: starting threads costs tens of µs.
PARALLEL_BYTES = 1 << 20
#: Out-of-place calls writing at least this many bytes use non-temporal (streaming) stores:
#: the output lines are not read first and do not evict the cache (float32/bf16, aligned).
NT_BYTES = 16 << 20
#: Fresh outputs of at least this many bytes are put on transparent huge pages
#: (``madvise(MADV_HUGEPAGE)`` before the first write; see :func:`new_output`). Whether a
#: block of 4-32 MiB is a fresh mapping (every page faults) or reused heap memory (already
#: faulted, the hint is a no-op) depends on glibc's allocation history: with a 32 MiB
#: threshold a bf16 backward at s=2048 took 2.3-13 ms from run to run. ``ROPEKIT_HUGEPAGES=0``
#: turns it off.
HUGE_BYTES = 4 << 20
_HUGE = os.environ.get("ROPEKIT_HUGEPAGES", "1") != "0"
#: ``ROPEKIT_BUILD_WAIT=1``: the first call waits for the kernel's compile instead of running
#: eager while it builds in the background (results then never mix the two paths' roundings)
_WAIT_BUILD = os.environ.get("ROPEKIT_BUILD_WAIT", "0") == "1"
_PACK: dict = {}  # argument count -> struct.Struct of that many int64
_LIVE1 = struct.Struct("<9q")  # rk_run's per-call block for one job
_LIVE2 = struct.Struct("<14q")  # rk_run's per-call block for two jobs (q and k)
#: validated q/k call signatures -> (packed template, q extent, k extent) or False (the
#: kernel declined it: always take the general path); see :func:`fast_qk`
_PLANS: dict = {}
_PLANS_MAX = 1024

_lib = None  # the loaded kernel (ctypes.CDLL), or False when it cannot be built
_call = None  # its rk_rotate
_has_f16 = False


def _load(wait: bool = True):
    """Load (building if needed) the kernel. ``wait=False`` (the apply paths): a kernel that
    still has to be compiled is built in a background thread and ``None`` is returned — those
    calls run the eager path, so the first call in a fresh process costs milliseconds, not
    the 1-2 s of a compile; :func:`kernel_loaded` waits for the build."""
    global _lib, _call, _has_f16
    lib = _cpu_build.load(wait=wait)
    if lib is None:
        if not wait and "lib" not in _cpu_build._state:
            return None  # still building: try again on the next call
        _lib = False
        return False
    _has_f16 = bool(lib.rk_features() & 1)
    _call = lib.rk_rotate
    omp = _openmp_entry_points() if os.environ.get("ROPEKIT_OPENMP", "1") != "0" else None
    lib.rk_use_openmp(*(omp or (0, 0, 0)))
    _lib = lib
    return lib


def _openmp_entry_points():
    """``(GOMP_parallel, omp_get_thread_num, omp_get_num_threads)`` addresses of the OpenMP
    runtime torch has loaded in this process (Linux: found in ``/proc/self/maps``), or ``None``.

    The kernel then splits rows over torch's own OpenMP team instead of starting threads of
    its own: after a torch op those workers spin waiting for more work, and competing with
    them cost our second thread most of its core. Without such a runtime (or with
    ``ROPEKIT_OPENMP=0``) the kernel starts pthreads.
    """
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if line.rstrip().endswith((".so", ".so.1", ".so.5")) and "omp" in line}
    except OSError:
        return None
    names = ("libgomp", "libiomp5", "libomp")
    for path in sorted(paths, key=lambda p: ("torch" not in p, p)):  # torch's own copy first
        if not os.path.basename(path).startswith(names):
            continue
        try:
            rt = ctypes.CDLL(path)  # already loaded: the same instance torch uses
            return tuple(ctypes.cast(getattr(rt, n), ctypes.c_void_p).value
                         for n in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads"))
        except (OSError, AttributeError):
            continue
    return None


def _reset() -> None:
    """Forget the loaded kernel (tests switch compilers / cache directories)."""
    global _lib, _call, _has_f16
    _lib, _call, _has_f16 = None, None, False
    _PLANS.clear()
    _cpu_build.reset()


def kernel_loaded() -> bool:
    """Whether the compiled kernel is in use (building it on first call); ``False`` means eager fallback."""
    return bool(_lib if _lib is not None else _load())


def available() -> bool:
    """Always: without a compiler the backend still runs (eager fallback, one warning)."""
    return True


def supports(x: torch.Tensor) -> bool:
    """CPU tensors of float16/bfloat16/float32/float64."""
    return x.is_cpu and x.dtype in _DT


def _fast(x: torch.Tensor) -> Optional[int]:
    """Kernel dtype code when the compiled kernel can take ``x``, else ``None``."""
    dt = _DT.get(x.dtype)
    if dt is None or not x.is_cpu:
        return None
    if _lib is None:
        _load(wait=_WAIT_BUILD)
    if not _lib or (dt == 2 and not _has_f16):
        return None
    return dt


def new_output(x: torch.Tensor, memory_format=torch.preserve_format) -> torch.Tensor:
    """``torch.empty_like(x)`` for a result the kernel is about to write, on huge pages when large.

    With Linux's transparent-huge-page mode ``madvise`` (a common default), every 4 KiB page
    of a fresh multi-MB tensor faults on its first write — for a 32 MB float32 output that
    cost 3x the rotation itself. Outputs of at least :data:`HUGE_BYTES` are advised
    (``MADV_HUGEPAGE``, a hint that never changes contents) so the kernel faults 2 MiB at a
    time: out-of-place calls and backward then cost about what writing an existing buffer
    does. ``ROPEKIT_HUGEPAGES=0`` disables it; without the compiled kernel, or on other
    systems, this is ``torch.empty_like``.
    """
    out = torch.empty_like(x, memory_format=memory_format)
    if _HUGE and out.is_cpu:
        n = out.numel() * out.element_size()
        if n >= HUGE_BYTES and (_lib or (_lib is None and _load(wait=_WAIT_BUILD))):
            _lib.rk_advise_huge(out.data_ptr(), n)
    return out


def _run(jobs: tuple, njobs: int, serial: int = 0) -> int:
    """Call the kernel on ``njobs`` concatenated job tuples (layout: ``rk_rotate`` in the C++ file).

    All jobs are validated before any is run: a nonzero return means nothing was written.
    """
    n = len(jobs) + 5
    pk = _PACK.get(n)
    if pk is None:
        pk = _PACK[n] = struct.Struct(f"<{n}q")
    return _call(pk.pack(njobs, torch.get_num_threads(), PARALLEL_BYTES, serial, NT_BYTES, *jobs))


def _strided(x, out, cos, sin, dt, lay, conj, tab=None) -> tuple:
    """Job fields for ``out = rot(x)`` with cos/sin broadcast through their strides.

    ``tab``: ``_table_fields(cos, sin)`` when already computed (q and k share it).
    """
    xs = x.stride()
    return (dt, lay, conj, 0, x.dim(), cos.dim(), cos.shape[-1], x.data_ptr(), out.data_ptr(), cos.data_ptr(),
            sin.data_ptr(), 0, 0, 0, *x.shape, *xs, *(xs if out is x else out.stride()),
            *(tab or _table_fields(cos, sin)))


def _table_fields(cos, sin) -> tuple:
    return (*cos.shape, *cos.stride(), *sin.stride())


def _tables(cos, sin, dt):
    """Tables in the compute dtype (a no-op for float32 tables and non-float64 x)."""
    cdt = _F64 if dt == 3 else _F32
    if cos.dtype is not cdt:
        cos = cos.to(cdt)
    if sin.dtype is not cdt:
        sin = sin.to(cdt)
    return cos, sin


def _contig_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def rotate(x, cos, sin, layout, conjugate, out):
    """``out = rot(x)`` (``rot(-θ)`` when ``conjugate``); see the backend contract.

    Args:
        x: ``[..., d]``, any strides (a non-unit last-dim stride goes to eager).
        cos, sin: ``[..., r/2]`` broadcastable to ``x.shape[:-1] + (r/2,)``.
        layout: ``"half"`` or ``"interleaved"``.
        conjugate: rotate by ``-θ``.
        out: ``x``'s shape and dtype; may be ``x`` itself (in place).

    Returns:
        ``out``.
    """
    dt = _fast(x)
    if dt is not None:
        c, s = _tables(cos, sin, dt)
        rc = _run(_strided(x, out, c, s, dt, _LAYOUT[layout], 1 if conjugate else 0), 1)
        if rc == 0:
            _bump_version(out)  # out may be x or a caller's buffer: autograd must see the write
            return out
        if rc == 3:
            # a read operand whose last dim is not unit-stride (e.g. the expanded gradient
            # of .sum(), all strides 0): read a compact copy instead
            x2, c, s = _contig_last(x), _contig_last(c), _contig_last(s)
            rc = _run(_strided(x2, out, c, s, dt, _LAYOUT[layout], 1 if conjugate else 0), 1)
            if rc == 0:
                _bump_version(out)
                return out
    return _eager.rotate(x, cos, sin, layout, conjugate, out)


def _check_inplace(t: torch.Tensor, name: str) -> None:
    # the same sufficient test as apply_rotary's (catches unfold/as_strided windows too)
    from ..functional import _check_writable

    _check_writable(t, name)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def rotate_qk(q, k, cos, sin, layout, inplace, conjugate=False):
    """Rotate ``q`` ``[..., hq, d]`` and ``k`` ``[..., hk, d]`` with the same tables in one call.

    Returns ``(q_rot, k_rot)``: ``q``/``k`` themselves when ``inplace``, else fresh tensors
    (:func:`new_output`, so a ``bshd`` view of ``bhsd`` memory keeps its strides).
    No autograd (``ropekit.apply_rotary_qk`` calls this only without grad; its backward
    calls it with ``conjugate=True``: ``R(-θ)`` without building ``-sin``).
    """
    qo, ko = (q, k) if inplace else (new_output(q), new_output(k))
    dq = _fast(q)
    if dq is not None and k.dtype is q.dtype:
        lay = _LAYOUT[layout]
        c, s = _tables(cos, sin, dq)
        tab = _table_fields(c, s)
        cj = 1 if conjugate else 0
        jq = _strided(q, qo, c, s, dq, lay, cj, tab)
        jk = _strided(k, ko, c, s, dq, lay, cj, tab)
        # q and k may overlap when in place on one storage: then k after q, as two calls would
        rc = _run(jq + jk, 2, 1 if inplace and _same_storage(q, k) else 0)
        if rc == 0:
            if inplace:
                _bump_version((q, k))
            return qo, ko
        # nonzero: nothing was written; 4 = an expanded (zero-stride) q or k written in place
    if inplace:
        _check_inplace(q, "q")
        _check_inplace(k, "k")
    rotate(q, cos, sin, layout, conjugate, qo)
    rotate(k, cos, sin, layout, conjugate, ko)
    return qo, ko


# ---------------------------------------------------------------------------------------
# per-call fast path for small (decode) calls: one dict lookup instead of re-validating


def _extent(t: torch.Tensor) -> int:
    """Bytes from ``t``'s first element to just past its last (strides are non-negative)."""
    return (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def qk_key(q, k, cos, sin, layout: str, inplace: bool, backend: str) -> tuple:
    """What a q/k call's validation and kernel arguments depend on, except the addresses."""
    return (q.shape, q.stride(), k.shape, k.stride(), cos.shape, cos.stride(), sin.shape, sin.stride(),
            q.dtype, k.dtype, cos.dtype, sin.dtype, layout, inplace, backend)


def _plan_dtype(x, *tables):
    """Kernel dtype code of ``x`` when a plan can be recorded for it (compiled kernel, tables
    already in the compute dtype, the other tensors of ``x``'s dtype), else ``None``."""
    dt = _fast(x)
    if dt is None:
        return None
    cdt = _F64 if dt == 3 else _F32
    return dt if all(t.dtype is cdt for t in tables) else None


def _store_plan(key: tuple, njobs: int, jobs: tuple, *extents: int) -> None:
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.clear()
    _PLANS[key] = (struct.pack(f"<{len(jobs) + 5}q", njobs, 0, 0, 0, 0, *jobs), *extents)


def remember_qk(key: tuple, q, k, cos, sin, qo, ko, layout: str) -> None:
    """Record ``key`` as validated: :func:`ropekit.apply_rotary_qk` calls this after its checks
    passed and :func:`rotate_qk` wrote ``qo``/``ko``; later calls with the same key go
    through :func:`fast_qk`. Only calls the kernel takes as they are are recorded (tables
    already in the compute dtype, q and k of one dtype)."""
    dt = _plan_dtype(q, cos, sin)
    if dt is None or k.dtype is not q.dtype:
        return
    lay = _LAYOUT[layout]
    tab = _table_fields(cos, sin)
    jobs = _strided(q, qo, cos, sin, dt, lay, 0, tab) + _strided(k, ko, cos, sin, dt, lay, 0, tab)
    _store_plan(key, 2, jobs, _extent(q), _extent(k))


def _run_qk_plan(key: tuple, q, k, cos, sin, pos_ptr: int, inplace: bool):
    """Run a two-job plan (q and k) on new addresses; ``None`` when there is none or the
    kernel declined (nothing written; a position outside the table keeps the plan)."""
    plan = _PLANS.get(key)
    if not plan or not (q.is_cpu and k.is_cpu and cos.is_cpu and sin.is_cpu):
        return None
    tpl, qext, kext = plan
    qp, kp, cp, sp = q.data_ptr(), k.data_ptr(), cos.data_ptr(), sin.data_ptr()
    if inplace:
        qo, ko = q, k
        serial = 1 if qp < kp + kext and kp < qp + qext else 0  # may overlap: k after q
    else:
        qo, ko = new_output(q), new_output(k)
        serial = 0
    live = _LIVE2.pack(torch.get_num_threads(), PARALLEL_BYTES, serial, NT_BYTES,
                       qp, qo.data_ptr(), cp, sp, pos_ptr, kp, ko.data_ptr(), cp, sp, pos_ptr)
    rc = _lib.rk_run(tpl, live)
    if rc != 0:
        if rc < 100:
            _PLANS[key] = False  # the general path handles this signature from now on
        return None
    if inplace:
        _bump_version((q, k))
    return qo, ko


def fast_qk(key: tuple, q, k, cos, sin, inplace: bool):
    """``(q_rot, k_rot)`` for a call signature recorded by :func:`remember_qk`, else ``None``.

    The caller has checked that no autograd is involved and that nothing is being traced;
    everything else the checks depend on is in ``key``. Costs one dict lookup, the outputs
    (unless ``inplace``), one ``struct.pack`` of the addresses and one ctypes call.
    """
    return _run_qk_plan(key, q, k, cos, sin, 0, inplace)


def rotate_key(x, cos, sin, out, layout: str, inplace: bool, conjugate: bool, backend: str) -> tuple:
    """:func:`qk_key` for one tensor (``apply_rotary``), ``out`` included."""
    return (x.shape, x.stride(), cos.shape, cos.stride(), sin.shape, sin.stride(), x.dtype, cos.dtype, sin.dtype,
            None if out is None else (out.shape, out.stride(), out.dtype), layout, inplace, conjugate, backend)


def remember_rotate(key: tuple, x, cos, sin, dst, layout: str, conjugate: bool) -> None:
    """:func:`remember_qk` for one tensor written into ``dst`` (``x`` itself, ``out=`` or fresh)."""
    dt = _plan_dtype(x, cos, sin)
    if dt is None:
        return
    jobs = _strided(x, dst, cos, sin, dt, _LAYOUT[layout], 1 if conjugate else 0)
    _store_plan(key, 1, jobs, _extent(x), _extent(dst))


def fast_rotate(key: tuple, x, cos, sin, out, inplace: bool):
    """The rotated tensor for a signature recorded by :func:`remember_rotate`, else ``None``
    (also when ``out`` overlaps ``x``: the general path treats or rejects that)."""
    plan = _PLANS.get(key)
    if not plan or not (x.is_cpu and cos.is_cpu and sin.is_cpu):
        return None
    tpl, xext, oext = plan
    xp = x.data_ptr()
    if inplace:
        dst = x
    elif out is not None:
        op = out.data_ptr()
        if not out.is_cpu or (xp < op + oext and op < xp + xext):
            return None
        dst = out
    else:
        dst = new_output(x)
    if _lib.rk_run(tpl, _LIVE1.pack(torch.get_num_threads(), PARALLEL_BYTES, 0, NT_BYTES,
                                    xp, dst.data_ptr(), cos.data_ptr(), sin.data_ptr(), 0)) != 0:
        _PLANS[key] = False
        return None
    if inplace or out is not None:
        _bump_version(dst)
    return dst


def remember_gather(key: tuple, q, k, qo, ko, cos_t, sin_t, npos: int, pst: tuple, layout: str) -> None:
    """Record a validated fused-gather call (see :meth:`ropekit.RotaryEmbedding.forward`):
    positions are ``npos`` contiguous int64 values read through the per-dim strides ``pst``
    (their address is passed per call to :func:`fast_gather`)."""
    dt = _plan_dtype(q, cos_t, sin_t)
    if dt is None or k.dtype is not q.dtype or not (cos_t.is_contiguous() and sin_t.is_contiguous()):
        return
    n, h, lay = cos_t.shape[0], cos_t.shape[1], _LAYOUT[layout]
    jobs = ()
    for x, o in ((q, qo), (k, ko)):
        jobs += (dt, lay, 0, 1, x.dim(), 0, h, 0, 0, 0, 0, 0, npos, n, *x.shape, *x.stride(), *o.stride(), *pst)
    _store_plan(key, 2, jobs, _extent(q), _extent(k))


def fast_gather(key: tuple, q, k, cos_t, sin_t, pos_ptr: int, inplace: bool):
    """``(q_rot, k_rot)`` for a fused-gather signature recorded by :func:`remember_gather`, else
    ``None`` (also when a position is outside the table: nothing was written, and the
    caller's general path grows the table or raises)."""
    return _run_qk_plan(key, q, k, cos_t, sin_t, pos_ptr, inplace)


def _bump_version(ts) -> None:
    """Tell autograd that ``ts`` (a tensor or a tuple of them) were modified in place (the
    kernel writes behind its back), so a graph that saved one of them raises instead of
    silently using the new values. ``torch.autograd.graph.increment_version``'s own call,
    without its Python wrapper (0.3 µs instead of 0.9 at decode); inference tensors have no
    counter and are skipped by torch."""
    _increment_version((ts,) if isinstance(ts, torch.Tensor) else ts)


_increment_version = getattr(torch._C, "_increment_version", None) or torch.autograd.graph.increment_version


# ---------------------------------------------------------------------------------------
# gather: table rows picked by position inside the kernel

# position strides on x's leading dims, per format: [s] (or [t]) positions, then [b, s]
_POS1 = {"bshd": (0, 1, 0), "bhsd": (0, 0, 1), "sbhd": (1, 0, 0), "thd": (1, 0)}


def _pos_strides(fmt: str, pos: torch.Tensor) -> tuple:
    if pos.dim() == 1:
        return _POS1[fmt]
    pb, ps = pos.stride()
    if pos.shape[0] == 1:
        pb = 0
    return {"bshd": (pb, ps, 0), "bhsd": (pb, 0, ps), "sbhd": (ps, pb, 0)}[fmt]


def _check_gather(q, k, cos_table, sin_table, positions, fmt):
    """Everything the kernel relies on to stay inside its buffers (shapes, devices, dtypes)."""
    b, s = split_format(q, fmt)
    if split_format(k, fmt, "k") != (b, s):
        raise fail(
            f"q and k with the same batch and sequence sizes in format {fmt!r}",
            f"q {tuple(q.shape)} and k {tuple(k.shape)}",
            "rotate them in separate calls",
        )
    for nm, t in (("q", q), ("k", k)):
        if t.dtype not in _DT:
            raise fail(f"{nm} of a real floating dtype {tuple(_DT)}", f"{nm}.dtype={t.dtype}", f"convert {nm} to float")
    if q.shape[-1] != k.shape[-1]:
        raise fail("q and k of the same head dim", f"{q.shape[-1]} and {k.shape[-1]}", "use one RopeConfig per head dim")
    for nm, t in (("cos_table", cos_table), ("sin_table", sin_table)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.dtype.is_floating_point:
            got = f"shape {tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise fail(f"{nm} a float [n, r/2] table", got, "pass the tables of RotaryEmbedding.tables(n)")
    if cos_table.shape != sin_table.shape or 2 * cos_table.shape[1] > q.shape[-1] or cos_table.shape[1] < 1:
        raise fail(
            f"cos_table and sin_table of one shape [n, r/2] with 1 <= r/2 <= d/2 = {q.shape[-1] // 2}",
            f"{tuple(cos_table.shape)} and {tuple(sin_table.shape)}",
            "build them with ropekit.cos_sin(cfg, torch.arange(n))",
        )
    if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        got = str(positions.dtype) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise fail("positions an integer tensor", got, "pass int64 positions")
    ok = ((s,),) if fmt == "thd" else ((s,), (b, s), (1, s))
    if tuple(positions.shape) not in ok:
        raise fail(
            f"positions of shape {' or '.join(str(list(o)) for o in ok)} for q {tuple(q.shape)} in format {fmt!r}",
            f"shape {list(positions.shape)}",
            "one position per token ([s] shared by the batch, [b, s] per sample, [t] packed)",
        )
    if not (q.is_cpu and k.is_cpu and cos_table.is_cpu and sin_table.is_cpu and positions.is_cpu):
        for nm, t in (("k", k), ("cos_table", cos_table), ("sin_table", sin_table), ("positions", positions)):
            if t.device != q.device:
                raise fail(f"{nm} on q's device {q.device}", f"{t.device}", f"move it: {nm}.to(q.device)")


def _bad_positions(positions: torch.Tensor, n: int):
    lo, hi = int(positions.min()), int(positions.max())
    return fail(
        f"positions in [0, {n}) (the table length)",
        f"positions from {lo} to {hi}",
        "grow the tables (RotaryEmbedding.tables(max_position + 1)) or fix the positions",
    )


def _check_range(pos: torch.Tensor, n: int) -> None:
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= n):
        raise _bad_positions(pos, n)


def _gather_views(cos_table, sin_table, pos, fmt):
    """Gathered tables viewed to broadcast against q/k in ``fmt`` (unfused paths)."""
    from ..modules import _table_view

    return _table_view(cos_table[pos], fmt, pos.dim()), _table_view(sin_table[pos], fmt, pos.dim())


def _gather(xs, cos_table, sin_table, pos, fmt, layout, conj, outs):
    """``outs[i] = rot(xs[i])`` with the table rows ``pos``, 1 or 2 tensors in one kernel call;
    ``outs`` may be ``xs`` (in place).

    Positions are range-checked before anything is written (RopeError).
    """
    n = cos_table.shape[0]
    dq = _fast(xs[0])
    if dq is not None and all(x.dtype is xs[0].dtype for x in xs):
        cdt = _F64 if dq == 3 else _F32
        if cos_table.dtype is cdt and sin_table.dtype is cdt and cos_table.is_contiguous() and sin_table.is_contiguous():
            if pos.dtype is not _I64 or not pos.is_contiguous():
                pos = pos.to(_I64).contiguous()
            lay, h, pst, np_ = _LAYOUT[layout], cos_table.shape[1], _pos_strides(fmt, pos), pos.numel()
            c, s, p = cos_table.data_ptr(), sin_table.data_ptr(), pos.data_ptr()
            jobs = ()
            for x, o in zip(xs, outs):
                jobs += (dq, lay, conj, 1, x.dim(), 0, h, x.data_ptr(), o.data_ptr(), c, s, p, np_, n,
                         *x.shape, *x.stride(), *o.stride(), *pst)
            # q and k may overlap when in place on one storage: then k after q, as two calls would
            serial = 1 if len(xs) == 2 and outs[0] is xs[0] and _same_storage(xs[0], xs[1]) else 0
            rc = _run(jobs, len(xs), serial)
            if rc >= 100:
                raise _bad_positions(pos, n)
            if rc == 0:
                return outs
    # other table dtypes / strides / q-k dtypes: gather the rows first, then the strided path
    _check_range(pos, n)
    cos, sin = _gather_views(cos_table, sin_table, pos, fmt)
    for x, o in zip(xs, outs):
        rotate(x, cos, sin, layout, bool(conj), o)
    return outs


def _gather_rotate(xs, cos_table, sin_table, pos, fmt, layout, conjugate, inplace) -> list:
    """The fused-gather hook of :class:`ropekit.functional._GatherQK`: rotate 1 or 2 tensors.

    Returns ``xs`` themselves when ``inplace``. Out of place, the forward rotation writes into
    :func:`new_output` outputs (a ``bshd`` view of ``bhsd`` memory keeps its strides); the
    conjugated one (backward) takes gradients that may be expanded (zero strides, e.g. from
    ``.sum()``): the kernel reads any strides, a non-unit last-dim stride is made contiguous
    here, and the outputs are contiguous.
    """
    if inplace:
        outs = list(xs)
    elif conjugate:
        xs = [x if x.stride(-1) == 1 else x.contiguous() for x in xs]
        outs = [new_output(x, torch.contiguous_format) for x in xs]
    else:
        outs = [new_output(x) for x in xs]
    return _gather(xs, cos_table, sin_table, pos, fmt, layout, 1 if conjugate else 0, outs)


def rotate_qk_gather(q, k, cos_table, sin_table, positions, fmt, layout, inplace):
    """Rotate ``q`` and ``k`` with table rows gathered by position inside the kernel.

    Args:
        q: ``[b, s, hq, d]`` / ``[b, hq, s, d]`` / ``[s, b, hq, d]`` / ``[t, hq, d]`` by ``fmt``.
        k: the same format with ``hk`` heads.
        cos_table, sin_table: ``[n, r/2]`` tables for positions ``0 .. n-1`` (float32 for
            float32/bf16/fp16 q, float64 for float64 q take the zero-copy path; other
            dtypes are gathered and converted first).
        positions: int64 ``[s]`` (shared by the batch), ``[b, s]`` or ``[t]`` (``thd``).
        fmt: ``"bshd"``, ``"bhsd"``, ``"sbhd"`` or ``"thd"``.
        layout: ``"half"`` or ``"interleaved"``.
        inplace: write into ``q`` and ``k``.

    Returns:
        ``(q_rot, k_rot)``. Differentiable in ``q`` and ``k`` through
        :class:`ropekit.functional._GatherQK` (tables that require grad take the unfused
        path through :func:`ropekit.apply_rotary_qk`).

    Raises:
        RopeError: positions outside ``[0, n)`` (checked before anything is written), or
        shapes that do not match ``fmt``.
    """
    _check_gather(q, k, cos_table, sin_table, positions, fmt)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or cos_table.requires_grad or sin_table.requires_grad)
    if inplace:
        _check_inplace(q, "q")
        _check_inplace(k, "k")
        if grad and any(t.is_leaf and t.requires_grad for t in (q, k)):
            raise fail(
                "inplace=True on a tensor autograd may modify",
                "a leaf tensor that requires grad",
                "use inplace=False, or apply to a non-leaf (e.g. the output of the q projection)",
            )
    if not grad:
        qo, ko = _gather_rotate([q, k], cos_table, sin_table, positions, fmt, layout, False, inplace)
        if inplace:
            _bump_version((q, k))
        return qo, ko
    if cos_table.requires_grad or sin_table.requires_grad:
        from ..functional import apply_rotary_qk

        n = cos_table.shape[0]
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= n):
            raise _bad_positions(positions, n)
        cos, sin = _gather_views(cos_table, sin_table, positions, fmt)
        return apply_rotary_qk(q, k, cos, sin, layout=layout, inplace=inplace, backend=NAME)
    import sys

    from ..functional import _GatherQK

    return _GatherQK.apply(q, k, cos_table, sin_table, positions, fmt, layout, sys.modules[__name__], inplace)
