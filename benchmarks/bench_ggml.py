"""Benchmark: ggml's ROPE op (llama.cpp's CPU backend) against ropekit at the same shapes, in one run.

ggml is timed by its own harness, ``test-backend-ops perf -o ROPE -b CPU`` (from
https://github.com/ggml-org/ggml or llama.cpp, built with ``GGML_NATIVE=ON``); its perf cases
include, with contiguous input and no frequency factors (``ff=0,v=0``):

* ``ne_a=[128,32,512,1], n_dims=128, mode=0`` (llama 7B, normal = pairs (2i, 2i+1))
  = ropekit ``[512 tokens, 32 heads, 128]`` with ``layout="interleaved"``;
* ``ne_a=[64,8,512,1], n_dims=64, mode=2`` (falcon 40B, NEOX = halves)
  = ropekit ``[512, 8, 64]`` with ``layout="half"``
  (there is no NEOX case at ``[128,32,512]``; this is the only full-width NEOX one),

each in f32 and f16, out of place (``inplace=0``). Its number is the mean µs per op over at
least 1 s of graph computes whose graph repeats the same node (same input, same output
buffer: hot, like ropekit's ``out=``), positions random in ``[0, 512)``.

ropekit is timed at the same shapes and thread count (``round_robin`` from ``_env``): out of
place fresh (``torch.ops.ropekit.rotary``), ``out=`` (``rotary_out`` into a preallocated
tensor) and in place (``rotary_``), tables from ``ropekit.cos_sin`` (float32, the default,
also for float16 x) viewed ``[512, 1, d/2]``. ggml runs and ropekit timings alternate
(``--rounds`` rounds: ggml, ropekit, ggml, ropekit, ...); medians over the rounds.

Threads: ``test-backend-ops`` has no thread option: it gives the CPU backend
``std::thread::hardware_concurrency()`` threads (ignores ``taskset``). In an OpenMP build
(ggml's default where OpenMP is found) ``OMP_THREAD_LIMIT=N`` caps that team, so ggml runs
with ``min(N, hardware_concurrency)`` threads and ropekit with ``torch.set_num_threads(N)``.
Without OpenMP the cap does nothing: ggml then uses all hardware threads.

Rows are appended to ``benchmarks/results/ggml.csv``; ``ratio_to_ggml`` is ggml's median µs
over the row's median µs (the speedup over ggml: > 1 means faster than ggml; 1.0 on ggml's
own row).

Run: ``python benchmarks/bench_ggml.py --ggml-bin /path/to/build/bin/test-backend-ops``
(or set ``GGML_TEST_BACKEND_OPS``); ``--threads 1,2``, ``--rounds 5``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

import ropekit
import ropekit.ops  # noqa: F401  (registers torch.ops.ropekit)

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _env import append_rows, cpu_level, cpu_model, git_rev, round_robin, version  # noqa: E402

CSV_PATH = ROOT / "results" / "ggml.csv"
FIELDS = [
    "run", "device", "cpu", "level", "threads", "torch", "git_rev", "impl", "shape", "dtype", "mode",
    "median_us", "ratio_to_ggml", "ggml_rev",
]
# ggml ne [d, heads, tokens, 1] + mode  ->  ropekit [tokens, heads, d] + layout
CASES = [
    ((128, 32, 512), 0, "interleaved"),
    ((64, 8, 512), 2, "half"),
]
GGML_TYPES = {"f32": torch.float32, "f16": torch.float16}
ROW_RE = re.compile(r"ROPE\((?P<params>[^)]*)\):\s+(?P<runs>\d+) runs -\s+(?P<us>[\d.]+) us/run")

BUILD_HELP = """\
ggml's test-backend-ops not found (--ggml-bin or GGML_TEST_BACKEND_OPS). Build it with:
  git clone https://github.com/ggml-org/ggml /tmp/ggml
  cmake -S /tmp/ggml -B /tmp/ggml/build -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release -DGGML_BUILD_TESTS=ON
  cmake --build /tmp/ggml/build -j2 --target test-backend-ops
