"""Backward against forward of the ``cpu`` backend, timed round-robin in one loop (the
performance target "backward within 1.1x of forward", ``docs/performance.md``).

``bench_apply.py`` times its forward and backward modes one after the other, minutes apart;
on a shared VM the machine's speed drifts between them by more than the 10% this target is
about. Here each round times, back to back, on the same inputs:

* ``forward``: ``apply_rotary_qk(q, k, cos, sin, backend="cpu")`` (out of place: fresh
  outputs, like the gradients the backward returns);
* ``backward``: ``torch.autograd.grad`` of those outputs for a random upstream gradient (the
  same R(-θ) kernel, gradients written to fresh tensors);
* ``module forward`` / ``module backward``: the same through ``RotaryEmbedding`` (the fused
  gather);
* ``copy_`` of the same bytes, as the scale.

Rows (one per variant; ``ratio_to_forward`` = median / median of the matching forward) are
appended to ``benchmarks/results/backward.csv``.

    python benchmarks/bench_backward.py [--threads 1] [--rounds 15] [--cases 1x2048,4x2048,8x1]
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import append_rows, cpu_model, git_rev, version  # noqa: E402
from _env import round_robin as _round_robin, stats as _stats  # noqa: E402

from ropekit import RopeConfig, RotaryEmbedding, apply_rotary_qk, cos_sin  # noqa: E402

CSV_PATH = Path(__file__).resolve().parent / "results" / "backward.csv"
FIELDS = ["run", "device", "cpu", "threads", "torch", "git_rev", "b", "s", "hq", "hk", "d", "dtype", "variant",
          "median_us", "p20_us", "p80_us", "ratio_to_forward"]


def case(b, s, dtype, rounds):
    hq, hk, d = 32, 8, 128
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, s, hq, d, generator=g).to(dtype)
    k = torch.randn(b, s, hk, d, generator=g).to(dtype)
    pos = torch.tensor([100 + 37 * i for i in range(b)])[:, None] if s == 1 else torch.arange(s)[None].expand(b, s)
    cos, sin = cos_sin(RopeConfig(d), pos)  # [b, s, r/2]
    c4, s4 = cos[:, :, None], sin[:, :, None]
    rope = RotaryEmbedding(RopeConfig(d), backend="cpu", max_position=int(pos.max()) + 1)
    kw = {"offsets": pos[:, 0]} if s == 1 else {}
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    outs = apply_rotary_qk(qg, kg, c4, s4, backend="cpu")
    mouts = rope(qg, kg, **kw)
    qd, kd = torch.empty_like(q), torch.empty_like(k)
    fns = {
        "copy_": lambda: (qd.copy_(q), kd.copy_(k)),
        "forward": lambda: apply_rotary_qk(q, k, c4, s4, backend="cpu"),
        "backward": lambda: torch.autograd.grad(outs, (qg, kg), (gq, gk), retain_graph=True),
        "module forward": lambda: rope(q, k, **kw),
        "module backward": lambda: torch.autograd.grad(mouts, (qg, kg), (gq, gk), retain_graph=True),
    }
    inner = 200 if s == 1 else 1
    for f in fns.values():
        for _ in range(3):
            f()
    return dict(b=b, s=s, hq=hq, hk=hk, d=d), _round_robin(fns, rounds, inner)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--cases", default="1x2048,4x2048,8x1", help="b x s, comma-separated")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--csv", type=Path, default=CSV_PATH)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = dict(run=datetime.datetime.now().isoformat(timespec="seconds"), device="cpu", cpu=cpu_model(),
                threads=torch.get_num_threads(), torch=version("torch"), git_rev=git_rev("bench_backward.py"))
    rows = []
    for dt in args.dtypes.split(","):
        for c in args.cases.split(","):
            b, s = (int(v) for v in c.split("x"))
            shape, times = case(b, s, getattr(torch, dt), args.rounds)
            stats = {n: _stats(v) for n, v in times.items()}  # median, p20, p80
            med = {n: st[0] for n, st in stats.items()}
            for n, (m, p20, p80) in stats.items():
                fwd = med["module forward" if n.startswith("module") else "forward"]
                ratio = m / fwd if "forward" in n or "backward" in n else float("nan")
                rows.append(dict(meta, **shape, dtype=dt, variant=n, median_us=f"{m * 1e6:.2f}",
                                 p20_us=f"{p20 * 1e6:.2f}", p80_us=f"{p80 * 1e6:.2f}", ratio_to_forward=f"{ratio:.3f}"))
                print(f"  {dt:8s} b={b} s={s:<5d} {n:16s} {med[n] * 1e6:10.1f} µs  x{ratio:.2f} of forward", flush=True)
    append_rows(rows, args.csv, FIELDS)
    print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
