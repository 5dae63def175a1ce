"""Context parallelism for the LLM: the ranks of a cp group share each micro-batch.

Every document of the packed micro-batch is zigzag-sharded over the group
(``seedvl_kernels.zigzag_shard``: padded to a multiple of 2*cp, rank r keeps chunks r and 2cp-1-r),
together with its labels, positions, a token mask (False on padding) and each placeholder's index
among the batch's visual tokens. Attention runs as ``ring_attention`` over the group; the MoE
balance statistics are summed over the group and each rank returns its share (``route``'s
``group``), so loss and gradients equal the unsharded batch's once the ranks' gradients are summed
(FSDP's reduce-scatter over dp x cp does that).

The images are not sharded: every rank of the group runs the ViT on all of the micro-batch's
images and keeps the visual tokens its placeholders need (``visual_index``), so the ViT's gradient
sums correctly over the group. Spreading the images over the group by their FLOPs is the vision
workload balancing of report section 5.1.2.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from model.vlm import SeedVLM
from seedvl_kernels.ring_attention import zigzag_shard

from ..data.packer import IGNORE_INDEX, PackedBatch


def apply_context_parallel(model: SeedVLM, cp_group: dist.ProcessGroup) -> None:
    """Attention through ring_attention and balance statistics over ``cp_group``."""
    for layer in model.llm.layers:
        layer.attn.cp_group = cp_group
        if layer.is_moe:
            layer.ffn.cp_group = cp_group


def shard_batch(batch: PackedBatch, cp_size: int, cp_rank: int, image_token_id: int) -> PackedBatch:
    """This rank's zigzag shard of a packed micro-batch (host tensors; the images stay whole)."""
    ids = batch.input_ids
    is_image = ids == image_token_id
    visual = torch.where(is_image, torch.cumsum(is_image, 0) - 1, -1)  # placeholder -> visual token
    mask = torch.ones_like(ids, dtype=torch.bool)
    pad_id = 0 if image_token_id != 0 else 1
    shard = zigzag_shard(
        [ids, batch.labels, batch.position_ids, visual, mask],
        batch.cu_seqlens,
        cp_size,
        cp_rank,
        pad_values=[pad_id, IGNORE_INDEX, 0, -1, False],
    )
    ids, labels, positions, visual, mask = shard.tensors
    loss_mask = labels != IGNORE_INDEX
    local_image = ids == image_token_id
    return dataclasses.replace(
        batch,
        input_ids=ids,
        labels=labels,
        loss_mask=loss_mask,
        position_ids=positions,
        cu_seqlens=shard.cu_seqlens,
        max_seqlen=shard.max_seqlen,
        image_positions=local_image.nonzero().flatten(),
        num_targets=int(loss_mask.sum()),
        visual_index=visual[local_image],
        token_mask=mask,
    )
