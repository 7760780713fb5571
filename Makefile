# The two commands of the quick start, each self-contained from a fresh clone:
#   make demo   set up .venv, then run the whole pipeline on the built-in corpus
#   make test   set up .venv, then run the test suite
# `make setup` alone builds the environment; LACY_FAST_NO_NATIVE=1 skips the C++ helpers.
# On a GPU machine, offline, with only torch and triton installed (no setup):
#   make gpu-wheels WHEELS=dir   where a registry is reached: the wheels the check needs (<= 64 MiB),
#                                DeepSpeed among them, built by the .venv's Python without compiled ops
#   make gpu-check [WHEELS=dir]  the GPU tests, kernel benchmark, the Trainer's timed steps (DeepSpeed)
#                                and the determinism check (bench/gpu_check.py)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_ARGS ?=
PYTEST_ARGS ?=
WHEELS ?=
GPU_CHECK_ARGS ?=

.PHONY: setup demo test bench clean gpu-check gpu-wheels

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml constraints.txt CMakeLists.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and alone: `torch==2.13.0` is the CPU build here and the CUDA build on a
	# GPU machine; everything after it sees the requirement satisfied.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/lacy-fast demo $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

gpu-check:
	$(PYTHON) bench/gpu_check.py $(if $(WHEELS),--wheels $(WHEELS)) $(GPU_CHECK_ARGS)

gpu-wheels: setup
	$(BIN)/python bench/gpu_wheels.py --out $(or $(WHEELS),gpu-wheels)

clean:
	rm -rf $(VENV) build *.egg-info
