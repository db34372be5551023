"""Long hypothesis campaign: tests/test_fuzz.py with many random (non-derandomized) examples.

Usage::

    .venv/bin/python benchmarks/fuzz_long.py [--examples 5000] [--rounds 1] [-k eager]

Each round runs ``pytest tests/test_fuzz.py`` with ``ROPEKIT_FUZZ_EXAMPLES`` set, which
switches the tests to random seeds (a new part of the space every round). A failure prints
hypothesis' minimal falsifying example: pin it in tests/test_fuzz.py with ``@example`` and
record it in docs/reliability.md. One CSV row per round goes to stdout (round, examples,
seconds, exit code, torch version, git revision).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=5000, help="examples per test function")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("-k", default="", help="pytest -k selection (e.g. a backend name)")
    a = ap.parse_args()
    import torch

    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print("round,examples,seconds,exit_code,torch,git")
    worst = 0
    for i in range(a.rounds):
        env = dict(os.environ, ROPEKIT_FUZZ_EXAMPLES=str(a.examples))
        cmd = [sys.executable, "-m", "pytest", "tests/test_fuzz.py", "-q", "-x", "-p", "no:cacheprovider",
               "--hypothesis-show-statistics"] + (["-k", a.k] if a.k else [])
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        print(f"{i},{a.examples},{time.perf_counter() - t0:.1f},{rc},{torch.__version__},{rev}", flush=True)
        worst = max(worst, rc)
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
