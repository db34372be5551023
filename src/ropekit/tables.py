"""cos/sin tables: angles in float64 from exact integer positions, rounded once.

Tables are *half width*: one value per frequency, ``[..., r/2]``, the same for both
layouts. :func:`to_full_width` / :func:`from_full_width` convert to and from the
``[..., r]`` form transformers uses.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Dict, Hashable, Optional, Tuple, Union

import torch

from ._checks import describe, flag, integer
from ._checks import device as check_device
from ._errors import fail
from ._tensor_checks import dual, host_readable
from .scaling import NTK, DynamicNTK, Linear, Llama3, LongRoPE, Proportional, YaRN
from .config import CPU, MAX_EXACT_POSITION, RopeConfig, check_layout, check_seq_len

__all__ = ["cos_sin", "angles", "to_full_width", "from_full_width", "check_positions", "TableCache", "build_table"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_positions(positions: torch.Tensor, name: str = "positions", *, check_values: bool = True) -> torch.Tensor:
    """Validate an integer position tensor; return it unchanged.

    Raises RopeError for non-tensors, floating/complex/bool dtypes and (when
    ``check_values``, which syncs with the device) negative values. Values are not
    checked on ``meta`` tensors (they have none), while torch.compile/export traces
    (a check would be a host sync) or inside ``torch.func`` transforms (``vmap``: a value
    check would read a batched tensor's value).
    """
    if not isinstance(positions, torch.Tensor):
        raise fail(f"{name} an integer torch.Tensor", type(positions).__name__, f"pass torch.as_tensor({name})")
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        raise fail(
            f"{name} with an integer dtype (positions are exact integers)",
            f"dtype {positions.dtype}",
            f"convert with {name}.long(); bf16/fp16 cannot even represent integers above 256/2048 exactly",
        )
    readable = positions.numel() and host_readable(positions)  # not traced, vmapped or a make_fx proxy
    if positions.dtype == torch.uint64 and readable and bool((positions.view(torch.int64) < 0).any()):
        # checked even without check_values: converted to int64 (as every caller does), these wrap to negative
        raise fail(f"{name} <= 2**53 (exact in the float64 angle m·θ)", "a uint64 value of 2**63 or more",
                   "positions are token indices; check how they were computed")
    if check_values and readable:
        p = positions  # (torch has no aminmax for uint16/32/64: read them as int64, exactly)
        if positions.dtype == torch.uint64:
            p = positions.view(torch.int64)
        elif positions.dtype in (torch.uint16, torch.uint32):
            p = positions.to(torch.int64)
        lo, hi = (int(v) for v in torch.aminmax(p))  # one pass, one sync
        if lo < 0:
            raise fail(
                f"{name} >= 0",
                f"a minimum of {lo}",
                "positions count from 0; for left padding clamp padded positions to 0 (they are masked anyway)",
            )
        if hi > MAX_EXACT_POSITION:
            raise fail(
                f"{name} <= 2**53 (exact in the float64 angle m·θ)",
                f"a maximum of {hi}",
                "positions are token indices; check how they were computed",
            )
    return positions


def cos_sin_f64(ang: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of float64 angles ``[...]``, the same bits on every call and in every process.

    On CPU it runs the compiled ``torch.ops.ropekit.cos_sin`` when the extension is loaded:
    a reduction by pi/2 and polynomials from IEEE double additions and multiplications only
    (within 1 ulp of float64; angles of 1.6e6 radians and more, or within 2^-30 of a multiple
    of pi/2, take the C library's ``cos``/``sin``), so the result depends neither on the
    thread split, the instruction-set level nor the process (nor, outside those angles, on the
    machine). ``torch.cos`` on float64 CPU tensors goes through a vector math library that has
    returned values accurate to ~28 bits on the first call in a fresh worker thread, so the
    same table could differ by an ulp between processes. Elsewhere (other devices, no
    extension, angles that need a gradient or are a ``torch.func`` transform's tensors) it is
    ``torch.cos`` / ``torch.sin``.

    Example:
        >>> a = torch.tensor([0.0, 1.0, 1e7], dtype=torch.float64)
        >>> c, s = cos_sin_f64(a)
        >>> c.shape, c.dtype
        (torch.Size([3]), torch.float64)
    """
    global _COS_SIN_OP
    functorch = torch._C._are_functorch_transforms_active()
    if functorch and not ang.requires_grad:
        ang = _constant_of_transforms(ang)
    if (ang.device.type == "cpu" and ang.dtype == torch.float64 and not ang.requires_grad
            # vmap/grad: the op has no batching rule; angles that are constants of the
            # transforms (a module's table built inside one) run it with the transforms set aside
            and not (functorch and torch._C._functorch.is_functorch_wrapped_tensor(ang))
            and not dual(ang)):  # forward AD: torch's
        op = _COS_SIN_OP
        if op is None:  # registered when ropekit.ops loads the extension (looked up until then)
            op = _COS_SIN_OP = getattr(getattr(torch.ops, "ropekit", None), "cos_sin", None)
        if op is not None:
            if functorch:
                with torch._C._DisableFuncTorch():
                    return op(ang)
            return op(ang)
    return torch.cos(ang), torch.sin(ang)


_COS_SIN_OP = None


def _constant_of_transforms(t: torch.Tensor) -> torch.Tensor:
    """``t`` without the ``torch.func.grad`` wrappers of a tensor no transform differentiates
    (created inside ``grad``, e.g. a table's positions); batched (``vmap``) or differentiated
    tensors stay as they are."""
    F = torch._C._functorch
    u = t
    while F.is_functorch_wrapped_tensor(u) and not F.is_batchedtensor(u) and not u.requires_grad:
        u = F.get_unwrapped(u)
    return t if F.is_functorch_wrapped_tensor(u) else u


def check_dtype(dtype) -> None:
    """RopeError unless ``dtype`` is a floating table dtype (f16, bf16, f32, f64)."""
    if dtype not in _FLOAT_DTYPES:
        raise fail(f"dtype one of {_FLOAT_DTYPES}", str(dtype), "tables are floating point; use torch.float32")


def check_cfg(cfg) -> None:
    """RopeError unless ``cfg`` is a :class:`~ropekit.RopeConfig`."""
    if not isinstance(cfg, RopeConfig):
        raise fail("cfg a ropekit.RopeConfig", type(cfg).__name__, "build one with RopeConfig(head_dim=...)")


def _as_positions(positions: Union[torch.Tensor, int, list, tuple, range]) -> torch.Tensor:
    """Tensor positions unchanged; an int/list/tuple/range as int64 positions on CPU.

    Python positions are always put on CPU, explicitly: never on the device of an active
    ``torch.device(...)`` context (e.g. ``meta``, where they would have no values).
    """
    if isinstance(positions, torch.Tensor):
        return positions
    if isinstance(positions, bool):
        raise fail("positions an integer tensor", "a bool", "pass e.g. torch.arange(seq_len)")
    if not isinstance(positions, (int, list, tuple, range)):
        raise fail("positions an integer tensor, int, list or range", type(positions).__name__, "pass torch.arange(seq_len)")
    try:
        if isinstance(positions, int):
            t = torch.tensor(positions, dtype=torch.int64, device=CPU)
        elif isinstance(positions, range):
            t = torch.arange(positions.start, positions.stop, positions.step, dtype=torch.int64, device=CPU)
        else:
            t = torch.as_tensor(list(positions), device=CPU)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise fail(
            "positions an int, range or (nested) list of ints in [0, 2**53]",
            f"{describe(positions)} ({e})",
            "pass torch.arange(seq_len) or a list of token indices",
        ) from None
    return t.long() if t.numel() == 0 else t  # [] would be float32


def angles(cfg: RopeConfig, positions: torch.Tensor, *, seq_len: Optional[int] = None) -> torch.Tensor:
    """Exact angles ``m·θ_i`` in float64, ``[*positions.shape, r/2]``, on ``positions.device``.

    Positions up to 2^53 are exact in float64; each angle is one correctly rounded
    float64 product, so its absolute error is below ``|m·θ| · 2^-53``.
    """
    check_cfg(cfg)
    positions = check_positions(_as_positions(positions))
    inv = cfg.inv_freq(seq_len).to(positions.device)  # [r/2] float64
    return positions.to(torch.float64).unsqueeze(-1) * inv  # [..., r/2]


_exact_angles = angles  # cos_sin's keyword `angles` shadows the function inside it


def _default_seq_len(cfg: RopeConfig, positions: torch.Tensor) -> Optional[int]:
    if cfg.scaling is None or not cfg.scaling.length_dependent:
        return None  # frequencies do not depend on the length: skip the device sync
    if positions.device.type == "meta" or torch.compiler.is_compiling():
        raise fail(
            f"seq_len= for length-dependent scaling ({type(cfg.scaling).__name__}) on meta tensors or under torch.compile",
            "seq_len=None (its default, max(positions) + 1, would need the position values)",
            "pass seq_len= explicitly",
        )
    return int(positions.max()) + 1 if positions.numel() else 0


def cos_sin(
    cfg: RopeConfig,
    positions: Union[torch.Tensor, int, list, range],
    *,
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
    seq_len: Optional[int] = None,
    attention_scaling: bool = True,
    angles: str = "exact",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Half-width cos/sin tables for integer positions.

    Args:
        cfg: the rotary configuration.
        positions: integer tensor of any shape ``[...]`` (e.g. ``[s]``, ``[b, s]``, ``[t]``),
            or an int/list/range. Values must be ``>= 0``.
        dtype: dtype of the returned tables (float32 default). Angles are computed in
            float64 regardless and rounded once to ``dtype``.
        device: where the tables go (default: ``positions.device``).
        seq_len: total sequence length for length-dependent schemes (dynamic NTK,
            LongRoPE). Default: ``max(positions) + 1``. Pass the *final* length of a
            generation to keep LongRoPE's factor choice fixed for the whole sequence.
        attention_scaling: multiply by ``cfg.attention_factor`` (YaRN/LongRoPE's
            ``mscale``), as transformers does. ``False`` returns plain cos/sin, e.g. to
            apply the factor to the attention softmax temperature yourself.
        angles: ``"exact"`` (default): float64 angles from exact integer positions.
            ``"transformers"``: reproduce transformers' float32 angles bit for bit (see
            :func:`ropekit.hf.transformers_cos_sin`), for outputs identical to an HF model;
            its error grows with position (``docs/numerics.md``).

    Returns:
        ``(cos, sin)``, each ``[*positions.shape, r/2]`` of ``dtype``.

    Precision: each value is within 0.5 ulp of ``dtype`` of the exact cos/sin of the
    float64 angle (plus float64 error of ~1e-16 relative to the angle).

    Example:
        >>> cfg = RopeConfig(head_dim=8)
        >>> cos, sin = cos_sin(cfg, torch.arange(5))
        >>> cos.shape
        torch.Size([5, 4])
    """
    return _cos_sin(cfg, positions, dtype=dtype, device=device, seq_len=seq_len,
                    attention_scaling=attention_scaling, angles=angles, default_seq_len=True)


def _cos_sin(cfg, positions, *, dtype, device, seq_len, attention_scaling, angles, default_seq_len):
    """:func:`cos_sin`; with ``default_seq_len=False`` a ``seq_len`` of ``None`` keeps its
    meaning for the frequencies ("within the original context": ``cfg.inv_freq(None)``,
    the frequencies of ``cfg.table_key(None)``) instead of defaulting to ``max(positions) + 1``
    (what :func:`build_table` needs: a table's frequencies are those of its key)."""
    check_cfg(cfg)
    check_dtype(dtype)
    seq_len = check_seq_len(seq_len)
    device = check_device("device", device)
    attention_scaling = flag("attention_scaling", attention_scaling)
    if angles != "exact":
        if angles != "transformers":
            raise fail('angles "exact" or "transformers"', repr(angles), 'use "exact" unless you need bit parity with transformers')

        return _transformers_cos_sin(
            cfg, positions, seq_len=seq_len, dtype=dtype, device=device, attention_scaling=attention_scaling,
            default_seq_len=default_seq_len,
        )
    positions = check_positions(_as_positions(positions))
    if seq_len is None and default_seq_len:
        seq_len = _default_seq_len(cfg, positions)
    if device is not None:
        positions = positions.to(device)
    ang = _exact_angles(cfg, positions, seq_len=seq_len)  # float64 [..., r/2]
    cos, sin = cos_sin_f64(ang)
    if attention_scaling:
        f = cfg.attention_factor
        if f != 1.0:
            cos, sin = cos * f, sin * f
    return cos.to(dtype), sin.to(dtype)


def check_table(t) -> None:
    """RopeError unless ``t`` is a floating tensor with at least one dim (a cos/sin table)."""
    if not isinstance(t, torch.Tensor) or t.dim() < 1 or not t.dtype.is_floating_point:
        got = f"shape {tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise fail("a floating cos/sin table tensor [..., width]", got, "pass cos or sin from ropekit.cos_sin")


def to_full_width(t: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """Half-width ``[..., r/2]`` -> full-width ``[..., r]`` (transformers' form).

    ``"half"``: ``cat(t, t)``; ``"interleaved"``: each value repeated twice in place.
    """
    check_layout(layout)
    check_table(t)
    if layout == "half":
        return torch.cat((t, t), dim=-1)
    return torch.repeat_interleave(t, 2, dim=-1)


def _equal_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal`` where NaN equals NaN (tables can hold NaN, e.g. from a NaN factor)."""
    if torch.equal(a, b):
        return True
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def from_full_width(t: torch.Tensor, layout: str = "half", *, check: bool = True) -> torch.Tensor:
    """Full-width ``[..., r]`` -> half-width ``[..., r/2]``; inverse of :func:`to_full_width`.

    With ``check`` (default) a RopeError is raised if the two copies differ, which means
    the table was built for the other layout. NaN equals NaN in that comparison (so
    ``from_full_width(to_full_width(t))`` returns ``t`` for every table ``t``); ``meta``
    tensors have no values to compare and are not checked.
    """
    check_layout(layout)
    check_table(t)
    check = flag("check", check)
    r = t.shape[-1]
    if r % 2:
        raise fail("a full-width table with an even last dim", f"shape {tuple(t.shape)}", "pass cos/sin of width r")
    if layout == "half":
        a, b = t[..., : r // 2], t[..., r // 2 :]
    else:
        a, b = t[..., 0::2], t[..., 1::2]
    if check and t.device.type != "meta" and not _equal_nan(a, b):
        other = "interleaved" if layout == "half" else "half"
        raise fail(
            f'a full-width table in the "{layout}" layout (two equal copies)',
            "copies that differ",
            f'check the layout (is it "{other}"?) or that this is a cos/sin table at all',
        )
    return a


def build_table(
    cfg: RopeConfig,
    n: int,
    *,
    dtype: torch.dtype,
    device: Union[str, torch.device],
    seq_len: Optional[int] = None,
    attention_scaling: bool = True,
    what: str = "a cos/sin table",
    angles: str = "exact",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``cos_sin(cfg, arange(n), seq_len=seq_len)`` for a table of ``n`` rows, or a RopeError
    when it cannot exist.

    The frequencies are those of ``cfg.inv_freq(seq_len)``, the table of key
    ``cfg.table_key(seq_len)``: ``seq_len=None`` means "within the original context"
    (dynamic NTK unscaled, LongRoPE's short factors) for every ``n``, not :func:`cos_sin`'s
    default ``max(position) + 1 = n`` (a table longer than the original context would
    otherwise hold scaled frequencies under the key of the unscaled ones).

    A table of ``n`` rows holds ``2 · n · r/2`` values of ``dtype`` (and its float64 angles
    while it is built). Refused with a RopeError: ``n`` not an int in ``[0, 2**53 + 1]``; a
    table over :data:`MAX_TABLE_BYTES`; and an allocation the device refuses (reported
    with the table's size instead of the allocator's own error).
    """
    check_cfg(cfg)
    check_dtype(dtype)
    device = check_device("device", device)
    n = integer("table length", n, minimum=0, maximum=MAX_EXACT_POSITION + 1, fix="ask for at most 2**53 + 1 positions")
    nbytes = 2 * n * cfg.n_pairs * torch.empty((), dtype=dtype, device=CPU).element_size()
    got = f"{n} rows x {cfg.n_pairs} pairs x 2 tables of {dtype} = {nbytes / 2**30:.3g} GiB"
    fix = (
        "pass a smaller max_position / length (tables grow on demand), or give the positions "
        "themselves to ropekit.cos_sin, which computes only the rows asked for"
    )
    if nbytes > MAX_TABLE_BYTES:
        raise fail(f"{what} of at most {MAX_TABLE_BYTES >> 30} GiB", got, fix)
    try:
        pos = torch.arange(n, dtype=torch.int64, device=device)
        if seq_len is None and cfg.scaling is not None and cfg.scaling.length_dependent:
            # None builds the frequencies of table_key(None) (within the original context), not
            # those of cos_sin's default max(position) + 1 = n (a long table would otherwise hold
            # scaled frequencies under the key of the unscaled ones): a length of that key, passed
            # explicitly (0 for the built-in schemes; a key holds one set of frequencies)
            if cfg.table_key(0) != cfg.table_key(None):
                return _cos_sin(cfg, pos, dtype=dtype, device=None, seq_len=None,
                                attention_scaling=attention_scaling, angles=angles, default_seq_len=False)
            seq_len = 0
        return cos_sin(cfg, pos, dtype=dtype, seq_len=seq_len, attention_scaling=attention_scaling, angles=angles)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if isinstance(e, torch.OutOfMemoryError) or "alloc" in str(e).lower():
            raise fail(f"{what} that fits in {device} memory", f"{got} (the allocator refused it)", fix) from None
        raise


#: Largest cos/sin table (both halves) ropekit will try to build: 1 TiB. Anything larger is
#: a wrong ``max_position`` or position, not a model (10M positions x 64 pairs is 5 GiB).
MAX_TABLE_BYTES = 1 << 40


class TableCache:
    """Lazily grown cos/sin tables for positions ``0 .. n-1``, keyed by device, dtype and
    (for length-dependent scaling) ``cfg.table_key(seq_len)``.

    Growth doubles the length (rounded to a power of two) so a generation loop rebuilds
    the table O(log n) times. Safe to use from several threads: a lookup either sees an
    old complete table or a new complete one.
    """

    def __init__(self, cfg: RopeConfig, *, attention_scaling: bool = True, min_len: int = 0) -> None:
        check_cfg(cfg)
        self.cfg = cfg
        self.attention_scaling = flag("attention_scaling", attention_scaling)
        self.min_len = integer("min_len", min_len, minimum=0, maximum=MAX_EXACT_POSITION + 1, fix="pass the longest sequence you expect, or 0")
        self._tables: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._tables = {}

    def get(
        self, n: int, *, device: torch.device, dtype: torch.dtype = torch.float32, seq_len: Optional[int] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` each ``[n', r/2]`` with ``n' >= n``, covering positions ``0 .. n'-1``,
        with the frequencies of ``cfg.inv_freq(seq_len)`` (the key's: ``seq_len=None`` is
        "within the original context" for every ``n``)."""
        device = check_device("device", device)
        check_dtype(dtype)
        n = integer("n", n, minimum=0, maximum=MAX_EXACT_POSITION + 1, fix="ask for the rows of positions 0 .. n-1, n <= 2**53 + 1")
        key: Hashable = (str(device), dtype, self.cfg.table_key(seq_len))
        hit = self._tables.get(key)
        if hit is not None and hit[0].shape[0] >= n:
            return hit
        with self._lock:
            hit = self._tables.get(key)
            if hit is not None and hit[0].shape[0] >= n:
                return hit
            size = max(n, self.min_len, 1)
            size = 1 << (size - 1).bit_length()
            table = build_table(
                self.cfg, size, dtype=dtype, device=device, seq_len=seq_len, attention_scaling=self.attention_scaling
            )
            new = dict(self._tables)
            new[key] = table
            self._tables = new  # one atomic swap: readers never see a half-built dict
            return table


# ---------------------------------------------------------------------------------------
# transformers-compatible float32 tables
# ---------------------------------------------------------------------------------------


def _f32_default(base: Any, dim: int) -> torch.Tensor:
    # transformers: 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)),
    # every step in float32 (``base`` may be a Python float or a float32 0-d tensor).
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=CPU).to(dtype=torch.float) / dim))


def transformers_inv_freq(cfg: RopeConfig, seq_len: Optional[int] = None) -> torch.Tensor:
    """Frequencies exactly as transformers computes them: float32 ``[r/2]``, same op order.

    Mirrors ``transformers.modeling_rope_utils`` (the model classes' default init for
    unscaled RoPE, ``_compute_*_parameters`` for the rest) so the float32 roundings are the
    same. For ``DynamicNTK`` above ``max_position`` it mirrors the module's update path,
    where the sequence length is an int64 tensor and the new base is a float32 scalar.
    ``DynamicNTK(static=True)`` and ``NTK`` (HunYuan ``ntk_alpha``) use the same float32 style.
    Use :meth:`RopeConfig.inv_freq` for the exact float64 values.
    """
    s = cfg.scaling
    dim = cfg.rotary_dim
    base = cfg.base
    if s is None:
        return _f32_default(base, dim)
    if isinstance(s, Linear):
        inv = _f32_default(base, dim)
        inv /= s.factor
        return inv
    if isinstance(s, NTK):
        return _f32_default(base * s.factor ** (dim / (dim - 2)), dim)
    if isinstance(s, DynamicNTK):
        mp, f = s.max_position, s.factor
        if s.static:
            length: Any = f * mp
        elif seq_len is None or seq_len <= mp:
            length = mp  # the module's init path: Python numbers
        else:
            # the module's update path: seq_len = max(position_ids) + 1 is an int64 tensor
            length = torch.maximum(torch.tensor(int(seq_len), device=CPU), torch.tensor(mp, dtype=torch.int64, device=CPU))
        new_base = base * ((f * length / mp) - (f - 1)) ** (dim / (dim - 2))
        return _f32_default(new_base, dim)
    if isinstance(s, YaRN):
        pos_freqs = base ** (torch.arange(0, dim, 2, device=CPU).to(dtype=torch.float) / dim)
        extrapolation = 1.0 / pos_freqs
        interpolation = 1.0 / (s.factor * pos_freqs)
        low, high = s.correction_range(cfg)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=CPU) - low) / (high - low), 0, 1)
        extra_w = 1 - ramp
        return interpolation * (1 - extra_w) + extrapolation * extra_w
    if isinstance(s, LongRoPE):
        ext = torch.tensor(s.long_factor if s.is_long(seq_len) else s.short_factor, dtype=torch.float32, device=CPU)
        shape = torch.arange(0, dim, 2, dtype=torch.int64, device=CPU).float() / dim
        return 1.0 / (ext * base**shape)
    if isinstance(s, Llama3):
        inv = _f32_default(base, dim)
        old = s.original_max_position
        low_wl, high_wl = old / s.low_freq_factor, old / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > low_wl, inv / s.factor, inv)
        span = s.high_freq_factor - s.low_freq_factor
        smooth = (old / wavelen - s.low_freq_factor) / span if span else torch.full_like(inv, float("nan"))
        smoothed = (1 - smooth) * out / s.factor + smooth * out
        medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
        return torch.where(medium, smoothed, out)
    if isinstance(s, Proportional):
        d = cfg.head_dim
        k = s.n_rotating(cfg)
        rot = 1.0 / (base ** (torch.arange(0, 2 * k, 2, dtype=torch.int64, device=CPU).to(dtype=torch.float) / d))
        inv = torch.cat((rot, torch.zeros(d // 2 - k, dtype=torch.float32, device=CPU))) if d // 2 > k else rot
        inv /= s.factor
        return inv
    raise fail(
        "a scheme from ropekit.scaling with a transformers counterpart",
        type(s).__name__,
        "use ropekit.cos_sin (exact float64 angles) for custom schemes",
    )


def transformers_cos_sin(
    cfg: RopeConfig,
    positions: Union[torch.Tensor, int, list, range],
    *,
    seq_len: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
    attention_scaling: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Half-width cos/sin computed the way transformers' rotary modules do, bit for bit.

    transformers computes ``freqs = position_ids.float() * inv_freq`` in float32 (positions
    rounded to float32, one float32 product), then ``cos(freqs) * attention_scaling`` in
    float32, then casts to the activation dtype. This function does the same with
    :func:`transformers_inv_freq`, so ``to_full_width(cos)`` equals the module's output
    exactly (tested against transformers' Llama, Qwen2, Phi-3, GPT-NeoX, DeepSeek-V3 and
    Gemma 3 modules). Use it when outputs must match an HF model exactly.

    Precision: the float32 angle carries an absolute error up to about ``|m·θ|·2^-23``
    (growing with position ``m``; ~0.1 rad at ``m = 2^20`` for ``θ = 1``), unlike
    :func:`ropekit.cos_sin`, whose error stays at float32 rounding of cos/sin (see
    ``docs/numerics.md``).

    Args:
        cfg: the rotary configuration.
        positions: integer positions ``[...]`` (e.g. ``[b, s]``).
        seq_len: total length for length-dependent schemes; default ``max(positions) + 1``
            (what transformers uses).
        dtype: output dtype (transformers casts to the activation dtype ``x.dtype``).
        device: where to compute (default ``positions.device``).
        attention_scaling: multiply by the attention factor, as transformers does.

    Returns:
        ``(cos, sin)``, each ``[*positions.shape, r/2]`` of ``dtype``.

    Example:
        >>> cfg = RopeConfig(head_dim=8)
        >>> cos, sin = transformers_cos_sin(cfg, torch.arange(3)[None])
        >>> cos.shape, cos.dtype
        (torch.Size([1, 3, 4]), torch.float32)
    """
    return _transformers_cos_sin(cfg, positions, seq_len=seq_len, dtype=dtype, device=device,
                                 attention_scaling=attention_scaling, default_seq_len=True)


def _transformers_cos_sin(cfg, positions, *, seq_len, dtype, device, attention_scaling, default_seq_len):
    """:func:`transformers_cos_sin`; ``default_seq_len=False``: ``seq_len=None`` means
    ``transformers_inv_freq(cfg, None)`` (see :func:`_cos_sin`)."""
    positions = check_positions(_as_positions(positions))
    if device is not None:
        positions = positions.to(device)
    if (seq_len is None and default_seq_len and cfg.scaling is not None and cfg.scaling.length_dependent
            and positions.numel()):
        seq_len = int(positions.max()) + 1
    inv = transformers_inv_freq(cfg, seq_len).to(positions.device)  # float32 [r/2]
    freqs = positions[..., None].float() * inv  # float32 [..., r/2]
    cos, sin = freqs.cos(), freqs.sin()
    if attention_scaling:
        f = cfg.attention_factor
        cos, sin = cos * f, sin * f
    return cos.to(dtype), sin.to(dtype)
