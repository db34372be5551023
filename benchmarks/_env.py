"""Environment columns shared by the benchmark scripts' CSV rows (CPU model, versions, git revision)."""

from __future__ import annotations

import csv
import platform
import subprocess
from pathlib import Path
from typing import List, Optional, Sequence

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


def version(mod: str) -> str:
    """``mod.__version__``, or ``"-"`` when it is not importable."""
    try:
        return __import__(mod).__version__
    except Exception:
        return "-"


def git_rev(script: str) -> str:
    """Short HEAD revision, ``+dirty`` when ``src/`` or this ``script`` (under benchmarks/) has changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src", f"benchmarks/{script}"],
            cwd=ROOT.parent, capture_output=True, text=True,
        )  # fmt: skip
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "-"


def append_rows(rows: List[dict], path: Path, fields: Sequence[str]) -> None:
    """Append ``rows`` (dicts keyed by ``fields``) to the CSV at ``path``, with a header when it is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
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
