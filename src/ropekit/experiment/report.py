"""Write a :class:`~.study.StudyResult` as CSV files, ``report.md`` and PNG plots.

Plots are drawn from the same rows as the CSV files (matplotlib is imported lazily and
is optional: without it the report says the plots were skipped).
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Sequence, Tuple

from .schemes import describe_scheme
from .study import StudyResult

__all__ = ["write_report", "aggregate", "write_csv", "read_csv", "load_result", "merge_dirs"]


def write_csv(path: str, rows: Sequence[Dict[str, Any]]) -> None:
    """Rows of dicts -> CSV (columns = union of keys in first-seen order)."""
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def aggregate(rows: Iterable[Dict[str, Any]], keys: Sequence[str], value: str) -> Dict[Tuple, Tuple[float, float, int]]:
    """Group ``rows`` by ``keys``: ``{key: (mean, half_range, n)}`` of ``value`` over seeds.

    Example:
        >>> aggregate([{"a": 1, "v": 1.0}, {"a": 1, "v": 2.0}], ["a"], "v")
        {(1,): (1.5, 0.5, 2)}
    """
    g: Dict[Tuple, List[float]] = defaultdict(list)
    for r in rows:
        g[tuple(r[k] for k in keys)].append(float(r[value]))
    return {k: (statistics.fmean(v), (max(v) - min(v)) / 2, len(v)) for k, v in g.items()}


def _cell(x: Tuple[float, float, int]) -> str:
    m, hr, n = x
    return f"{m:.3f}" if n == 1 else f"{m:.3f} ±{hr:.3f}"


def _scheme_label(name: str, ft: int) -> str:
    return name if not ft else f"{name} + fine-tune {ft} steps"


def _plots(res: StudyResult, out: str) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    # 1. loss curves (held-out bits/byte vs step), thin per seed, thick mean
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    encs = list(dict.fromkeys(r["encoding"] for r in res.curves))
    colors = plt.get_cmap("tab10")
    for i, e in enumerate(encs):
        agg = aggregate([r for r in res.curves if r["encoding"] == e], ["step"], "val_bpb")
        steps = sorted(k[0] for k in agg)
        ax.plot(steps, [agg[(s,)][0] for s in steps], color=colors(i), label=e, lw=1.8)
        for seed in res.config.seeds:
            rs = [r for r in res.curves if r["encoding"] == e and r["seed"] == seed]
            ax.plot([r["step"] for r in rs], [r["val_bpb"] for r in rs], color=colors(i), lw=0.5, alpha=0.5)
    ax.axhline(res.unigram_bpb, color="gray", ls=":", lw=1, label="unigram (no context)")
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out bits/byte (length {res.config.model.ctx})")
    lo = min(r["val_bpb"] for r in res.curves)
    ax.set_ylim(lo - 0.1, res.unigram_bpb + 0.3)
    ax.set_title(f"Position encodings at equal budget ({len(res.config.seeds)} seed(s); thin = per seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = os.path.join(out, "loss_curves.png")
    fig.savefig(p)
    plt.close(fig)
    files.append(p)
    # 2. bits/byte vs length per scheme (all positions, last `tail` positions)
    if res.extrapolation:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100, sharey=False)
        labels = list(dict.fromkeys((r["scheme"], r["finetuned"]) for r in res.extrapolation))
        names = list(dict.fromkeys(r["scheme"] for r in res.extrapolation))
        for ax, col, title in zip(axes, ("bpb", "tail_bpb"), ("all positions", f"last {res.config.tail} positions")):
            agg = aggregate(res.extrapolation, ["scheme", "finetuned", "length"], col)
            for name, ft in labels:
                ls = sorted(k[2] for k in agg if k[0] == name and k[1] == ft)
                ax.plot(
                    ls,
                    [agg[(name, ft, L)][0] for L in ls],
                    marker="o" if not ft else "s",
                    ls="-" if not ft else "--",
                    color=colors(names.index(name)),
                    label=_scheme_label(name, ft),
                    ms=4,
                )
            ax.set_xscale("log", base=2)
            ax.set_xticks(res.config.lengths)
            ax.set_xticklabels([str(L) for L in res.config.lengths])
            ax.set_xlabel("window length (training length %d)" % res.config.model.ctx)
            ax.set_ylabel("held-out bits/byte")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"RoPE model beyond its training length ({len(res.config.seeds)} seed(s), mean)")
        fig.tight_layout()
        p = os.path.join(out, "extrapolation.png")
        fig.savefig(p)
        plt.close(fig)
        files.append(p)
    return files


def write_report(res: StudyResult, out: str, *, command: str = "") -> List[str]:
    """Write ``curves.csv``, ``encodings.csv``, ``extrapolation.csv``, ``analysis.csv``,
    ``config.json``, ``report.md`` and the PNG plots into ``out``; return the paths."""
    os.makedirs(out, exist_ok=True)
    paths = []
    for name, rows in (
        ("curves", res.curves),
        ("encodings", res.encodings),
        ("extrapolation", res.extrapolation),
        ("analysis", res.analysis),
    ):
        if rows:
            p = os.path.join(out, f"{name}.csv")
            write_csv(p, rows)
            paths.append(p)
    p = os.path.join(out, "config.json")
    with open(p, "w") as f:
        json.dump(
            {"command": command, "config": res.config.to_dict(), "environment": res.environment, "seconds": res.seconds},
            f,
            indent=1,
        )
    paths.append(p)
    pngs = _plots(res, out)
    paths += pngs
    cfg = res.config
    mc, tc = cfg.model, cfg.train
    L = []
    L.append("# ropekit evidence: a tiny byte-level LM trained on CPU\n")
    if command:
        L.append(f"Command: `{command}`  ")
    if "jobs" in res.environment:
        L.append(f"Seeds ran in {res.environment['jobs']} parallel processes.  ")
    L.append(
        f"Seeds: {list(cfg.seeds)} ({len(cfg.seeds)}); wall time {res.seconds / 60:.1f} min; "
        f"Python {res.environment.get('python')}, torch {res.environment.get('torch')}, "
        f"{res.environment.get('threads')} threads.\n"
    )
    L.append(f"{res.corpus}.  ")
    L.append(f"Context-free baseline (unigram with add-one smoothing, train -> held out): **{res.unigram_bpb:.3f} bits/byte**.\n")
    L.append(
        f"Model: {mc.n_layer} layers, d_model {mc.d_model}, {mc.n_head} heads of {mc.head_dim}, pre-norm, "
        f"SDPA causal attention, tied embeddings; rotary base {mc.rope_base:g}. Training: AdamW lr {tc.lr:g} "
        f"(warm-up {tc.warmup}, cosine to {tc.min_lr_ratio:g}x), {tc.steps} steps x {tc.batch} windows of "
        f"{mc.ctx} bytes (context {mc.ctx}). Same data order for every encoding within a seed.\n"
    )
    L.append("Values are held-out bits per byte (lower is better): mean over seeds, ± half the range between seeds.\n")
    # --- encodings
    L.append(f"## Position encodings at the training length ({mc.ctx})\n")
    agg = aggregate(res.encodings, ["encoding"], "bpb")
    L.append("| encoding | bits/byte |")
    L.append("|---|---|")
    for (e,), v in sorted(agg.items(), key=lambda kv: kv[1][0]):
        L.append(f"| {e} | {_cell(v)} |")
    if res.skipped_encodings:
        L.append(f"\nLeft out (not available in this ropekit): {', '.join(res.skipped_encodings)}.")
    L.append("")
    # --- extrapolation
    if res.extrapolation:
        labels = list(dict.fromkeys((r["scheme"], r["finetuned"]) for r in res.extrapolation))
        lengths = cfg.lengths
        for col, title in (
            ("bpb", "all positions of every window"),
            ("tail_bpb", f"the last {cfg.tail} positions of each span (same bytes at every length, with L-{cfg.tail} bytes of context)"),
        ):
            agg = aggregate(res.extrapolation, ["scheme", "finetuned", "length"], col)
            L.append(f"## RoPE beyond the training length: {title}\n")
            L.append("| scheme | " + " | ".join(f"{n} ({n // mc.ctx}x)" for n in lengths) + " |")
            L.append("|---" * (len(lengths) + 1) + "|")
            for name, ft in labels:
                cells = [_cell(agg[(name, ft, n)]) if (name, ft, n) in agg else "" for n in lengths]
                L.append(f"| {_scheme_label(name, ft)} | " + " | ".join(cells) + " |")
            L.append("")
        L.append(
            f"Evaluation: {cfg.eval_spans} held-out spans of {lengths[-1]} bytes, evenly spaced over the held-out "
            f"files; at length L each span is cut into {lengths[-1]}/L independent windows (positions 0..L-1, "
            "`seq_len=L`), so 'all positions' covers the same bytes at every length.\n"
        )
        L.append("Schemes (M = training length, L = window length):\n")
        for name in dict.fromkeys(r["scheme"] for r in res.extrapolation):
            L.append(f"- `{name}`: {describe_scheme(name, cfg.dynamic_factor)}")
        if cfg.finetune_steps:
            L.append(
                f"- `+ fine-tune N steps`: the trained RoPE model fine-tuned for N steps at length {lengths[-1]} "
                f"(lr {cfg.finetune_lr:g}, same tokens per step) with the scheme at factor {lengths[-1] // mc.ctx}, "
                "then evaluated with that fixed scheme at every length; `none + fine-tune` is the control "
                "(same fine-tuning, no scaling)."
            )
        L.append("")
    # --- analysis
    if res.analysis:
        L.append(f"## RoFormer decay bound and relative-position check (head dim {mc.head_dim}, base {mc.rope_base:g})\n")
        bcols = [k for k in res.analysis[0] if k.startswith("bound_")]
        L.append(
            "Bound B(Δ) = (1/(r/2)) Σ_j |Σ_{k<j} e^{iΔθ_k}| (RoFormer §3.4.3, `ropekit.analysis.decay_bound`) at distance Δ, "
            f"for each scheme's frequencies at length {res.analysis[0]['length']}; relpos = max deviation of "
            "⟨f(q,m), f(k,n)⟩ along diagonals m-n = const, relative to |q||k| (`relative_position_error`, float64).\n"
        )
        L.append("| scheme | " + " | ".join(f"Δ={c[6:]}" for c in bcols) + " | relpos |")
        L.append("|---" * (len(bcols) + 2) + "|")
        for r in res.analysis:
            L.append(f"| {r['scheme']} | " + " | ".join(f"{r[c]:.2f}" for c in bcols) + f" | {r['relpos_max_dev']:.1e} |")
        L.append("")
    if pngs:
        L.append("## Plots\n")
        for p in pngs:
            L.append(f"![{os.path.basename(p)}]({os.path.basename(p)})")
        L.append("")
    L.append("Files: " + ", ".join(f"`{os.path.basename(p)}`" for p in paths) + ".")
    rp = os.path.join(out, "report.md")
    with open(rp, "w") as f:
        f.write("\n".join(L) + "\n")
    return [rp, *paths]


def _parse(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def read_csv(path: str) -> List[Dict[str, Any]]:
    """Inverse of :func:`write_csv` (numbers parsed back; floats to the 6 digits written)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


