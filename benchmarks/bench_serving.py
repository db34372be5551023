"""Benchmark: the serving operations on CPU, each against what an engine does without them.

Timed round-robin in one run (one sample of each variant per round), median/p20/p80 in µs:

* ``cache write`` — RoPE of q and k plus the KV-cache write at decode (b = 8 and 64 tokens)
  and prefill (b = 1, s = 2048); hq = 32, hk = 8, d = 128, bf16, a paged NHD cache (blocks of
  16, slots scattered over the block pool):
  ``apply_rotary_cache`` (one op: k rotated straight into the cache, v copied) against
  ``rotary_gather_`` + ``index_copy_`` of k and v (the same rotation kernel, then two writes),
  and against ``apply_rotary_gather`` + ``cache[slots] = k`` / ``= v`` (index_put).
* ``profiles`` — per-sequence scaling profiles (3 stacked profiles, a profile index per
  sequence) against a single-profile call of the same gather op on the same shapes: the gather
  with positions already offset by ``profile * n`` (as an engine builds them), and
  ``apply_rotary_profiles`` with and without its host-side range checks.
* ``rerotate`` — ``rerotate_cache`` of 4096 keys in a paged bf16 cache against
  gather (``cache[slots]``) + ``ropekit.rerotate`` + scatter (``index_copy_``).

Rows are appended to ``benchmarks/results/serving.csv`` (device, CPU, threads, versions, git
revision, group, shape, dtype, variant, median/p20/p80 µs, ratio to the group's baseline).

Run: ``python benchmarks/bench_serving.py [--threads N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import time
from pathlib import Path

import torch

import ropekit
from ropekit import RopeConfig, cos_sin, serving
from ropekit.scaling import YaRN

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _env import append_rows, cpu_model, git_rev, version  # noqa: E402

CSV_PATH = ROOT / "results" / "serving.csv"
FIELDS = ["run", "device", "cpu", "threads", "torch", "ropekit_level", "git_rev", "group", "shape", "dtype", "variant",
          "median_us", "p20_us", "p80_us", "ratio_to_baseline"]


def _time(fns: dict, rounds: int, inner: int) -> dict:
    ts = {n: [] for n in fns}
    for f in fns.values():
        for _ in range(3):
            f()
    for _ in range(rounds):
        for n, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            ts[n].append((time.perf_counter() - t0) / inner)
    return ts


def _rows(meta, group, shape, dtype, ts, baseline):
    base = statistics.median(ts[baseline])
    rows = []
    print(f"{group}: {shape} {dtype}")
    for n, t in ts.items():
        t = sorted(t)
        med, p20, p80 = statistics.median(t), t[len(t) // 5], t[(4 * len(t)) // 5]
        rows.append(dict(meta, group=group, shape=shape, dtype=dtype, variant=n, median_us=f"{med * 1e6:.2f}",
                         p20_us=f"{p20 * 1e6:.2f}", p80_us=f"{p80 * 1e6:.2f}", ratio_to_baseline=f"{med / base:.3f}"))
        print(f"  {n:58s} {med * 1e6:10.2f} µs (p20 {p20 * 1e6:.2f}, p80 {p80 * 1e6:.2f})  x{med / base:.3f}")
    return rows


def cache_write(meta, b, s, rounds, dtype=torch.bfloat16):
    hq, hk, d, bs = 32, 8, 128, 16
    t = b * s
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(t, h, d, generator=g).to(dtype) for h in (hq, hk, hk))
    nblocks = max(64, 2 * t // bs)
    kc, vc = torch.zeros(nblocks, bs, hk, d, dtype=dtype), torch.zeros(nblocks, bs, hk, d, dtype=dtype)
    slots = torch.randperm(nblocks * bs, generator=g)[:t]  # scattered over the pool
    n = 4096
    pos = (torch.arange(t) % s + (torch.arange(t) // s) * 37 + 100) % n
    ct, st = cos_sin(RopeConfig(d), torch.arange(n))
    kf, vf = kc.view(-1, hk, d), vc.view(-1, hk, d)

    def unfused_op():
        torch.ops.ropekit.rotary_gather_(q, k, ct, st, pos, "thd", "half", False)
        kf.index_copy_(0, slots, k)
        vf.index_copy_(0, slots, v)

    def unfused_public():
        qr, kr = ropekit.apply_rotary_gather(q, k, ct, st, positions=pos, format="thd", inplace=True)
        kf[slots] = kr
        vf[slots] = v

    fns = {
        "rotary_gather_ + index_copy_ (k, v)": unfused_op,
        "apply_rotary_gather + cache[slots] = k, v": unfused_public,
        "torch.ops.ropekit.rotary_cache_": lambda: torch.ops.ropekit.rotary_cache_(q, k, ct, st, pos, kc, slots, v, vc),
        "ropekit.apply_rotary_cache": lambda: serving.apply_rotary_cache(q, k, ct, st, pos, kc, slots=slots, v=v,
                                                                         v_cache=vc),
    }
    inner = max(1, 2000 // t)
    ts = _time(fns, rounds, inner)
    return _rows(meta, "cache write", f"t={t} (b={b} s={s}) hq={hq} hk={hk} d={d} paged nhd bs={bs}", "bfloat16", ts,
                 "rotary_gather_ + index_copy_ (k, v)")


def profiles(meta, b, s, rounds, dtype=torch.bfloat16):
    hq, hk, d, n = 32, 8, 128, 4096
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(b, s, hq, d, generator=g).to(dtype), torch.randn(b, s, hk, d, generator=g).to(dtype)
    cfgs = [RopeConfig(d), RopeConfig(d, scaling=YaRN(4.0, 1024)), RopeConfig(d, scaling=YaRN(8.0, 1024))]
    cos, sin, _ = serving.profile_tables(cfgs, n)
    prof = torch.arange(b) % 3
    pos = (torch.arange(b)[:, None] * 97 + torch.arange(s)) % (n - s)
    ct, st = cos[0], sin[0]
    flat_c, flat_s = cos.reshape(-1, d // 2), sin.reshape(-1, d // 2)  # [P*n, r/2] views
    flat = serving.profile_positions(pos, prof, 3, n, s=s)  # what an engine folds into its positions
    fns = {
        "single profile: apply_rotary_gather": lambda: ropekit.apply_rotary_gather(q, k, ct, st, positions=pos,
                                                                                   inplace=True),
        "profiles: apply_rotary_gather, offset positions (P=3)": lambda: ropekit.apply_rotary_gather(
            q, k, flat_c, flat_s, positions=flat, inplace=True),
        "profiles: apply_rotary_profiles(check=False) (P=3)": lambda: serving.apply_rotary_profiles(
            q, k, cos, sin, prof, positions=pos, inplace=True, check=False),
        "profiles: apply_rotary_profiles (P=3, host range checks)": lambda: serving.apply_rotary_profiles(
            q, k, cos, sin, prof, positions=pos, inplace=True),
    }
    ts = _time(fns, rounds, max(1, 2000 // (b * s)))
    return _rows(meta, "profiles", f"b={b} s={s} hq={hq} hk={hk} d={d}", "bfloat16", ts,
                 "single profile: apply_rotary_gather")


def rerotate(meta, rounds, nkeys=4096, dtype=torch.bfloat16):
    hk, d, bs = 8, 128, 16
    g = torch.Generator().manual_seed(2)
    nblocks = 2 * nkeys // bs
    kc = torch.randn(nblocks, bs, hk, d, generator=g).to(dtype)
    slots = torch.randperm(nblocks * bs, generator=g)[:nkeys]
    old = torch.arange(nkeys) + 4
    new = torch.arange(nkeys)  # sink eviction: every key moves back by 4
    cfg = RopeConfig(d)
    kf = kc.view(-1, hk, d)

    def unfused():
        rows = kf[slots]  # gather
        ropekit.rerotate(rows, cfg, old, new, format="thd", inplace=True)
        kf.index_copy_(0, slots, rows)  # scatter

    fns = {
        "gather + ropekit.rerotate + index_copy_": unfused,
        "ropekit.rerotate_cache": lambda: serving.rerotate_cache(kc, slots, old, new, cfg),
    }
    ts = _time(fns, rounds, 1)
    return _rows(meta, "rerotate", f"{nkeys} keys hk={hk} d={d} paged nhd bs={bs}", "bfloat16", ts,
                 "gather + ropekit.rerotate + index_copy_")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--csv", type=Path, default=CSV_PATH)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = dict(run=_dt.datetime.now().isoformat(timespec="seconds"), device="cpu", cpu=cpu_model(),
                threads=torch.get_num_threads(), torch=torch.__version__, ropekit_level=ropekit.ops.capability(),
                git_rev=git_rev("bench_serving.py"))
    print(f"{meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, triton {version('triton')}, "
          f"ropekit level {meta['ropekit_level']}")
    rows = []
    with torch.no_grad():
        for b, s in ((8, 1), (64, 1), (1, 2048)):
            rows += cache_write(meta, b, s, args.rounds)
        for b, s in ((8, 1), (4, 512)):
            rows += profiles(meta, b, s, args.rounds)
        rows += rerotate(meta, args.rounds)
    append_rows(rows, args.csv, FIELDS)
    print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
