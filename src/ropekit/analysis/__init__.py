"""Analysis of a rotary configuration: wavelengths, scaling bands, the long-range decay
bound, the relative-position property and attention score vs distance. Pure torch, all
in float64 (plots live in :mod:`ropekit.analysis.plots`, which imports matplotlib lazily).

Vocabulary: pair ``i = 0 .. r/2-1`` rotates with frequency ``θ_i`` (radians per token);
its *wavelength* ``λ_i = 2π/θ_i`` is the number of tokens of one full turn. "before"
means the unscaled frequencies ``cfg.base_inv_freq()``, "after" the scaled ones
``cfg.inv_freq(seq_len)``.

Example:
    >>> from ropekit import RopeConfig
    >>> from ropekit.analysis import decay_bound, wavelengths
    >>> cfg = RopeConfig(head_dim=128, base=10000.0)
    >>> float(decay_bound(cfg, [0])[0])     # (1/64) * (1 + 2 + ... + 64)
    32.5
    >>> before, after = wavelengths(cfg)
    >>> round(float(before[0]), 4), bool((before == after).all())
    (6.2832, True)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .._checks import describe, flag, integer, real
from .._errors import fail
from ..config import RopeConfig

__all__ = [
    "Model",
    "PAIR_CLASSES",
    "wavelengths",
    "classify_pairs",
    "bands",
    "pair_table",
    "band_runs",
    "context_coverage",
    "decay_bound",
    "decay_distances",
    "relative_position_error",
    "attention_scores",
    "summary",
]

_F64 = torch.float64
_MAX_POS = 1 << 53  # the largest position whose float64 angle m·θ is exact (tables refuse more)

#: Classes of a rotary pair under scaling: frequency kept, divided by the full factor,
#: anything else (the YaRN ramp / Llama-3 smooth band, NTK's changed base, LongRoPE's
#: per-pair factors), or set to zero (Gemma-4 "proportional" pairs that do not rotate).
PAIR_CLASSES = ("unchanged", "interpolated", "in between", "not rotating")


@dataclasses.dataclass(frozen=True)
class Model:
    """A config with a name and the context lengths it is meant for (plain data).

    Args:
        label: name shown in tables and legends.
        config: the :class:`~ropekit.RopeConfig`.
        context: the (extended) maximum number of positions, e.g. HF
            ``max_position_embeddings``; ``None`` if unknown.
        source: where the config comes from (a model id or a file path).
    """

    label: str
    config: RopeConfig
    context: Optional[int] = None
    source: Optional[str] = None

    @property
    def original_context(self) -> Optional[int]:
        """The pre-training context: the scheme's ``original_max_position_embeddings``
        when it has one, else :attr:`context`."""
        orig = _original_context(self.config)
        return orig if orig else self.context


def _param(cfg: RopeConfig, name: str, default: Any = None) -> Any:
    return getattr(cfg.scaling, name, default) if cfg.scaling is not None else default


def _original_context(cfg: RopeConfig) -> Optional[int]:
    """The scheme's pre-training length (YaRN/Llama3/LongRoPE ``original_max_position``,
    dynamic NTK ``max_position``), or None."""
    for name in ("original_max_position", "original_max_position_embeddings", "max_position"):
        v = _param(cfg, name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return int(v)
    return None


def _check_cfg(cfg: Any) -> RopeConfig:
    if not isinstance(cfg, RopeConfig):
        raise fail("a ropekit.RopeConfig", type(cfg).__name__, "build one with RopeConfig(...) or RopeConfig.from_hf(...)")
    return cfg


# --------------------------------------------------------------------------- wavelengths
def wavelengths(cfg: RopeConfig, *, seq_len: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Wavelength ``2π/θ_i`` in tokens of every rotary pair, before and after scaling.

    Args:
        cfg: the rotary config.
        seq_len: total length for length-dependent schemes (dynamic NTK, LongRoPE).

    Returns:
        ``(before, after)``, float64 ``[r/2]`` each.
    """
    _check_cfg(cfg)
    two_pi = 2.0 * math.pi
    return two_pi / cfg.base_inv_freq(), two_pi / cfg.inv_freq(seq_len)


