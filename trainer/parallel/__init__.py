"""Hybrid parallelism, applied to the single-device model from outside (torchtitan's way).

``parallelize`` applies, in this order:

1. expert parallel (``expert_parallel``): MoE experts sharded over "ep" as DTensors;
2. context parallel (``context_parallel``): ring attention and balance statistics over "cp";
3. FSDP2 (``fsdp``): ZeRO-3 units over all ranks (experts over "edp"), mixed precision.

Expert parallelism comes before FSDP because FSDP shards what is already a DTensor on the "ep"
dimension again over "edp". The data side (which micro-batches and which shard each rank takes)
lives in ``trainer.data.stream`` and ``context_parallel.shard_batch``; the layout and its meshes in
``dims``. ``profiles/parallelism.md`` gives the communication volume per step.
"""

from __future__ import annotations

import torch

from model.vlm import SeedVLM

from .context_parallel import apply_context_parallel, shard_batch
from .dims import LayoutError, Meshes, ParallelDims, init_distributed, launched_by_torchrun
from .expert_parallel import apply_expert_parallel
from .fsdp import apply_fsdp, mixed_precision, refresh_trainable
from .grad_norm import clip_grad_norm_


def parallelize(model: SeedVLM, meshes: Meshes, *, param_dtype: torch.dtype | None = None) -> None:
    """Apply the layout of ``meshes`` to ``model`` in place (every rank, the same weights)."""
    if meshes.experts is not None:
        apply_expert_parallel(model, meshes.experts["ep"])
    if meshes.cp_group is not None:
        apply_context_parallel(model, meshes.cp_group)
    apply_fsdp(model, meshes, mixed_precision(param_dtype))


__all__ = [
    "LayoutError",
    "Meshes",
    "ParallelDims",
    "clip_grad_norm_",
    "init_distributed",
    "launched_by_torchrun",
    "parallelize",
    "refresh_trainable",
    "shard_batch",
]
