"""The GPU benchmark harness (``benchmarks/bench_gpu.py``) run on tiny shapes, so a GPU run cannot fail on a typo.

Without CUDA the root conftest sets ``TRITON_INTERPRET=1`` before any Triton kernel is
defined, so ropekit's kernel and Liger-Kernel's (both Triton) run on CPU tensors through
the interpreter. With CUDA (or ``ROPEKIT_TEST_DEVICE=cuda``) the same tests run on the GPU.

Liger in bfloat16 is not checked under the interpreter: Triton's interpreter does bf16
arithmetic wrong (bf16 x bf16 in an interpreted kernel gives values like 1e38), and Liger
computes in the tables' dtype; ropekit converts to float32 before any arithmetic, so its
bf16 path is checked. flash-attention and FlashInfer need CUDA builds: here they are
expected to be reported as skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_gpu as bg  # noqa: E402

from ropekit.backends import triton as tb  # noqa: E402

DEV = torch.device(os.environ.get("ROPEKIT_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
pytestmark = pytest.mark.skipif(not tb.available(), reason="triton needs CUDA or TRITON_INTERPRET=1")
INTERPRETED = DEV.type == "cpu"

try:
    import liger_kernel.ops.rope  # noqa: F401

    HAS_LIGER = True
except ImportError:
    HAS_LIGER = False

ROPEKIT = ["ropekit-triton in-place", "ropekit-triton", "ropekit-triton module in-place", "ropekit-triton module"]
DIFFERENTIABLE = ["ropekit-triton", "ropekit-triton module", "transformers eager", "torch.compile(transformers)"]


@pytest.fixture(scope="module")
def meta():
    return bg.environment(DEV)


def _by(rows, **kw):
    return [r for r in rows if all(str(r[k]) == str(v) for k, v in kw.items())]


def _assert_clean(rows):
    for r in rows:
        assert not r["note"].startswith(("error", "FAILED", "capture failed")), r
        assert "MISMATCH" not in r["note"], r


def test_bench_case_every_variant_every_mode(meta):
    """Prefill, float32, all peers: each variant timed and checked against the eager result."""
    case = bg.Case(1, 2, 2, 1, 8, "float32", DEV)
    rows = bg.bench_case(case, meta, rounds=1, warmup=1, compile_backend="eager", log=lambda m: None)
    _assert_clean(rows)
    expect_fwd = ROPEKIT + [bg.COPY, "transformers eager", "torch.compile(transformers)"] + (["liger"] if HAS_LIGER else [])
    for name in expect_fwd:
        (r,) = _by(rows, variant=name, mode="forward")
        assert float(r["median_us"]) > 0 and r["shape"] == case.shape and r["dtype"] == "float32"
        if name != bg.COPY:
            assert float(r["max_err"]) <= bg.err_tol("float32", [torch.ones(1)])
    for mode in ("backward", "fwd+bwd"):
        names = {r["variant"] for r in _by(rows, mode=mode)}
        assert names == set(DIFFERENTIABLE + [bg.COPY] + (["liger"] if HAS_LIGER else [])), (mode, names)
    assert _by(rows, variant="ropekit-triton in-place", mode="forward")[0]["inplace"] == "yes"
    assert _by(rows, variant="ropekit-triton", mode="forward")[0]["inplace"] == "no"
    for peer in ("flash-attn", "flashinfer"):  # CUDA builds: skipped with the reason here
        skipped = _by(rows, variant=peer, mode="skipped")
        try:
            __import__({"flash-attn": "flash_attn.ops.triton.rotary", "flashinfer": "flashinfer"}[peer])
        except ImportError:
            assert skipped and "not importable" in skipped[0]["note"]


@pytest.mark.skipif(not HAS_LIGER, reason="liger-kernel not installed (pip install 'liger-kernel>=0.5,<0.9': in the dev extra)")
def test_liger_peer_decode_per_sample_positions(meta):
    """Liger's RoPE with per-sample decode positions ([b, 1, d] tables) matches the eager result."""
    dtype = "float32" if INTERPRETED else "bfloat16"  # see the module doc: bf16 is wrong in the interpreter
    case = bg.Case(2, 1, 2, 1, 8, dtype, DEV)
    rows = bg.bench_case(case, meta, peers=["liger"], modes=["forward", "backward"], rounds=1, warmup=1, only=["liger"],
                         log=lambda m: None)
    _assert_clean(rows)
    assert {r["mode"] for r in _by(rows, variant="liger")} == {"forward", "backward"}
    inp = bg.Inputs(case)
    (v,) = bg.peer_liger(inp)
    q, k = inp.q.clone(), inp.k.clone()
    qo, ko = v.apply(q, k)
    assert qo.data_ptr() == q.data_ptr()  # Liger rotates in place, as the row says
    assert bg.max_err((qo, ko), inp.ref()) <= bg.err_tol(dtype, inp.ref())


