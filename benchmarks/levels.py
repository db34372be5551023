"""Every instruction-set level of the compiled CPU operators, one table.

Runs this script's measurement in a fresh process per level this CPU supports
(``ROPEKIT_CPU_CAPABILITY`` forces it: default, avx2, avx512, avx512bf16), and prints one markdown table:
level x dtype x op, µs and the ratio to ``copy_`` of the same bytes. Each value is the median
over rounds in which all the ops take turns (``_env.round_robin``: every sample a
``torch.utils.benchmark.Timer.timeit``; 15 rounds of 40 calls at ``l2``, 15 of 5 at ``cache``,
7 of 1 at ``prefill``), so ``copy_`` is measured in the same rounds as the ops. Rows are
appended to ``benchmarks/results/levels.csv`` (run, level, device, CPU, threads, versions, git
revision, shape, dtype, op, median_us, ratio_to_copy).

Ops: rotary in place (q only), ``out=``, fresh output; the position gather (``rotary_gather_``,
q and k in place); fused qk-norm + RoPE in place (forward) and its backward; ``copy_`` of q (and of
q and k for the q+k ops) is the reference; ``clone()`` of q (allocation + copy) is measured
too. Shapes: ``cache`` = q [512, 32, 128] (k [512, 8,
128]): 8 MiB in float32, 4 MiB in 16 bits, beyond a 2 MiB L2, so on such a CPU it is
L3-resident; ``l2`` = q [64, 32, 128] (k [64, 8, 128]): 1 MiB / 512 KiB, resident in a 2 MiB
L2 (not run by default); ``prefill`` = b=4, s=2048, q 32 heads, k 8, d=128 (DRAM).

Run: ``python benchmarks/levels.py`` (all levels, both shapes, float32/bfloat16/float16;
``--layouts half,interleaved`` adds the interleaved layout's ops);
``--shapes l2,cache`` for the cache-resident shapes only; ``--levels avx2,avx512``; ``--threads 2``
(default 1: the ``threads`` column is the count the measurement ran with); ``--repeat 3`` runs
three processes per level, alternating the order of the levels, and prints the medians (where
one process's ``copy_`` swings, as on a VM sharing its L3).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _env import append_rows, cpu_model, git_rev, round_robin, version  # noqa: E402

CSV_PATH = ROOT / "results" / "levels.csv"
FIELDS = ["run", "level", "device", "cpu", "threads", "torch", "git_rev", "shape", "dtype", "op", "median_us",
          "ratio_to_copy"]


def measure(shapes, layouts=("half",)):
    """Rows of one process (the level it runs at), as dicts."""
    import torch

    import ropekit.ops  # noqa: F401  (registers torch.ops.ropekit)
    from ropekit import RopeConfig, cos_sin

    R = torch.ops.ropekit
    rows = []
    dims = {"l2": (1, 64), "cache": (1, 512), "prefill": (4, 2048)}
    for shape in shapes:
        b, s = dims[shape]
        c, sn = cos_sin(RopeConfig(128), torch.arange(s))  # [s, 64] float32
        c4, s4 = c[:, None], sn[:, None]  # [s, 1, 64]
        pos = torch.arange(s).expand(b, s).contiguous()
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            g = torch.Generator().manual_seed(0)
            q = torch.randn(b, s, 32, 128, generator=g).to(dt).squeeze(0)
            k = torch.randn(b, s, 8, 128, generator=g).to(dt).squeeze(0)
            qo, ko = torch.empty_like(q), torch.empty_like(k)
            w = torch.ones(128)
            gq, gk = torch.randn(q.shape, generator=g).to(dt), torch.randn(k.shape, generator=g).to(dt)
            fwd = R.qk_norm_rotary_fwd(q, k, w, w, c4, s4, 1e-6, 0.0, "half")
            rq, rk = fwd[2], fwd[3]
            qb, kb = (q, k) if q.dim() == 4 else (q[None], k[None])
            fns = {
                "copy_ q": lambda: qo.copy_(q),
                "copy_ q+k": lambda: (qo.copy_(q), ko.copy_(k)),
                "clone q": lambda: q.clone(),  # copy_ + allocation: what out-of-place is held to
            }
            for lay in layouts:
                sfx = "" if lay == "half" else f" ({lay})"
                fns.update({
                    "rotary in place" + sfx: lambda lay=lay: R.rotary_(q, c4, s4, lay, False),
                    "rotary out=" + sfx: lambda lay=lay: R.rotary_out(q, c4, s4, lay, False, out=qo),
                    "rotary fresh" + sfx: lambda lay=lay: R.rotary(q, c4, s4, lay, False),
                    "gather q+k in place" + sfx: lambda lay=lay: R.rotary_gather_(qb, kb, c, sn, pos, "bshd", lay, False),
                    # unit weights: applied again on every call, the data stays normal (no subnormals)
                    "qk-norm fwd in place" + sfx: lambda lay=lay: R.qk_norm_rotary_(q, k, w, w, c4, s4, 1e-6, 0.0, lay),
                    "qk-norm bwd" + sfx: lambda lay=lay: R.qk_norm_rotary_bwd(gq, gk, q, k, w, w, rq, rk, c4, s4, 0.0, lay),
                })
            # the ops take turns (round-robin): on a shared machine a burst of load then hits
            # every op of a round alike, and the medians stay comparable
            rounds, inner = {"l2": (15, 40), "cache": (15, 5), "prefill": (7, 1)}[shape]
            t = {op: statistics.median(ts) * 1e6 for op, ts in round_robin(fns, rounds, inner).items()}
            for op, us in t.items():
                ref = t["copy_ q+k"] if ("q+k" in op or "qk-norm" in op) else t["copy_ q"]
                rows.append({"shape": shape, "dtype": str(dt).replace("torch.", ""), "op": op, "median_us": round(us, 1),
                             "ratio_to_copy": round(us / ref, 2)})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="cache,prefill")
    ap.add_argument("--levels", default=None, help="comma-separated; default: every level this CPU supports")
    ap.add_argument("--layouts", default="half", help="comma-separated: half, interleaved (ops of a layout other "
                    "than half are named with it, e.g. 'rotary in place (interleaved)')")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in the measurements (default 1: steadier on a shared machine)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="processes per level, the levels' order reversed every other time; the table shows the "
                         "medians of their µs and ratios (every process's rows go to the CSV)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    shapes = a.shapes.split(",")
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps(measure(shapes, a.layouts.split(","))))
        return
    import torch

    from ropekit import ops

    levels = a.levels.split(",") if a.levels else ops.levels()
    run = _dt.datetime.now().isoformat(timespec="seconds")
    env_cols = {"run": run, "device": "cpu", "cpu": cpu_model(), "threads": a.threads,
                "torch": version("torch"), "git_rev": git_rev("levels.py")}
    samples = {}  # (shape, dtype, op) -> level -> [(µs, ratio) per process]
    for rep in range(max(1, a.repeat)):
        for lv in (levels if rep % 2 == 0 else levels[::-1]):
            env = dict(os.environ, ROPEKIT_CPU_CAPABILITY=lv)
            cmd = [sys.executable, __file__, "--child", "--shapes", a.shapes, "--threads", str(a.threads),
                   "--layouts", a.layouts]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            rows = json.loads(out.stdout.strip().splitlines()[-1])
            append_rows([dict(env_cols, level=lv, **r) for r in rows], CSV_PATH, FIELDS)
            for r in rows:
                samples.setdefault((r["shape"], r["dtype"], r["op"]), {}).setdefault(lv, []).append(
                    (r["median_us"], r["ratio_to_copy"]))
    table = {key: {lv: (statistics.median(u for u, _ in v), statistics.median(q for _, q in v)) for lv, v in per.items()}
             for key, per in samples.items()}
    reps = f", median of {a.repeat} processes per level" if a.repeat > 1 else ""
    print(f"{env_cols['cpu']}, {env_cols['threads']} threads, torch {env_cols['torch']}, {env_cols['git_rev']}{reps}; "
          "µs (ratio to copy_ of the same bytes, same process)\n")
    print("| shape | dtype | op | " + " | ".join(levels) + " |")
    print("|---|---|---|" + "---|" * len(levels))
    for (shape, dtype, op), v in table.items():
        cells = [f"{v[lv][0]:.0f} ({v[lv][1]:.2f})" if lv in v else "-" for lv in levels]
        print(f"| {shape} | {dtype} | {op} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
