"""The ``ropekit`` command."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from . import RopeConfig, apply_rotary, backends, cos_sin, reference

    torch.manual_seed(0)
    cfg = RopeConfig(head_dim=64, base=10000.0)
    print(f"ropekit tour — {cfg}")
    R = reference.rotation_matrix(cfg, 5)
    print(f"  R(m=5) is {tuple(R.shape)}; max |RᵀR - I| = {(R.T @ R - torch.eye(64, dtype=torch.float64)).abs().max():.2e}")
    q, k = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    print("  relative position: <f(q,m), f(k,n)> depends only on m - n")
    for m, n in ((3, 1), (103, 101), (10003, 10001)):
        c, s = cos_sin(cfg, torch.tensor([m, n]), dtype=torch.float64)
        qm = apply_rotary(q, c[0], s[0], backend="reference")
        kn = apply_rotary(k, c[1], s[1], backend="reference")
        print(f"    m={m:>6} n={n:>6}  score = {float(qm @ kn):+.12f}")
    x = torch.randn(2, 16, 4, 64)
    c, s = cos_sin(cfg, torch.arange(16), dtype=torch.float64)
    ref = apply_rotary(x.double(), c[:, None], s[:, None], backend="reference")
    print("  backends vs the dense-matrix oracle (float32 input, max abs error):")
    for name in backends.available():
        if name == "reference":
            continue
        y = apply_rotary(x, c[:, None].float(), s[:, None].float(), backend=name)
        print(f"    {name:<10} {float((y.double() - ref).abs().max()):.2e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ropekit", description="Rotary position embedding: inspect, verify, plot, bench.")
    sub = p.add_subparsers(dest="cmd")
    d = sub.add_parser("demo", help="a short tour: rotation, relative positions, backends agreeing")
    d.set_defaults(func=_demo)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not getattr(args, "func", None):
        p.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # RopeError and friends: one clear line, no traceback
        print(f"ropekit: error: {e}", file=sys.stderr)
        return 2