def load_result(out: str, corpus_text: str, unigram_bpb: float) -> Tuple[StudyResult, str]:
    """A result back from the files :func:`write_report` wrote into ``out``, and its command.
    The corpus description and unigram baseline are passed in (recomputed by the caller)."""
    from .model import ModelConfig
    from .study import StudyConfig
    from .train import TrainConfig

    with open(os.path.join(out, "config.json")) as f:
        meta = json.load(f)
    d = dict(meta["config"])
    d["model"], d["train"] = ModelConfig(**d["model"]), TrainConfig(**d["train"])
    for k in ("seeds", "encodings", "schemes", "multiples"):
        d[k] = tuple(d[k])
    res = StudyResult(StudyConfig(**d), corpus_text, unigram_bpb, [])
    res.environment = meta.get("environment", {})
    res.seconds = float(meta.get("seconds", 0.0))
    res.curves, res.encodings = read_csv(os.path.join(out, "curves.csv")), read_csv(os.path.join(out, "encodings.csv"))
    res.extrapolation = read_csv(os.path.join(out, "extrapolation.csv"))
    res.analysis = read_csv(os.path.join(out, "analysis.csv"))
    return res, meta.get("command", "")


def merge_dirs(dirs: Sequence[str], corpus_text: str, unigram_bpb: float) -> Tuple[StudyResult, str]:
    """Merge result directories: rows of a later directory replace the earlier rows of the
    same encoding (loss curves, encodings table) or the same scheme (extrapolation), e.g. to
    re-run one encoding after a fix without re-running everything."""
    base, cmd = load_result(dirs[0], corpus_text, unigram_bpb)
    cmds = [cmd]
    for d in dirs[1:]:
        r, c = load_result(d, corpus_text, unigram_bpb)
        cmds.append(c)
        encs = {x["encoding"] for x in r.encodings}
        schemes = {(x["scheme"], x["finetuned"]) for x in r.extrapolation}
        base.curves = [x for x in base.curves if x["encoding"] not in encs] + r.curves
        base.encodings = [x for x in base.encodings if x["encoding"] not in encs] + r.encodings
        base.extrapolation = [x for x in base.extrapolation if (x["scheme"], x["finetuned"]) not in schemes] + r.extrapolation
        base.analysis = r.analysis or base.analysis
        base.seconds += r.seconds
    return base, " && ".join(c for c in cmds if c)
