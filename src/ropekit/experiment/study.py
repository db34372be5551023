"""The study: train one tiny LM per position encoding and seed, then extrapolate the RoPE
model with every scaling scheme, training-free (and optionally after brief fine-tuning).

:func:`run_study` returns plain data (:class:`StudyResult`); :mod:`.report` writes it.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, TextIO

import torch

from .._errors import fail
from .corpus import Corpus, unigram_bits_per_byte
from .model import ModelConfig, TinyLM, available_encodings
from .schemes import FINETUNE_SCHEMES, SCHEMES, scheme_config
from .train import TrainConfig, eval_windows, evaluate, set_determinism, train

__all__ = ["StudyConfig", "StudyResult", "run_study", "run_study_parallel", "merge_results", "Progress"]


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Everything that defines a run (written verbatim into the report).

    Args:
        model, train: model size and optimisation (``train.seq_len`` = ``model.ctx``).
        seeds: one model per seed and encoding; seeds change the init and the data order.
        encodings: position encodings to train (``"rope"`` is required for the schemes).
        schemes: scaling schemes of the extrapolation table.
        multiples: evaluation lengths as multiples of the training length.
        eval_spans: held-out spans of ``max(multiples) * ctx`` bytes evaluated at every length.
        tail: positions at the end of each span reported separately.
        dynamic_factor: ``factor`` of dynamic NTK.
        finetune_steps: steps of fine-tuning at the longest length for
            :data:`~.schemes.FINETUNE_SCHEMES` (0: off).
        finetune_lr: constant learning rate of that fine-tuning (after a short warm-up).
    """

    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    seeds: Sequence[int] = (0, 1)
    encodings: Sequence[str] = ("rope", "nope", "learned", "sinusoidal", "xpos", "p-rope")
    schemes: Sequence[str] = SCHEMES
    multiples: Sequence[int] = (1, 2, 4, 8)
    eval_spans: int = 32
    tail: int = 128
    dynamic_factor: float = 2.0
    finetune_steps: int = 0
    finetune_lr: float = 3e-4
    threads: int = 2

    def __post_init__(self) -> None:
        if "rope" not in self.encodings and self.schemes:
            raise fail("'rope' among the encodings when schemes are compared", repr(list(self.encodings)), "add rope")
        bad = [s for s in self.schemes if s not in SCHEMES]
        if bad:
            raise fail(f"schemes from {SCHEMES}", repr(bad), "drop the unknown names")
        if not self.seeds:
            raise fail("at least one seed", repr(self.seeds), "pass e.g. seeds=(0,)")
        if sorted(self.multiples) != list(self.multiples) or self.multiples[0] != 1:
            raise fail("increasing length multiples starting at 1", repr(self.multiples), "use (1, 2, 4, 8)")

    @property
    def lengths(self) -> List[int]:
        return [m * self.model.ctx for m in self.multiples]

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seeds"], d["encodings"] = list(self.seeds), list(self.encodings)
        d["schemes"], d["multiples"] = list(self.schemes), list(self.multiples)
        return d


@dataclasses.dataclass
class StudyResult:
    """Rows of plain data (lists of dicts), one list per CSV file."""

    config: StudyConfig
    corpus: str
    unigram_bpb: float
    skipped_encodings: List[str]
    curves: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    encodings: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    extrapolation: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    analysis: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    environment: Dict[str, str] = dataclasses.field(default_factory=dict)


class Progress:
    """A one-line text progress bar on ``stream`` (stderr by default) with an ETA.

    Work is counted in token-steps so training, fine-tuning and evaluation share one bar.
    """

    def __init__(self, total: float, stream: Optional[TextIO] = None, width: int = 28) -> None:
        self.total, self.done, self.width = max(total, 1.0), 0.0, width
        self.stream = sys.stderr if stream is None else stream
        self.t0 = time.perf_counter()
        self.label = ""
        self._last = 0.0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def advance(self, amount: float, label: Optional[str] = None, force: bool = False) -> None:
        self.done = min(self.total, self.done + amount)
        if label is not None:
            self.label = label
        now = time.perf_counter()
        # redraw at most 4x/s on a terminal, every 10 s into a log file
        if not force and now - self._last < (0.25 if self._tty else 10.0):
            return
        self._last = now
        frac = self.done / self.total
        el = now - self.t0
        eta = el * (1 - frac) / frac if frac > 0 else float("nan")
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        line = f"[{bar}] {100 * frac:5.1f}%  {el / 60:5.1f} min, eta {eta / 60:5.1f} min  {self.label}"
        self.stream.write(("\r" + line.ljust(100)) if self._tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.advance(0.0, force=True)
        if self._tty:
            self.stream.write("\n")


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)


