"""Figures of the analysis in :mod:`ropekit.analysis`, written as PNG files.

matplotlib is imported inside the functions (``pip install ropekit[plot]``) and used
without pyplot (a bare ``Figure`` on the Agg canvas), so plotting never touches global
state or needs a display. Each function takes several models to compare on one figure.

Example:
    >>> import tempfile, os
    >>> from ropekit import RopeConfig
    >>> from ropekit.analysis import Model
    >>> path = os.path.join(tempfile.mkdtemp(), "decay.png")
    >>> plot_decay([Model("base 1e4", RopeConfig(64), context=4096)], path) == path
    True
"""

from __future__ import annotations

import os
from typing import Any, List, Sequence, Tuple

import torch

from .._errors import fail
from . import Model, attention_scores, classify_pairs, decay_bound, decay_distances, wavelengths

__all__ = ["plot_decay", "plot_wavelengths", "plot_frequencies", "plot_scores", "KINDS", "plot"]

_CLASS_COLORS = {"unchanged": "#2ca02c", "in between": "#ffbf00", "interpolated": "#d62728"}


def _figure(nrows: int = 1, height: float = 4.8, sharex: bool = False) -> Tuple[Any, List[Any]]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - depends on the environment
        raise fail("matplotlib installed", "ImportError", "pip install 'ropekit[plot]' (or matplotlib)") from None
    fig = Figure(figsize=(9.0, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=sharex, squeeze=False)[:, 0]
    return fig, list(axes)


def _check(models: Sequence[Model]) -> List[Model]:
    models = list(models)
    if not models or not all(isinstance(m, Model) for m in models):
        raise fail("a non-empty list of ropekit.analysis.Model", repr(models)[:80], "wrap configs as Model(label, cfg)")
    return models


def _save(fig: Any, path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise fail("an existing output folder", repr(d), "create it first or pick another --out path")
    fig.savefig(path, format="png")
    return path


def _colors(n: int) -> List[str]:
    base = ["#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]
    return [base[i % len(base)] for i in range(n)]


def _max_context(models: Sequence[Model], default: int) -> int:
    ctx = [m.context for m in models if m.context]
    return max(ctx) if ctx else default


def plot_decay(models: Sequence[Model], path: str, *, max_distance: int = 0) -> str:
    """The RoFormer decay bound :func:`~ropekit.analysis.decay_bound` vs relative distance
    (log x axis, distance 0 drawn at 0.5) for each model; dotted verticals mark contexts.
    ``max_distance`` defaults to the largest context (or 65536)."""
    models = _check(models)
    top = max_distance or _max_context(models, 65536)
    dist = decay_distances(top)
    fig, (ax,) = _figure()
    for m, c in zip(models, _colors(len(models))):
        b = decay_bound(m.config, dist, seq_len=m.context)
        x = dist.to(torch.float64).clamp(min=0.5)
        ax.plot(x.numpy(), b.numpy(), color=c, lw=1.0, label=f"{m.label} (r={m.config.rotary_dim}, base={m.config.base:g})")
        if m.context:
            ax.axvline(m.context, color=c, ls=":", lw=1.2)
    ax.set_xscale("log")
    ax.set_xlabel("relative distance |m - n| (tokens, log scale; dotted: context)")
    ax.set_ylabel("bound  (1/(r/2)) Σ_j |S_j|")
    ax.set_title("Long-range decay bound of RoPE (RoFormer §3.4.3)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def _shade_bands(ax: Any, m: Model) -> None:
    cls = classify_pairs(m.config, seq_len=m.context)
    seen = set()
    for i, c in enumerate(cls):
        label = None if c in seen else f"{c} ({m.label})"
        seen.add(c)
        ax.axvspan(i - 0.5, i + 0.5, color=_CLASS_COLORS[c], alpha=0.13, lw=0, label=label)


def _first_scaled(models: Sequence[Model]) -> Any:
    for m in models:
        if m.config.scaling is not None:
            return m
    return None


def _has_unscaled_twin(m: Model, models: Sequence[Model]) -> bool:
    c = m.config
    return any(
        o.config.scaling is None and (o.config.head_dim, o.config.rotary_dim, o.config.base) == (c.head_dim, c.rotary_dim, c.base)
        for o in models
    )


def _first_of_base(m: Model, models: Sequence[Model], seen: set) -> bool:
    """True once per distinct unscaled frequency set: scaled models sharing a base draw one
    "before scaling" curve."""
    key = (m.config.head_dim, m.config.rotary_dim, m.config.base)
    if key in seen:
        return False
    seen.add(key)
    return True


def _before_label(m: Model) -> str:
    return f"before scaling (base {m.config.base:g}, r={m.config.rotary_dim})"


def plot_wavelengths(models: Sequence[Model], path: str) -> str:
    """Wavelength ``2π/θ_i`` of every pair before (black dashed) and after (solid) scaling, on a
    log axis, with each model's original (dotted) and extended (dash-dot) context as
    horizontals. The bands of the first scaled model are shaded by class."""
    models = _check(models)
    fig, (ax,) = _figure(height=5.2)
    sm = _first_scaled(models)
    if sm is not None:
        _shade_bands(ax, sm)
    drawn: dict = {}  # context value -> annotated already (models often share one)
    seen_bases: set = set()
    for m, c in zip(models, _colors(len(models))):
        before, after = wavelengths(m.config, seq_len=m.context)
        i = torch.arange(m.config.n_pairs).numpy()
        scaled = m.config.scaling is not None
        if scaled and not _has_unscaled_twin(m, models) and _first_of_base(m, models, seen_bases):
            ax.plot(i, before.numpy(), color="k", ls="--", lw=1.0, label=_before_label(m))
        ax.plot(i, after.numpy(), color=c, lw=1.6, marker=".", ms=3, label=m.label)
        oc = m.original_context
        for value, ls, what in ((oc, ":", "original context" if m.context and m.context != oc else "context"),
                                (m.context if m.context != oc else None, "-.", "extended context")):
            if not value or value in drawn:
                continue
            drawn[value] = True
            ax.axhline(value, color=c, ls=ls, lw=1.2)
            ax.annotate(f"{what} {value:,} ({m.label})", (1.0, value), xycoords=("axes fraction", "data"),
                        xytext=(-4, 3), textcoords="offset points", ha="right", fontsize=7, color=c)
    ax.set_yscale("log")
    ax.set_xlabel("rotary pair i (0 = highest frequency)")
    ax.set_ylabel("wavelength 2π/θ_i (tokens, log scale)")
    ax.set_title("Wavelength of each rotary pair vs the context")
    ax.grid(True, which="major", alpha=0.25)
    ax.legend(loc="upper left", fontsize=7, ncol=2 if len(models) > 1 else 1, bbox_to_anchor=(0.0, 0.93))
    return _save(fig, path)


def plot_frequencies(models: Sequence[Model], path: str) -> str:
    """Two panels: ``θ_i`` before (black dashed) and after (solid) scaling on a log axis, and the
    per-pair factor ``θ_before/θ_after`` the scheme divides each frequency by."""
    models = _check(models)
    fig, (ax, ax2) = _figure(nrows=2, height=6.4, sharex=True)
    seen_bases: set = set()
    for m, c in zip(models, _colors(len(models))):
        tb, ta = m.config.base_inv_freq(), m.config.inv_freq(m.context)
        i = torch.arange(m.config.n_pairs).numpy()
        if m.config.scaling is not None and not _has_unscaled_twin(m, models) and _first_of_base(m, models, seen_bases):
            ax.plot(i, tb.numpy(), color="k", ls="--", lw=1.0, label=_before_label(m))
        ax.plot(i, ta.numpy(), color=c, lw=1.6, label=m.label)
        ax2.plot(i, (tb / ta).numpy(), color=c, lw=1.6, marker=".", ms=3, label=m.label)
    ax.set_yscale("log")
    ax.set_ylabel("θ_i (rad / token, log)")
    ax.set_title("Frequencies before and after scaling")
    ax.grid(True, which="major", alpha=0.25)
    ax.legend(fontsize=7, loc="lower left")
    ax2.set_xlabel("rotary pair i (0 = highest frequency)")
    ax2.set_ylabel("θ_before / θ_after")
    ax2.set_title("Per-pair scaling factor (1 = unchanged, factor = interpolated)", fontsize=10)
    ax2.grid(True, alpha=0.25)
    ax2.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def plot_scores(models: Sequence[Model], path: str, *, max_distance: int = 0, samples: int = 64) -> str:
    """Attention logit vs relative distance (:func:`~ropekit.analysis.attention_scores`,
    ``samples`` random ``q = k``), log x axis; dotted verticals mark contexts."""
    models = _check(models)
    top = max_distance or _max_context(models, 65536)
    dist = decay_distances(top)
    fig, (ax,) = _figure()
    for m, c in zip(models, _colors(len(models))):
        s = attention_scores(m.config, dist, samples=samples, seq_len=m.context)
        ax.plot(dist.to(torch.float64).clamp(min=0.5).numpy(), s.numpy(), color=c, lw=0.9, label=m.label)
        if m.context:
            ax.axvline(m.context, color=c, ls=":", lw=1.2)
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("relative distance m - n (tokens, log scale; dotted: context)")
    ax.set_ylabel("logit ⟨f(q,m), f(k,n)⟩ / √d")
    ax.set_title(f"Attention logit vs distance (q = k, mean of {samples} N(0, I) vectors)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    return _save(fig, path)


#: ``kind -> function`` for :func:`plot` and the ``ropekit plot`` command.
KINDS = {
    "decay": plot_decay,
    "wavelengths": plot_wavelengths,
    "frequencies": plot_frequencies,
    "scores": plot_scores,
}


def plot(kind: str, models: Sequence[Model], path: str) -> str:
    """Dispatch to ``plot_<kind>``; RopeError for an unknown kind."""
    if kind not in KINDS:
        raise fail(f"kind in {sorted(KINDS)}", repr(kind), "pick one of them")
    return KINDS[kind](models, path)