def test_bfloat16_decode_ropekit_and_transformers(meta):
    case = bg.Case(2, 1, 2, 1, 8, "bfloat16", DEV)
    rows = bg.bench_case(case, meta, peers=["transformers"], modes=["forward"], rounds=1, warmup=1, log=lambda m: None)
    _assert_clean(rows)
    assert {r["variant"] for r in rows} == set(ROPEKIT + [bg.COPY, "transformers eager"])


def test_a_wrong_peer_is_flagged_and_a_broken_one_recorded(meta, monkeypatch):
    """The output check can fail: a conjugated rotation is a MISMATCH; a raising peer is an error row."""

    def wrong(inp):
        from ropekit import apply_rotary_qk

        return [bg.Variant("wrong", lambda a, b: apply_rotary_qk(a, b, inp.c4, inp.s4, conjugate=True, backend="eager"), False)]

    def broken(inp):
        return [bg.Variant("broken", lambda a, b: a.no_such_method(), False)]

    def missing(inp):
        import no_such_rope_package  # noqa: F401

    monkeypatch.setitem(bg.PEERS, "wrong", wrong)
    monkeypatch.setitem(bg.PEERS, "broken", broken)
    monkeypatch.setitem(bg.PEERS, "missing", missing)
    case = bg.Case(1, 3, 2, 1, 8, "float32", DEV)
    rows = bg.bench_case(case, meta, peers=["wrong", "broken", "missing"], modes=["forward"], rounds=1, warmup=1, log=lambda m: None)
    assert "MISMATCH" in _by(rows, variant="wrong")[0]["note"]
    assert _by(rows, variant="broken")[0]["note"].startswith("error: AttributeError")
    assert "not importable" in _by(rows, variant="missing", mode="skipped")[0]["note"]
    assert "MISMATCH" not in _by(rows, variant="ropekit-triton")[0]["note"]


QK_NORM = [bg.QK_NORM_FUSED, bg.QK_NORM_FUSED + " in-place", "ropekit unfused (torch norm + triton rope)",
           "transformers eager (qk-norm)", "torch.compile(transformers qk-norm)"]


