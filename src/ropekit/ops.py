"""ropekit's compiled operators, ``torch.ops.ropekit.*`` (built from ``csrc/`` at install).

Loading this module registers the ops with PyTorch's dispatcher when the package was
installed with its extension (``pip install --no-build-isolation -e .`` with torch already
present and a C++ compiler). Without it, :data:`LOADED` is ``False``, :data:`REASON` says
why, and the ``cpu`` backend is not available (``backend="auto"`` warns once and runs
``eager``).

The ops (schemas in ``csrc/ops.cpp``), for CPU and Meta tensors, differentiable in ``x``/
``q``/``k`` (backward: the same op with the rotation conjugated)::

    rotary(x, cos, sin, layout="half", conjugate=False) -> Tensor
    rotary_(x!, cos, sin, layout, conjugate) -> ()               # in place
    rotary_out(x, cos, sin, layout, conjugate, *, out!) -> ()
    rotary_qk(q, k, cos, sin, layout, conjugate) -> (Tensor, Tensor)
    rotary_qk_(q!, k!, cos, sin, layout, conjugate) -> ()
    rotary_gather(q, k, cos_table, sin_table, positions, format, layout, conjugate) -> (Tensor, Tensor)
        # positions [s], [b, s] ([1, s]), [t] for thd, or [b] when s == 1 (one token per sample)
    rotary_gather_(q!, k!, cos_table, sin_table, positions, format, layout, conjugate) -> ()
    qk_norm_rotary(q, k, q_weight, k_weight, cos, sin, eps=1e-6, weight_offset=0.0, layout="half")
        -> (Tensor, Tensor)       # per-head RMSNorm then rotation, differentiable in q, k and both weights
    qk_norm_rotary_(q!, k!, q_weight, k_weight, cos, sin, eps, weight_offset, layout) -> ()
    qk_norm_rotary_fwd(...) -> (q', k', q_rstd, k_rstd)          # the forward with its saved inverse RMS
    qk_norm_rotary_fwd_(q!, k!, ...) -> (q_rstd, k_rstd)
    qk_norm_rotary_bwd(grad_q, grad_k, q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin, weight_offset, layout)
        -> (dq, dk, dq_weight, dk_weight)
    rotary_cache_(q!, k, cos_table, sin_table, positions, k_cache!, slots, v=None, v_cache!=None, k_out!=None,
                  cache_layout="nhd", layout="half") -> ()
        # serving: q rotated in place, k rotated into the cache at flat slots (negative: skipped),
        # v copied beside it; not differentiable (ropekit.serving.apply_rotary_cache)
    cpu_capability() -> str                     # "default", "avx2", "avx512" or "avx512bf16"
    cos_sin(angles) -> (Tensor, Tensor)         # float64 cos/sin per element from IEEE operations
        # only (ropekit.tables uses it for exact tables: the same bits in every process)

The kernel is compiled for several instruction-set levels and the best one the CPU runs is
picked when the library loads; ``ROPEKIT_CPU_CAPABILITY=default|avx2|avx512|avx512bf16`` (set before
the first call) forces a lower one. Every level gives the same bits.

Example:
    >>> import torch, ropekit
    >>> from ropekit import ops
    >>> if ops.LOADED:
    ...     q = torch.randn(1, 4, 2, 8)
    ...     cos, sin = ropekit.cos_sin(ropekit.RopeConfig(8), torch.arange(4))
    ...     y = torch.ops.ropekit.rotary(q, cos[:, None], sin[:, None])
    ...     assert y.shape == q.shape
"""

from __future__ import annotations

from typing import Optional

__all__ = ["LOADED", "REASON", "LEVELS", "capability", "levels", "check"]

try:
    from . import _C  # noqa: F401  (its static initialisers register torch.ops.ropekit.*)

    LOADED = True
    REASON: Optional[str] = None
except ImportError as e:  # installed without the extension (no compiler, or no torch at build time)
    _C = None
    LOADED = False
    REASON = f"ropekit._C was not built ({e})"


def _args(op: str, args: tuple, kwargs: dict) -> tuple:
    """The op's schema arguments in order, defaults filled (``out`` last for ``rotary_out``)."""
    if not kwargs and op not in _DEFAULTS:
        return args
    names, defaults = _DEFAULTS.get(op, ((), ()))
    full = list(args) + [None] * (len(names) - len(args))
    for i, nm in enumerate(names):
        if nm in kwargs:
            full[i] = kwargs[nm]
        elif i >= len(args):
            full[i] = defaults[i]
    return tuple(full)


