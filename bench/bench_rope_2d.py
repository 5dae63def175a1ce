"""rope_2d bandwidth at Seed-ViT shapes: one read and one write of x, 2 * T * H * D * itemsize bytes.

Rows per (T, dtype): the cuda, triton and ref implementations, and two peers timed in the same
process: ``copy`` (a device-to-device copy of the same bytes, the speed of light; the kernels'
target is ratio_to_peer["copy"] >= 0.8) and ``torch_compile_ref`` (the reference compiled by
Inductor, the strongest PyTorch-only alternative). On a CPU: one tiny shape, fp32, the reference
and the peers (compiled with the aot_eager backend, so no C++ build), to prove the harness runs.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from bench import harness
from bench.model_shapes import (
    SEEDVIT_HEAD_DIM,
    SEEDVIT_HEADS,
    SEEDVIT_MAX_PATCHES_PER_SIDE,
    SEEDVIT_ROPE_THETA,
    SEEDVIT_TOKENS,
    TINY_VIT_HEAD_DIM,
    TINY_VIT_HEADS,
    TINY_VIT_TOKENS,
)

rope_mod = importlib.import_module("seedvl_kernels.rope_2d")

ON_GPU = torch.cuda.is_available()
PEERS = ("copy", "torch_compile_ref")
IMPLS = ("cuda", "triton", "ref", *PEERS)
if ON_GPU:
    CASES = [(T, SEEDVIT_HEADS, SEEDVIT_HEAD_DIM) for T in SEEDVIT_TOKENS]
    DTYPES = (torch.bfloat16, torch.float16, torch.float32)
else:
    CASES = [(TINY_VIT_TOKENS, TINY_VIT_HEADS, TINY_VIT_HEAD_DIM)]
    DTYPES = (torch.float32,)

# One compiled reference for every case: dynamic=False gives each (shape, dtype) its own
# specialised kernel, the strongest version of this peer.
_compiled_ref = torch.compile(
    rope_mod.rope_2d_ref, dynamic=False, backend="inductor" if ON_GPU else "aot_eager"
)


def _peers(x: torch.Tensor, pos: torch.Tensor) -> dict:
    out = torch.empty_like(x)
    return {
        "copy": lambda: out.copy_(x),
        "torch_compile_ref": lambda: _compiled_ref(x, pos, SEEDVIT_ROPE_THETA),
    }


# Decorators nearest the function vary slowest: a case's impls run back to back.
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("T,H,D", CASES, ids=lambda v: str(v))
def test_rope_2d(gpu_bench, bench_device, impl, T, H, D, dtype):
    if impl not in PEERS:
        harness.skip_unless_runnable("rope_2d", impl, bench_device, dtype)
    x = torch.randn(T, H, D, device=bench_device, dtype=dtype)
    pos = torch.randint(0, SEEDVIT_MAX_PATCHES_PER_SIDE, (T, 2), device=bench_device, dtype=torch.int32)
    peers = _peers(x, pos)
    fn = peers[impl] if impl in PEERS else (lambda: rope_mod.rope_2d(x, pos, SEEDVIT_ROPE_THETA, impl=impl))
    row = gpu_bench(
        fn,
        impl=impl,
        case={"T": T, "H": H, "D": D},
        dtype=dtype,
        nbytes=2 * x.numel() * x.element_size(),
        peers=peers,
        notes="" if ON_GPU or impl != "torch_compile_ref" else "aot_eager backend on CPU",
    )
    assert row["time_ms"] > 0