@pytest.mark.parametrize("case", [(1, 3, "float32", ("forward", "fwd+bwd")), (1, 2, "bfloat16", ("forward",))], ids=str)
def test_qk_norm_case_every_variant(meta, case, monkeypatch):
    """Per-head RMSNorm + RoPE rows: every variant timed forward and (out of place) forward+backward,
    each checked against ropekit's eager composition (outputs, dq, dk and both weight gradients).
    Prefill shapes only: a decode sample is 20 calls, slow under the interpreter."""
    b, s, dtype, modes = case
    c = bg.Case(b, s, 2, 1, 16, dtype, DEV)
    moved = {}
    real_row = bg._row

    def row(meta, case, variant, mode, inplace="", med=None, p20=None, p80=None, moved_=None, *a, **kw):
        moved[(variant, mode)] = moved_
        return real_row(meta, case, variant, mode, inplace, med, p20, p80, moved_, *a, **kw)

    monkeypatch.setattr(bg, "_row", row)
    rows = bg.bench_qk_norm_case(c, meta, modes=modes, rounds=1, warmup=1, compile_backend="eager", log=lambda m: None)
    _assert_clean(rows)
    assert {r["variant"] for r in _by(rows, mode="qk-norm forward")} == set(QK_NORM + [bg.COPY])
    if "fwd+bwd" in modes:
        assert {r["variant"] for r in _by(rows, mode="qk-norm fwd+bwd")} == set(QK_NORM + [bg.COPY]) - {QK_NORM[1]}
        assert moved[(bg.QK_NORM_FUSED, "qk-norm fwd+bwd")] == 2.5 * c.nbytes  # read x, g, x; write out, dx
    assert moved[(bg.QK_NORM_FUSED, "qk-norm forward")] == c.nbytes == moved[(bg.COPY, "qk-norm forward")]
    for r in rows:
        assert float(r["median_us"]) > 0 and r["dtype"] == dtype and r["shape"] == c.shape
    md = "\n".join(bg.qk_norm_tables(rows))
    assert f"| {bg.QK_NORM_FUSED} | " in md and "(x1.00)" in md


def test_qk_norm_wrong_result_is_flagged(meta, monkeypatch):
    """The qk-norm check can fail: a variant that skips the weight is a MISMATCH."""
    real = bg.qk_norm_variants

    def with_wrong(inp, compile_backend="inductor"):
        out, skipped = real(inp, compile_backend)
        from ropekit import apply_qk_norm_rotary

        def wrong(a, b, wa=None, wb=None):  # q's and k's norm weights swapped
            wa, wb = (inp.wq, inp.wk) if wa is None else (wa, wb)
            return apply_qk_norm_rotary(a, b, wb, wa, inp.rope.c4, inp.rope.s4, backend="eager")

        return out[:1] + [bg.Variant("wrong", wrong, False, grad=wrong)], skipped

    monkeypatch.setattr(bg, "qk_norm_variants", with_wrong)
    rows = bg.bench_qk_norm_case(bg.Case(1, 2, 2, 1, 8, "float32", DEV), meta, rounds=1, warmup=1, compile_backend="eager",
                                 log=lambda m: None)
    for mode in ("qk-norm forward", "qk-norm fwd+bwd"):
        assert "MISMATCH" in _by(rows, variant="wrong", mode=mode)[0]["note"]
        assert "MISMATCH" not in _by(rows, variant=bg.QK_NORM_FUSED, mode=mode)[0]["note"]


def test_graph_decode(meta):
    """CPU: the static-buffer protocol (copy in, run, compare with eager); CUDA: real capture and replay."""
    rows = bg.graph_decode(meta, DEV, b=2, dtype="bfloat16", hq=2, hk=1, d=8, steps=2, replays=5,
                           compile_backend="eager" if INTERPRETED else "inductor", log=lambda m: None)
    names = [r["variant"] for r in rows]
    assert names[:2] == ["RotaryEmbedding", "apply_rotary_qk(cos_t[offsets])"] and names[2].startswith("torch.compile")
    by = {r["variant"]: r for r in rows}
    for name in names[1:]:  # the sync-free paths
        assert "MISMATCH" not in by[name]["note"] and "failed" not in by[name]["note"], by[name]
        assert "replay == eager" in by[name]["note"] or "replay vs eager" in by[name]["note"]
    if INTERPRETED:
        assert all(r["note"].startswith("cpu: no CUDA graph") for r in rows)
    else:
        assert by["apply_rotary_qk(cos_t[offsets])"]["note"].startswith("captured") and float(by["apply_rotary_qk(cos_t[offsets])"]["median_us"]) > 0