_ROT = (("x", "cos", "sin", "layout", "conjugate"), (None, None, None, "half", False))
_QK = (("q", "k", "cos", "sin", "layout", "conjugate"), (None, None, None, None, "half", False))
_GATHER = (("q", "k", "cos_table", "sin_table", "positions", "format", "layout", "conjugate"),
           (None, None, None, None, None, "bshd", "half", False))
_NORM = (("q", "k", "q_weight", "k_weight", "cos", "sin", "eps", "weight_offset", "layout"),
         (None, None, None, None, None, None, 1e-6, 0.0, "half"))
_CACHE = (("q", "k", "cos_table", "sin_table", "positions", "k_cache", "slots", "v", "v_cache", "k_out", "cache_layout",
           "layout"), (None,) * 7 + (None, None, None, "nhd", "half"))
_DEFAULTS = {
    "rotary_cache_": _CACHE,
    "rotary": _ROT, "rotary_": _ROT,
    "rotary_out": (_ROT[0] + ("out",), _ROT[1] + (None,)),
    "rotary_qk": _QK, "rotary_qk_": _QK, "rotary_gather": _GATHER, "rotary_gather_": _GATHER,
    "qk_norm_rotary": _NORM, "qk_norm_rotary_": _NORM, "qk_norm_rotary_fwd": _NORM, "qk_norm_rotary_fwd_": _NORM,
}


def check(op: str, *args, **kwargs) -> None:
    """Run the one validator of ``torch.ops.ropekit.<op>`` on its arguments (in schema order,
    as the op takes them); raises a :class:`~ropekit.RopeError` for anything the op's kernels
    refuse (dtypes, devices, shapes, aliasing of written tensors with inputs). The validators
    are the C++ ones the CPU kernels run (``csrc/ops.cpp``): the fake kernels and the kernels
    of other devices call them through here, so every path applies the same rules. Values
    (positions in range) are checked by the kernels, which have the data. Without the
    compiled extension nothing is checked here (:data:`LOADED` is ``False``)."""
    if _C is None or _compiling():
        return
    _check(op, args, kwargs)


def _check(op: str, args: tuple, kwargs: dict) -> None:
    """:func:`check` on tensors Python holds (real, fake or meta): the C++ validator itself."""
    a = _args(op, args, kwargs)
    try:
        if op in ("rotary", "rotary_", "rotary_out"):
            _C.check_rotary(a[0], a[1], a[2], a[3], op == "rotary_", a[5] if op == "rotary_out" else None)
        elif op in ("rotary_qk", "rotary_qk_"):
            _C.check_qk(a[0], a[1], a[2], a[3], a[4], op == "rotary_qk_")
        elif op in ("rotary_gather", "rotary_gather_"):
            _C.check_gather(a[0], a[1], a[2], a[3], a[4], a[5], a[6], op == "rotary_gather_")
        elif op in ("qk_norm_rotary", "qk_norm_rotary_", "qk_norm_rotary_fwd", "qk_norm_rotary_fwd_"):
            _C.check_qk_norm(*a[:9], op.endswith("_"))
        elif op == "qk_norm_rotary_bwd":
            _C.check_qk_norm_bwd(*a)
        elif op == "rotary_cache_":
            _C.check_rotary_cache(*a)
        elif op == "cos_sin":
            _C.check_cos_sin(*a)
        else:
            raise KeyError(op)
    except ValueError as e:
        raise rope_error(e) from None
    except TypeError as e:  # pybind's refusal of an argument of the wrong type (a list for a tensor, ...)
        raise _fail(f"the argument types of ropekit::{op}", str(e).split("\n")[0],
                    "pass tensors, strings and bools as the op's schema names them") from None


def _compiling() -> bool:
    # while torch.compile / torch.export trace plain torch code (the torch-only backends) the
    # validator is not called here: dynamo cannot trace into it (those callers use refusal()
    # below); the compiled ops' fake kernels run it themselves (_check)
    import torch

    return torch.compiler.is_compiling()


def dynamo_tracing() -> bool:
    """True while TorchDynamo (torch.compile, strict torch.export) traces the caller's Python."""
    import torch

    fn = getattr(torch.compiler, "is_dynamo_compiling", None)  # False when run, True when traced
    return fn() if fn is not None else torch.compiler.is_compiling()


def torch_exporting() -> bool:
    """True while torch.export traces the caller."""
    import torch

    fn = getattr(torch.compiler, "is_exporting", None)
    return bool(fn()) if fn is not None else False


