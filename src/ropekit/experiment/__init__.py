"""Evidence harness: a tiny byte-level language model trained on CPU with ropekit.

It trains the same small decoder-only transformer with different position encodings
(RoPE, NoPE, learned and sinusoidal absolute, and the rotary variants of
:mod:`ropekit.variants` when present) at an equal step budget on the Python standard
library's own source files, then evaluates the RoPE model at 1x/2x/4x/8x its training
length with every training-free scaling scheme of :mod:`ropekit.scaling` (and optionally
after brief fine-tuning), and reports the RoFormer decay bound and relative-position check
for the model's config.

Run it with ``python -m ropekit.experiment [--smoke] [--out DIR]`` or :func:`run`.
Not imported by ``import ropekit``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from typing import List, Optional

__all__ = ["run", "build_parser", "smoke_config", "full_config"]


def smoke_config(seeds=(0,), steps: int = 300):
    """The size used by ``--smoke`` and the test suite: finishes in well under a minute on
    2 cores (2 layers, d_model 64, 2 heads of 32, context 128; RoPE and NoPE only)."""
    from .model import ModelConfig
    from .study import StudyConfig
    from .train import TrainConfig

    return StudyConfig(
        model=ModelConfig(n_layer=2, d_model=64, n_head=2, ctx=128),
        train=TrainConfig(steps=steps, batch=16, lr=3e-3, warmup=20, eval_every=50, eval_batches=8),
        seeds=tuple(seeds),
        encodings=("rope", "nope"),
        eval_spans=16,
    )


def full_config(seeds=(0, 1), steps: int = 500, finetune_steps: int = 60):
    """The full run (about 20-30 minutes on 2 uncontended cores with 2 seeds)."""
    from .model import ModelConfig
    from .study import StudyConfig
    from .train import TrainConfig

    return StudyConfig(
        model=ModelConfig(),
        train=TrainConfig(steps=steps),
        seeds=tuple(seeds),
        eval_spans=32,
        finetune_steps=finetune_steps,
    )


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error on stderr (no usage dump), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _count(minimum: int, what: str):
    """argparse type: an int >= ``minimum`` (``--steps -3`` / ``--seeds 0`` are refused, not
    replaced by the defaults)."""

    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            n = None
        if n is None or n < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, an int >= {minimum}, got {v!r}")
        return n

    parse.__name__ = "int"
    return parse


def _factor(v: str) -> float:
    import math

    try:
        x = float(v)
    except ValueError:
        x = math.nan
    if not (math.isfinite(x) and x >= 1.0):
        raise argparse.ArgumentTypeError(f"expected a finite factor >= 1 (dynamic NTK), got {v!r}")
    return x


def build_parser(prog: str = "ropekit experiment") -> argparse.ArgumentParser:
    from .model import POSITION_ENCODINGS
    from .schemes import SCHEMES

    p = _Parser(
        prog=prog,
        description="Train a tiny byte-level LM on the Python stdlib with each position encoding and "
        "extrapolate the RoPE model with ropekit's scaling schemes; write CSV, report.md and PNG plots.",
    )
    p.add_argument("--smoke", action="store_true", help="tiny run (< 60 s): 2-layer model, 300 steps, 1 seed")
    p.add_argument("--out", default=None, help="output directory (default experiments/full or experiments/smoke)")
    p.add_argument("--seeds", type=_count(1, "a number of seeds"), default=None,
                   help="number of seeds (0..n-1), >= 1; default 2 (smoke: 1)")
    p.add_argument("--steps", type=_count(1, "a number of training steps"), default=None,
                   help="training steps per model, >= 1 (default 500; smoke 300)")
    p.add_argument("--finetune-steps", type=_count(0, "a number of fine-tuning steps"), default=None,
                   help="fine-tuning steps at the longest length for none/linear/yarn (default 60; smoke 0 = off)")
    p.add_argument("--encodings", default=None, help=f"comma-separated subset of {','.join(POSITION_ENCODINGS)}")
    p.add_argument("--schemes", default=None, help=f"comma-separated subset of {','.join(SCHEMES)}")
    p.add_argument("--dynamic-factor", type=_factor, default=2.0, help="factor of dynamic NTK, >= 1 (default 2)")
    p.add_argument("--eval-spans", type=_count(1, "a number of held-out spans"), default=None,
                   help="held-out spans of 8x the context, >= 1 (default 32; smoke 16)")
    p.add_argument("--threads", type=_count(1, "a number of threads"), default=2,
                   help="torch threads in total (at most 2 are used)")
    p.add_argument("--jobs", type=_count(1, "a number of processes"), default=1,
                   help="processes running seeds in parallel (threads are split "
                   "between them; 2 jobs x 1 thread is faster than 1 x 2 on a busy machine)")
    p.add_argument("--corpus-root", default=None, help="directory of .py files (default: this Python's stdlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    p.add_argument("--merge", nargs="+", metavar="DIR", default=None, help="no training: merge result directories "
                   "into --out (rows of later ones replace the same encoding/scheme of earlier ones) and redraw")
    return p


def run(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m ropekit.experiment`` / ``ropekit experiment``.

    Args:
        argv: command-line arguments (without the program name); ``None`` reads ``sys.argv``.

    Returns:
        0 on success (the process exit code).
    """
    from .corpus import load_corpus
    from .report import write_report
    from .study import run_study

    args = build_parser().parse_args(argv)
    if args.merge:
        from .corpus import unigram_bits_per_byte
        from .report import merge_dirs

        corpus = load_corpus(args.corpus_root)
        res, command = merge_dirs(args.merge, corpus.describe(), unigram_bits_per_byte(corpus.train, corpus.heldout))
        out = args.out or args.merge[0]
        paths = write_report(res, out, command=command)
        if not args.quiet:
            print(f"merged {len(args.merge)} directories into {out}/: {paths[0]}")
        return 0
    if args.smoke:
        cfg = smoke_config(steps=300 if args.steps is None else args.steps, seeds=range(1 if args.seeds is None else args.seeds))
    else:
        cfg = full_config(steps=500 if args.steps is None else args.steps, seeds=range(2 if args.seeds is None else args.seeds))
    changes = {"dynamic_factor": args.dynamic_factor, "threads": args.threads}
    if args.finetune_steps is not None:
        changes["finetune_steps"] = args.finetune_steps
    if args.encodings:
        changes["encodings"] = tuple(s.strip() for s in args.encodings.split(",") if s.strip())
    if args.schemes is not None:  # "" = no extrapolation table
        changes["schemes"] = tuple(s.strip() for s in args.schemes.split(",") if s.strip())
    if args.eval_spans is not None:
        changes["eval_spans"] = args.eval_spans
    cfg = dataclasses.replace(cfg, **changes)
    out = args.out or os.path.join("experiments", "smoke" if args.smoke else "full")
    if args.jobs > 1 and len(cfg.seeds) > 1:
        from .study import run_study_parallel

        res = run_study_parallel(args.corpus_root, cfg, min(args.jobs, len(cfg.seeds)), quiet=args.quiet)
    else:
        res = run_study(load_corpus(args.corpus_root), cfg, quiet=args.quiet)
    command = "python -m ropekit.experiment " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    paths = write_report(res, out, command=command.strip())
    if not args.quiet:
        print(f"wrote {len(paths)} files to {out}/ ({res.seconds:.0f} s): {paths[0]}")
    return 0
