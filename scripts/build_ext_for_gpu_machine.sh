#!/usr/bin/env bash
# Build seedvl_kernels._C here for the lent GPU machines (CPython 3.12, sm_90a: H100/H200), so that
# scripts/gpu_pass.sh does not spend its device minutes compiling CUTLASS. The extension links neither
# libtorch nor libpython's symbols beyond the stable module ABI of its CPython version (nanobind,
# DLPack, static cudart), so a CUDA toolkit, that CPython's headers, nanobind and CUTLASS's headers
# are all it needs; no GPU.
#
#   bash scripts/build_ext_for_gpu_machine.sh                       # finds python3.12 itself
#   PY312=/path/to/python3.12 bash scripts/build_ext_for_gpu_machine.sh
#   SEEDVL_CUDA_ARCHS="80;90a" bash scripts/build_ext_for_gpu_machine.sh   # another target list
#
# It ends by printing the ignored path(s) to carry (the device tool's `carry` argument):
#   seedvl_kernels/_C.cpython-312-x86_64-linux-gnu.so   (and .whl/ if you carry wheels too)
# The module lands beside the package's Python files, where `import seedvl_kernels._C` finds it when
# the package is imported from the repository root (as gpu_pass.sh, pytest and the profiles do).
# Build tools for 3.12 (nanobind, nvidia-cutlass) go into build/cp312-tools, a venv made once.
# Parallel compile jobs: $CMAKE_BUILD_PARALLEL_LEVEL (default: every core).
set -euo pipefail
cd "$(dirname "$0")/.."

PY312=${PY312:-$(command -v python3.12 2>/dev/null || true)}
if [ -z "$PY312" ] || ! "$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  PY312=$(ls -d /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 2>/dev/null | head -1 || true)
fi
if [ -z "$PY312" ]; then
  echo "no CPython 3.12 interpreter found: set PY312=/path/to/python3.12" >&2
  exit 2
fi
ARCHS=${SEEDVL_CUDA_ARCHS:-90a}
TOOLS=build/cp312-tools
BUILD=build/cp312-sm${ARCHS//;/-}
echo "python: $PY312 ($("$PY312" -c 'import platform; print(platform.python_version())')), archs: $ARCHS"

if ! "$TOOLS/bin/python" -c 'import nanobind, cutlass_library' 2>/dev/null; then
  "$PY312" -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q "nanobind>=2.0" "nvidia-cutlass>=3.5"
fi

export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
start=$(date +%s)
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSEEDVL_BUILD_CUDA=ON \
  -DSEEDVL_CUDA_ARCHS="$ARCHS" -DPython_EXECUTABLE="$PWD/$TOOLS/bin/python" >"$BUILD.configure.log" 2>&1 \
  || { tail -30 "$BUILD.configure.log"; exit 1; }
cmake --build "$BUILD" --target _C
so=$(ls "$BUILD"/_C.cpython-312-*.so)
cp "$so" seedvl_kernels/
echo "built $(basename "$so") for $ARCHS in $(( $(date +%s) - start )) s"
echo "carry: seedvl_kernels/$(basename "$so")"
