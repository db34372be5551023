"""Every examples/*.py runs to completion in a fresh interpreter (they assert their own claims)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


def test_there_are_examples():
    names = {p.name for p in EXAMPLES}
    assert {"attention_block.py", "inspect_config.py"} <= names


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    r = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, f"{script.name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert r.stdout.strip(), f"{script.name} printed nothing"


def test_compare_scaling_writes_where_the_user_says(tmp_path):
    """Default: ./ropekit-figures of the current folder (never a random temporary folder)."""
    script = next(p for p in EXAMPLES if p.name == "compare_scaling.py")
    for argv, where in (([], tmp_path / "ropekit-figures"), (["mine/figs"], tmp_path / "mine" / "figs")):
        r = subprocess.run([sys.executable, str(script), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-2000:]
        assert sorted(p.name for p in where.iterdir()) == ["decay.png", "wavelengths.png"]
        assert "decay.png" in r.stdout and "wavelengths.png" in r.stdout
    r = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and "default: ./ropekit-figures" in " ".join(r.stdout.split()).replace("- ", "-")