def refusal(op: str, args: tuple, like: tuple):
    """:func:`check` for code TorchDynamo traces (where the C++ validator cannot be called): the
    validator runs on the fake tensors at trace time, inside the op ``ropekit::refused``. ``None``
    when it accepts them (the graph needs no check: its guards pin the checked sizes, strides,
    dtypes and devices). When it refuses, stand-ins of the call's results, new tensors shaped like
    ``like``, from the op ``ropekit::refuse``, which raises the validator's RopeError when the
    compiled graph runs, before anything is written: the caller returns them (copied into its
    destinations in place) instead of computing. A compiled call refuses as an eager one does:
    with the RopeError itself, which a refusal at trace time could not be (TorchDynamo wraps any
    exception of tracing in its own). Outside a trace (or without the extension): :func:`check`,
    then ``None``."""
    if _C is None or not dynamo_tracing():
        check(op, *args)
        return None
    if torch_exporting():  # exported programs stay free of the probe (portable, no extra op per call)
        return None
    lists = _pack(op, args)
    if not _refused(op, *lists).shape[0]:  # decided on the fake tensors, while tracing
        return None
    return tuple(_refuse(op, *lists, list(like)))


_KINDS = {"layout": 1, "format": 1, "cache_layout": 1, "conjugate": 2, "eps": 3, "weight_offset": 3}  # else a tensor


def _pack(op: str, args: tuple):
    """The op's arguments (in schema order) as the refusal ops take them: tensors (and ``None``s),
    strings, bools, floats, each list in order."""
    lists = ([], [], [], [])
    for nm, a in zip(_DEFAULTS[op][0], args):
        lists[_KINDS.get(nm, 0)].append(a)
    return lists


def _unpack(op: str, tensors, strs, flags, numbers) -> tuple:
    its = tuple(iter(v) for v in (tensors, strs, flags, numbers))
    return tuple(next(its[_KINDS.get(nm, 0)]) for nm in _DEFAULTS[op][0])


def _refused_fake(op, tensors, strs, flags, numbers):
    """``ropekit::refused`` while tracing: ``[1]`` when the validator refuses the fake tensors."""
    from ._errors import RopeError

    try:
        _check(op, _unpack(op, tensors, strs, flags, numbers), {})
    except RopeError:
        return tensors[0].new_empty(1)
    return tensors[0].new_empty(0)


def _refuse_real(op, tensors, strs, flags, numbers, like):
    """``ropekit::refuse`` when a graph runs: raises the validator's RopeError."""
    _check(op, _unpack(op, tensors, strs, flags, numbers), {})
    raise _fail(f"inputs of ropekit::{op} like those the compiled graph was traced for (refused then)",
                "inputs the validator accepts (their memory overlap differs from the traced ones)",
                "run the call outside torch.compile")


def _refuse_fake(op, tensors, strs, flags, numbers, like):
    return [t.new_empty(t.shape) for t in like]


_refused = _refuse = None  # the ops, registered below (with the extension)


def rope_error(err: Exception):
    """The :class:`~ropekit.RopeError` of an operator's refusal (its message is already in the
    house format: ``"ropekit: expected ..., got .... Fix: ..."``)."""
    from ._errors import RopeError

    if isinstance(err, RopeError):
        return err
    msg = str(err).split("\nException raised from")[0].strip()
    return RopeError(msg[len("ropekit: "):] if msg.startswith("ropekit: ") else msg)


def _fail(expected, got, fix):
    from ._errors import fail

    return fail(expected, got, fix)


def _new_out(x):
    """The CPU kernel's output rule (``new_out`` in ``csrc/ops.cpp``)."""
    import torch

    keep = x.shape[-1] <= 1 or x.stride(-1) == 1
    return torch.empty_like(x, memory_format=torch.preserve_format if keep else torch.contiguous_format)


