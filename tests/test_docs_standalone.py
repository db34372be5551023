"""The documentation stands alone in the repository: every file it points to is in the
repository, and it speaks about the product, not about how it was planned (issue numbers,
work sessions, files that only exist next to the repository)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tracked() -> list:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [ROOT / f for f in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file on disk
        files = [p for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts]
    keep = []
    for p in files:
        rel = p.relative_to(ROOT).as_posix()
        if not p.is_file():
            continue
        if rel == "README.md" or rel.startswith(("docs/", "examples/", "benchmarks/", "src/")):
            if p.suffix in (".md", ".py", ".cpp", ".txt", ".toml"):
                keep.append(rel)
    return sorted(keep)


FILES = _tracked()

#: Words of internal planning rather than of the product.
PLANNING = [
    (re.compile(r"\bissues? #?\d+", re.I), "an issue number"),
    (re.compile(r"\bsession'?s?\b", re.I), "a work session"),
    (re.compile(r"(?<![\w.])shared/"), "the shared/ folder next to the repository"),
    (re.compile(r"KERNELS\.md"), "KERNELS.md, which is not in the repository"),
    (re.compile(r"/work/|/home/\w"), "an absolute path of a development machine"),
]

KNOWN: dict = {}  # files allowed to fail this test (with the reason); none today

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # markdown links and images


def _params():
    for f in FILES:
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN[f])] if f in KNOWN else []
        yield pytest.param(f, marks=marks, id=f)


def test_the_scan_sees_the_docs():
    assert "docs/performance.md" in FILES and "README.md" in FILES and "src/ropekit/cli.py" in FILES


@pytest.mark.parametrize("rel", list(_params()))
def test_speaks_about_the_product_and_points_inside_the_repository(rel):
    path = ROOT / rel
    text = path.read_text(encoding="utf-8")
    problems = []
    for pattern, what in PLANNING:
        for m in pattern.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            problems.append(f"{rel}:{line}: {what}: {m.group(0)!r}")
    if path.suffix == ".md":
        for m in LINK.finditer(text):
            target = m.group(1)
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            resolved = (path.parent / target).resolve()
            if ROOT not in resolved.parents and resolved != ROOT or not resolved.exists():
                line = text.count("\n", 0, m.start()) + 1
                problems.append(f"{rel}:{line}: link to {target!r} outside the repository or missing")
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The patterns above do find the defects they name (so a pass means something)."""
    bad = "see `../shared/KERNELS.md`; targets (issue 4); this session's VM"
    found = {what for pattern, what in PLANNING if pattern.search(bad)}
    assert len(found) == 4
    assert not any(p.search("in possession of tissue 4; the reissued 2 tables") for p, _ in PLANNING[:2])
