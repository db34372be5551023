"""``benchmarks/bench_qk_norm.py`` on tiny shapes (one round), so the real run cannot fail on a typo:
every variant runs, passes its output checks, lands in the CSV with the house columns, and
the summary of the targets comes out. torch.compile is exercised with dynamo's ``eager``
compiler (inductor's C++ build would take tens of seconds here)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_qk_norm as bq  # noqa: E402

VARIANTS = {"copy_", "fused", "fused in-place", "rope in-place only", "unfused ropekit", "transformers eager",
            "torch.compile(transformers)"}


def test_bench_qk_norm_smoke(tmp_path, monkeypatch, capsys):
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    out = tmp_path / "qk_norm.csv"
    try:
        bq.main(["--rounds", "1", "--inner", "1", "--cases", "1x8,2x1", "--heads", "4,2,16", "--csv", str(out)])
    finally:
        torch._dynamo.reset()
    rows = list(csv.DictReader(open(out)))
    assert set(rows[0]) == set(bq.FIELDS)
    got = {(r["variant"], r["dtype"], r["mode"], r["s"]) for r in rows}
    want = {(v, dt, m, s) for v in VARIANTS for dt in ("float32", "bfloat16") for m in ("forward", "fwd+bwd")
            for s in ("8", "1")}
    assert got == want
    for r in rows:
        assert float(r["median_us"]) > 0 and r["device"] == "cpu" and r["torch"] == torch.__version__
        assert r["ratio_to_fused"] == "1.000" if r["variant"] == "fused" else float(r["ratio_to_fused"]) > 0
    text = capsys.readouterr().out
    assert "fused in-place / rope in-place only (target <= 1.25 prefill, 1.5 decode)" in text
    assert text.count("| float32 |") == 4 and text.count("| bfloat16 |") == 4
    # --summary reads the CSV back
    bq.main(["--summary", "--csv", str(out)])
    assert "unfused ropekit / fused (target >= 2.0)" in capsys.readouterr().out


def test_written_out_prologue_is_transformers():
    """The benchmark's Qwen3 prologue equals transformers' modules/functions, bit for bit."""
    import pytest

    qwen3 = pytest.importorskip("transformers.models.qwen3.modeling_qwen3")
    x, w = torch.randn(2, 3, 4, 16).to(torch.bfloat16), (1 + 0.1 * torch.randn(16)).to(torch.bfloat16)
    m = qwen3.Qwen3RMSNorm(16, bq.EPS).to(torch.bfloat16)
    with torch.no_grad():
        m.weight.copy_(w)
        assert torch.equal(m(x), bq.qwen3_rms_norm(x, w, bq.EPS))
    cos, sin = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    a = qwen3.apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=2)
    b = bq._apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_summary_ratios():
    """Ratios of same-run medians, each against its target's direction."""
    med = {"fused": 10.0, "fused in-place": 11.0, "rope in-place only": 10.0, "unfused ropekit": 15.0,
           "transformers eager": 60.0}
    rows = [dict(dtype="bfloat16", shape="b=1 s=2", mode="forward", variant=v, median_us=str(t)) for v, t in med.items()]
    line = bq.summary(rows).splitlines()[-1]
    assert line == "| bfloat16 | b=1 s=2 | forward | 1.10x met | 1.50x MISSED | 6.00x met |"
