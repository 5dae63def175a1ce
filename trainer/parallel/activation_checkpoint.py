"""Activation checkpointing per block: each ViT block and decoder layer keeps fewer activations for
backward and recomputes the rest.

    none        keep everything (fastest; the CPU default)
    selective   keep the outputs of the matmuls and of attention, recompute the cheap elementwise
                ops, norms and activations between them (torch's selective activation checkpointing):
                most of the memory back for a few percent of extra compute
    full        keep only each block's input and recompute the whole block in backward

Applied before FSDP (torchtitan's order), through torch's ``checkpoint_wrapper``; checkpoints keep
their parameter names (``get_state_dict`` drops the wrapper's prefix).
"""

from __future__ import annotations

from functools import partial

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from model.vlm import SeedVLM

MODES = ("none", "selective", "full")


def _saved_ops() -> set:
    ops = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
    for name in ("varlen_attention_fwd", "grouped_gemm", "moe_ffn_triton_fwd"):
        if hasattr(torch.ops.seedvl, name):
            ops.add(getattr(torch.ops.seedvl, name).default)
    return ops


def _policy(saved: set, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: SeedVLM, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"--activation-checkpointing: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode == "none":
        return
    kwargs = {}
    if mode == "selective":
        policy = partial(_policy, _saved_ops())
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, policy)
    for blocks in (model.vit.blocks, model.llm.layers):
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block, **kwargs)


def apply_compile(model: SeedVLM) -> None:
    """``torch.compile`` each ViT block and decoder layer in place (one graph per block: every op of
    the package is a custom op with a fake implementation, so the blocks trace without breaks)."""
    for blocks in (model.vit.blocks, model.llm.layers):
        for block in blocks:
            block.compile(dynamic=True)  # token counts change every batch: no recompiles
