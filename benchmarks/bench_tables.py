"""Benchmark: building cos/sin tables on CPU — ropekit's deterministic ``cos_sin`` operator
against ``torch.cos`` + ``torch.sin`` of the same float64 angles (what the tables used before,
whose vector math path is not reproducible between processes) and the C library one value at
a time (Python's ``math``, the accuracy reference; small sizes only).

Also the whole ``ropekit.cos_sin(cfg, positions)`` call (angles, trigonometry, rounding to
float32) at the same sizes. Variants take turns within every round (``_env.round_robin``);
medians. Rows are appended to ``benchmarks/results/tables.csv`` (run, device, CPU, level,
threads, torch, git revision, positions, values, variant, median_us, ratio_to_torch).

Run: ``python benchmarks/bench_tables.py`` (``--positions 8,4096,131072``, ``--threads 1``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _env import append_rows, cpu_level, cpu_model, git_rev, round_robin, stats, version  # noqa: E402

CSV_PATH = ROOT / "results" / "tables.csv"
FIELDS = ["run", "device", "cpu", "level", "threads", "torch", "git_rev", "positions", "values", "variant",
          "median_us", "ratio_to_torch"]


def run(positions: List[int], threads: int, csv_path: Path = CSV_PATH, rounds: int = 9) -> List[dict]:
    import torch

    import ropekit
    from ropekit.tables import cos_sin_f64

    if not ropekit.ops.LOADED:
        raise SystemExit(f"the compiled operators are not built ({ropekit.ops.REASON})")
    torch.set_num_threads(threads)
    cfg = ropekit.RopeConfig(128, base=500000.0)
    run_id = _dt.datetime.now().isoformat(timespec="seconds")
    rows = []
    for n in positions:
        pos = torch.arange(n)
        ang = pos.double()[:, None] * cfg.inv_freq()  # [n, 64] float64
        fns = {
            "torch.cos + torch.sin": lambda: (torch.cos(ang), torch.sin(ang)),
            "ropekit cos_sin op": lambda: cos_sin_f64(ang),
            "ropekit.cos_sin (whole call)": lambda: ropekit.cos_sin(cfg, pos),
        }
        if ang.numel() <= 1 << 16:
            flat = ang.reshape(-1).tolist()
            fns["math.cos + math.sin (per value)"] = lambda: ([math.cos(a) for a in flat], [math.sin(a) for a in flat])
        inner = max(1, min(200, (1 << 18) // ang.numel()))
        times = round_robin(fns, rounds=rounds, inner=inner, num_threads=threads)
        base = stats(times["torch.cos + torch.sin"])[0]
        for name, ts in times.items():
            med = stats(ts)[0]
            rows.append({"run": run_id, "device": "cpu", "cpu": cpu_model(), "level": cpu_level(), "threads": threads,
                         "torch": version("torch"), "git_rev": git_rev("bench_tables.py"), "positions": n,
                         "values": ang.numel(), "variant": name, "median_us": f"{med * 1e6:.1f}",
                         "ratio_to_torch": f"{med / base:.2f}"})
    append_rows(rows, csv_path, FIELDS)
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", default="8,4096,131072", help="table lengths, comma-separated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--csv", default=str(CSV_PATH))
    a = ap.parse_args(argv)
    rows = run([int(p) for p in a.positions.split(",")], a.threads, Path(a.csv), a.rounds)
    print(f"{rows[0]['cpu']}, level {rows[0]['level']}, {a.threads} thread(s), torch {rows[0]['torch']}")
    print("| positions | values | variant | µs | ratio to torch.cos + torch.sin |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['positions']} | {r['values']} | {r['variant']} | {r['median_us']} | {r['ratio_to_torch']} |")
    print(f"appended {len(rows)} rows to {a.csv}")


if __name__ == "__main__":
    main()