def _register_fakes() -> None:
    """Fake (Meta) kernels: the op's validator (:func:`check`, the same C++ rules as the CPU
    kernel), then empty outputs by the kernel's rule. In Python so that symbolic shapes
    (torch.compile with dynamic shapes, export) stay symbolic; they serve meta tensors too —
    and a call mixing a meta tensor with tensors of another device is refused by the
    validator's device check."""
    import torch

    def rotary(x, cos, sin, layout="half", conjugate=False):
        check("rotary", x, cos, sin, layout, conjugate)
        return _new_out(x)

    def rotary_(x, cos, sin, layout="half", conjugate=False):
        check("rotary_", x, cos, sin, layout, conjugate)

    def rotary_out(x, cos, sin, layout="half", conjugate=False, *, out):
        check("rotary_out", x, cos, sin, layout, conjugate, out)

    def rotary_qk(q, k, cos, sin, layout="half", conjugate=False):
        check("rotary_qk", q, k, cos, sin, layout, conjugate)
        return _new_out(q), _new_out(k)

    def rotary_qk_(q, k, cos, sin, layout="half", conjugate=False):
        check("rotary_qk_", q, k, cos, sin, layout, conjugate)

    def rotary_gather(q, k, cos_table, sin_table, positions, format="bshd", layout="half", conjugate=False):
        check("rotary_gather", q, k, cos_table, sin_table, positions, format, layout, conjugate)
        return _new_out(q), _new_out(k)

    def rotary_gather_(q, k, cos_table, sin_table, positions, format="bshd", layout="half", conjugate=False):
        check("rotary_gather_", q, k, cos_table, sin_table, positions, format, layout, conjugate)

    def _rstd(x):  # one inverse RMS per row, in the compute dtype
        return x.new_empty(x.shape[:-1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)

    def qk_norm_rotary(q, k, q_weight, k_weight, cos, sin, eps=1e-6, weight_offset=0.0, layout="half"):
        check("qk_norm_rotary", q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout)
        return _new_out(q), _new_out(k)

    def qk_norm_rotary_(q, k, q_weight, k_weight, cos, sin, eps=1e-6, weight_offset=0.0, layout="half"):
        check("qk_norm_rotary_", q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout)

    def qk_norm_rotary_fwd(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout):
        check("qk_norm_rotary_fwd", q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout)
        return _new_out(q), _new_out(k), _rstd(q), _rstd(k)

    def qk_norm_rotary_fwd_(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout):
        check("qk_norm_rotary_fwd_", q, k, q_weight, k_weight, cos, sin, eps, weight_offset, layout)
        return _rstd(q), _rstd(k)

    def qk_norm_rotary_bwd(grad_q, grad_k, q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin, weight_offset, layout):
        check("qk_norm_rotary_bwd", grad_q, grad_k, q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin, weight_offset,
              layout)
        return _new_out(grad_q), _new_out(grad_k), q_weight.new_empty(q_weight.shape), k_weight.new_empty(k_weight.shape)

    def rotary_cache_(q, k, cos_table, sin_table, positions, k_cache, slots, v=None, v_cache=None, k_out=None,
                      cache_layout="nhd", layout="half"):
        check("rotary_cache_", q, k, cos_table, sin_table, positions, k_cache, slots, v, v_cache, k_out, cache_layout,
              layout)

    def cos_sin(angles):
        check("cos_sin", angles)
        return angles.new_empty(angles.shape), angles.new_empty(angles.shape)

    for fn in (rotary, rotary_, rotary_out, rotary_qk, rotary_qk_, rotary_gather, rotary_gather_, qk_norm_rotary,
               qk_norm_rotary_, qk_norm_rotary_fwd, qk_norm_rotary_fwd_, qk_norm_rotary_bwd, rotary_cache_, cos_sin):
        torch.library.register_fake(f"ropekit::{fn.__name__}", fn)


def _register_refusal_ops() -> None:
    """``ropekit::refused`` and ``ropekit::refuse`` (see :func:`refusal`)."""
    global _refused, _refuse
    import torch

    args = "str op, Tensor?[] tensors, str[] strs, bool[] flags, float[] numbers"
    # refused: defined in C++ (an empty kernel: a graph that keeps the probe of an accepted call
    # pays a C++ dispatch, not a Python one); its fake kernel is the trace-time validator
    torch.library.register_fake("ropekit::refused", _refused_fake)
    _refused = torch.ops.ropekit.refused.default
    _refuse = torch.library.custom_op("ropekit::refuse", _refuse_real, mutates_args=(),
                                      schema=f"({args}, Tensor[] like) -> Tensor[]")
    _refuse.register_fake(_refuse_fake)


if LOADED:
    _register_fakes()
    _register_refusal_ops()


# The instruction-set levels the kernel is compiled for on x86-64, lowest first (AArch64 and
# other architectures build "default" only). ROPEKIT_CPU_CAPABILITY names one of them.
LEVELS = ("default", "avx2", "avx512", "avx512bf16")


def capability() -> Optional[str]:
    """The instruction-set level the CPU kernel runs at (``None`` without the extension)."""
    if not LOADED:
        return None
    import torch

    return torch.ops.ropekit.cpu_capability()


def levels() -> list:
    """The levels this CPU can run, lowest first, up to :func:`capability` (each can be forced
    with ``ROPEKIT_CPU_CAPABILITY=<level>`` in a fresh process); ``[]`` without the extension."""
    best = capability()
    if best is None:
        return []
    return list(LEVELS[: LEVELS.index(best) + 1]) if best in LEVELS else [best]
