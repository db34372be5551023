"""Triton backend (``backend="triton"``): the CUDA kernels of ropekit's operators.

The kernels (:mod:`ropekit.backends._triton_kernels`) rotate ``x [..., d]`` read through
its strides and write the result in place or into ``out``; everything here is the host
side: canonical ``[m0, m1, h, d]`` views, block sizes and the launch. They are registered
as the CUDA implementations of the same ``torch.ops.ropekit.*`` ops the CPU runs
(:func:`ropekit.backends._triton_ops.register_cuda_kernels`): one schema, one validator and
one autograd (C++, backward = the same op conjugated) per op, a kernel per device. The
entry points ``apply*`` below call those ops; ``backend="triton"`` means these kernels.

Primitives (no checks, no autograd; the op impls call them):

- :func:`rotate` — one tensor, half-width ``cos``/``sin`` broadcastable to ``x``.
- :func:`rotate_qk` — q and k in ONE launch (head blocks of q, then of k; ``hq != hk`` ok).
- :func:`rotate_qk_gather` — q and k in one launch, table rows gathered by position inside
  the kernel (``[s]``, ``[b, s]``, packed ``[t]`` or per-sample ``[b]`` decode positions).
- :func:`qk_norm_rotate` / :func:`qk_norm_backward` — per-head RMSNorm then RoPE of q and k
  in one launch, and its backward (weight gradients: fixed per-program partial sums, then
  ``torch.sum``; no atomics, the same bits run to run).

Same bits as the CPU operator: every launch passes ``enable_fp_fusion=False`` (no FMA
contraction: ``x1*c - x2*s`` rounds both products, as the C++ kernel built with
``-ffp-contract=off``); float32 math (float64 for float64 x), one rounding at the store. The
rotation is bit-identical to the CPU op in float32, bfloat16 and float16; the fused
norm sums its squares in another order than the CPU kernel (within a few ulps, not bits).
Under ``TRITON_INTERPRET=1`` (CPU) the float32 -> bfloat16/float16 store truncates instead of
rounding: at most one ulp off there.

Strides: any strides are read directly (e.g. a ``bshd`` view of ``bhsd`` memory) as long as
the last dim has stride 1; otherwise one ``.contiguous()`` copy (and a copy back in place).

Block sizes: ``LAUNCH`` / :func:`launch_config` (or ``ROPEKIT_TRITON_LAUNCH``) override the
built-in choice of tile, heads per program and warps; the defaults are unchanged by them.

Host syncs: none on CUDA. Gathered positions are range-checked in the kernel (a
device-side assert: the launch is compiled with ``debug=True`` for that one check), so the
decode path can be captured in a CUDA graph. CPU tensors (interpreter) are checked on the
host with a RopeError, like the CPU op.

Example:
    >>> import ropekit
    >>> dev = "cuda" if torch.cuda.is_available() else "cpu"   # CPU runs under TRITON_INTERPRET=1
    >>> q, k = torch.randn(2, 3, 4, 16, device=dev), torch.randn(2, 3, 2, 16, device=dev)
    >>> cos, sin = ropekit.cos_sin(ropekit.RopeConfig(16), torch.arange(3), device=dev)  # [s, r/2]
    >>> q2, k2 = ropekit.apply_rotary_qk(q, k, cos[:, None], sin[:, None], backend="triton")
    >>> ref = ropekit.apply_rotary(q, cos[:, None], sin[:, None], backend="eager")
    >>> bool((q2 - ref).abs().max() < 1e-5)
    True
"""

import contextlib
import importlib.util
import math
import os
import struct
import sys
from typing import List, Optional, Sequence, Tuple

import torch

from .. import ops as _ops
from .._errors import fail
from . import _generic, _triton_mode
from . import cpu as _cpu_entry  # the ops' entry points (device-generic: CUDA tensors reach the Triton impls)

NAME = "triton"
CHECKS = True  # the ops (torch.ops.ropekit.*) validate their inputs
DIFFERENTIABLE = False
TRACEABLE = True  # graphs see the ops themselves (their fakes: ropekit.ops)
FUSED_QK = True
GATHER = True
QK_NORM = True  # apply_qk_norm: the fused norm + rotation kernel

__all__ = [
    "NAME", "available", "supports", "rotate", "rotate_qk", "rotate_qk_gather", "apply", "apply_qk", "apply_gather",
    "apply_qk_norm", "qk_norm_rotate", "qk_norm_backward", "LAUNCH", "launch_config",
]

