#!/usr/bin/env bash
# `make gpu-check`: the Triton kernels as the CUDA kernels of torch.ops.ropekit.* -- opcheck of every
# op and the GPU test suite with ROPEKIT_TEST_DEVICE=cuda (tests/test_triton_opcheck.py,
# tests/test_triton_ops.py: same bits as the CPU op, decode in a CUDA graph under
# set_sync_debug_mode("error"); tests/test_triton.py, tests/test_triton_qk_norm.py), then
# benchmarks/bench_gpu.py (peers, % of the same-run copy_ bandwidth, CUDA graphs), ending with one
# summary table. CSV, summary and logs go to $OUT (default gpu-results/). Without CUDA it says so
# and exits 0 within seconds, installing nothing.
#
# ropekit's compiled operators (ropekit._C, csrc/) are built in place for the chosen python when
# they do not load there (`setup.py build_ext --inplace`, at most $GPU_BUILD_TIMEOUT s, default
# 150): the CUDA kernels are registered on those ops, so without them the tests fail.
#
# Python: $GPU_PYTHON if set, else $VENV/bin/python, else python3 -- the first whose torch sees a
# CUDA device (whatever torch that is: its version and CUDA version are printed). Only when
# nvidia-smi shows a GPU and none of them has a CUDA torch is $VENV set up (`make setup`).
# ropekit runs from src/ (PYTHONPATH), nothing is installed into that python: the optional
# peers of the `gpu` extra in pyproject.toml that are missing are pip-installed (--no-deps,
# never torch) into $GPU_SITE (default .gpu-site/); a peer that does not install is skipped
# by the benchmark. WHEELS=folder installs them from local wheels (offline machines).
#
# Time (under 8 minutes in all): the build at most $GPU_BUILD_TIMEOUT s (150; skipped when
# ropekit._C loads), the tests $GPU_TEST_TIMEOUT s (150), the benchmark stops starting new
# sections after $GPU_BENCH_BUDGET s (130) and is killed at that + 30 s. Wheels of missing peers
# are taken from $WHEELS, else from .whl/ when that folder exists (machines without an index).
#
# GPU_CHECK_CPU=1 runs the same pipeline on CPU (TRITON_INTERPRET=1, tiny shapes; extra pytest
# arguments in $GPU_TEST_ARGS): a check of this script on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
VENV="${VENV:-.venv}"
SITE="${GPU_SITE:-.gpu-site}"
WHEELS="${WHEELS:-}"
[ -z "$WHEELS" ] && [ -d .whl ] && WHEELS=.whl
BUILD_TIMEOUT="${GPU_BUILD_TIMEOUT:-150}"
TEST_TIMEOUT="${GPU_TEST_TIMEOUT:-150}"
BENCH_BUDGET="${GPU_BENCH_BUDGET:-130}"
CPU_RUN="${GPU_CHECK_CPU:-}"
export PYTHONUNBUFFERED=1

probe() {  # $1: a python. Prints what its torch sees; status 0 when that is a CUDA device.
    "$1" - <<'EOF' 2>/dev/null
import sys
import torch
ok = torch.cuda.is_available()
name = f", {torch.cuda.get_device_name(0)}" if ok else ""
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {ok}{name}")
sys.exit(0 if ok else 1)
EOF
}

candidates=()
[ -n "${GPU_PYTHON:-}" ] && candidates+=("$GPU_PYTHON")
[ -x "$VENV/bin/python" ] && candidates+=("$VENV/bin/python")
command -v python3 >/dev/null 2>&1 && candidates+=("$(command -v python3)")
PY=""
for c in "${candidates[@]}"; do
    if info=$(probe "$c") || { [ -n "$CPU_RUN" ] && [ -n "$info" ]; }; then
        PY="$c"
        break
    fi
    echo "gpu-check: $c: ${info:-no importable torch}"
done
if [ -z "$PY" ]; then
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "gpu-check: no CUDA here (no nvidia-smi, no python whose torch sees a GPU): nothing to check."
        exit 0
    fi
    echo "gpu-check: nvidia-smi sees a GPU but no python has a CUDA torch: setting up $VENV (make setup)"
    make setup VENV="$VENV" || { echo "gpu-check: make setup failed"; exit 1; }
    if ! info=$(probe "$VENV/bin/python"); then
        echo "gpu-check: $VENV's torch does not see the GPU: ${info:-torch not importable}"
        exit 1
    fi
    PY="$VENV/bin/python"