def test_int64_check_passes_and_can_fail(meta, monkeypatch):
    (r,) = bg.check_int64(meta, DEV, "float32", min_numel=600, h=3, d=16, chunk=4, log=lambda m: None)
    assert r["note"].startswith("ok:") and r["mode"] == "int64_offsets" and float(r["max_err"]) <= 1e-6
    import ropekit

    real = ropekit.apply_rotary

    def off_by_one_at_the_end(x, cos, sin, **kw):  # a wrong last element (where int32 offsets would wrap)
        y = real(x, cos, sin, **kw)
        if kw.get("backend") == "triton" and not kw.get("inplace"):
            y[..., -1, -1, -1] += 1
        return y

    monkeypatch.setattr(ropekit, "apply_rotary", off_by_one_at_the_end)
    (bad,) = bg.check_int64(meta, DEV, "float32", min_numel=600, h=3, d=16, chunk=4, log=lambda m: None)
    assert bad["note"].startswith("FAILED") and float(bad["max_err"]) >= 1


def test_sweep_configs_are_bit_exact_and_best_is_reported(meta):
    classes = bg.sweep_classes([(1, 4), (2, 4), (3, 1), (1, 1)], "float32", 4, 2, 16, DEV)
    assert list(classes) == ["prefill b=2 s=4 float32", "decode b=3 float32"]
    grid = {"tile": (256, 1024), "bh_max": (2, 16), "num_warps": (4,)}
    rows, best = bg.sweep(meta, classes, grid, rounds=1, log=lambda m: None)
    _assert_clean(rows)
    assert set(best) == set(classes)
    for cls, (cfg, t_best, t_def) in best.items():
        assert {"tile", "bh_max", "num_warps", "BT", "BH"} <= set(cfg) and 0 < t_best <= t_def
        assert len(_by(rows, mode="sweep")) >= 2
        assert sum("default" in r["note"] for r in rows if r["note"].startswith(cls)) == 1
    assert tb.LAUNCH == tb.LAUNCH_DEFAULTS or os.environ.get("ROPEKIT_TRITON_LAUNCH")  # restored


def test_peak_bandwidth():
    gbps, src = bg.peak_from_props(SimpleNamespace(name="NVIDIA H200", memory_clock_rate=3_201_000, memory_bus_width=6144))
    assert abs(gbps - 4916.7) < 0.1  # 2 x 3.201 GHz x 768 bytes and "6144 bit" in src
    assert bg.peak_from_props(SimpleNamespace(name="NVIDIA H200", memory_clock_rate=0, memory_bus_width=0))[0] == 4800.0
    assert bg.peak_from_name("NVIDIA H100 80GB HBM3")[0] == 3350.0
    assert bg.peak_from_name("Some GPU")[0] == 0.0
    assert bg.peak_gbps(torch.device("cpu"), 1234.0) == (1234.0, "--peak-gbps")


def _synthetic(variant, mode, b, s, us, frac="", dtype="bfloat16", note=""):
    return dict(run="r", device="cuda", gpu="G", driver="1", cuda="12", torch="t", triton="3", transformers="5", liger="0.8",
                git_rev="abc", peak_gbps="4800", variant=variant, shape=f"b={b} s={s} hq=32 hk=8 d=128", b=b, s=s, hq=32, hk=8,
                d=128, dtype=dtype, mode=mode, inplace="", median_us=str(us), p20_us="", p80_us="", gbps="", frac_peak=frac,
                ratio_to_copy="", max_err="", note=note)


