"""Benchmark: what one call costs at decode (b=8, s=1, hq=32, hk=8, d=128), by how it is made.

Timed round-robin in one run (one sample of each per round), median/p20/p80 in µs:

* ``aten mul_ pair`` — ``q.mul_(1.0); k.mul_(1.0)``: two aten in-place ops on the same
  tensors, the floor for any dispatcher op that touches q and k;
* ``torch.ops.ropekit.rotary_qk_`` — ropekit's C++ operator alone;
* ``ropekit.apply_rotary_qk(inplace=True)`` — the public function (resolve + op);
* ``RotaryEmbedding(q, k, offsets=[b], inplace=True)`` — the module (positions from the
  offsets, the cached table, the fused gather op);
* ``python custom_op (no-op)`` — a ``torch.library.custom_op`` in Python that returns at
  once: what the dispatch alone would cost if the op or its autograd lived in Python (the
  LibTorch stable ABI has no C++ autograd);
* the training step of ``bench_apply.py`` (``train_rows``): projection forward + backward,
  alone and with ropekit in place on its q/k views.

Rows are appended to ``benchmarks/results/dispatch.csv`` (device, CPU, threads, versions,
git revision, shape, dtype, variant, median/p20/p80 µs, ratio to the ``mul_`` pair).

Run: ``python benchmarks/bench_dispatch.py [--threads N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
from pathlib import Path

import torch

import ropekit
from ropekit import RopeConfig, RotaryEmbedding, apply_rotary_qk, cos_sin

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _env import append_rows, cpu_level, cpu_model, git_rev, round_robin, stats, version  # noqa: E402

CSV_PATH = ROOT / "results" / "dispatch.csv"
FIELDS = ["run", "device", "cpu", "level", "threads", "torch", "git_rev", "variant", "shape", "dtype", "median_us", "p20_us",
          "p80_us", "ratio_to_mul_pair"]


@torch.library.custom_op("ropekit_bench::noop_", mutates_args=("q", "k"))
def _noop(q: torch.Tensor, k: torch.Tensor) -> None:
    return None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--inner", type=int, default=200, help="calls per sample")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--csv", type=Path, default=CSV_PATH)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    b, hq, hk, d = 8, 32, 8, 128
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(b, 1, hq, d, generator=g).to(dtype), torch.randn(b, 1, hk, d, generator=g).to(dtype)
    off = torch.tensor([100 + 37 * i for i in range(b)])
    cfg = RopeConfig(d)
    cos, sin = cos_sin(cfg, off[:, None])  # [b, 1, r/2]
    c4, s4 = cos[:, :, None], sin[:, :, None]  # [b, 1, 1, r/2]
    rope = RotaryEmbedding(cfg, max_position=1024)
    rope(q.clone(), k.clone(), offsets=off)  # tables built
    fns = {
        "aten mul_ pair": lambda: (q.mul_(1.0), k.mul_(1.0)),
        "torch.ops.ropekit.rotary_qk_": lambda: torch.ops.ropekit.rotary_qk_(q, k, c4, s4, "half", False),
        "ropekit.apply_rotary_qk(inplace=True)": lambda: apply_rotary_qk(q, k, c4, s4, inplace=True),
        "RotaryEmbedding(offsets=[b], inplace=True)": lambda: rope(q, k, offsets=off, inplace=True),
        "python custom_op (no-op)": lambda: _noop(q, k),
    }
    for f in fns.values():
        for _ in range(20):
            f()
    ts = round_robin(fns, args.rounds, args.inner)
    meta = dict(run=_dt.datetime.now().isoformat(timespec="seconds"), device="cpu", cpu=cpu_model(), level=cpu_level(),
                threads=torch.get_num_threads(), torch=torch.__version__, git_rev=git_rev("bench_dispatch.py"))
    base = statistics.median(ts["aten mul_ pair"])
    rows = []
    print(f"per call at decode b={b} s=1 hq={hq} hk={hk} d={d} {args.dtype}, {torch.get_num_threads()} threads, "
          f"cpu level {ropekit.ops.capability()}")
    for n, t in ts.items():
        med, p20, p80 = stats(t)
        rows.append(dict(meta, variant=n, shape=f"b={b} s=1 hq={hq} hk={hk} d={d}", dtype=args.dtype,
                         median_us=f"{med * 1e6:.2f}", p20_us=f"{p20 * 1e6:.2f}", p80_us=f"{p80 * 1e6:.2f}",
                         ratio_to_mul_pair=f"{med / base:.2f}"))
        print(f"  {n:46s} {med * 1e6:8.2f} µs  (p20 {p20 * 1e6:.2f}, p80 {p80 * 1e6:.2f})  x{med / base:.2f} of the mul_ pair")
    from bench_apply import train_rows

    tmeta = dict(run=meta["run"], device="cpu", cpu=meta["cpu"], level=meta["level"], threads=meta["threads"], torch=meta["torch"],
                 triton=version("triton"), transformers=version("transformers"), git_rev=meta["git_rev"])
    for r in train_rows(tmeta, b, 1, hq, hk, d, args.dtype, args.rounds):
        rows.append(dict(meta, variant=r["variant"], shape=r["shape"], dtype=args.dtype, median_us=r["median_us"],
                         p20_us=r["p20_us"], p80_us=r["p80_us"],
                         ratio_to_mul_pair=f"{float(r['median_us']) / 1e6 / base:.2f}"))
    append_rows(rows, args.csv, FIELDS)
    print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
