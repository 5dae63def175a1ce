"""ring_attention's per-step (out, lse) merge: the fused Triton kernel against the eager reference.

Every ring step folds a block's fp32 partial (o_t, lse_t) into the running (o, lse) of this rank's
queries. Bytes a step: o read and written, o_t read (3 * T*Hq*D*4), lse read and written, lse_t read
(3 * T*Hq*4). Rows: ``triton`` (one kernel, seedvl_kernels.ring_attention_triton), ``ref`` (the eager
chain of 20 ATen kernels, ring_attention._merge_ref) and the peer ``copy`` (a device-to-device copy
of the same number of bytes: the kernel's target is ratio_to_peer["copy"] >= 0.8). Shape: a 16k-token
local shard (a 32k-token document at CP=2) with the LLM pack's 32 query heads of head dim 128. On a
CPU: a tiny shape, the reference and the peer only.
"""

from __future__ import annotations

import importlib

import pytest
import torch

ra = importlib.import_module("seedvl_kernels.ring_attention")
rat = importlib.import_module("seedvl_kernels.ring_attention_triton")

ON_GPU = torch.cuda.is_available()
PEERS = ("copy",)
IMPLS = ("triton", "ref", *PEERS)
CASES = [(16384, 32, 128)] if ON_GPU else [(64, 2, 16)]  # (local rows T, Hq, D)


def _partials(T: int, H: int, D: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    out, blk = (torch.randn(T, H, D, device=device) for _ in range(2))
    lse, blk_lse = (torch.randn(H, T, device=device) for _ in range(2))
    return out, lse, blk, blk_lse


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,H,D", CASES, ids=lambda v: str(v))
def test_ring_attention_merge(gpu_bench, bench_device, impl, T, H, D):
    if impl == "triton":
        if bench_device.type != "cuda":
            pytest.skip("ring_attention merge impl=triton: CPU runs time the reference only")
        why = rat.merge_unavailable(torch.empty(0, device=bench_device), torch.empty(0, device=bench_device))
        if why is not None:
            pytest.skip(f"ring_attention merge impl=triton: {why}")
    out, lse, blk, blk_lse = _partials(T, H, D, bench_device)
    nbytes = 3 * out.numel() * 4 + 3 * lse.numel() * 4
    src = torch.empty(nbytes // 8, device=bench_device)  # copy: nbytes / 2 read + nbytes / 2 written
    dst = torch.empty_like(src)
    peers = {"copy": lambda: dst.copy_(src)}
    merges = {
        "triton": lambda: rat.merge_(out, lse, blk, blk_lse),
        "ref": lambda: ra._merge_ref(out, lse, blk, blk_lse),
    }
    row = gpu_bench(
        peers[impl] if impl in PEERS else merges[impl],
        impl=impl,
        case={"T": T, "Hq": H, "D": D, "what": "merge"},
        dtype=torch.float32,
        nbytes=nbytes,
        peers=peers,
    )
    assert row["time_ms"] > 0