# whether triton is installed, without importing it (import ropekit needs torch only; triton
# loads when the first kernel runs)
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` (triton.cdiv, without importing triton)."""
    return -(-a // b)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FORMATS = ("bshd", "bhsd", "sbhd", "thd")


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """Triton importable, the ops loaded (:data:`ropekit.ops.LOADED`: their schemas and
    autograd), and either a CUDA device or ``TRITON_INTERPRET=1`` (CPU interpreter)."""
    return _HAS_TRITON and _ops.LOADED and (torch.cuda.is_available() or _interpret())


def supports(x: torch.Tensor) -> bool:
    """CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``. All four float dtypes."""
    if not available() or x.dtype not in _DTYPES:
        return False
    return x.is_cuda or (_interpret() and x.device.type == "cpu")


# --------------------------------------------------------------------------------------
# launch
# --------------------------------------------------------------------------------------

_TILE = 4096  # elements per program on GPU (fp32: 16 KB read + 16 KB written)
_TILE_INTERPRET = 16384  # the interpreter's cost is per op, not per element: bigger tiles


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# --------------------------------------------------------------------------------------
# launch configuration (tunable; the defaults are the built-in rule)
# --------------------------------------------------------------------------------------
# ``tile``: elements one program covers (BT tokens x BH heads x 2*R2P columns), a power of
#     two; None: _TILE on GPU, _TILE_INTERPRET under the interpreter.
# ``bh_max``: most heads that share one cos/sin load (power of two).
# ``num_warps``: warps per program.
# Change them with ``launch_config(...)`` (a context manager) or, read at import, the
# environment variable ROPEKIT_TRITON_LAUNCH="tile=8192,bh_max=8,num_warps=8".
# benchmarks/bench_gpu.py --sweep times a grid of them and prints the best per shape class.

LAUNCH_DEFAULTS = {"tile": None, "bh_max": 16, "num_warps": 4}
LAUNCH = dict(LAUNCH_DEFAULTS)


def _checked_launch(cfg: dict) -> dict:
    """``cfg`` merged over the current LAUNCH, each value checked (RopeError)."""
    out = dict(LAUNCH)
    for key, val in cfg.items():
        if key not in LAUNCH_DEFAULTS:
            raise fail(f"a launch key in {sorted(LAUNCH_DEFAULTS)}", repr(key), "e.g. launch_config(tile=8192, bh_max=8, num_warps=8)")
        if key == "tile" and val is None:
            out[key] = None
            continue
        ok = type(val) is int and val >= 1 and val & (val - 1) == 0
        if key == "num_warps":
            ok = ok and val <= 32
        if not ok:
            raise fail(f"{key} a power of two" + (" <= 32" if key == "num_warps" else "") + (" or None" if key == "tile" else ""),
                       repr(val), f"pass e.g. {key}={LAUNCH_DEFAULTS[key] or 4096}")
        out[key] = val
    return out


def _parse_launch_env(text: str) -> dict:
    """``"tile=8192,bh_max=8"`` -> ``{"tile": 8192, "bh_max": 8}`` (RopeError if malformed)."""
    cfg = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, val = (v.strip() for v in item.partition("="))
        if val == "None":
            cfg[key] = None
        elif val.isdigit():
            cfg[key] = int(val)
        else:
            raise fail("ROPEKIT_TRITON_LAUNCH as key=int pairs separated by commas", repr(text), 'e.g. ROPEKIT_TRITON_LAUNCH="tile=8192,num_warps=8"')
    return _checked_launch(cfg)


@contextlib.contextmanager
def launch_config(**cfg):
    """Launch with other block sizes inside the block (keys of ``LAUNCH``); restored on exit.

    Example:
        >>> from ropekit.backends import triton as tb
        >>> before = dict(tb.LAUNCH)
        >>> with tb.launch_config(tile=8192, num_warps=8):
        ...     tb.LAUNCH["tile"], tb.LAUNCH["num_warps"]
        (8192, 8)
        >>> tb.LAUNCH == before
        True
    """
    new = _checked_launch(cfg)
    old = dict(LAUNCH)
    LAUNCH.update(new)
    try:
        yield LAUNCH
    finally:
        LAUNCH.clear()
        LAUNCH.update(old)


if os.environ.get("ROPEKIT_TRITON_LAUNCH"):
    LAUNCH.update(_parse_launch_env(os.environ["ROPEKIT_TRITON_LAUNCH"]))


def _launch_kernel(name: str, grid, device: torch.device, *args, **kwargs) -> None:
    """Launch ``_triton_kernels.<name>[grid](*args, **kwargs)`` with FMA contraction off.

    ``enable_fp_fusion=False``: every product is rounded before the add, as in the CPU
    operator (built with ``-ffp-contract=off``), so both devices give the same bits. The CUDA
    device guard only for CUDA tensors (``TRITON_INTERPRET=1`` runs CPU tensors).
    tests/test_triton_aot.py replaces this function to record what the launcher asks for.
    """
    from . import _triton_kernels

    kernel = getattr(_triton_kernels, name)
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        kernel[grid](*args, enable_fp_fusion=False, **kwargs)


def _launch_params(M: int, ha: int, hb: int, r2p: int, interpreted: bool) -> Tuple[int, int, int]:
    """``(BT, BH, num_warps)`` for ``M`` tokens, ``ha``/``hb`` heads, padded half width ``r2p``."""
    bh = min(_pow2(max(ha, hb)), LAUNCH["bh_max"])  # >= 8 heads share a cos/sin load when there are that many
    tile = LAUNCH["tile"] or (_TILE_INTERPRET if interpreted else _TILE)
    bt = max(1, min(_pow2(M), tile // (bh * 2 * r2p)))
    return bt, bh, LAUNCH["num_warps"]


def _launch(
    xa: torch.Tensor,
    oa: Optional[torch.Tensor],
    xb: Optional[torch.Tensor],
    ob: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: Optional[torch.Tensor],
    interleaved: bool,
    conjugate: bool,
    cos_per_head: bool,
    out_of_place: bool,
) -> None:
    """Launch the kernel on canonical views ``xa/oa [m0, m1, ha, d]``, ``xb/ob [m0, m1, hb, d]``.

    In place (``not out_of_place``) ``oa``/``ob`` are ignored (None).

    ``pos is None``: ``cos``/``sin`` are ``[m0, m1, ha|1, r/2]`` broadcast views.
    Otherwise they are tables ``[n, r/2]`` and ``pos [m0, m1]`` int64 selects the rows.
    """
    m0, m1, ha, d = xa.shape
    hb = 0 if xb is None else xb.shape[2]
    inplace = not out_of_place
    # no tensor is passed to the kernel twice: under torch.compile each mutated kernel
    # argument is cloned separately, so aliases would split; unused pointers are None
    oa_arg = None if inplace else oa
    xb_arg = None if hb == 0 else xb
    ob_arg = None if (hb == 0 or inplace) else ob
    sxb = xb.stride()[:3] if hb else (0, 0, 0)
    sob = ob.stride()[:3] if hb and ob is not None else sxb
    soa = oa.stride()[:3] if oa is not None else xa.stride()[:3]
    r2 = cos.shape[-1]
    M = m0 * m1
    if M == 0 or ha + hb == 0:
        return
    r2p = _pow2(r2)
    bt, bh, num_warps = _launch_params(M, ha, hb, r2p, _interpreted())
    nba = _cdiv(ha, bh)
    grid = (_cdiv(M, bt), nba + _cdiv(hb, bh))
    if pos is None:
        sc, ss, sp, nrows = cos.stride(), sin.stride(), (0, 0), 0
    else:
        sc = (cos.stride(0), 0, 0, cos.stride(1))
        ss = (sin.stride(0), 0, 0, sin.stride(1))
        sp, nrows = pos.stride(), cos.shape[0]
    tail = out_of_place and d > 2 * r2
    tail_b = min(_pow2(d - 2 * r2), 64) if tail else 1
    # gathered positions are range-checked in the kernel (a device-side assert, compiled in
    # with debug=True; integer-overflow sanitising stays off): no host sync on CUDA
    check = pos is not None and _device_side_checks(xa)
    dbg = {"debug": True, "sanitize_overflow": False} if check else {}
    _launch_kernel(
        "rope_kernel", grid, xa.device,
        xa, oa_arg, xb_arg, ob_arg, cos, sin, pos,
        M, m1, ha, hb, nba,
        *xa.stride()[:3], *soa, *sxb, *sob,
        *sc, *ss, *sp, nrows,
        R2=r2, D=d, R2P=r2p, BT=bt, BH=bh,
        INTERLEAVED=interleaved, CONJ=conjugate, GATHER=pos is not None,
        COS_PER_HEAD=cos_per_head, COPY_TAIL=tail, TAIL_B=tail_b,
        F64=xa.dtype == torch.float64, INPLACE=inplace, HAS_B=hb > 0, CHECK_POS=check,
        num_warps=num_warps, **dbg,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# per-head RMSNorm + RoPE launch (apply_qk_norm_rotary)
# --------------------------------------------------------------------------------------

_DW_PROGRAMS = 1024  # backward: token-tile programs per head block (each sums its tiles' weight gradient)


def _split_f32(v: float) -> Tuple[float, float]:
    """``v`` as float32 ``hi`` + ``lo`` (Triton passes host floats as float32; float64 math adds them)."""
    hi = _f32(v)
    return hi, (_f32(v - hi) if math.isfinite(hi) else 0.0)


def _f32(v: float) -> float:
    """``v`` rounded to float32 (to nearest; +-inf past its range)."""
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


def _norm_widths(d: int, r2: int) -> Tuple[int, int]:
    """``(R2P, TP)``: padded half width and padded pass-through tail ``[r, d)`` (1 when empty)."""
    return _pow2(r2), _pow2(d - 2 * r2) if d > 2 * r2 else 1


def _norm_launch_params(M: int, ha: int, hb: int, d: int, r2: int, interpreted: bool) -> Tuple[int, int, int]:
    """``(BT, BH, num_warps)`` by the rule of :func:`_launch_params` (and its ``LAUNCH`` knobs)
    for rows of ``2 * R2P + TP`` padded elements instead of ``2 * R2P``."""
    r2p, tp = _norm_widths(d, r2)
    width = 2 * r2p + (tp if d > 2 * r2 else 0)
    return _launch_params(M, ha, hb, _pow2(width) // 2, interpreted)


def _interpreted() -> bool:
    """Whether the kernels run under Triton's CPU interpreter (bigger tiles pay off there)."""
    from ._triton_kernels import rope_kernel

    return rope_kernel.__class__.__name__ == "InterpretedFunction"


def _s3(t: Optional[torch.Tensor], like: Optional[torch.Tensor] = None) -> Tuple[int, int, int]:
    """The first three strides of a canonical view (of ``like`` when ``t`` is None; zeros if both are)."""
    t = t if t is not None else like
    return tuple(t.stride()[:3]) if t is not None else (0, 0, 0)


def _qk_norm_launch(xa, oa, ra, wa, xb, ob, rb, wb, cos, sin, eps, weight_offset, interleaved, cos_per_head) -> None:
    """Forward launch on canonical views ``x*/o* [m0, m1, h, d]``, ``r* [m0, m1, h]`` (inverse RMS
    out, or None), weights ``w* [d]``, ``cos/sin [m0, m1, h|1, r/2]``. ``oa is None``: in place."""
    m0, m1, ha, d = xa.shape
    hb = 0 if xb is None else xb.shape[2]
    M, r2 = m0 * m1, cos.shape[-1]
    if M == 0 or ha + hb == 0:
        return
    inplace = oa is None
    r2p, tp = _norm_widths(d, r2)
    bt, bh, num_warps = _norm_launch_params(M, ha, hb, d, r2, _interpreted())
    nba = _cdiv(ha, bh)
    grid = (_cdiv(M, bt), nba + _cdiv(hb, bh))
    eps_hi, eps_lo = _split_f32(eps)
    wo_hi, wo_lo = _split_f32(weight_offset)
    _launch_kernel(
        "qk_norm_fwd_kernel", grid, xa.device,
        xa, oa, ra, wa, xb, ob, rb, wb, cos, sin,
        M, m1, ha, hb, nba,
        *_s3(xa), *_s3(oa, xa), *_s3(ra), wa.stride(0),
        *_s3(xb), *_s3(ob, xb), *_s3(rb), wb.stride(0) if wb is not None else 0,
        *cos.stride(), *sin.stride(),
        eps_hi, eps_lo, wo_hi, wo_lo,
        R2=r2, D=d, R2P=r2p, TP=tp, BT=bt, BH=bh,
        INTERLEAVED=interleaved, COS_PER_HEAD=cos_per_head, F64=xa.dtype == torch.float64,
        INPLACE=inplace, HAS_B=hb > 0, SAVE_RSTD=ra is not None,
        num_warps=num_warps,
    )  # fmt: skip


def _qk_norm_bwd_params(M: int, h: int, d: int, r2: int) -> Tuple[int, int, int, int]:
    """``(BT, BH, num_warps, programs)`` of one tensor's backward: what it gets launched alone,
    also in a joint launch (its weight gradient is then summed in the same order, same bits)."""
    bt, bh, num_warps = _norm_launch_params(M, h, 0, d, r2, _interpreted())
    return bt, bh, num_warps, max(1, min(_cdiv(M, bt), _DW_PROGRAMS))


def _qk_norm_bwd_launch(ga, xa, ra, wa, dxa, pa, gb, xb, rb, wb, dxb, pb, cos, sin, weight_offset, interleaved,
                        cos_per_head, bt, bh, programs, num_warps, bt_b=1, bh_b=1, programs_b=1) -> None:
    """Backward launch on canonical views (see :func:`_qk_norm_backward`): ``dx*`` (or None) get
    the input gradients, ``p* [programs * cdiv(h, bh), d]`` (or None) the partial weight gradients;
    group b (k) has its own tile ``bt_b x bh_b`` and ``programs_b``."""
    m0, m1, ha, d = xa.shape
    hb = 0 if xb is None else xb.shape[2]
    M, r2 = m0 * m1, cos.shape[-1]
    if M == 0 or ha + hb == 0:
        return
    if hb == 0:
        bt_b, bh_b, programs_b = 1, 1, 1
    r2p, tp = _norm_widths(d, r2)
    nba = _cdiv(ha, bh)
    grid = (max(programs, programs_b if hb else 0), nba + _cdiv(hb, bh_b))
    wo_hi, wo_lo = _split_f32(weight_offset)
    _launch_kernel(
        "qk_norm_bwd_kernel", grid, xa.device,
        ga, xa, dxa, ra, wa, pa, gb, xb, dxb, rb, wb, pb, cos, sin,
        M, m1, ha, hb, nba, _cdiv(M, bt), programs, _cdiv(M, bt_b), programs_b,
        *_s3(ga), *_s3(xa), *_s3(dxa, xa), *_s3(ra), wa.stride(0),
        *_s3(gb), *_s3(xb), *_s3(dxb, xb), *_s3(rb), wb.stride(0) if wb is not None else 0,
        *cos.stride(), *sin.stride(),
        wo_hi, wo_lo,
        R2=r2, D=d, R2P=r2p, TP=tp, BT=bt, BH=bh, BT_B=bt_b, BH_B=bh_b,
        INTERLEAVED=interleaved, COS_PER_HEAD=cos_per_head, F64=xa.dtype == torch.float64, HAS_B=hb > 0,
        DX_A=dxa is not None, DW_A=pa is not None, DX_B=dxb is not None, DW_B=pb is not None,
        num_warps=num_warps,
    )  # fmt: skip


def _run(xa, oa, xb, ob, cos, sin, pos, interleaved, conjugate, cos_per_head, inplace):
    _launch(xa, oa, xb, ob, cos, sin, pos, interleaved, conjugate, cos_per_head, not inplace)


# --------------------------------------------------------------------------------------
# canonical views
# --------------------------------------------------------------------------------------


def _views(ts: Sequence[torch.Tensor], hd: int) -> Optional[List[torch.Tensor]]:
    """Views ``[m0, m1, h, last]`` of tensors whose dims agree except ``hd`` (moved to -2).

    Leading dims other than ``hd`` are padded with size-1 dims or merged into two (only
    when every tensor allows a view); None when a merge would need a copy.
    """
    out = []
    for t in ts:
        v = t.movedim(hd, -2)
        while v.dim() < 4:
            v = v.unsqueeze(0)
        if v.dim() > 4:
            try:
                v = v.view(-1, *v.shape[-3:])  # [m0, m1, h, last]
            except RuntimeError:
                return None
        out.append(v)
    return out


def _pick_head_dim(lead: Sequence[int], ce: torch.Tensor, se: torch.Tensor, last: bool = False) -> Tuple[int, bool]:
    """The dim of x along which cos/sin are shared (the largest; ``last``: the last such dim,
    the heads dim of every format), and whether none is."""
    shared = [i for i, n in enumerate(lead) if n > 1 and ce.stride(i) == 0 and se.stride(i) == 0]
    if shared:
        return (shared[-1] if last else max(shared, key=lambda i: lead[i])), False
    ones = [i for i, n in enumerate(lead) if n == 1]
    if ones:
        return ones[-1], False
    return len(lead) - 1, True  # cos/sin differ for every element: per-head table loads


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _rotate_canon(x, cos, sin, interleaved, conjugate, out, inplace) -> None:
    """``x``/``out`` with unit last stride, ``dim >= 2``; cos/sin broadcast to ``x``."""
    lead = tuple(x.shape[:-1])
    r2 = cos.shape[-1]
    ce, se = cos.expand(*lead, r2), sin.expand(*lead, r2)
    hd, per_head = _pick_head_dim(lead, ce, se)
    v = _views([x, out, ce, se], hd)
    if v is None:
        # leading dims that no view can merge: one launch per index of the first dim
        for i in range(x.shape[0]):
            _rotate_canon(x[i], ce[i], se[i], interleaved, conjugate, out[i], inplace)
        return
    xv, ov, cv, sv = v
    _run(xv, ov, None, None, cv, sv, None, interleaved, conjugate, per_head, inplace)


def rotate(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layout: str,
    conjugate: bool,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write ``R(±θ) x`` into ``out`` (which may be ``x``) in one launch; see the module doc.

    Args:
        x: ``[..., d]`` float16/bfloat16/float32/float64 on CUDA (CPU under the interpreter).
        cos, sin: ``[..., r/2]`` broadcastable to ``x.shape[:-1] + (r/2,)``; any float dtype.
        layout: ``"half"`` or ``"interleaved"``.
        conjugate: rotate by ``-θ``.
        out: ``x``'s shape and dtype; ``out is x`` means in place. Dims ``[r, d)`` are copied
            into ``out`` by the same kernel.

    Returns:
        ``out``.
    """
    inplace = out is x
    if x.numel() == 0:
        return out
    if x.dim() == 1:
        _rotate_one(x[None], cos, sin, layout, conjugate, x[None] if inplace else out[None], inplace)
        return out
    _rotate_one(x, cos, sin, layout, conjugate, out, inplace)
    return out


def _rotate_one(x, cos, sin, layout, conjugate, out, inplace) -> None:
    interleaved = layout == "interleaved"
    if inplace:
        work = _unit_last(x)
        _rotate_canon(work, cos, sin, interleaved, conjugate, work, True)
        if work is not x:
            x.copy_(work)
        return
    xi = _unit_last(x)
    oi = out if out.stride(-1) == 1 else torch.empty_like(xi)
    _rotate_canon(xi, cos, sin, interleaved, conjugate, oi, False)
    if oi is not out:
        out.copy_(oi)


def rotate_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layout: str,
    inplace: bool,
    conjugate: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``[..., hq, d]`` and k ``[..., hk, d]`` (shapes equal except the heads dim)
    with the same tables in ONE launch (the kernel of ``ropekit::rotary_qk`` on CUDA; no
    autograd here: the op's autograd calls it again conjugated).

    Falls back to one launch per tensor when q and k differ in dtype, head dim or in more
    than one dim, when cos/sin differ per head, or when a last-dim stride is not 1.
    """
    qo = q if inplace else torch.empty_like(q)
    ko = k if inplace else torch.empty_like(k)
    if q.numel() == 0 or k.numel() == 0:
        if not inplace:
            qo.copy_(q)
            ko.copy_(k)
        return qo, ko
    diff = [i for i in range(q.dim() - 1) if q.dim() == k.dim() and q.shape[i] != k.shape[i]]
    r2 = cos.shape[-1]
    v = None
    if (
        q.dtype == k.dtype
        and q.dim() == k.dim() >= 2
        and q.shape[-1] == k.shape[-1]
        and len(diff) <= 1
        and all(t.stride(-1) == 1 for t in (q, k, qo, ko))
    ):
        ce, se = cos.expand(*q.shape[:-1], r2), sin.expand(*q.shape[:-1], r2)
        if diff:
            hd, per_head = diff[0], False  # cos/sin broadcast over it (checked by check_tables)
        else:
            hd, per_head = _pick_head_dim(tuple(q.shape[:-1]), ce, se)
        if not per_head:
            v = _views([q, qo, k, ko, ce, se], hd)
    if v is None:
        rotate(q, cos, sin, layout, conjugate, qo)
        rotate(k, cos, sin, layout, conjugate, ko)
        return qo, ko
    qv, qov, kv, kov, cv, sv = v
    _run(qv, qov, kv, kov, cv, sv, None, layout == "interleaved", conjugate, False, inplace)
    return qo, ko


# --------------------------------------------------------------------------------------
# fused gather (RotaryEmbedding.forward)
# --------------------------------------------------------------------------------------


def _fmt_view(t: torch.Tensor, fmt: str) -> torch.Tensor:
    """q/k in ``fmt`` -> a ``[b, s, h, d]`` view (``[1, t, h, d]`` for thd)."""
    if fmt == "bhsd":
        return t.transpose(1, 2)
    if fmt == "sbhd":
        return t.transpose(0, 1)
    if fmt == "thd":
        return t.unsqueeze(0)
    return t


def _pos_view(pos: torch.Tensor, m0: int, m1: int) -> torch.Tensor:
    """Positions ``[s]`` / ``[b, s]`` / ``[t]`` -> ``[m0, m1]`` (stride 0 over a shared batch)."""
    if pos.dim() == 1:
        return pos[None].expand(m0, m1)
    return pos


def _gather_groups(xs, outs, cos_t, sin_t, pos, fmt, interleaved, conjugate, inplace) -> None:
    """Launch for up to two same-format tensors (one launch when their dtypes agree)."""
    views = [(_fmt_view(x, fmt), _fmt_view(o, fmt)) for x, o in zip(xs, outs)]
    m0, m1 = views[0][0].shape[:2]
    pv = _pos_view(pos, m0, m1)
    if len(views) == 2 and views[0][0].dtype == views[1][0].dtype:
        (xa, oa), (xb, ob) = views
        _run(xa, oa, xb, ob, cos_t, sin_t, pv, interleaved, conjugate, False, inplace)
        return
    for xa, oa in views:
        _run(xa, oa, None, None, cos_t, sin_t, pv, interleaved, conjugate, False, inplace)


def _gather_rotate(xs, cos_table, sin_table, pos, fmt, layout, conjugate, inplace) -> list:
    """The fused gather (the CUDA kernel of ``ropekit::rotary_gather``): rotate 1 or 2 tensors.

    Unit last stride is enforced here (incoming gradients may be expanded: zero strides;
    in place, such a tensor is rotated in a copy and written back). Returns ``xs``
    themselves when ``inplace``, else fresh tensors.
    """
    work = [_unit_last(x) for x in xs]
    outs = work if inplace else [torch.empty_like(w) for w in work]
    _gather_groups(work, outs, cos_table, sin_table, pos, fmt, layout == "interleaved", conjugate, inplace)
    if inplace:
        for x, w in zip(xs, work):
            if w is not x:
                x.copy_(w)
        return list(xs)
    return outs


def _device_side_checks(t: torch.Tensor) -> bool:
    """Whether positions are range-checked in the kernel (CUDA) instead of on the host.
    tests/test_triton_aot.py and tests/test_triton_ops.py switch it on for CPU tensors to
    run the CUDA branch of the host code."""
    return t.is_cuda


def check_range_host(pos: torch.Tensor, n: int) -> None:
    """Positions in ``[0, n)`` read on the host (RopeError): CPU tensors only (the interpreter
    path). On CUDA the kernel checks them itself (a device-side assert, no host sync)."""
    if pos.numel() == 0 or _device_side_checks(pos):
        return
    lo, hi = (int(v) for v in torch.aminmax(pos))
    if lo < 0 or hi >= n:
        raise fail(
            f"positions in [0, {n}) (the table length)",
            f"positions from {lo} to {hi}",
            "grow the tables (RotaryEmbedding.tables(max_position + 1)) or fix the positions",
        )


def gather_positions(q: torch.Tensor, positions: torch.Tensor, fmt: str) -> torch.Tensor:
    """Positions as the kernel reads them: int64 ``[s]`` / ``[t]`` (shared by the batch) or
    ``[b, s]``; ``[1, s]`` -> ``[s]``; ``[b]`` with ``s == 1`` (one token per sample) -> ``[b, 1]``.
    Shape only (no values read)."""
    pos = positions if positions.dtype == torch.int64 else positions.to(torch.int64)
    b, s = _fmt_view(q, fmt).shape[:2]
    if pos.dim() == 2 and pos.shape[0] == 1:
        pos = pos[0]
    if fmt != "thd" and pos.dim() == 1 and s == 1 and pos.shape[0] == b and b != 1:
        pos = pos.view(b, 1)
    if tuple(pos.shape) not in ((s,), (b, s)):
        raise fail(f"positions of shape [{s}] or [{b}, {s}] for q {tuple(q.shape)} in format {fmt!r}",
                   f"shape {list(positions.shape)}", "one position per token ([s] shared by the batch, [b, s] per sample)")
    return pos


def rotate_qk_gather(q, k, cos_table, sin_table, positions, fmt, layout, inplace, conjugate=False):
    """Rotate q and k in one launch, table rows gathered by position inside the kernel (the
    kernel of ``ropekit::rotary_gather`` on CUDA; no checks, no autograd here).

    Args:
        q: ``[b, s, hq, d]`` (bshd), ``[b, hq, s, d]`` (bhsd), ``[s, b, hq, d]`` (sbhd) or
            ``[t, hq, d]`` (thd); any strides. k: the same format with ``hk`` heads.
        cos_table, sin_table: ``[n, r/2]`` rows for positions ``0 .. n-1``.
        positions: integers ``[s]``, ``[b, s]``, ``[1, s]``, ``[t]`` (thd), or ``[b]`` when ``s == 1``.

    Returns ``(q_rot, k_rot)`` (q and k themselves when ``inplace``).
    """
    pos = gather_positions(q, positions, fmt)
    if q.numel() == 0 and k.numel() == 0:
        return (q, k) if inplace else (q.clone(), k.clone())
    out = _gather_rotate([q, k], cos_table, sin_table, pos, fmt, layout, conjugate, inplace)
    return out[0], out[1]


# --------------------------------------------------------------------------------------
# entry points of the backend registry: the dispatcher ops (torch.ops.ropekit.*), whose
# CUDA kernels are the launches above (ropekit.backends._triton_ops); one validator and one
# autograd per op (C++). CPU tensors under TRITON_INTERPRET=1 reach the same Python kernels
# through _triton_mode.on_triton() (the op's CPU kernel otherwise).
# --------------------------------------------------------------------------------------


def _ops_backend():
    return _cpu_entry


def _mode(*ts):
    return _triton_mode.on_triton(*ts)


def apply(x, cos, sin, layout, conjugate, inplace, out):
    """Entry point (see :mod:`ropekit.backends`): ``ropekit::rotary`` / ``rotary_`` / ``rotary_out``."""
    with _mode(x):
        return _ops_backend().apply(x, cos, sin, layout, conjugate, inplace, out)


def apply_qk(q, k, cos, sin, layout, conjugate, inplace):
    """Entry point: ``ropekit::rotary_qk`` / ``rotary_qk_`` (q and k in one launch)."""
    with _mode(q, k):
        return _ops_backend().apply_qk(q, k, cos, sin, layout, conjugate, inplace)


def apply_gather(q, k, cos_table, sin_table, positions, fmt, layout, conjugate, inplace):
    """Entry point: ``ropekit::rotary_gather`` / ``rotary_gather_`` (rows gathered in the kernel;
    on CUDA the positions are range-checked there, without a host sync)."""
    with _mode(q, k):
        return _ops_backend().apply_gather(q, k, cos_table, sin_table, positions, fmt, layout, conjugate, inplace)


def apply_qk_norm(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout, inplace):
    """Entry point: ``ropekit::qk_norm_rotary`` / ``qk_norm_rotary_`` (norm + rotation, one launch)."""
    with _mode(q, k):
        return _ops_backend().apply_qk_norm(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout, inplace)


# --------------------------------------------------------------------------------------
# per-head RMSNorm + RoPE (apply_qk_norm_rotary): views, autograd, entry point
# --------------------------------------------------------------------------------------


def _lead_mergeable(v: torch.Tensor, n: int) -> bool:
    """Whether the first ``n`` dims of ``v`` merge into one by ``view`` (size-1 dims ignored)."""
    dims = [(sz, st) for sz, st in zip(v.shape[:n], v.stride()[:n]) if sz != 1]
    return all(dims[i][1] == dims[i + 1][1] * dims[i + 1][0] for i in range(len(dims) - 1))


def _canon4(t: torch.Tensor, hd: int, need_view: bool) -> Optional[torch.Tensor]:
    """``t [..., h (at hd), ..., last]`` as ``[m0, m1, h, last]``: ``hd`` moved to -2, leading dims
    padded or merged. A view when the strides allow it; otherwise a copy (``need_view``: None)."""
    v = t.movedim(hd, -2)
    while v.dim() < 4:
        v = v.unsqueeze(0)
    if v.dim() > 4:
        if _lead_mergeable(v, v.dim() - 3):
            v = v.view(-1, *v.shape[-3:])
        elif need_view:
            return None
        else:
            v = v.reshape(-1, *v.shape[-3:])  # a copy (inputs only)
    return v


def _canon_in(t: torch.Tensor, hd: int) -> torch.Tensor:
    """Read-only canonical view of ``t`` with unit last stride (a copy when needed)."""
    return _unit_last(_canon4(t, hd, False))


def _uncanon(v: torch.Tensor, like: torch.Tensor, hd: int) -> torch.Tensor:
    """The canonical ``v [m0, m1, h, d]`` viewed back to ``like``'s shape (inverse of :func:`_canon4`)."""
    moved = like.movedim(hd, -2).shape
    return v.reshape(moved).movedim(-2, hd)


def _canon_dst(like: torch.Tensor, hd: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A fresh output of ``like``'s shape and dtype and its writable canonical view ``(out, view)``:
    ``empty_like`` (``like``'s layout) when its canonical form is a view with unit last stride,
    else canonical-contiguous memory seen through ``like``'s shape."""
    out = torch.empty_like(like)
    v = _canon4(out, hd, True)
    if v is None or v.stride(-1) != 1:
        v = torch.empty(_canon4(like, hd, False).shape, dtype=like.dtype, device=like.device)
        out = _uncanon(v, like, hd)
    return out, v


class _NormPlan:
    """How q and k are launched: ``joint`` (one launch, q heads then k heads) or one each;
    per tensor the dim of its heads (``hd``: moved to -2 in the canonical view) and whether
    cos/sin differ per head (``per_head``). A function of shapes and table strides only, so
    the backward rebuilds the same canonical views from the saved tensors."""

    __slots__ = ("joint", "hd", "per_head")

    def __init__(self, q, k, cos, sin):
        r2 = cos.shape[-1]
        diff = [i for i in range(q.dim() - 1) if q.dim() == k.dim() and q.shape[i] != k.shape[i]]
        self.joint = (
            q.dtype == k.dtype and q.dim() == k.dim() and q.shape[-1] == k.shape[-1] and len(diff) <= 1
        )
        hd, per = [], []
        for x in (q, k):
            lead = tuple(x.shape[:-1])
            ce, se = cos.expand(*lead, r2), sin.expand(*lead, r2)
            if self.joint and diff:
                h, p = diff[0], False  # cos/sin broadcast over it (they broadcast to both q and k)
            else:
                # the last shared dim (the heads dim), whatever the partner: a tensor launched alone
                # (in-place autograd: one backward node per tensor) is tiled as in the joint launch,
                # so its weight gradient is summed in the same order (same bits)
                h, p = _pick_head_dim(lead, ce, se, last=True)
            hd.append(h)
            per.append(p)
        self.hd, self.per_head = tuple(hd), tuple(per)

    def tables(self, i: int, x: torch.Tensor, cos, sin):
        lead, r2 = tuple(x.shape[:-1]), cos.shape[-1]
        return _canon_in(cos.expand(*lead, r2), self.hd[i]), _canon_in(sin.expand(*lead, r2), self.hd[i])


def _rstd_buf(xv: torch.Tensor) -> torch.Tensor:
    """The inverse RMS of every head row of the canonical ``xv``: ``[m0, m1, h]`` in the compute dtype."""
    return torch.empty(xv.shape[:3], dtype=_generic.compute_dtype(xv), device=xv.device)


def _qk_norm_forward(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, interleaved, inplace, save, plan):
    """Launch the forward (one launch for q and k when ``plan.joint``, else one each).

    Returns ``(q_out, k_out, (rstd_q, rstd_k))``: the outputs (``q``/``k`` themselves when
    ``inplace``) and, when ``save``, the canonical inverse RMS buffers ``[m0, m1, h]``.
    """
    groups = []  # per tensor: (x view, out view or None, rstd, weight, cos view, sin view, out, copy back)
    for i, (x, w) in enumerate(((q, q_weight), (k, k_weight))):
        hd = plan.hd[i]
        cv, sv = plan.tables(i, x, cos, sin)
        if inplace:
            xv = _canon4(x, hd, True)
            back = xv is None or xv.stride(-1) != 1
            if back:  # not writable through a canonical view: a canonical copy, written back after
                xv = _canon4(x, hd, False).contiguous()
            out, ov = x, None
        else:
            xv, back = _canon_in(x, hd), False
            out, ov = _canon_dst(x, hd)
        groups.append((xv, ov, _rstd_buf(xv) if save else None, w, cv, sv, out, back))
    (qa, qo, qr, qw, qc, qs, q_out, q_back), (ka, ko, kr, kw, _, _, k_out, k_back) = groups
    if plan.joint:
        _run_qk_norm(qa, qo, qr, qw, ka, ko, kr, kw, qc, qs, eps, weight_offset, interleaved, plan.per_head[0], inplace)
    else:
        for (xa, oa, ra, wa, ca, sa, _, _), per in zip(groups, plan.per_head):
            _run_qk_norm(xa, oa, ra, wa, None, None, None, None, ca, sa, eps, weight_offset, interleaved, per, inplace)
    for (xv, _, _, _, _, _, x, back), hd in zip(groups, plan.hd):
        if back:
            x.copy_(_uncanon(xv, x, hd))
    return q_out, k_out, (qr, kr)


def _run_qk_norm(xa, oa, ra, wa, xb, ob, rb, wb, cos, sin, eps, weight_offset, interleaved, cos_per_head, inplace):
    _qk_norm_launch(xa, None if inplace else oa, ra, wa, xb, None if inplace else ob, rb, wb, cos, sin, eps,
                    weight_offset, interleaved, cos_per_head)


def _qk_norm_backward(grads, xs, weights, rstds, cos, sin, weight_offset, interleaved, plan, need_dx, need_dw):
    """Gradients of the forward: ``grads``/``xs``/``weights``/``rstds`` per tensor (q, k) — a
    gradient may be None (output unused) — and which ``dx``/``dw`` are needed.

    One launch for both tensors when ``plan.joint`` and both take part, else one each.
    Returns ``([dq, dk], [dq_weight, dk_weight])`` (None where not needed). The weight
    gradients are summed in float32 (float64 for float64 inputs) in a fixed order:
    per-program partial rows, then ``torch.sum`` over them; bit-identical run to run.
    """
    dxs, dws = [None, None], [None, None]
    parts = []
    for i in (0, 1):
        g = grads[i]
        if g is None or not (need_dx[i] or need_dw[i]):
            continue
        x, hd = xs[i], plan.hd[i]
        gv, xv = _canon_in(g, hd), _canon_in(x, hd)
        if need_dx[i]:
            dxs[i], dv = _canon_dst(x, hd)
        else:
            dv = None
        cv, sv = plan.tables(i, x, cos, sin)
        parts.append((i, gv, xv, rstds[i], weights[i], dv, cv, sv))
    if not parts:
        return dxs, dws
    launches = [parts] if plan.joint and len(parts) == 2 else [[p] for p in parts]
    for group in launches:
        m0, m1, _, d = group[0][2].shape
        r2 = cos.shape[-1]
        # each tensor's own tile (as launched alone): its weight gradient has the same bits either way
        params = [_qk_norm_bwd_params(m0 * m1, p[2].shape[2], d, r2) for p in group]
        args = []
        for (i, gv, xv, rv, w, dv, _, _), (_, bh, _, programs) in zip(group, params):
            pv = None
            if need_dw[i]:
                pv = torch.empty(programs * _cdiv(xv.shape[2], bh), d, dtype=_generic.compute_dtype(xv), device=xv.device)
            args.append((gv, xv, rv, w, dv, pv))
        if len(args) == 1:
            args.append((None,) * 6)
        (ga, xa, ra, wa, dxa, pa), (gb, xb, rb, wb, dxb, pb) = args
        cv, sv = group[0][6], group[0][7]
        bt, bh, num_warps, programs = params[0]
        bt_b, bh_b, _, programs_b = params[-1]
        _qk_norm_bwd_launch(ga, xa, ra, wa, dxa, pa, gb, xb, rb, wb, dxb, pb, cv, sv, weight_offset, interleaved,
                            plan.per_head[group[0][0]], bt, bh, programs, num_warps, bt_b, bh_b, programs_b)
        for (i, *_), (_, _, _, w, _, pv) in zip(group, args):
            if pv is not None:
                dws[i] = pv.sum(0).to(w.dtype)  # [d]: a fixed-order reduction of the partial rows
    return dxs, dws


def qk_norm_rotate(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout, inplace, save=False):
    """Per-head RMSNorm then RoPE of q ``[..., hq, d]`` and k ``[..., hk, d]`` in one launch
    (the kernel of ``ropekit::qk_norm_rotary*`` on CUDA; no checks, no autograd here).

    Returns ``(q_out, k_out, (rstd_q, rstd_k))``: q and k themselves when ``inplace``; the
    inverse RMS of every head row in the shape ``x.shape[:-1]`` (compute dtype) when ``save``.
    """
    interleaved = layout == "interleaved"
    plan = _NormPlan(q, k, cos, sin)
    qo, ko, rv = _qk_norm_forward(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, interleaved, inplace, save,
                                  plan)
    rstds = (None, None)
    if save:
        rstds = tuple(_rstd_natural(r, x, hd) for r, x, hd in zip(rv, (q, k), plan.hd))
    return qo, ko, rstds


def _rstd_natural(r: torch.Tensor, x: torch.Tensor, hd: int) -> torch.Tensor:
    """The canonical ``r [m0, m1, h]`` as a contiguous ``x.shape[:-1]`` tensor (the op's rstd)."""
    out = torch.empty(x.shape[:-1], dtype=r.dtype, device=r.device)
    if out.numel():
        out.copy_(_uncanon(r.unsqueeze(-1), x[..., :1], hd).squeeze(-1))
    return out


def qk_norm_backward(grads, xs, weights, rstds, cos, sin, weight_offset, layout):
    """``(dq, dk, dq_weight, dk_weight)`` of :func:`qk_norm_rotate` (``ropekit::qk_norm_rotary_bwd``).

    ``rstds`` in the op's form (one value per row of x, ``x.shape[:-1]`` numel). A side with an
    empty ``x`` (the other tensor of a single-tensor backward) gets an empty ``dx`` and a zero
    weight gradient.
    """
    live = [x.numel() > 0 for x in xs]
    pq, pk = (xs[0] if live[0] else xs[1]), (xs[1] if live[1] else xs[0])
    plan = _NormPlan(pq, pk, cos, sin) if any(live) else None
    gs, rs = [None, None], [None, None]
    for i in (0, 1):
        if live[i]:
            g = grads[i] if grads[i].dtype == xs[i].dtype else grads[i].to(xs[i].dtype)
            gs[i] = g
            r = rstds[i].reshape(xs[i].shape[:-1]).unsqueeze(-1)
            rs[i] = _canon_in(r, plan.hd[i])[..., 0]  # [m0, m1, h]
    dxs, dws = ([None, None], [None, None])
    if plan is not None:
        dxs, dws = _qk_norm_backward(gs, list(xs), list(weights), rs, cos, sin, weight_offset, layout == "interleaved",
                                     plan, live, live)
    for i in (0, 1):
        if not live[i]:
            dxs[i] = torch.empty_like(grads[i])
            dws[i] = torch.zeros_like(weights[i])
    return dxs[0], dxs[1], dws[0], dws[1]
