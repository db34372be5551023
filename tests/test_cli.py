"""The ``ropekit`` command through ``main(argv)``: exit codes, output, PNG files, JSON."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ropekit import RopeConfig, presets
from ropekit.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# A Llama-3.1-style HF config.json written for the test (values as in the public
# meta-llama/Llama-3.1-8B config: rope_theta 5e5, llama3 scaling 8/1/4/8192, 131072 positions).
LLAMA_JSON = {
    "model_type": "llama",
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_png(path: Path, min_bytes: int = 20_000):
    """A real, non-blank PNG: signature, IHDR size, decodes to pixels that are not all one colour."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    assert w >= 600 and h >= 400
    assert len(data) >= min_bytes
    import matplotlib.image as mpimg

    px = mpimg.imread(str(path))
    assert px.shape[:2] == (h, w) and float(px[..., :3].std()) > 0.05


def assert_one_line_error(code, err):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ropekit: error:"), err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------ inspect
def test_inspect_preset_table(capsys):
    code, out, _ = run(capsys, "inspect", "llama-3.1-8b")
    assert code == 0
    for text in ("128 / 128 (64 pairs)", "500,000", "llama3", "131,072 positions (original 8,192)",
                 "unchanged for λ < 2,048", "interpolated"):
        assert text in out


def test_inspect_json_round_trips_every_preset(capsys):
    for name in presets.names():
        code, out, _ = run(capsys, "inspect", name, "--json")
        assert code == 0
        data = json.loads(out)
        cfg = presets.get(name)
        cfgs = cfg if isinstance(cfg, dict) else {None: cfg}
        assert len(data["configs"]) == len(cfgs)
        for entry, want in zip(data["configs"], cfgs.values()):
            assert RopeConfig.from_dict(entry["config"]) == want
            assert entry["context"] == presets.info(name)["context"]
            assert len(entry["pairs"]) == want.n_pairs


def test_inspect_config_json_and_folder(capsys, tmp_path):
    d = tmp_path / "my-llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA_JSON))
    code, out_file, _ = run(capsys, "inspect", str(d / "config.json"), "--json")
    assert code == 0
    code, out_dir, _ = run(capsys, "inspect", str(d), "--json")
    assert code == 0
    a, b = json.loads(out_file)["configs"][0], json.loads(out_dir)["configs"][0]
    assert a["config"] == b["config"] == presets.get("llama-3.1-8b").to_dict()
    assert a["context"] == 131072 and a["original_context"] == 8192


def test_inspect_inline_spec_pairs_and_unscaled(capsys):
    code, out, _ = run(capsys, "inspect", "head_dim=64,base=1e4,context=4096", "--pairs")
    assert code == 0 and "64 / 64 (32 pairs)" in out and out.count("unchanged") >= 32
    code, out, _ = run(capsys, "inspect", "llama-3.1-8b:unscaled", "--json")
    entry = json.loads(out)["configs"][0]
    assert entry["config"]["scaling"] is None and entry["context"] == 8192


def test_inspect_per_layer_preset(capsys):
    per_layer = [n for n in presets.names() if isinstance(presets.get(n), dict)]
    if not per_layer:
        pytest.skip("no per-layer preset")
    code, out, _ = run(capsys, "inspect", per_layer[0])
    assert code == 0 and out.count(per_layer[0] + " [") == len(presets.get(per_layer[0]))


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["inspect", "llama-3.1-8bb"], "did you mean llama-3.1-8b"),
        (["inspect", "no-such-model"], "ropekit list"),
        (["inspect"], "MODEL"),
        (["inspect", "llama-3.1-8b", "--jsn"], "unrecognized"),
        (["frobnicate"], "invalid choice"),
        (["inspect", "head_dim=64,bass=3"], "keys"),
        (["inspect", "head_dim=63"], "rotary_dim"),
        (["plot", "decay", "llama-3.1-8b", "--out", "x.jpg"], ".png"),
        (["plot", "spiral", "llama-3.1-8b", "--out", "x.png"], "invalid choice"),
        (["plot", "decay", "llama-3.1-8b", "--out", "/no/such/dir/x.png"], "folder"),
        (["verify", "llama-3.1-8b", "--backend", "cuda-magic"], "backend"),
    ],
)
def test_errors_are_one_line_exit_2(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, err)
    assert needle in err


