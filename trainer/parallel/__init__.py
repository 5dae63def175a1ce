"""Hybrid parallelism, applied to the single-device model from outside (torchtitan's way).

``parallelize`` applies, in this order:

1. expert parallel (``expert_parallel``): MoE experts sharded over "ep" as DTensors;
2. context parallel (``context_parallel``): ring attention and balance statistics over "cp";
3. activation checkpointing per block (``activation_checkpoint``), then ``torch.compile`` per block;
4. FSDP2 (``fsdp``): ZeRO-3 units over all ranks (experts over "edp"), mixed precision.

A single process takes step 3 alone (``meshes`` None). Under pipeline parallelism (``pipeline``,
pp > 1) the LLM is split into this rank's stages between steps 3 and 4 (``pipeline.split_model``:
steps 1-3 apply to every layer alike, so they need not know the split), and step 4 is
``pipeline.apply_fsdp``: the ViT and the adapter over all ranks, each stage over its pipeline
rank's dp x cp ranks.

Vision workload balancing (``vit_balance``) is not applied to the model: the trainer builds a
``VisionBalancer`` next to it, which spreads each step's images over the ranks and hands the model
each micro-batch's ``visual_route``.

Expert parallelism comes before FSDP because FSDP shards what is already a DTensor on the "ep"
dimension again over "edp". The data side (which micro-batches and which shard each rank takes)
lives in ``trainer.data.stream`` and ``context_parallel.shard_batch``; the layout and its meshes in
``dims``. ``profiles/parallelism.md`` gives the communication volume per step.
"""

from __future__ import annotations

import torch

from model.vlm import SeedVLM

from .activation_checkpoint import MODES as AC_MODES
from .activation_checkpoint import apply_activation_checkpointing, apply_compile
from .context_parallel import apply_context_parallel, shard_batch
from .dims import LayoutError, Meshes, ParallelDims, check_launch, init_distributed, launched_by_torchrun
from .expert_parallel import apply_expert_parallel
from .fsdp import apply_fsdp, mixed_precision, refresh_trainable, shard_units
from .grad_norm import clip_grad_norm_
from .pipeline import LLMStage, Pipeline, PipelinePlan, plan_pipeline
from .pipeline import apply_fsdp as apply_pipeline_fsdp
from .pipeline import split_model as split_pipeline
from .vit_balance import BalancedBatch, VisionBalancer, VisualRoute, unwrap


def parallelize(
    model: SeedVLM,
    meshes: Meshes | None,
    *,
    param_dtype: torch.dtype | None = None,
    activation_checkpointing: str = "none",
    compile: bool = False,
    pipeline: PipelinePlan | None = None,
) -> list[LLMStage]:
    """Apply the layout of ``meshes`` (None: a single process) and the per-block options to
    ``model`` in place (every rank, the same weights). Returns this rank's pipeline stages (none
    without ``pipeline``)."""
    if meshes is not None and meshes.experts is not None:
        apply_expert_parallel(model, meshes.experts["ep"])
    if meshes is not None and meshes.cp_group is not None:
        apply_context_parallel(model, meshes.cp_group)
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        apply_compile(model)
    if pipeline is not None and meshes is not None and meshes.dims.pp > 1:
        stages = split_pipeline(model, pipeline, meshes.pp_rank, model.cfg.image_token_id)
        apply_pipeline_fsdp(model, stages, meshes, mixed_precision(param_dtype))
        return stages
    if meshes is not None:
        apply_fsdp(model, meshes, mixed_precision(param_dtype))
    return []


__all__ = [
    "AC_MODES",
    "BalancedBatch",
    "LLMStage",
    "LayoutError",
    "Meshes",
    "ParallelDims",
    "Pipeline",
    "PipelinePlan",
    "VisionBalancer",
    "VisualRoute",
    "check_launch",
    "clip_grad_norm_",
    "init_distributed",
    "launched_by_torchrun",
    "parallelize",
    "plan_pipeline",
    "refresh_trainable",
    "shard_batch",
    "shard_units",
    "unwrap",
]
