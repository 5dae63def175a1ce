"""Model FLOPs of a packed micro-batch and the device's measured matmul peak: what each step's
``tflops`` and ``mfu`` in log.jsonl are made of.

Model FLOPs follow the usual MFU convention: 3 x the forward FLOPs (backward = 2 x forward) of every
matmul weight a token uses (the experts it is routed to, not all of them; model.summary counts
them) plus attention, whatever is frozen and whatever is recomputed:

    LLM      T x 2 x active matmul weights + 4 x H x Dh x layers x sum_d L_d (L_d + 1) / 2   (causal)
    ViT      Tv x 2 x matmul weights       + 4 x H x Dh x depth x sum_i L_i^2                (full)
    adapter  Tv/4 x 2 x matmul weights

for the documents L_d and images L_i of the micro-batch this rank computes (a context-parallel
shard counts its own local blocks). The peak is a large matmul timed with CUDA events at start, in
the dtype the model computes in; on a CPU there is no peak and no MFU.
"""

from __future__ import annotations

import torch

from model.config import VLMConfig
from model.summary import count, llm_flops_per_token, vit_flops_per_token

from .data.packer import PackedBatch


class FlopCounter:
    def __init__(self, cfg: VLMConfig) -> None:
        parts = count(cfg)
        self.llm_matmul = llm_flops_per_token(cfg.llm, parts, 0)["matmul"]
        self.vit_matmul = vit_flops_per_token(cfg.vit, parts, 0)["matmul"]
        self.adapter = 2 * parts["adapter"].matmul_active
        self.llm_attn = 4 * cfg.llm.num_q_heads * cfg.llm.head_dim * cfg.llm.num_layers
        self.vit_attn = 4 * cfg.vit.num_heads * cfg.vit.head_dim * cfg.vit.depth

    def batch(self, b: PackedBatch) -> int:
        """Training FLOPs of one packed micro-batch (host tensors; no device sync)."""
        docs = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).long()
        images = (b.vit_cu_seqlens[1:] - b.vit_cu_seqlens[:-1]).long()
        patches = int(b.patches.shape[0])
        forward = (
            b.num_tokens * self.llm_matmul
            + self.llm_attn * int((docs * (docs + 1) // 2).sum())
            + patches * self.vit_matmul
            + self.vit_attn * int((images * images).sum())
            + patches // 4 * self.adapter
        )
        return 3 * forward


def measure_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float | None:
    """Measured dense matmul FLOP/s of ``device`` in ``dtype`` (None on a CPU)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3)