def _log(msg: str, stream: Optional[TextIO]) -> None:
    s = sys.stdout if stream is None else stream
    s.write(msg + "\n")
    s.flush()


def _analysis_rows(cfg: StudyConfig) -> List[Dict[str, Any]]:
    """RoFormer decay bound and the relative-position check for the model's rotary config,
    plain and with each scheme at the longest length (``ropekit.analysis``)."""
    from .. import analysis

    mc = cfg.model
    base = mc.rope_config()
    L = cfg.lengths[-1]
    dists = [0, 1, 4, 16, 64, mc.ctx, 2 * mc.ctx, 4 * mc.ctx, 8 * mc.ctx, L]
    dists = sorted(set(dists))
    rows = []
    for name in ["none", *[s for s in cfg.schemes if s != "none"]]:
        c = scheme_config(name, base, L, mc.ctx, dynamic_factor=cfg.dynamic_factor)
        b = analysis.decay_bound(c, torch.tensor(dists), seq_len=L)  # float64 [n]
        err = analysis.relative_position_error(c, seq_len=L, distances=(0, 1, 5, 100, L - 1), starts=(0, 1, 17, L // 2))
        row: Dict[str, Any] = {"scheme": name, "length": L, "relpos_max_dev": err}
        row.update({f"bound_{d}": float(v) for d, v in zip(dists, b)})
        rows.append(row)
    return rows


def run_study(
    corpus: Corpus,
    cfg: StudyConfig,
    *,
    log: Optional[TextIO] = None,
    progress_stream: Optional[TextIO] = None,
    quiet: bool = False,
) -> StudyResult:
    """Run the whole study on ``corpus``; deterministic for a given config and machine."""
    t0 = time.perf_counter()
    set_determinism(cfg.threads)
    mc = cfg.model
    tc = dataclasses.replace(cfg.train, seq_len=mc.ctx)
    avail = available_encodings()
    encs = [e for e in cfg.encodings if e in avail]
    skipped = [e for e in cfg.encodings if e not in avail]
    unigram = unigram_bits_per_byte(corpus.train, corpus.heldout)
    res = StudyResult(cfg, corpus.describe(), unigram, skipped)
    res.environment = {"python": sys.version.split()[0], "torch": torch.__version__, "threads": str(torch.get_num_threads())}
    if not quiet:
        _log(corpus.describe(), log)
        _log(f"context-free baseline (unigram, add-one, train -> held out): {unigram:.3f} bits/byte", log)
        if skipped:
            _log(f"position encodings not available in this ropekit (left out): {skipped}", log)
    span = cfg.lengths[-1]
    ev = eval_windows(corpus.heldout, cfg.eval_spans, span)
    ntok = cfg.eval_spans * span
    # work in units of (tokens processed / ctx tokens): one training step = batch units
    ft_schemes = [s for s in FINETUNE_SCHEMES if cfg.finetune_steps > 0]
    per_seed = (
        len(encs) * (tc.steps * tc.batch + ntok / mc.ctx)
        + len(cfg.schemes) * len(cfg.lengths) * ntok / mc.ctx
        + len(ft_schemes) * (cfg.finetune_steps * tc.batch * 1.5 + len(cfg.lengths) * ntok / mc.ctx)
    )
    bar = Progress(per_seed * len(cfg.seeds), progress_stream) if not quiet else None

    def tick(units: float, label: Optional[str] = None) -> None:
        if bar is not None:
            bar.advance(units, label)

    for seed in cfg.seeds:
        for pe in encs:
            _seed_all(seed)
            model = TinyLM(mc, pe)
            label = f"seed {seed} train {pe}"
            curve = train(
                model, corpus.train, corpus.heldout, tc, seed=seed, progress=lambda st, loss: tick(tc.batch, f"{label} step {st}/{tc.steps} bpb {loss:.3f}")
            )
            for st, a, v in zip(curve["step"], curve["train_bpb"], curve["val_bpb"]):
                res.curves.append({"seed": seed, "encoding": pe, "step": st, "train_bpb": a, "val_bpb": v})
            all_bpb, tail_bpb = evaluate(model, ev, mc.ctx, tail=cfg.tail)
            tick(ntok / mc.ctx)
            res.encodings.append(
                {"seed": seed, "encoding": pe, "length": mc.ctx, "bpb": all_bpb, "tail_bpb": tail_bpb, "final_val_bpb": curve["val_bpb"][-1]}
            )
            if not quiet:
                _log(f"seed {seed} {pe:<10} held-out bits/byte at length {mc.ctx}: {all_bpb:.4f}", log)
            if pe != "rope":
                continue
            base = mc.rope_config()
            for name in cfg.schemes:
                for m, L in zip(cfg.multiples, cfg.lengths):
                    model.set_rope(scheme_config(name, base, L, mc.ctx, dynamic_factor=cfg.dynamic_factor))
                    a, t = evaluate(model, ev, L, tail=cfg.tail)
                    tick(ntok / mc.ctx, f"seed {seed} eval {name} at {L}")
                    res.extrapolation.append(
                        {"seed": seed, "scheme": name, "finetuned": 0, "length": L, "multiple": m, "bpb": a, "tail_bpb": t}
                    )
            model.set_rope(base)
            for name in ft_schemes:
                L = cfg.lengths[-1]
                ft = copy.deepcopy(model)
                ftc = scheme_config(name, base, L, mc.ctx, dynamic_factor=cfg.dynamic_factor)
                ft.set_rope(ftc)
                ftt = TrainConfig(
                    steps=cfg.finetune_steps,
                    batch=max(1, tc.batch * mc.ctx // L),  # same tokens per step as pre-training
                    seq_len=L,
                    lr=cfg.finetune_lr,
                    warmup=max(1, cfg.finetune_steps // 10),
                    min_lr_ratio=1.0,
                    eval_every=max(1, cfg.finetune_steps),
                    eval_batches=4,
                )
                lbl = f"seed {seed} fine-tune {name} at {L}"
                train(ft, corpus.train, corpus.heldout, ftt, seed=1000 + seed, progress=lambda st, loss: tick(tc.batch * 1.5, f"{lbl} step {st}"))
                for m, Le in zip(cfg.multiples, cfg.lengths):
                    # the fine-tuned model keeps the scheme it was tuned with (factor L/M)
                    a, t = evaluate(ft, ev, Le, tail=cfg.tail)
                    tick(ntok / mc.ctx, f"seed {seed} eval fine-tuned {name} at {Le}")
                    res.extrapolation.append(
                        {"seed": seed, "scheme": name, "finetuned": cfg.finetune_steps, "length": Le, "multiple": m, "bpb": a, "tail_bpb": t}
                    )
    if bar is not None:
        bar.close()
    if "rope" in encs:
        res.analysis = _analysis_rows(cfg)
    res.seconds = time.perf_counter() - t0
    return res


def merge_results(parts: Sequence[StudyResult], config: StudyConfig, seconds: float) -> StudyResult:
    """One result from per-seed results (rows concatenated in seed order)."""
    parts = sorted(parts, key=lambda r: list(r.config.seeds))
    first = parts[0]
    out = StudyResult(config, first.corpus, first.unigram_bpb, first.skipped_encodings, seconds=seconds)
    out.environment = dict(first.environment, jobs=str(len(parts)))
    for r in parts:
        out.curves += r.curves
        out.encodings += r.encodings
        out.extrapolation += r.extrapolation
    out.analysis = first.analysis
    return out


def _worker(args) -> StudyResult:
    root, cfg, quiet = args
    from .corpus import load_corpus

    return run_study(load_corpus(root), cfg, quiet=quiet)


def run_study_parallel(corpus_root: Optional[str], cfg: StudyConfig, jobs: int, *, quiet: bool = False) -> StudyResult:
    """:func:`run_study` with the seeds spread over ``jobs`` processes of
    ``max(1, cfg.threads // jobs)`` threads each (same total thread budget).

    Each seed's numbers are computed exactly as in a single process; only the thread
    count per process may differ, which on CPU changes reduction order at most.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    t0 = time.perf_counter()
    threads = max(1, cfg.threads // jobs)
    subs = [(corpus_root, dataclasses.replace(cfg, seeds=(s,), threads=threads), quiet) for s in cfg.seeds]
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
        parts = list(ex.map(_worker, subs))
    return merge_results(parts, cfg, time.perf_counter() - t0)
