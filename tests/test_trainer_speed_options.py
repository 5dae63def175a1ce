"""The speed options of the trainer on CPU: activation checkpointing gives the same loss and
gradients as none (recomputation is exact), whole ViT blocks and decoder layers compile with
fullgraph=True (no graph breaks), and bf16 autocast trains close to fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.llm import rope_cos_sin
from model.vlm import SeedVLM
from trainer.components import build_model_config, micro_batch_loss
from trainer.data.chat import LEVEL_PROMPT, encode_conversation
from trainer.data.packer import SamplePool
from trainer.data.spatial import SpatialDataset
from trainer.data.tokenizer import ByteTokenizer
from trainer.parallel import apply_activation_checkpointing

TOK = ByteTokenizer()
CFG = build_model_config("seedvl-tiny", TOK)


def _batch():
    ds = SpatialDataset(0)
    pool = SamplePool([encode_conversation(ds[i], TOK) for i in range(3)])
    return pool.collate(np.arange(3), min_level=LEVEL_PROMPT, image_token_id=TOK.image_token_id)


def _loss_and_grads(mode: str, dtype: torch.dtype | None = None):
    torch.manual_seed(0)
    model = SeedVLM(CFG)
    apply_activation_checkpointing(model, mode)
    batch = _batch()
    with torch.autocast("cpu", dtype or torch.float32, enabled=dtype is not None):
        out = model(**batch.model_inputs())
        _, loss = micro_batch_loss(out, batch.labels, targets=batch.num_targets, accum=1, llm=CFG.llm)
    loss.backward()
    names = [n.replace("._checkpoint_wrapped_module", "") for n, _ in model.named_parameters()]
    return loss.detach(), dict(zip(names, (p.grad for p in model.parameters()), strict=True))


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_is_exact(mode):
    loss, grads = _loss_and_grads("none")
    loss_ac, grads_ac = _loss_and_grads(mode)
    assert torch.equal(loss, loss_ac)
    assert grads.keys() == grads_ac.keys()
    for name, g in grads.items():
        assert torch.equal(g, grads_ac[name]), f"{mode}: {name}"


def test_bf16_autocast_is_close_to_fp32():
    loss, grads = _loss_and_grads("none")
    loss_bf, grads_bf = _loss_and_grads("selective", torch.bfloat16)
    assert abs(loss_bf - loss) < 2e-2 * loss  # bf16 has 8 mantissa bits
    cos = torch.nn.functional.cosine_similarity(
        torch.cat([g.flatten() for g in grads.values()]),
        torch.cat([g.flatten() for g in grads_bf.values()]),
        0,
    )
    assert cos > 0.99


def test_blocks_compile_with_fullgraph():
    torch.manual_seed(0)
    model = SeedVLM(CFG)
    batch = _batch()
    x = torch.randn(batch.patches.shape[0], CFG.vit.width)
    block = model.vit.blocks[0]
    args = (x, batch.pos_hw, batch.vit_cu_seqlens, batch.vit_max_seqlen)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), block(*args))

    layer = model.llm.layers[0]
    h = torch.randn(batch.num_tokens, CFG.llm.hidden)
    cos, sin = rope_cos_sin(batch.position_ids, CFG.llm.head_dim, CFG.llm.rope_theta)
    args = (h, cos, sin, batch.cu_seqlens, batch.max_seqlen)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*args), layer(*args), strict=True):
        torch.testing.assert_close(got, want)
