"""``benchmarks/bench_tables.py`` on tiny sizes (one round), so the real run cannot fail on a
typo: every variant runs and lands in the CSV with the house columns."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

from ropekit import ops

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_tables as bt  # noqa: E402


@pytest.mark.skipif(not ops.LOADED, reason="the compiled operators are not built")
def test_bench_tables_smoke(tmp_path, capsys):
    out = tmp_path / "tables.csv"
    bt.main(["--positions", "3,40", "--rounds", "1", "--csv", str(out)])
    rows = list(csv.DictReader(open(out)))
    assert set(rows[0]) == set(bt.FIELDS)
    got = {(r["positions"], r["variant"]) for r in rows}
    variants = {"torch.cos + torch.sin", "ropekit cos_sin op", "ropekit.cos_sin (whole call)",
                "math.cos + math.sin (per value)"}
    assert got == {(p, v) for p in ("3", "40") for v in variants}
    for r in rows:
        assert float(r["median_us"]) > 0 and r["torch"] == torch.__version__ and r["level"] == ops.capability()
        assert r["values"] == str(int(r["positions"]) * 64)
    assert "| 40 | 2560 | ropekit cos_sin op |" in capsys.readouterr().out
