"""ZeRO-3 with FSDP2 (``fully_shard``): parameters, gradients and optimizer states sharded.

Units, innermost first (each unit all-gathers its parameters just before its forward and frees
them after; gradients are reduce-scattered as each unit's backward ends):

    each ViT block, the ViT, the adapter        over all ranks ("dp_cp"), as the report's ViT ZeRO
    each MoE layer's routed experts (ep > 1)    over "edp": the ranks holding the same experts
    each LLM decoder layer                      over all ranks ("dp_cp")
    the root (embeddings, final norm, LM head)  over all ranks ("dp_cp")

The LLM's dense weights are sharded over dp x cp rather than dp alone: the cp ranks of a dp
replica hold the same weights and their gradients must be summed too, and one flattened mesh
does both (torchtitan's dp_shard_cp).

Gradients are summed, not averaged: the loss is already normalised by the step's global target
count, so the sum over ranks is the gradient of the whole step. Mixed precision: with
``param_dtype=bf16`` the all-gathered weights and the activations are bf16 while the sharded
master weights, the optimizer states and the gradient reduction stay fp32.

ViT pre-training (trainer.vit_pretrain.loop) shards its model with :func:`shard_units`: each ViT
block, the ViT, and each head (MIM decoder, attention pool, text encoder, SuperClass, SigLIP) is a
unit of its own, with no root, since a step calls them one by one rather than through one forward.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from model.vlm import SeedVLM

from .dims import Meshes


def mixed_precision(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    if param_dtype is None or param_dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def apply_fsdp(model: SeedVLM, meshes: Meshes, mp_policy: MixedPrecisionPolicy) -> None:
    world = meshes.world
    for block in model.vit.blocks:
        fully_shard(block, mesh=world, mp_policy=mp_policy)
    fully_shard(model.vit, mesh=world, mp_policy=mp_policy)
    fully_shard(model.adapter, mesh=world, mp_policy=mp_policy)
    for layer in model.llm.layers:
        if meshes.experts is not None and layer.is_moe:
            fully_shard(layer.ffn.experts, mesh=meshes.experts["edp"], mp_policy=mp_policy)
        fully_shard(layer, mesh=world, mp_policy=mp_policy)
    fully_shard(model, mesh=world, mp_policy=mp_policy)
    sum_gradients(model)


def shard_units(
    model: nn.Module, units: Iterable[nn.Module], mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy
) -> None:
    """``fully_shard`` each of ``units``, innermost first, over ``mesh``, then :func:`sum_gradients`.
    For a model without a root unit, whose parts run one by one (ViT pre-training): every
    parameter must then sit in one of the units."""
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp_policy)
    loose = [name for name, p in model.named_parameters() if not isinstance(p, DTensor)]
    if loose:
        raise ValueError(f"units: parameters outside every unit: {', '.join(loose)}")
    sum_gradients(model)


def sum_gradients(model: nn.Module) -> None:
    """Every FSDP unit of ``model`` sums its gradients over its ranks (the losses are normalised by
    global counts), with ranks that left a parameter unused still joining the reduce-scatter."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # A plain SUM: gloo has no PREMUL_SUM, and with a factor of 1 it is the same reduction.
            module.set_force_sum_reduction_for_comms(True)
            # Ranks whose micro-batch left a parameter unused (no image, no token for an expert)
            # still join the reduce-scatter, with zeros.
            module.set_reduce_scatter_unused_params(True)


def refresh_trainable(model: nn.Module) -> None:
    """Recompute each FSDP unit's gradient dtypes after a stage changed which parameters train.

    FSDP2 takes a unit's original and reduce dtypes from its parameters that require grad when the
    unit first runs; a unit frozen then (the ViT in stage 0) gets none, and with bf16 parameters its
    gradients would later come back in bf16 when it trains. FSDP2 has no public call for this, so
    this one reaches into its parameter groups (torch 2.13).
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None:
                group._init_mp_dtypes()
