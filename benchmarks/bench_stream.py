"""Benchmark: streaming stores for out-of-place outputs, alone and with the next reader.

The compiled operators write an out-of-place output with streaming (non-temporal) stores when
it is at least ``ROPEKIT_STREAM_BYTES`` bytes (default 16 MiB): no read-for-ownership of the
output's cache lines, and the output is not left in the caches. This script measures what that
is worth at a size below the default (float32 ``[s, 32, 128]``, ``--tokens`` sets s: 512 is
8 MiB, ggml's benchmark shape) in three situations, each with the default threshold and with
``ROPEKIT_STREAM_BYTES=--threshold`` (at or below the output's size: it streams; above the
default and the output's size: regular stores where the default would stream):

* ``out=``: ``torch.ops.ropekit.rotary_out`` alone, into a preallocated output;
* ``out= + copy_``: the same, then the output copied into another buffer (a KV-cache write);
* ``out= + sum``: the same, then the output summed (any reader of the output).

Each setting runs in its own process (``ROPEKIT_STREAM_BYTES`` is read once per process),
the processes alternate (``--rounds`` each), the variants inside a process take turns
(``_env.round_robin``); the table gives medians over all samples, and the ratio of the
streamed setting to the default one per variant. ``copy_`` of the same bytes is the
reference row. Rows go to ``benchmarks/results/stream.csv``.

Usage: ``python benchmarks/bench_stream.py [--tokens 512] [--threshold 4194304] [--rounds 4]``
(``--tokens 2048 --threshold 1000000000``: a 32 MiB output, default streaming against none).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import ROOT, append_rows, cpu_level, cpu_model, git_rev, version  # noqa: E402

_CHILD = r"""
import json, sys
import torch
import ropekit
import ropekit.ops  # noqa: F401
sys.path.insert(0, sys.argv[1])
from _env import round_robin
torch.set_num_threads(int(sys.argv[3]))
s = int(sys.argv[2])
x = torch.randn(s, 32, 128)
out, dst = torch.empty_like(x), torch.empty_like(x)
c, sn = ropekit.cos_sin(ropekit.RopeConfig(128), torch.arange(s))
c, sn = c[:, None], sn[:, None]
R = torch.ops.ropekit
fns = {
    "copy_": lambda: dst.copy_(x),
    "out=": lambda: R.rotary_out(x, c, sn, "half", False, out=out),
    "out= + copy_": lambda: (R.rotary_out(x, c, sn, "half", False, out=out), dst.copy_(out)),
    "out= + sum": lambda: (R.rotary_out(x, c, sn, "half", False, out=out), out.sum()),
}
t = round_robin(fns, rounds=int(sys.argv[4]), inner=5)
print(json.dumps({k: [v * 1e6 for v in vs] for k, vs in t.items()}))
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=512, help="s of the float32 [s, 32, 128] input (512: 8 MiB)")
    ap.add_argument("--threshold", type=int, default=4 << 20,
                    help="ROPEKIT_STREAM_BYTES of the second setting (bytes)")
    ap.add_argument("--rounds", type=int, default=4, help="processes per setting, alternating")
    ap.add_argument("--inner-rounds", type=int, default=9, help="round_robin rounds in each process")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-csv", action="store_true")
    a = ap.parse_args(argv)
    out_bytes = a.tokens * 32 * 128 * 4
    settings = {"default": None, f"ROPEKIT_STREAM_BYTES={a.threshold}": str(a.threshold)}
    samples = {k: {} for k in settings}
    for rnd in range(a.rounds):
        order = list(settings) if rnd % 2 == 0 else list(settings)[::-1]
        for name in order:
            env = dict(os.environ)
            env.pop("ROPEKIT_STREAM_BYTES", None)
            if settings[name] is not None:
                env["ROPEKIT_STREAM_BYTES"] = settings[name]
            r = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), str(a.tokens), str(a.threads),
                                str(a.inner_rounds)], capture_output=True, text=True, env=env)
            if r.returncode != 0:
                sys.exit(r.stderr[-3000:])
            for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items():
                samples[name].setdefault(k, []).extend(v)
    run = _dt.datetime.now().replace(microsecond=0).isoformat()
    env_cols = dict(run=run, device="cpu", cpu=cpu_model(), level=cpu_level(), threads=a.threads,
                    torch=version("torch"), git_rev=git_rev("bench_stream.py"), shape=f"{a.tokens}x32x128", dtype="float32")
    med = {n: {k: statistics.median(v) for k, v in s.items()} for n, s in samples.items()}
    base, streamed = list(settings)
    print(f"{env_cols['cpu']}, level {env_cols['level']}, {a.threads} thread(s), float32 [{a.tokens}, 32, 128] "
          f"({out_bytes >> 20} MiB), median µs over {a.rounds} processes per setting")
    print(f"| op | {base} | {streamed} | ratio |")
    print("|---|---|---|---|")
    rows = []
    for k in med[base]:
        print(f"| {k} | {med[base][k]:.0f} | {med[streamed][k]:.0f} | {med[streamed][k] / med[base][k]:.2f} |")
        for n in settings:
            rows.append(dict(env_cols, setting=n, op=k, median_us=round(med[n][k], 1),
                             ratio_to_default=round(med[n][k] / med[base][k], 3)))
    if not a.no_csv:
        path = ROOT / "results" / "stream.csv"
        append_rows(rows, path, list(rows[0]))
        print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