def test_summary_targets():
    rows = [
        _synthetic("copy_", "forward", 4, 4096, 90.0, "0.95"),
        _synthetic("ropekit-triton in-place", "forward", 4, 4096, 100.0, "0.900"),
        _synthetic("liger", "forward", 4, 4096, 130.0, "0.690"),
        _synthetic("ropekit-triton", "forward", 4, 4096, 120.0, "0.75"),
        _synthetic("ropekit-triton", "backward", 4, 4096, 140.0, "0.64"),
        _synthetic("ropekit-triton in-place", "forward", 8, 4096, 200.0, "0.800"),
        _synthetic("RotaryEmbedding", "cuda_graph_decode", 64, 1, 5.0, note="captured; no host sync; replay == eager (bitwise)"),
        _synthetic("flashinfer", "skipped", 4, 4096, "", note="not importable: ModuleNotFoundError: x"),
        _synthetic("ropekit-triton", "int64_offsets", 1, 1 << 24, 9.0, note="ok: 2^31 elements"),
    ]
    ratios = {("ropekit-triton in-place", 4): "0.92", ("ropekit-triton in-place", 8): "0.80", ("ropekit-triton", 4): "0.86",
              ("liger", 4): "0.70"}
    for r in rows:
        r["ratio_to_copy"] = ratios.get((r["variant"], r["b"]), "") if r["mode"] == "forward" else ""
        r["gbps"] = "3000" if r["variant"] == "copy_" else r["gbps"]
    md = bg.summarize(rows, "`3 passed in 1.0s`, exit status 0")
    assert "`3 passed in 1.0s`" in md
    assert "| ropekit-triton in-place forward bf16 >= 90% of the same-run copy_ bandwidth | b=4 s=4096 | 92% ( GB/s) | yes |" in md
    assert "| ropekit-triton in-place forward bf16 >= 90% of the same-run copy_ bandwidth | b=8 s=4096 | 80% ( GB/s) | no |" in md
    assert "| ropekit-triton forward bf16 >= 85% of the same-run copy_ bandwidth | b=4 s=4096 | 86% ( GB/s) | yes |" in md
    assert "| at least Liger's forward speed (bf16, both in place) | b=4 s=4096 | 1.30x | yes |" in md
    assert "| at least Liger's forward speed (bf16, both in place) | b=8 s=4096 | – (no Liger row) | not measured |" in md
    assert "| backward within 1.1x of forward (bf16, out of place) | b=4 s=4096 | 1.17x | no |" in md
    assert "| decode replayed in a CUDA graph (RotaryEmbedding) | b=64 s=1 hq=32 hk=8 d=128 | captured" in md and "| yes |" in md
    assert "flashinfer (skipped" in md
    # the one table at the end: tests, the copy_ reference, every variant as % of copy_, missing peers, checks
    final = md[md.index("## Summary"):]
    assert md.rstrip().endswith(final.rstrip()) and final.count("## ") == 1
    assert "| GPU tests (ROPEKIT_TEST_DEVICE=cuda, opcheck included) | 3 passed in 1.0s | | all pass | yes |" in final
    assert "| copy_ of the same bytes (the reference) | 3000 GB/s at b=8 s=4096 |" in final or "| copy_ of the same bytes" in final
    assert "| ropekit-triton in-place | 200.0 µs, 80% | – | >= 90% of copy_ | no |" in final  # the largest prefill
    assert "| liger | – | – |  |  |" in final  # timed at b=4 only
    assert "| flashinfer | not installed | not installed | | |" in final
    assert "| flash-attn |" not in final  # no row at all: neither timed nor skipped
    assert "| decode in a CUDA graph: RotaryEmbedding (b=64 s=1 hq=32 hk=8 d=128) | | 5.0 µs per replay | captured, no host sync, replay == eager | yes |" in final
    assert "| more than 2^31 elements (ropekit-triton) | ok: 2^31 elements | | within 1 ulp | yes |" in final
    failed = bg.summarize(rows, "`1 failed, 2 passed in 1.0s`, exit status 1")
    assert "| 1 failed, 2 passed in 1.0s | | all pass | no |" in failed


def test_tests_text(tmp_path):
    log = tmp_path / "pytest.log"
    log.write_text("....F\nFAILED tests/test_triton.py::test_x - AssertionError\n1 failed, 4 passed in 2.50s\n")
    txt = bg.tests_text(log, 1)
    assert txt.startswith("`1 failed, 4 passed in 2.50s`, exit status 1") and "FAILED tests/test_triton.py::test_x" in txt
    assert "timed out" in bg.tests_text(tmp_path / "none.log", 124) or bg.tests_text(tmp_path / "none.log", 124) == "exit status 124 (no log)"


