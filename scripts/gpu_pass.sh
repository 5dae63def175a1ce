#!/usr/bin/env bash
# The whole GPU pass in one command: build the extension with every core, run the GPU tests and the
# benchmarks, and leave logs plus result JSON in $OUT (default ./out). Meant for one call of a
# lent GPU machine (see ../shared/GPU.md) and equally for a developer's own GPU box.
#
#   bash scripts/gpu_pass.sh                 # everything
#   PYTEST_ARGS="-k rope" bash scripts/gpu_pass.sh
#   RING_STEP_COST=0 bash scripts/gpu_pass.sh   # without the ring-attention step-cost measurement
#
# Wheels missing on an offline machine may be carried in .whl/ and are installed into /tmp/site
# first. For the lent GPU machines (no registry access) prepare them where pip works:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl nvidia-cutlass nvtx
# (the build only needs nvidia-cutlass's headers, so its own dependencies are not needed).
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -v -e . >"$OUT/build.log" 2>&1 || { echo "build failed"; tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"

python3 -m seedvl_kernels.info | tee "$OUT/info.txt"
python3 -m seedvl_kernels.info --json >"$OUT/info.json"

python3 -m pytest -m gpu -v -rs ${PYTEST_ARGS:-} tests/ 2>&1 | tee "$OUT/test_gpu.log" || status=1
python3 -m pytest bench/ -q -rs ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/bench.log" || status=1
cp bench/results/*.json "$OUT/" 2>/dev/null || true
# Issue 8: one ring step's cost relative to one unsharded attention call (profiles/ring_attention_model.md).
if [ "${RING_STEP_COST:-1}" = 1 ] && [ -z "${PYTEST_ARGS:-}" ]; then
  python3 profiles/ring_attention_step_cost.py --impl triton --out "$OUT" 2>&1 | tee "$OUT/ring_step_cost.log" || status=1
fi
exit $status
