# Common loops. `make help` lists them. `make run` and `make test` set up the environment first
# (scripts/setup_env.sh): the active virtual environment, or ./.venv, created when missing.
ifdef VIRTUAL_ENV
PY ?= python
else
PY ?= .venv/bin/python
endif

.PHONY: help setup run install build test test-gpu bench lint format gpu-pass info clean

help:
	@echo "run       set up (no CUDA build without an NVIDIA GPU), then the main job (python trainer/run.py)"
	@echo "test      set up, then pytest (CPU: reference + Triton interpreter; GPU tests skip without a GPU)"
	@echo "setup     a virtual environment with torch (CPU or CUDA build, as the machine has) and this project"
	@echo "install   editable install with dev tools (builds seedvl_kernels._C when nvcc exists)"
	@echo "build     rebuild the extension in place after editing csrc/ (no build isolation)"
	@echo "test-gpu  pytest -m gpu"
	@echo "bench     pytest bench/ (results JSON under bench/results/ on a GPU)"
	@echo "lint      ruff check + ruff format --check"
	@echo "gpu-pass  build + GPU tests + benchmarks in one go (scripts/gpu_pass.sh)"
	@echo "info      python -m seedvl_kernels.info"

setup:
	bash scripts/setup_env.sh

# The main job does not need the CUDA extension where no NVIDIA GPU could run it: skip its build.
RUN_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo AUTO || echo OFF)

run:
	SEEDVL_BUILD_CUDA=$${SEEDVL_BUILD_CUDA:-$(RUN_CUDA)} bash scripts/setup_env.sh
	$(PY) trainer/run.py

install:
	$(PY) -m pip install -e ".[dev]"

build:
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install --no-build-isolation --no-deps -e .

test: setup
	$(PY) -m pytest

test-gpu:
	$(PY) -m pytest -m gpu -v

bench:
	$(PY) -m pytest bench/

lint:
	ruff check . && ruff format --check .

format:
	ruff format . && ruff check --fix .

gpu-pass:
	bash scripts/gpu_pass.sh

info:
	$(PY) -m seedvl_kernels.info

clean:
	rm -rf build/ *.egg-info .pytest_cache .ruff_cache
