#!/usr/bin/env bash
# The one set-up behind `make run`, `make test` and CI: a Python environment with torch and this
# project installed (editable, with the dev tools; the CUDA extension builds where nvcc exists).
#
# The environment is the active virtual environment, or ./.venv, created when missing. torch is
# installed only when it is not importable: the default build from the package index on a machine
# with an NVIDIA GPU, else the CPU build ($TORCH_CPU, default torch==2.13.0, which the index here
# serves as a CPU build; elsewhere point $TORCH_INDEX_URL at a PyTorch index of CPU wheels, so pip
# does not fetch several GB of CUDA wheels). $SEEDVL_BUILD_CUDA (AUTO, ON, OFF; default AUTO: where
# nvcc is found) says whether the CUDA extension is compiled; `make run` passes OFF on a machine
# without an NVIDIA GPU, where the extension could not run (its CUTLASS grouped GEMM alone takes
# minutes to compile). A stamp records the choice and skips the rest until pyproject.toml changes or
# a build is asked for that the environment lacks.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  py=python
else
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  py=.venv/bin/python
fi
export SEEDVL_BUILD_CUDA="${SEEDVL_BUILD_CUDA:-AUTO}"
stamp="$("$py" -c 'import sys; print(sys.prefix)')/.seedvl-setup"
done_as="$(cat "$stamp" 2>/dev/null || true)"
# OFF asks for no build, so an environment set up with the extension serves it too.
if [[ -f "$stamp" && "$stamp" -nt pyproject.toml ]] &&
  [[ "$done_as" == "cuda=$SEEDVL_BUILD_CUDA" || ("$SEEDVL_BUILD_CUDA" == OFF && "$done_as" == cuda=*) ]] &&
  "$py" -c "import torch, seedvl_kernels" 2>/dev/null; then
  exit 0
fi

"$py" -m pip install -q --upgrade pip
if ! "$py" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing torch with CUDA"
    "$py" -m pip install -q torch
  else
    echo "setup: no NVIDIA GPU, installing the CPU build of torch (${TORCH_CPU:-torch==2.13.0})"
    "$py" -m pip install -q "${TORCH_CPU:-torch==2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi
"$py" -m pip install -q -e ".[dev]"
echo "cuda=$SEEDVL_BUILD_CUDA" > "$stamp"
echo "setup: done ($("$py" -c 'import sys, torch; print(sys.prefix, "torch", torch.__version__)'))"