def classify_pairs(cfg: RopeConfig, *, seq_len: Optional[int] = None, rtol: float = 1e-9) -> List[str]:
    """Class of each pair from the measured frequency ratio ``ρ_i = θ_before / θ_after``.

    ``"unchanged"`` when ``ρ_i = 1``, ``"interpolated"`` when ``ρ_i`` equals the scheme's
    ``factor`` (all of ``Linear``; the low-frequency band of YaRN and Llama 3), else
    ``"in between"`` (both within relative tolerance ``rtol``); ``"not rotating"`` when
    ``θ_after = 0``. Schemes without a scalar
    ``factor`` (e.g. NTK by base, LongRoPE) have only unchanged / in between pairs.
    :func:`bands` predicts the same classes from the scheme's parameters.

    Returns:
        a list of ``r/2`` strings from :data:`PAIR_CLASSES`.

    Example:
        >>> from ropekit.scaling import Linear
        >>> set(classify_pairs(RopeConfig(64, scaling=Linear(factor=4.0))))
        {'interpolated'}
    """
    _check_cfg(cfg)
    rtol = real("rtol", rtol, minimum=0, fix="pass a relative tolerance, e.g. 1e-9")
    after = cfg.inv_freq(seq_len)
    ratio = cfg.base_inv_freq() / after  # [r/2]; inf where a pair stops rotating
    factor = _param(cfg, "factor")
    out = []
    for rho, a in zip(ratio.tolist(), after.tolist()):
        if a == 0.0:
            out.append("not rotating")
        elif abs(rho - 1.0) <= rtol:
            out.append("unchanged")
        elif isinstance(factor, (int, float)) and factor > 1 and abs(rho - factor) <= rtol * factor:
            out.append("interpolated")
        else:
            out.append("in between")
    return out


