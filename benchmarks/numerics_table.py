"""Max abs error of cos/sin at long positions: ropekit float32 tables vs transformers' float32 angles.

Oracle: cos/sin of the exact angle m·θ_i evaluated in float64 from the float64 frequencies
(ropekit's ``RopeConfig.inv_freq``), i.e. the same frequencies both tables are meant to
represent. For each decade-of-two position 2^k we take a window of positions
[2^k - W, 2^k + W) and report the max |table - oracle| over all of them and all frequencies.

    .venv/bin/python benchmarks/numerics_table.py            # prints the markdown table

Config: Llama-3.1-8B-like (head_dim 128, rope_theta 5e5, llama3 scaling x8), the
``llama-3.1-8b`` preset.
"""

from __future__ import annotations

import sys

import torch

import ropekit
from ropekit import presets
from ropekit.hf import transformers_cos_sin


def main(window: int = 256) -> str:
    cfg = presets.get("llama-3.1-8b")
    inv64 = cfg.inv_freq()  # float64 [r/2]
    rows = ["| position | ropekit cos/sin (float32 table) | transformers-style float32 angles |", "|---:|---:|---:|"]
    for k in range(10, 25, 2):
        m = 2**k
        pos = torch.arange(max(m - window, 0), m + window)
        ang = pos.double()[:, None] * inv64  # float64 oracle angles [n, r/2]
        oc, os_ = torch.cos(ang), torch.sin(ang)
        c, s = ropekit.cos_sin(cfg, pos)
        tc, ts = transformers_cos_sin(cfg, pos)
        e_rk = max(float((c.double() - oc).abs().max()), float((s.double() - os_).abs().max()))
        e_tf = max(float((tc.double() - oc).abs().max()), float((ts.double() - os_).abs().max()))
        rows.append(f"| 2^{k} = {m:,} | {e_rk:.2e} | {e_tf:.2e} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {sys.platform}", file=sys.stderr)
    print(main())
