"""Benchmark: ``RotaryEmbedding(..., seq_lens=[b])`` (one scaling profile per sequence, one
gather call over stacked tables) against the module's single-profile call (``seq_len=``), at
decode (b=8, s=1, hq=32, hk=8) with Phi-3.5-mini's LongRoPE config, bf16, in place.

The 8 planned lengths span LongRoPE's switch (2 profiles: short and long factors). Timed
round-robin in one run (``_env.round_robin``: torch.utils.benchmark.Timer); rows appended to
``benchmarks/results/module_profiles.csv`` (device, level, threads, versions, shape, median).

Run: ``python benchmarks/bench_module_profiles.py [--threads 1] [--rounds 30]``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import torch

import ropekit

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _env import append_rows, cpu_level, cpu_model, git_rev, round_robin, stats  # noqa: E402

CSV_PATH = ROOT / "results" / "module_profiles.csv"
FIELDS = ["run", "device", "cpu", "level", "threads", "torch", "git_rev", "variant", "shape", "dtype", "median_us",
          "p20_us", "p80_us", "ratio"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--inner", type=int, default=100)
    ap.add_argument("--csv", type=Path, default=CSV_PATH)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg_file = ROOT.parent / "tests" / "data" / "phi-3.5-mini-instruct.json"
    cfg = ropekit.RopeConfig.from_hf(json.loads(cfg_file.read_text()))
    rope = ropekit.RotaryEmbedding(cfg, max_position=8192)
    b, hq, hk, d = 8, 32, 8, cfg.head_dim
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, 1, hq, d, generator=g).to(torch.bfloat16)
    k = torch.randn(b, 1, hk, d, generator=g).to(torch.bfloat16)
    off = torch.tensor([100 + 37 * i for i in range(b)])
    lens = [1000, 9000, 200000, 500, 3000, 5000, 6000, 100]  # both sides of the 4096 switch
    fns = {
        "module, one profile (seq_len=4000)": lambda: rope(q, k, offsets=off, seq_len=4000, inplace=True),
        "module, per-sequence (seq_lens=[b], 2 profiles)": lambda: rope(q, k, offsets=off, seq_lens=lens, inplace=True),
    }
    for f in fns.values():
        f()
    ts = round_robin(fns, args.rounds, args.inner, args.threads)
    base = stats(ts[next(iter(fns))])[0]
    meta = dict(run=_dt.datetime.now().isoformat(timespec="seconds"), device="cpu", cpu=cpu_model(), level=cpu_level(),
                threads=args.threads, torch=torch.__version__, git_rev=git_rev("bench_module_profiles.py"))
    rows = []
    print(f"decode b={b} s=1 hq={hq} hk={hk} d={d} bfloat16, LongRoPE (phi-3.5-mini), {args.threads} thread(s)")
    for n, t in ts.items():
        med, p20, p80 = stats(t)
        rows.append(dict(meta, variant=n, shape=f"b={b} s=1 hq={hq} hk={hk} d={d}", dtype="bfloat16",
                         median_us=f"{med * 1e6:.2f}", p20_us=f"{p20 * 1e6:.2f}", p80_us=f"{p80 * 1e6:.2f}",
                         ratio=f"{med / base:.3f}"))
        print(f"  {n:50s} {med * 1e6:8.2f} µs  x{med / base:.2f}")
    append_rows(rows, args.csv, FIELDS)


if __name__ == "__main__":
    main()