def bands(cfg: RopeConfig) -> Optional[Dict[str, Any]]:
    """The frequency bands a scheme defines, from its parameters; ``None`` for schemes
    without bands (plain, linear, NTK, LongRoPE...).

    - Llama 3 (``rope_type == "llama3"``): pairs with ``λ < L/high_freq_factor`` are
      unchanged, ``λ > L/low_freq_factor`` interpolated, smooth in between
      (``L = original_max_position``).
    - YaRN: pair ``i`` is unchanged where the ramp ``clamp((i - low)/(high - low), 0, 1)``
      is 0 (``i <= low``), interpolated where it is 1 (``i >= high``; every pair when
      ``low > high``, which a long ``L`` for a small base gives), where ``low``/``high``
      are the pair indices that turn ``beta_fast``/``beta_slow`` times within ``L``
      (rounded outwards unless ``truncate`` is False), as in YaRN (arXiv 2309.00071,
      eq. 17-18) and transformers.

    Returns:
        dict with ``"kind"`` and ``"classes"`` (predicted class per pair, a list of
        ``r/2`` strings), plus the band edges (``"unchanged_below"`` /
        ``"interpolated_above"`` in tokens of wavelength, or ``"low"``/``"high"`` pair
        indices for YaRN).
    """
    _check_cfg(cfg)
    kind = getattr(cfg.scaling, "rope_type", None)
    orig = _original_context(cfg)
    before, _ = wavelengths(cfg)
    if kind == "llama3" and orig:
        hi = float(orig) / float(_param(cfg, "high_freq_factor"))
        lo = float(orig) / float(_param(cfg, "low_freq_factor"))
        classes = [
            "unchanged" if lam < hi else "interpolated" if lam > lo else "in between" for lam in before.tolist()
        ]
        return {"kind": "llama3", "unchanged_below": hi, "interpolated_above": lo, "classes": classes}
    if kind == "yarn" and orig:
        r = cfg.rotary_dim
        beta_fast = float(_param(cfg, "beta_fast", 32.0) or 32.0)
        beta_slow = float(_param(cfg, "beta_slow", 1.0) or 1.0)

        def pair_of(turns: float) -> float:
            # pair index whose wavelength fits `turns` times into `orig`: λ_i = orig/turns
            return r * math.log(float(orig) / (turns * 2.0 * math.pi)) / (2.0 * math.log(cfg.base))

        low, high = pair_of(beta_fast), pair_of(beta_slow)
        if _param(cfg, "truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, r - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        # the ramp itself, clamp((i - low)/(high - low), 0, 1): 0 keeps θ_i, 1 divides it by the
        # factor. Not "i <= low": when L is long for the base, low (clamped at 0 only) can exceed
        # high (clamped at r - 1), and then every pair is interpolated, as in the scheme.
        ramps = [min(max((i - low) / (high - low), 0.0), 1.0) for i in range(r // 2)]
        classes = ["unchanged" if v == 0.0 else "interpolated" if v == 1.0 else "in between" for v in ramps]
        return {
            "kind": "yarn",
            "low": low,
            "high": high,
            "unchanged_below": float(orig) / beta_fast,
            "interpolated_above": float(orig) / beta_slow,
            "classes": classes,
        }
    return None


def pair_table(cfg: RopeConfig, *, seq_len: Optional[int] = None) -> List[Dict[str, Any]]:
    """One row per pair: ``pair``, ``theta_before``, ``theta_after``, ``wavelength_before``,
    ``wavelength_after``, ``ratio`` (``θ_before/θ_after``) and ``class``."""
    before, after = wavelengths(cfg, seq_len=seq_len)
    tb, ta = cfg.base_inv_freq(), cfg.inv_freq(seq_len)
    cls = classify_pairs(cfg, seq_len=seq_len)
    return [
        {
            "pair": i,
            "theta_before": float(tb[i]),
            "theta_after": float(ta[i]),
            "wavelength_before": float(before[i]),
            "wavelength_after": float(after[i]),
            "ratio": float(tb[i] / ta[i]),
            "class": cls[i],
        }
        for i in range(cfg.n_pairs)
    ]


def band_runs(cfg: RopeConfig, *, seq_len: Optional[int] = None) -> List[Dict[str, Any]]:
    """Contiguous runs of pairs of one class: ``class``, ``first``, ``last``, and the
    wavelength range before/after and ratio range of the run (pairs are ordered from the
    highest frequency, pair 0, to the lowest)."""
    rows = pair_table(cfg, seq_len=seq_len)
    runs: List[Dict[str, Any]] = []
    for row in rows:
        if runs and runs[-1]["class"] == row["class"]:
            run = runs[-1]
        else:
            run = {"class": row["class"], "first": row["pair"], "members": []}
            runs.append(run)
        run["last"] = row["pair"]
        run["members"].append(row)
    for run in runs:
        m = run.pop("members")
        run["wavelength_before"] = [m[0]["wavelength_before"], m[-1]["wavelength_before"]]
        run["wavelength_after"] = [m[0]["wavelength_after"], m[-1]["wavelength_after"]]
        run["ratio"] = [min(x["ratio"] for x in m), max(x["ratio"] for x in m)]
    return runs


def context_coverage(cfg: RopeConfig, context: Optional[int], original_context: Optional[int]) -> Dict[str, Any]:
    """How the pairs see positions up to ``context`` compared with training on
    ``original_context`` positions.

    A pair whose original wavelength is shorter than ``original_context`` turned fully
    during training, so every angle it can take was seen. Any other pair saw angles up to
    ``original_context · θ_before``; at the extended context it reaches
    ``context · θ_after``. The pair stays *in range* when the latter is not larger.

    Returns:
        dict with ``wrapped_in_training`` (count of pairs with ``λ_before <= original``),
        ``in_range`` (pairs in range at ``context``), ``out_of_range`` (list of pair
        indices) and ``max_angle_ratio`` (the largest ``context·θ_after /
        (original·θ_before)`` among the pairs that did not wrap; 0 if all wrapped).
        Empty dict when a context is unknown.
    """
    _check_cfg(cfg)
    if context is None or original_context is None:
        return {}
    context = integer("context", context, minimum=0, maximum=1 << 53, fix="pass the context length in tokens, or None")
    original_context = integer(
        "original_context", original_context, minimum=0, maximum=1 << 53, fix="pass the training context in tokens, or None"
    )
    if not context or not original_context:
        return {}
    before, _ = wavelengths(cfg)
    tb = cfg.base_inv_freq()
    ta = cfg.inv_freq(int(context))
    wrapped = before <= float(original_context)  # [r/2] bool
    ratio = (float(context) * ta) / (float(original_context) * tb)  # [r/2]
    out = [i for i in range(cfg.n_pairs) if not bool(wrapped[i]) and float(ratio[i]) > 1.0 + 1e-12]
    unwrapped = ratio[~wrapped]
    return {
        "wrapped_in_training": int(wrapped.sum()),
        "in_range": cfg.n_pairs - len(out),
        "out_of_range": out,
        "max_angle_ratio": float(unwrapped.max()) if unwrapped.numel() else 0.0,
    }


# --------------------------------------------------------------------------- decay bound
def _distances(distances: Union[torch.Tensor, Sequence[int], int], name: str = "distances") -> torch.Tensor:
    """``distances`` as a CPU ``[n]`` tensor of finite real values (its integer dtype kept,
    else float64), else a RopeError naming ``name``."""
    fix = "pass e.g. torch.arange(1024)"
    if isinstance(distances, (str, bytes)):
        raise fail(f"{name} a tensor, list or number", describe(distances), fix)
    try:
        d = distances if isinstance(distances, torch.Tensor) else torch.as_tensor(distances, device="cpu")
        if d.dtype.is_floating_point and not isinstance(distances, torch.Tensor):
            d = torch.as_tensor(distances, device="cpu", dtype=_F64)  # Python floats: float64, not the default float32
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise fail(f"{name} a tensor, list or number (each < 2**63)", describe(distances), fix) from None
    if d.dtype == torch.bool or d.dtype.is_complex:
        raise fail(f"{name} as numbers", f"dtype {d.dtype}", fix)
    if d.device.type == "meta":
        raise fail(f"{name} with values (a CPU or CUDA tensor, a list or a number)", "a meta tensor (shape only)",
                   f"pass the {name} themselves, e.g. torch.arange(1024)")
    d = d.detach().to("cpu").reshape(-1)
    if not d.dtype.is_floating_point:
        return d.to(torch.int64)
    d = d.to(_F64)
    if d.numel() and not bool(torch.isfinite(d).all()):
        raise fail(f"finite {name}", "inf or nan", f"pass {name} in tokens, e.g. torch.arange(1024)")
    return d


def decay_bound(
    cfg: RopeConfig,
    distances: Union[torch.Tensor, Sequence[int], int],
    *,
    seq_len: Optional[int] = None,
    chunk: int = 4096,
) -> torch.Tensor:
    """RoFormer's long-range decay bound (Su et al. 2021, section 3.4.3) vs relative distance.

    ``B(Δ) = (1/(r/2)) Σ_{j=1}^{r/2} |S_j|`` with ``S_j = Σ_{k=0}^{j-1} e^{i·Δ·θ_k}``, where
    ``θ`` are the scaled frequencies ``cfg.inv_freq(seq_len)``. The attention score of a
    pair of vectors with bounded "Abel differences" is at most ``max|h_{j+1}-h_j| · B(Δ)``;
    ``B(0) = (r/2 + 1)/2`` and ``B`` decays (with oscillations) as ``Δ`` grows.

    Args:
        cfg: the rotary config.
        distances: relative distances ``Δ`` (``[n]``, any real numbers).
        seq_len: total length for length-dependent schemes.
        chunk: distances processed at once, an int ``>= 1`` (bounds memory to
            ``chunk · r/2`` complex128).

    Returns:
        float64 ``[n]``. Angles ``Δ·θ_k`` are float64 products, so at distance ``Δ`` each
        term is exact to about ``Δ·θ_0·2^-53``.

    Example:
        >>> cfg = RopeConfig(head_dim=128)
        >>> b = decay_bound(cfg, torch.arange(0, 1001, 250))
        >>> b.dtype, b.shape, bool((b[1:] < b[0]).all())
        (torch.float64, torch.Size([5]), True)
    """
    _check_cfg(cfg)
    chunk = integer("chunk", chunk, minimum=1, fix="pass a positive number of distances per step, e.g. 4096")
    d = _distances(distances).to(_F64)  # [n]
    theta = cfg.inv_freq(seq_len)  # [r/2] float64
    out = torch.empty(d.shape[0], dtype=_F64)
    for a in range(0, d.shape[0], chunk):
        ang = d[a : a + chunk, None] * theta  # [c, r/2] float64
        s = torch.cumsum(torch.polar(torch.ones_like(ang), ang), dim=-1)  # S_1 .. S_{r/2}, complex128
        out[a : a + chunk] = s.abs().mean(dim=-1)
    return out


def decay_distances(max_distance: int, *, dense: int = 1024, points: int = 1500) -> torch.Tensor:
    """Distances for plotting a decay curve: every integer up to ``dense``, then about
    ``points`` log-spaced integers up to ``max_distance``. int64 ``[n]``, sorted, unique.

    ``max_distance`` is an int in ``[1, 2**53]``, ``dense`` in ``[1, 2**24]`` (the log-spaced
    part starts at ``dense``, so it cannot be 0) and ``points`` in ``[1, 2**24]``."""
    max_distance = integer("max_distance", max_distance, maximum=1 << 53, fix="pass the context length")
    dense = integer("dense", dense, minimum=1, maximum=1 << 24,
                    fix="pass e.g. 1024 (the log-spaced distances start at dense, so it must be at least 1)")
    points = integer("points", points, maximum=1 << 24, fix="pass e.g. 1500")
    a = torch.arange(0, min(dense, max_distance) + 1, dtype=torch.int64)
    if max_distance <= dense:
        return a
    b = torch.logspace(math.log10(dense), math.log10(max_distance), points, dtype=_F64).round().to(torch.int64)
    return torch.unique(torch.cat([a, b, torch.tensor([max_distance])]))


# --------------------------------------------------------------------------- scores
def _seed(seed: Any) -> int:
    return integer("seed", seed, minimum=-(1 << 63), maximum=(1 << 64) - 1, fix="pass an int seed, e.g. seed=0")


def _vector_arg(name: str, t: Any, d: int) -> torch.Tensor:
    """``t`` as a float64 CPU ``[n, d]`` tensor (n >= 1) of finite real values, else a RopeError."""
    what = f"{name} of shape [{d}] or [n, {d}] (head_dim last, n >= 1)"
    fix = f"pass {name} as a real tensor with the head dim last"
    if isinstance(t, (str, bytes)):
        raise fail(what, describe(t), fix)
    try:
        x = t if isinstance(t, torch.Tensor) else torch.as_tensor(t, device="cpu")
        if x.dtype.is_floating_point and not isinstance(t, torch.Tensor):
            x = torch.as_tensor(t, device="cpu", dtype=_F64)  # Python floats: float64, not the default float32
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise fail(what, describe(t), fix) from None
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise fail(f"{name} of real numbers", f"dtype {x.dtype}", fix)
    if x.device.type == "meta":
        raise fail(f"{name} with values", "a meta tensor (shape only)", fix)
    if x.dim() not in (1, 2) or x.shape[-1] != d or x.numel() == 0:
        raise fail(what, f"shape {tuple(x.shape)}", fix)
    x = x.detach().to(device="cpu", dtype=_F64).reshape(-1, d)
    if not bool(torch.isfinite(x).all()):
        raise fail(f"{name} of finite values", "inf or nan", fix)
    return x


def _vectors(cfg: RopeConfig, q: Any, k: Any, seed: int, samples: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 ``[n_q, d]``, ``[n_k, d]`` with ``n_q == n_k`` or one of them 1 (``k = q`` if
    ``k`` is None; ``samples`` seeded normal rows if ``q`` is None)."""
    d = cfg.head_dim
    if q is None:
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(samples, d, generator=g, dtype=_F64)
    qq = _vector_arg("q", q, d)
    kk = qq if k is None else _vector_arg("k", k, d)
    nq, nk = qq.shape[0], kk.shape[0]
    if nq != nk and nq != 1 and nk != 1:
        raise fail("q and k with the same number of rows (or one of them a single [d] vector)",
                   f"q with {nq} rows, k with {nk} rows", "pass q and k of the same shape [n, d]")
    return qq, kk  # [n, d]


def _positions_arg(name: str, values: Any, fix: str) -> torch.Tensor:
    """``values`` as int64 CPU ``[n]``: non-negative integers <= 2**53, else a RopeError naming ``name``."""
    d = _distances(values, name)
    if d.dtype.is_floating_point:
        ok = bool(((d == d.round()) & (d >= 0) & (d <= _MAX_POS)).all())
    else:
        ok = not d.numel() or (int(d.min()) >= 0 and int(d.max()) <= _MAX_POS)
    if not ok:
        raise fail(f"{name} non-negative integers <= 2**53 (positions exact in float64)", describe(values), fix)
    return d.to(torch.int64)


def _rotate(cfg, x, positions, *, seq_len, backend, dtype, attention_scaling=True):
    """``x [p, d]`` rotated as the config rotates a head: dims ``[o, o + r)`` by
    ``direction · m · θ`` (``o = cfg.rotary_offset``); the other dims pass through."""
    from ..functional import apply_rotary
    from ..tables import cos_sin

    cos, sin = cos_sin(cfg, positions, dtype=dtype, seq_len=seq_len, attention_scaling=attention_scaling)  # [p, r/2]
    conj, o = cfg.direction == -1, cfg.rotary_offset
    if not o:
        return apply_rotary(x, cos, sin, layout=cfg.layout, backend=backend, conjugate=conj)
    rot = apply_rotary(x[..., o:], cos, sin, layout=cfg.layout, backend=backend, conjugate=conj)  # rotates its first r dims
    return torch.cat([x[..., :o], rot], dim=-1)


def relative_position_error(
    cfg: RopeConfig,
    q: Optional[torch.Tensor] = None,
    k: Optional[torch.Tensor] = None,
    *,
    distances: Sequence[int] = (0, 1, 5, 100, 1000),
    starts: Sequence[int] = (0, 1, 17, 1000, 10000, 100000),
    seq_len: Optional[int] = None,
    backend: str = "reference",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> float:
    """Check that ``⟨f(q, m), f(k, n)⟩`` depends only on ``m - n`` (RoFormer eq. 11).

    For each distance ``Δ`` the score is computed at ``(m, n) = (s + Δ, s)`` for every
    start ``s``; the deviation of a diagonal is ``max - min`` of its scores. ``f`` is the
    config's rotation: dims ``[rotary_offset, rotary_offset + r)`` by
    ``direction · m · θ``, the other dims pass through.

    Args:
        cfg: the rotary config (its layout, rotary offset and direction are used).
        q, k: nonzero ``[d]`` vectors (``k`` defaults to ``q`` when only ``q`` is given);
            default a seeded standard normal pair.
        distances, starts: the diagonals and positions along them: non-empty, non-negative
            integers with ``start + distance <= 2**53``.
        seq_len: total length fixing the frequencies of length-dependent schemes
            (default: largest position + 1, at most 2**53, the same for every score).
        backend, dtype: how ``f`` is applied and the dtype of tables and vectors
            (float64 reference by default: deviations are then ~1e-16 · position).
        seed: seed of the default vectors.

    Returns:
        The largest deviation over all diagonals, divided by ``|q|·|k|`` (a float).

    Example:
        >>> relative_position_error(RopeConfig(head_dim=64)) < 1e-10
        True
    """
    from ..tables import check_dtype

    _check_cfg(cfg)
    seed = _seed(seed)
    if not isinstance(dtype, torch.dtype):
        raise fail("dtype a torch.dtype, e.g. torch.float64", describe(dtype), "pass dtype=torch.float64 or torch.float32")
    check_dtype(dtype)
    if q is None:
        g = torch.Generator().manual_seed(seed)
        q, k0 = torch.randn(2, cfg.head_dim, generator=g, dtype=_F64)
        k = k0 if k is None else k
    qq, kk = _vectors(cfg, q, k, seed, 1)
    for name, t in (("q", qq), ("k", kk)):
        if t.shape[0] != 1:
            raise fail(f"{name} a single vector [{cfg.head_dim}]", f"{t.shape[0]} rows", f"pass one {name} vector, e.g. {name}[0]")
    qq, kk = qq[0].to(dtype), kk[0].to(dtype)
    norm = float(qq.to(_F64).norm() * kk.to(_F64).norm())
    if not math.isfinite(norm) or norm == 0.0:
        raise fail(f"q and k nonzero and finite in {dtype} (the deviation is divided by |q|·|k|)",
                   f"|q|·|k| = {norm}", "pass nonzero q and k (or leave them out for a seeded random pair)")
    dist = _positions_arg("distances", distances, "pass non-negative integer distances, e.g. (0, 1, 5, 100, 1000)")
    st = _positions_arg("starts", starts, "pass non-negative integer start positions, e.g. (0, 1, 17, 1000)")
    if not dist.numel() or not st.numel():
        raise fail("at least one distance and one start", f"{dist.numel()} distances, {st.numel()} starts",
                   "pass non-empty distances and starts, e.g. distances=(0, 1, 5), starts=(0, 17, 1000)")
    top = int(dist.max()) + int(st.max())
    if top > _MAX_POS:
        raise fail("start + distance <= 2**53 (positions exact in float64)", f"a largest position of {top}",
                   "pass smaller starts or distances")
    m = (st[None, :] + dist[:, None]).reshape(-1)  # [D*S]
    n = st[None, :].expand(dist.shape[0], -1).reshape(-1)  # [D*S]
    if seq_len is None:
        seq_len = min(top + 1, _MAX_POS)
    qm = _rotate(cfg, qq.expand(m.shape[0], -1), m, seq_len=seq_len, backend=backend, dtype=dtype)  # [D*S, d]
    kn = _rotate(cfg, kk.expand(n.shape[0], -1), n, seq_len=seq_len, backend=backend, dtype=dtype)
    score = (qm.to(_F64) * kn.to(_F64)).sum(-1).reshape(dist.shape[0], st.shape[0])  # [D, S]
    dev = (score.max(dim=1).values - score.min(dim=1).values).max()
    return float(dev) / norm


def attention_scores(
    cfg: RopeConfig,
    distances: Union[torch.Tensor, Sequence[int]],
    q: Optional[torch.Tensor] = None,
    k: Optional[torch.Tensor] = None,
    *,
    samples: int = 64,
    seed: int = 0,
    seq_len: Optional[int] = None,
    attention_scaling: bool = True,
) -> torch.Tensor:
    """Attention logit ``⟨f(q, Δ), f(k, 0)⟩ / √d`` vs relative distance ``Δ``, in float64.

    ``f`` is the config's rotation: dims ``[rotary_offset, rotary_offset + r)`` rotate by
    ``direction · m · θ`` (as :class:`~ropekit.RotaryEmbedding` applies it), the other
    dims pass through. By the relative-position property this equals the logit of any
    ``(m, n)`` with ``m - n = Δ``. With ``attention_scaling`` (default) the tables carry
    the scheme's attention factor, as in the model, so logits of the rotated dims are
    multiplied by its square.

    Args:
        cfg: the rotary config.
        distances: ``[n]`` non-negative integers ``<= 2**53``.
        q, k: ``[d]`` or ``[samples, d]`` real, finite (the same number of rows, or one
            of them a single vector). Default: ``samples`` seeded standard normal
            vectors with ``k = q`` (a query meeting a key of the same content); the
            expected logit is then ``(2/√d) Σ_i cos(Δ·θ_i)`` plus the pass-through
            dims. (For independent random q and k the expectation is 0 at every distance.)
        samples, seed: used when ``q`` is not given; ``samples`` an int in ``[1, 2**20]``.
        seq_len: total length for length-dependent schemes (default ``max(Δ) + 1``,
            at most ``2**53``).

    Returns:
        float64 ``[n]``: the logit averaged over the rows of ``q``/``k``.

    Example:
        >>> s = attention_scores(RopeConfig(head_dim=64), [0, 10, 1000])
        >>> s.shape, bool(s[0] > s[2])
        (torch.Size([3]), True)
    """
    _check_cfg(cfg)
    from ..backends.eager import pair_views

    samples = integer("samples", samples, minimum=1, maximum=1 << 20, fix="pass a number of random vectors, e.g. 64")
    seed = _seed(seed)
    attention_scaling = flag("attention_scaling", attention_scaling)
    qq, kk = _vectors(cfg, q, k, seed, samples)  # [n, d]
    dist = _positions_arg("distances", distances, "pass e.g. torch.arange(4096)")  # [D] int64
    if seq_len is None:
        seq_len = min(int(dist.max()) + 1, _MAX_POS) if dist.numel() else 1
    d, r, o = cfg.head_dim, cfg.rotary_dim, cfg.rotary_offset
    q1, q2 = pair_views(qq[:, o : o + r], r, cfg.layout)  # [n, r/2] each
    k1, k2 = pair_views(kk[:, o : o + r], r, cfg.layout)
    # Per pair, <R(±Δθ)(q1, q2), (k1, k2)> = (q1 k1 + q2 k2) cos Δθ ± (q1 k2 - q2 k1) sin Δθ
    # (± = cfg.direction), so averaging over the rows first keeps memory at [D, r/2].
    a = (q1 * k1 + q2 * k2).mean(0)  # [r/2]
    b = (q1 * k2 - q2 * k1).mean(0)  # [r/2]
    keep = torch.ones(d, dtype=torch.bool)
    keep[o : o + r] = False
    rest = (qq[:, keep] * kk[:, keep]).sum(-1).mean()  # pass-through dims (not rotated)
    cos, sin = _tables(cfg, dist, seq_len, attention_scaling)  # [D, r/2], times the attention factor
    f = cfg.attention_factor if attention_scaling else 1.0  # k at position 0 carries the factor too
    logits = f * (cos @ a + cfg.direction * (sin @ b)) + rest  # [D]
    return logits / math.sqrt(d)


def _tables(cfg, positions, seq_len, attention_scaling):
    from ..tables import cos_sin

    return cos_sin(cfg, positions, dtype=_F64, seq_len=seq_len, attention_scaling=attention_scaling)


# --------------------------------------------------------------------------- summary
def summary(model: Model) -> Dict[str, Any]:
    """Everything ``ropekit inspect`` shows about one config, as JSON-ready plain data.

    Keys: ``label``, ``source``, ``context``, ``original_context``, ``config``
    (:meth:`RopeConfig.to_dict`, so ``RopeConfig.from_dict(s["config"])`` rebuilds it),
    ``n_pairs``, ``attention_factor``, ``theta`` / ``wavelength`` (``{"before": [max, min],
    "after": [...]}``; wavelengths ``[min, max]``), ``bands`` (see :func:`bands`, without
    the per-pair list), ``runs`` (:func:`band_runs`), ``coverage``
    (:func:`context_coverage`), ``not_rotating`` (count of zeroed frequencies) and
    ``pairs`` (:func:`pair_table`). Theta/wavelength ranges of "after" cover the
    rotating pairs; infinite values (pairs that do not rotate) become ``None``.
    Length-dependent schemes are evaluated at ``seq_len = context``.

    Example:
        >>> s = summary(Model("tiny", RopeConfig(head_dim=8), context=16))  # λ = 6.3, 63, 628, 6283
        >>> s["n_pairs"], s["runs"][0]["class"], s["coverage"]["wrapped_in_training"]
        (4, 'unchanged', 1)
    """
    if not isinstance(model, Model):
        raise fail("model a ropekit.analysis.Model", type(model).__name__,
                   "wrap the config: summary(Model(label, cfg, context=...)) (context may be None)")
    cfg = _check_cfg(model.config)
    if model.context is not None:
        integer("model.context", model.context, minimum=0, maximum=_MAX_POS,
                fix="pass the context length in tokens, or None, as Model(label, cfg, context=...)")
    ctx, orig = model.context, model.original_context
    tb, ta = cfg.base_inv_freq(), cfg.inv_freq(ctx)
    before, after = wavelengths(cfg, seq_len=ctx)
    b = bands(cfg)
    if b is not None:
        b = {k: v for k, v in b.items() if k != "classes"}
    rot = ta > 0  # pairs that rotate after scaling (all but Proportional's zeroed ones)
    return _json_ready({
        "label": model.label,
        "source": model.source,
        "context": ctx,
        "original_context": orig,
        "config": cfg.to_dict(),
        "n_pairs": cfg.n_pairs,
        "attention_factor": cfg.attention_factor,
        "theta": {"before": [float(tb.max()), float(tb.min())], "after": [float(ta.max()), float(ta[rot].min())]},
        "wavelength": {
            "before": [float(before.min()), float(before.max())],
            "after": [float(after.min()), float(after[rot].max())],
        },
        "not_rotating": int((~rot).sum()),
        "bands": b,
        "runs": band_runs(cfg, seq_len=ctx),
        # a scaled config whose scheme does not record the training length (linear, NTK):
        # the angles seen in training are unknown, so no coverage claim
        "coverage": context_coverage(cfg, ctx, orig) if cfg.scaling is None or _original_context(cfg) else {},
        "pairs": pair_table(cfg, seq_len=ctx),
    })


def _json_ready(x: Any) -> Any:
    """Infinite floats (wavelength/ratio of a pair that does not rotate) -> None."""
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