def test_main_writes_csv_and_summary(tmp_path):
    """The whole script on tiny shapes: every section reaches the CSV and the summary; --summarize rewrites it."""
    args = ["--device", DEV.type, "--out", str(tmp_path), "--cases", "1x2,2x1", "--heads", "2,1,8", "--dtypes", "float32",
            "--modes", "forward", "--rounds", "1", "--compile-backend", "eager", "--int64-numel", "200",
            "--sweep-grid", "tile=256;bh_max=2;num_warps=4", "--peers", "transformers", "--note", "tiny run",
            "--qk-norm-dtypes", "float32", "--qk-norm-cases", "1x2"]
    assert bg.main(args) == 0
    rows = bg.read_rows(tmp_path / "gpu.csv")
    assert {"int64_offsets", "cuda_graph_decode", "sweep", "forward", "qk-norm forward"} <= {r["mode"] for r in rows}
    assert "qk-norm fwd+bwd" not in {r["mode"] for r in rows}  # --modes forward applies to the section too
    assert list(rows[0]) == bg.FIELDS and all(r["git_rev"] and r["torch"] == torch.__version__ for r in rows)
    md = (tmp_path / "summary.md").read_text()
    for section in ("## Targets", "## Summary", "## forward, float32", "## CUDA graph: decode step", "## More than 2^31", "## Block-size sweep",
                    "## qk-norm forward (per-head RMSNorm + RoPE of q and k), float32"):
        assert section in md
    assert md.count("tiny run") == 1
    (tmp_path / "summary.md").unlink()
    assert bg.main(["--summarize", "--out", str(tmp_path)]) == 0
    assert "## Targets" in (tmp_path / "summary.md").read_text()


def test_budget_skips_sections(tmp_path):
    assert bg.main(["--device", DEV.type, "--out", str(tmp_path), "--budget-s", "0", "--cases", "1x2", "--heads", "2,1,8",
                    "--dtypes", "float32", "--modes", "forward", "--peers", ""]) == 0
    rows = bg.read_rows(tmp_path / "gpu.csv")
    assert rows and all(r["mode"] == "skipped" and "time budget" in r["note"] for r in rows)


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("nvidia-smi") is not None, reason="a CUDA machine: gpu-check would run")
def test_gpu_check_without_cuda_exits_0_fast(tmp_path):
    env = dict(os.environ, GPU_PYTHON=sys.executable, VENV=str(tmp_path / "no-venv"), OUT=str(tmp_path / "out"))
    t0 = time.monotonic()
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no CUDA here" in res.stdout and time.monotonic() - t0 < 30
    assert not (tmp_path / "out").exists() and not (tmp_path / "no-venv").exists()  # nothing set up or written


def test_gpu_check_pipeline_on_cpu(tmp_path):
    """GPU_CHECK_CPU=1: the whole script on CPU (the ops load: no build), the GPU test files
    (one selected test) and a benchmark with no time (every section skipped), ending in the
    summary table."""
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_CPU="1", GPU_PYTHON=sys.executable, VENV=str(tmp_path / "no-venv"), OUT=str(out),
               GPU_TEST_ARGS="-k register_cuda_kernels", GPU_BENCH_BUDGET="0", GPU_SITE=str(tmp_path / "site"),
               WHEELS=str(tmp_path / "no-wheels"))
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "ropekit operators:" in res.stdout and "building it in place" not in res.stdout
    for f in ("tests/test_triton_opcheck.py", "tests/test_triton_ops.py", "tests/test_triton.py", "tests/test_triton_qk_norm.py"):
        assert f in res.stdout
    md = (out / "summary.md").read_text()
    assert "## Summary" in md and "| GPU tests (ROPEKIT_TEST_DEVICE=cuda, opcheck included) | 1 passed" in md
    assert not (tmp_path / "no-venv").exists()