def test_unreadable_config_files(capsys, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    code, _, err = run(capsys, "inspect", str(bad))
    assert_one_line_error(code, err)
    assert "JSON" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "inspect", str(empty))
    assert_one_line_error(code, err)
    assert "config.json" in err


def test_no_command_prints_help_and_exit_2(capsys):
    code, out, _ = run(capsys)
    assert code == 2 and "inspect" in out and "verify" in out
    assert run(capsys, "--help")[0] == 0


def test_list(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0 and len(out.strip().splitlines()) == len(presets.names())
    assert "meta-llama/Llama-3.1-8B" in out


# ------------------------------------------------------------------------------ plot
@pytest.mark.parametrize("kind", ["decay", "wavelengths", "frequencies", "scores"])
def test_plot_kinds_write_valid_png(capsys, tmp_path, kind):
    out = tmp_path / f"{kind}.png"
    code, text, _ = run(capsys, "plot", kind, "qwen2.5-7b", "qwen2.5-7b-yarn", "head_dim=128,base=1e4,context=4096",
                        "--out", str(out))
    assert code == 0 and str(out) in text
    assert_png(out)


# ------------------------------------------------------------------------------ verify
def test_verify_prints_numbered_checks(capsys):
    code, out, _ = run(capsys, "verify", "head_dim=72,rotary_dim=48,layout=interleaved,context=2048",
                       "--backend", "eager", "--backend", "complex")
    assert code == 0
    lines = [l for l in out.splitlines() if l.strip().startswith("[")]
    assert len(lines) == 6 + 2 * 5
    assert all(" PASS " in l for l in lines) and lines[0].strip().startswith("[ 1]")
    assert "16 checks: 16 passed, 0 failed" in out


BROKEN = textwrap.dedent(
    '''
    """A backend that forgets to rotate (for the verify test)."""
    NAME = "broken"
    def available(): return True
    def supports(x): return True
    def rotate(x, cos, sin, layout, conjugate, out):
        out.copy_(x)
        return out
    '''
)


def test_verify_exit_1_when_a_backend_is_wrong(capsys, tmp_path, monkeypatch):
    from ropekit import backends

    (tmp_path / "broken_backend_for_test.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(backends._PATHS, "broken", "broken_backend_for_test")
    code, out, _ = run(capsys, "verify", "head_dim=32,context=256", "--backend", "broken")
    assert code == 1
    assert "FAIL  backend broken" in out and "5 failed" in out


def test_verify_json(capsys, tmp_path, monkeypatch):
    import json

    code, out, _ = run(capsys, "verify", "head_dim=72,rotary_dim=48,layout=interleaved,context=2048",
                       "--backend", "eager", "--json")
    data = json.loads(out)  # stdout is only the JSON document
    assert code == 0 and data["passed"] and data["n_failed"] == 0
    assert data["n_checks"] == len(data["checks"]) == 6 + 5  # properties + (fwd, bwd, qk-norm fwd/bwd, bf16)
    assert all(c["passed"] and c["value"] <= c["bound"] for c in data["checks"] if not c["skipped"])
    # a failing backend: exit 1 and the failing checks say so
    from ropekit import backends

    (tmp_path / "broken_backend_for_test.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(backends._PATHS, "broken", "broken_backend_for_test")
    code, out, _ = run(capsys, "verify", "head_dim=32,context=256", "--backend", "broken", "--json")
    data = json.loads(out)
    assert code == 1 and not data["passed"] and data["n_failed"] == 5
    assert all("broken" in c["name"] for c in data["checks"] if not c["passed"])


# ------------------------------------------------------------------------------ bench
def test_bench_without_script_is_a_clear_error(capsys, monkeypatch):
    import ropekit.cli as cli

    monkeypatch.setattr(cli, "find_bench_script", lambda: None)
    code, _, err = run(capsys, "bench")
    assert_one_line_error(code, err)
    assert "bench_apply.py" in err


def test_bench_drives_cases_with_progress(capsys, tmp_path, monkeypatch):
    script = tmp_path / "bench_apply.py"
    script.write_text(textwrap.dedent(
        """
        def cases(quick=True):
            return ["a", "b", "c"] if quick else ["a"]
        def run_case(c):
            return {"case": c, "ms": 1.0}
        """
    ))
    monkeypatch.setenv("ROPEKIT_BENCH", str(script))
    code, out, err = run(capsys, "bench")
    assert code == 0
    assert "3/3" in err and "case" in out and out.count("1.0") == 3


def test_bench_falls_back_to_main_with_quick(capsys, tmp_path, monkeypatch):
    script = tmp_path / "bench_apply.py"
    script.write_text("def main(argv):\n    print('ARGV', argv)\n    return 0\n")
    monkeypatch.setenv("ROPEKIT_BENCH", str(script))
    code, out, _ = run(capsys, "bench", "--", "--x")
    assert code == 0 and "ARGV ['--quick', '--x']" in out


# ------------------------------------------------------------------------------ demo, entry points
def test_demo_writes_report(capsys, tmp_path):
    out = tmp_path / "report"
    code, text, _ = run(capsys, "demo", "--out", str(out), "--model", "qwen2.5-7b-yarn")
    assert code == 0
    assert "verify:" in text and "failed" in text and str(out / "report.md") in text
    md = (out / "report.md").read_text()
    for kind in ("decay", "wavelengths", "frequencies", "scores"):
        assert f"({kind}.png)" in md
        assert_png(out / f"{kind}.png")
    assert "| 1 |" in md and "yarn" in md


def test_python_m_ropekit_and_lazy_imports():
    # `python -m ropekit inspect` (run as __main__), then: no matplotlib/triton/transformers loaded
    code = (
        "import runpy, sys\n"
        "sys.argv = ['ropekit', 'inspect', 'head_dim=8', '--json']\n"
        "try:\n    runpy.run_module('ropekit', run_name='__main__')\nexcept SystemExit as e:\n    rc = e.code\n"
        "import ropekit.analysis, ropekit.cli\n"
        "heavy = sorted(m for m in ('matplotlib', 'triton', 'transformers') if m in sys.modules)\n"
        "print('RC', rc, 'HEAVY', heavy, file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert json.loads(r.stdout)["configs"][0]["n_pairs"] == 4, r.stderr
    assert "RC 0 HEAVY []" in r.stderr, r.stderr


FAKE_BENCH_APPLY = textwrap.dedent(
    '''
    """Mimics benchmarks/bench_apply.py's structure: main(argv) calling first_call/bench_case."""
    import argparse
    from pathlib import Path

    def first_call(meta):
        print("first-call line")
        return [{"variant": "first"}]

    def bench_case(b, s, hq, hk, d, dtype_name, rounds, with_compile, meta):
        print("per-variant line", dtype_name, b, s)
        return [{"variant": f"{dtype_name} {b}x{s}"}]

    def table(path):
        return "TABLE " + Path(path).read_text().replace("\\n", " | ")

    def main(argv=None):
        ap = argparse.ArgumentParser()
        ap.add_argument("--quick", action="store_true")
        ap.add_argument("--csv", type=Path, default=Path("results/apply.csv"))
        args = ap.parse_args(argv)
        rows = first_call({})
        for dt in ("float32", "bfloat16"):
            for b, s in ([(1, 2048), (8, 1)] if args.quick else [(1, 2048), (4, 2048), (8, 1)]):
                rows += bench_case(b, s, 32, 8, 128, dt, 7, False, {})
        args.csv.write_text("\\n".join(r["variant"] for r in rows))
        print(table(args.csv))
    '''
)


def test_bench_apply_structure_gets_progress_and_temp_csv(capsys, tmp_path, monkeypatch):
    script = tmp_path / "bench_apply.py"
    script.write_text(FAKE_BENCH_APPLY)
    monkeypatch.setenv("ROPEKIT_BENCH", str(script))
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "bench")
    assert code == 0
    assert "5/5" in err and "bfloat16 b=8 s=1" in err  # 1 first call + 2 dtypes x 2 quick cases
    assert "per-variant line" not in out and out.count("TABLE first") == 1
    assert not (tmp_path / "results").exists()  # never the script's default CSV
    code, out, _ = run(capsys, "bench", "--verbose")
    assert code == 0 and "per-variant line" in out


# ------------------------------------------------------------------------------ first use
def test_version(capsys):
    import ropekit

    code, out, err = run(capsys, "--version")
    assert code == 0 and out.strip().startswith(f"ropekit {ropekit.__version__} (torch ")


def test_reader_closing_the_pipe_is_not_an_error(tmp_path):
    """`ropekit inspect ... | head`: no "[Errno 32] Broken pipe", status 141 (128 + SIGPIPE)."""
    import os

    r, w = os.pipe()
    os.close(r)  # the reader is gone before the command writes anything
    proc = subprocess.run(
        [sys.executable, "-m", "ropekit", "inspect", "llama-3.1-8b", "--pairs"],
        stdout=w, stderr=subprocess.PIPE, text=True, timeout=300,
    )
    os.close(w)
    assert proc.returncode == 141, proc.stderr
    assert "Broken pipe" not in proc.stderr and "Errno 32" not in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ""


@pytest.mark.parametrize("value", ["0", "-1", "ten"])
def test_plot_max_distance_must_be_positive(capsys, tmp_path, value):
    code, out, err = run(capsys, "plot", "decay", "llama-3.1-8b", "--out", str(tmp_path / "x.png"), "--max-distance", value)
    assert_one_line_error(code, err)
    assert "--max-distance: expected an int >= 1" in err and not (tmp_path / "x.png").exists()


def test_plot_max_distance_only_where_it_means_something(capsys, tmp_path):
    code, out, err = run(capsys, "plot", "wavelengths", "llama-3.1-8b", "--out", str(tmp_path / "x.png"), "--max-distance", "10")
    assert_one_line_error(code, err)
    assert "--max-distance with plot decay or scores" in err


def test_config_file_labels(capsys, tmp_path):
    """A file is labelled by its own name; a model folder (or its config.json) by the folder's."""
    (tmp_path / "data").mkdir()
    named = tmp_path / "data" / "my-llama-3.json"
    named.write_text(json.dumps(LLAMA_JSON))
    code, out, _ = run(capsys, "inspect", str(named))
    assert code == 0 and out.splitlines()[0].startswith("my-llama-3  (")
    folder = tmp_path / "Llama-3.1-8B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_JSON))
    for arg in (str(folder), str(folder / "config.json"), str(folder) + "/"):
        code, out, _ = run(capsys, "inspect", arg)
        assert code == 0 and out.splitlines()[0].startswith("Llama-3.1-8B  ("), out.splitlines()[0]


def test_context_from_transformers_class_defaults(capsys):
    """gemma-3-4b-it's config.json omits max_position_embeddings (Gemma3TextConfig's default)."""
    pytest.importorskip("transformers")
    path = Path(__file__).parent / "data" / "gemma-3-4b-it.json"
    assert "max_position_embeddings" not in json.dumps(json.loads(path.read_text()))
    code, out, _ = run(capsys, "inspect", str(path), "--json")
    assert code == 0
    contexts = {entry["context"] for entry in json.loads(out)["configs"]}
    assert contexts == {131072}


def test_verify_bf16_lines_explain_a_ratio_just_under_one(capsys):
    code, out, _ = run(capsys, "verify", "head_dim=64,context=2048", "--backend", "eager")
    assert code == 0
    line = next(l for l in out.splitlines() if "forward bfloat16" in l)
    assert "<= 1.0e+00" in line and "the most one correct rounding can be off" in line and "just under 1" in line