fi
echo "gpu-check: $PY: $info"
test_dev=cuda
bench_args=()
if [ -n "$CPU_RUN" ]; then
    echo "gpu-check: GPU_CHECK_CPU=1: CPU under TRITON_INTERPRET=1, tiny shapes (a check of the pipeline, no GPU numbers)"
    export TRITON_INTERPRET=1
    test_dev=cpu
    bench_args=(--device cpu --cases 2x8,3x1 --heads 4,2,16 --dtypes float32 --rounds 2 --compile-backend eager
                --int64-numel 3000 --sweep-grid "tile=256,1024;bh_max=2,16;num_warps=4" --qk-norm-dtypes float32)
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

mkdir -p "$OUT" "$SITE"
export PYTHONPATH="$PWD/$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# the gpu extra's requirements whose distribution is not installed at all (nothing is upgraded)
missing=$("$PY" - <<'EOF'
import re
from importlib import metadata
text = open("pyproject.toml").read()
try:
    import tomllib
    reqs = tomllib.loads(text)["project"]["optional-dependencies"]["gpu"]
except ImportError:  # Python < 3.11: the one line of the extra
    reqs = re.findall(r'"([^"]+)"', re.search(r"^gpu\s*=\s*\[(.*?)\]", text, re.M | re.S).group(1))
for req in reqs:
    name = re.split(r"[<>=!~; \[]", req, maxsplit=1)[0]
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        print(req)
EOF
)
for req in $missing; do
    if [[ "$req" == triton* ]]; then  # it must match torch: never guessed here
        echo "gpu-check: triton is not installed for $PY: install the triton version its torch was built with"
        continue
    fi
    src=()
    [ -n "$WHEELS" ] && src=(--no-index --find-links "$WHEELS")
    echo "gpu-check: installing $req into $SITE"
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$SITE" --retries 0 --timeout 10 \
        "${src[@]}" "$req" || echo "gpu-check: could not install $req (optional: the benchmark skips it)"
done

# ropekit._C for this python (its torch version and ABI): built in place when it does not load
if ! "$PY" -c "import ropekit.ops as o, sys; sys.exit(0 if o.LOADED else 1)" 2>/dev/null; then
    echo "gpu-check: ropekit._C does not load for $PY: building it in place (at most ${BUILD_TIMEOUT} s)"
    t0=$SECONDS
    timeout "$BUILD_TIMEOUT" "$PY" setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 \
        || echo "gpu-check: the build failed (see $OUT/build.log); the ops and their tests will not run"
    echo "gpu-check: build took $((SECONDS - t0)) s"
fi
"$PY" -c "import ropekit.ops as o; print('gpu-check: ropekit operators:', o.capability() if o.LOADED else o.REASON)"

workers=()  # Triton compiles each kernel specialization the tests need: spread them over processes
if [ -z "$CPU_RUN" ] && "$PY" -c "import xdist" 2>/dev/null; then workers=(-n "${GPU_TEST_WORKERS:-8}"); fi
GPU_TESTS=(tests/test_triton_opcheck.py tests/test_triton_ops.py tests/test_triton.py tests/test_triton_qk_norm.py
           src/ropekit/backends/triton.py)
echo "gpu-check: ${GPU_TESTS[*]} on $test_dev (at most ${TEST_TIMEOUT} s) ${workers[*]}"
# shellcheck disable=SC2086
ROPEKIT_TEST_DEVICE=$test_dev timeout "$TEST_TIMEOUT" "$PY" -m pytest "${GPU_TESTS[@]}" \
    "${workers[@]}" -rfE -p no:cacheprovider ${GPU_TEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}

echo "gpu-check: benchmarks/bench_gpu.py (budget ${BENCH_BUDGET} s)"
timeout $((BENCH_BUDGET + 30)) "$PY" benchmarks/bench_gpu.py --out "$OUT" --budget-s "$BENCH_BUDGET" "${bench_args[@]}" \
    --tests-log "$OUT/pytest.log" --tests-rc "$test_rc" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
if [ "$bench_rc" -ne 0 ]; then  # killed or crashed: the summary from the rows written so far
    "$PY" benchmarks/bench_gpu.py --summarize --out "$OUT" --tests-log "$OUT/pytest.log" --tests-rc "$test_rc" \
        --note "benchmark exit status $bench_rc$([ "$bench_rc" -eq 124 ] && echo ' (timed out)'): see bench.log"
fi
echo "gpu-check: tests exit status $test_rc, benchmark exit status $bench_rc; results in $OUT/ (summary.md, gpu.csv, pytest.log, bench.log)"
[ "$test_rc" -ne 0 ] && exit "$test_rc"
exit "$bench_rc"
