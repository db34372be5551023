"""Shared by the CPU benchmark scripts: the one timing harness (``round_robin``, ``timeit_us``,
both on ``torch.utils.benchmark.Timer``), and the environment columns of their CSV rows (CPU
model, instruction-set level, versions, git revision)."""

from __future__ import annotations

import csv
import platform
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent  # benchmarks/


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_level() -> str:
    """The instruction-set level the compiled CPU operators run at (``default``, ``avx2``,
    ``avx512``, ``avx512bf16``; ``ROPEKIT_CPU_CAPABILITY`` forces a lower one), ``"-"`` without the extension."""
    try:
        from ropekit import ops

        return ops.capability()
    except Exception:
        return "-"


def round_robin(fns: Dict[str, Callable[[], object]], rounds: int, inner: int,
                num_threads: Optional[int] = None) -> Dict[str, List[float]]:
    """Per variant, ``rounds`` samples of the mean seconds per call over ``inner`` calls.

    Each sample is ``torch.utils.benchmark.Timer(...).timeit(inner)`` (which first runs
    ``max(inner // 100, 2)`` warm-up calls of the same variant); the variants take turns within
    every round, so that on a shared, noisy machine they all see the same conditions and their
    medians compare. ``num_threads``: torch threads during the timing (default: the current
    setting; ``Timer``'s own default would be 1).
    """
    import torch
    from torch.utils import benchmark

    nt = num_threads or torch.get_num_threads()
    timers = {k: benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=nt) for k, fn in fns.items()}
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, t in timers.items():
            times[k].append(t.timeit(inner).mean)
    return times


def stats(ts: List[float]) -> Tuple[float, float, float]:
    """median, p20, p80 of the samples."""
    import statistics

    q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else [ts[0]] * 9
    return statistics.median(ts), q[1], q[7]


def timeit_us(fn: Callable[[], object], min_run_time: float = 0.3, num_threads: Optional[int] = None) -> float:
    """Median µs per call of ``fn`` (``torch.utils.benchmark.Timer.blocked_autorange``)."""
    import torch
    from torch.utils import benchmark

    fn()
    nt = num_threads or torch.get_num_threads()
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=nt).blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e6


def version(mod: str) -> str:
    """``mod.__version__``, or ``"-"`` when it is not importable."""
    try:
        return __import__(mod).__version__
    except Exception:
        return "-"


def git_rev(script: str) -> str:
    """Short HEAD revision, ``+dirty`` when ``src/``, ``csrc/`` or this ``script`` (under benchmarks/) has changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src", "csrc", f"benchmarks/{script}"],
            cwd=ROOT.parent, capture_output=True, text=True,
        )  # fmt: skip
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "-"


def append_rows(rows: List[dict], path: Path, fields: Sequence[str]) -> None:
    """Append ``rows`` (dicts keyed by ``fields``) to the CSV at ``path``, with a header when it is new.

    A file written with fewer columns (e.g. before the ``level`` column) is first rewritten
    with ``fields`` as its header, its rows keeping their values (empty in the new columns).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            r = csv.DictReader(f)
            old_fields, old_rows = r.fieldnames or [], list(r)
        if list(old_fields) != list(fields):
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(fields) + [k for k in old_fields if k not in fields])
                w.writeheader()
                w.writerows(old_rows)
            fields = w.fieldnames
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        if new:
            w.writeheader()
        w.writerows(rows)


def latest_rows(path: Path, run: Optional[str] = None) -> List[dict]:
    """Rows of one run (``run`` = its timestamp; default the last run in the file)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    last = run or rows[-1]["run"]
    return [r for r in rows if r["run"] == last]
