"""Every Triton kernel of the package compiles for sm_90 (H100/H200) in bf16 at the tile configs its
launcher picks on a GPU, without a GPU: profiles/triton_aot.py --quick --check in a subprocess (the
kernels must be real JIT functions there, and conftest sets TRITON_INTERPRET=1 here). It fails on a
lowering error, shared memory past the block limit, a bf16 dot product without tensor-core MMA, a
main loop without async copies, or a kernel with no launch in the script.

The interpreter tests check what the kernels compute; this checks what the GPU compiler makes of
them, which the interpreter never sees (bf16 dot layouts, shared-memory budgets, pipelining)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parent.parent
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.slow
@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton has no NVIDIA backend (no bundled ptxas)")
def test_kernels_compile_for_sm90_bf16():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    cmd = [sys.executable, str(ROOT / "profiles" / "triton_aot.py"), "--quick", "--check"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    for op in ("varlen_attention", "rope_2d", "grouped_gemm", "moe_ffn", "pool_adapter"):
        assert f"  {op}: " in run.stdout, f"no {op} launch compiled:\n{log[-3000:]}"
