# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.epcomm-installed
RANKS ?= 8

.PHONY: demo test test-python test-csrc bench venv clean gpu-check

EXT_SOURCES := $(shell find csrc/runtime csrc/bindings csrc/kernels csrc/simt csrc/common -type f 2>/dev/null)

$(STAMP): requirements-dev.txt pyproject.toml setup.py $(EXT_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-build-isolation -e .
	touch $@

venv: $(STAMP)

## demo: 8 CPU ranks emulating 4 nodes x 2 GPUs, DeepSeek-V3-shaped dispatch+combine, verified and timed
demo: $(STAMP)
	$(VENV)/bin/mpiexec -n $(RANKS) $(PY) examples/dispatch_combine_demo.py --nvl-ranks 2

## test: the whole test suite: kernel-layer checks (nvcc, g++, TSAN, ASan, planted bugs, lint), then Python
test: $(STAMP) test-csrc test-python

test-csrc:
	$(MAKE) -C csrc check

test-python: $(STAMP)
	$(PY) -m pytest -q

## bench: bandwidth suite at full size (8 CPU ranks = 4 nodes x 2), JSON + plot in bench/results/
bench: $(STAMP)
	MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=262144 MALLOC_TRIM_THRESHOLD_=262144 $(VENV)/bin/mpiexec -n $(RANKS) $(PY) bench/bandwidth.py --backend torch --nvl-ranks 2 --tokens 4096 --hidden 7168 --topk 8 --experts 256 --routing gate --reps 3 --sweep 1024,2048 --sweep-reps 1 --json bench/results/gate_4096.json --plot bench/results/gate_4096.png

## gpu-check: the first run on a GPU (README, "First run on a GPU"): the kernels on R fake ranks of one GPU
## against host references, then, with 2+ GPUs, the multi-process suite on backend="cuda". Not part of CI.
## The script exits 0 pass, 1 a check failed, 2 could not build or run, 3 no GPU or no nvcc (one line says so);
## make reports that code in its "Error N" line and itself exits 2: run the script for the code itself.
gpu-check:
	@csrc/tests/gpu_check/run_gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis csrc/tests/build epcomm/*.so
