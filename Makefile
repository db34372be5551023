# Every target sets up .venv first (idempotent): torch==2.13.0 is installed before the
# project so pip takes the local CPU wheel instead of a multi-GB CUDA build.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ropekit-installed
PYTEST_ARGS ?=

.PHONY: demo test setup bench experiment gpu-check clean

$(PY):
	python3 -m venv $(VENV)

# The compiled operators (csrc/) build during the project's install: without build isolation,
# so the build uses the torch installed just before (an isolated build would fetch another).
$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*)
	$(PY) -m pip install --quiet torch==2.13.0 "setuptools>=64" wheel
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev]"
	$(PY) -c "import ropekit.ops as o; print('ropekit operators:', o.capability() if o.LOADED else o.REASON)"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m ropekit demo

test: $(STAMP)
	$(PY) -m pytest src tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_apply.py

experiment: $(STAMP)
	$(PY) -m ropekit.experiment --jobs 2

# On a CUDA machine (under 8 minutes): builds ropekit._C for the python whose torch sees the GPU
# when it does not load there, runs opcheck of every op and the GPU tests with
# ROPEKIT_TEST_DEVICE=cuda, then benchmarks/bench_gpu.py; CSV, summary.md (ending with one summary
# table) and logs into $(OUT). Without CUDA: says so and exits 0 (no setup).
OUT ?= gpu-results
gpu-check:
	OUT="$(OUT)" VENV="$(VENV)" bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache src/ropekit/_C*.so