then: python benchmarks/bench_ggml.py --ggml-bin /tmp/ggml/build/bin/test-backend-ops"""


def ggml_filter() -> str:
    """``-p`` regex selecting exactly the cases of CASES, both types, ff=0, v=0."""
    alts = "|".join(
        rf"ne_a=\[{d},{h},{t},1\],n_dims={d},mode={m},"
        for (d, h, t), m, _ in CASES
    )  # fmt: skip
    return rf"type=(f32|f16),({alts}).*ff=0,v=0,inplace=0"


def run_ggml(binary: str, threads: int) -> Dict[Tuple[Tuple[int, int, int], int, str], float]:
    """One ``test-backend-ops perf -o ROPE -b CPU`` run: {(ne, mode, type): µs/run}."""
    env = dict(os.environ, OMP_THREAD_LIMIT=str(threads))
    cmd = [binary, "perf", "-o", "ROPE", "-b", "CPU", "-p", ggml_filter()]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    out: Dict[Tuple[Tuple[int, int, int], int, str], float] = {}
    for m in ROW_RE.finditer(p.stdout):
        kv = dict(re.findall(r"(\w+)=(\[[^\]]*\]|[^,]+)", m.group("params")))
        ne = tuple(int(x) for x in kv["ne_a"].strip("[]").split(","))[:3]
        out[(ne, int(kv["mode"]), kv["type"])] = float(m.group("us"))
    return out


def ropekit_fns(ne: Tuple[int, int, int], layout: str, dtype: torch.dtype):
    d, h, t = ne
    c, s = ropekit.cos_sin(ropekit.RopeConfig(d, layout=layout), torch.arange(t))
    c4, s4 = c.view(t, 1, d // 2), s.view(t, 1, d // 2)
    q = torch.randn(t, h, d).to(dtype)
    qi = q.clone()
    o = torch.empty_like(q)
    R = torch.ops.ropekit
    return {
        "ropekit fresh": lambda: R.rotary(q, c4, s4, layout, False),
        "ropekit out=": lambda: R.rotary_out(q, c4, s4, layout, False, out=o),
        "ropekit in place": lambda: R.rotary_(qi, c4, s4, layout, False),
    }


def ggml_rev(binary: str, given: Optional[str]) -> str:
    if given:
        return given
    src = Path(binary).resolve().parents[2]  # <src>/build/bin/test-backend-ops
    r = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "-"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ggml-bin", default=os.environ.get("GGML_TEST_BACKEND_OPS"))
    ap.add_argument("--ggml-rev", default=None, help="ggml commit (default: git rev of the binary's source tree)")
    ap.add_argument("--threads", default="1", help="comma-separated thread counts (default 1)")
    ap.add_argument("--rounds", type=int, default=5, help="ggml runs alternating with ropekit timings (>= 3)")
    ap.add_argument("--inner", type=int, default=100, help="ropekit calls per sample")
    ap.add_argument("--no-csv", action="store_true")
    a = ap.parse_args(argv)
    binary = a.ggml_bin and (shutil.which(a.ggml_bin) or a.ggml_bin)
    if not binary or not os.access(binary, os.X_OK):
        print(BUILD_HELP)
        return 0
    rev = ggml_rev(binary, a.ggml_rev)
    hwc = os.cpu_count() or 1
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    env_cols = dict(
        run=run_id, device="cpu", cpu=cpu_model(), level=cpu_level(), torch=torch.__version__,
        git_rev=git_rev("bench_ggml.py"), ggml_rev=rev,
    )  # fmt: skip
    print(f"ggml {rev} ({binary}); ropekit {version('ropekit')} level {env_cols['level']}; {env_cols['cpu']}")
    rows = []
    for nt in [int(x) for x in a.threads.split(",")]:
        ggml_nt = min(nt, hwc)
        torch.set_num_threads(nt)
        fns = {(ne, m, ty): ropekit_fns(ne, lay, GGML_TYPES[ty]) for ne, m, lay in CASES for ty in GGML_TYPES}
        gs: Dict[tuple, List[float]] = {k: [] for k in fns}
        rs: Dict[tuple, Dict[str, List[float]]] = {k: {v: [] for v in f} for k, f in fns.items()}
        for r in range(max(a.rounds, 3)):
            g = run_ggml(binary, nt)
            for k in fns:
                if k in g:
                    gs[k].append(g[k])
            for k, f in fns.items():
                for v, ts in round_robin(f, rounds=1, inner=a.inner, num_threads=nt).items():
                    rs[k][v].extend(t * 1e6 for t in ts)
            print(f"  threads {nt} round {r + 1}: ggml " + ", ".join(f"{k[2]} {k[0]} m{k[1]} {u:.0f}" for k, u in g.items()))
        print(f"\nthreads: ropekit {nt}, ggml {ggml_nt} (OMP_THREAD_LIMIT={nt}, hardware_concurrency {hwc})")
        print(f"{'shape (ggml ne)':>18} {'dtype':>5} {'mode':>5} {'impl':>17} {'median_us':>10} {'x vs ggml':>9}")
        for (ne, m, ty), f in fns.items():
            d, h, t = ne
            shape = f"{t}x{h}x{d}"
            g_us = statistics.median(gs[(ne, m, ty)]) if gs[(ne, m, ty)] else float("nan")
            res = [("ggml", g_us)] + [(v, statistics.median(ts)) for v, ts in rs[(ne, m, ty)].items()]
            for impl, us in res:
                ratio = g_us / us if us == us and g_us == g_us else float("nan")
                mode = f"{m} ({'normal/interleaved' if m == 0 else 'neox/half'})"
                print(f"{str(list(ne)):>18} {ty:>5} {m:>5} {impl:>17} {us:10.1f} {ratio:9.2f}")
                rows.append(dict(
                    env_cols, threads=nt if impl != "ggml" else ggml_nt, impl=impl, shape=shape, dtype=ty, mode=mode,
                    median_us=f"{us:.2f}", ratio_to_ggml=f"{ratio:.3f}",
                ))  # fmt: skip
    if not a.no_csv:
        append_rows(rows, CSV_PATH, FIELDS)
        print(f"\n{len(rows)} rows -> {CSV_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
