"""Model forwards on the tiny presets: packing is invisible (packed == one-by-one), the VLM trains
(finite gradients everywhere), and a ViT block compiles.

The last test runs the whole VLM through every Triton kernel (the interpreter on a CPU) and checks
loss and gradients against the reference path.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import seedvl_kernels
from model.config import get_preset
from model.llm import MoELLM
from model.preprocess import pack_images, patchify
from model.vit import SeedViT, ViTBlock
from model.vlm import SeedVLM
from tests.utils import assert_close


def _random_images(shapes: list[tuple[int, int]], gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=gen) for h, w in shapes]


# Image sizes already multiples of 28 px, so patchify does not resize: (2x2), (4x6), (2x8) patches.
IMAGE_SHAPES = [(28, 28), (56, 84), (28, 112)]


def _packed_images(shapes=IMAGE_SHAPES):
    gen = torch.Generator().manual_seed(0)
    return pack_images([patchify(img) for img in _random_images(shapes, gen)])


def _docs(lengths: list[int], vocab: int):
    """Random documents, and their packed ids, restarting positions and cu_seqlens."""
    docs = [torch.randint(0, vocab, (n,)) for n in lengths]
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return docs, torch.cat(docs), position_ids, cu


def test_vit_packed_equals_per_image():
    vit = SeedViT(get_preset("vit-tiny")).eval()
    batch = _packed_images()
    with torch.no_grad():
        packed = vit(batch.patches, batch.pos_hw, batch.cu_seqlens, batch.max_seqlen)
        cu = batch.cu_seqlens.tolist()
        singles = []
        for s, e in itertools.pairwise(cu):
            one = torch.tensor([0, e - s], dtype=torch.int32)
            singles.append(vit(batch.patches[s:e], batch.pos_hw[s:e], one, e - s))
    assert packed.shape == (cu[-1], 64)
    assert_close(packed, torch.cat(singles), "vit packed vs per-image", atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["llm-tiny", "llm-tiny-shared"])
def test_llm_packed_equals_per_document(preset):
    cfg = get_preset(preset)
    llm = MoELLM(cfg).eval()
    lengths = [7, 1, 16, 3]
    docs, ids, pos, cu = _docs(lengths, cfg.vocab_size)
    with torch.no_grad():
        packed = llm(ids, pos, cu, max(lengths))
        singles = [
            llm(d, torch.arange(len(d)), torch.tensor([0, len(d)], dtype=torch.int32), len(d)).logits
            for d in docs
        ]
    assert packed.logits.shape == (sum(lengths), cfg.vocab_size)
    assert_close(packed.logits, torch.cat(singles), f"{preset} packed vs per-document", atol=1e-5, rtol=1e-5)
    assert torch.isfinite(packed.load_balancing_loss) and packed.load_balancing_loss > 0
    assert torch.isfinite(packed.router_z_loss)


def test_llm_is_causal_within_a_document():
    cfg = get_preset("llm-tiny")
    llm = MoELLM(cfg).eval()
    _, ids, pos, cu = _docs([10], cfg.vocab_size)
    changed = ids.clone()
    changed[-1] = (ids[-1] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = llm(ids, pos, cu, 10).logits, llm(changed, pos, cu, 10).logits
    assert_close(a[:-1], b[:-1], "logits before the changed last token", atol=1e-6, rtol=1e-6)


def _vlm_batch(cfg, gen: torch.Generator):
    images = _packed_images()
    n_visual = images.patches.shape[0] // 4
    # Two documents: text, all visual placeholders, text | a text-only document.
    img = cfg.image_token_id
    text = lambda n: torch.randint(0, img, (n,), generator=gen)
    doc1 = torch.cat([text(5), torch.full((n_visual,), img), text(6)])
    doc2 = text(9)
    ids = torch.cat([doc1, doc2])
    pos = torch.cat([torch.arange(len(doc1)), torch.arange(len(doc2))])
    cu = torch.tensor([0, len(doc1), len(ids)], dtype=torch.int32)
    return images, ids, pos, cu, max(len(doc1), len(doc2))


def _vlm_loss(vlm: SeedVLM, cfg, batch) -> torch.Tensor:
    images, ids, pos, cu, max_len = batch
    out = vlm(
        ids, pos, cu, max_len,
        patches=images.patches, pos_hw=images.pos_hw,
        vit_cu_seqlens=images.cu_seqlens, vit_max_seqlen=images.max_seqlen,
    )  # fmt: skip
    assert out.logits.shape == (ids.shape[0], cfg.llm.vocab_size)
    ce = F.cross_entropy(out.logits[:-1].float(), ids[1:])
    return ce + cfg.llm.aux_loss_coef * out.load_balancing_loss + cfg.llm.z_loss_coef * out.router_z_loss


@pytest.mark.parametrize("preset", ["seedvl-tiny", "seedvl-tiny-shared"])
def test_vlm_forward_backward_finite(preset):
    cfg = get_preset(preset)
    vlm = SeedVLM(cfg)
    loss = _vlm_loss(vlm, cfg, _vlm_batch(cfg, torch.Generator().manual_seed(1)))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in vlm.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
    # The vision tower really feeds the LLM.
    assert vlm.vit.patch_embed.weight.grad.abs().sum() > 0
    assert vlm.adapter.w1.grad.abs().sum() > 0


def test_vlm_visual_tokens_land_on_placeholders():
    cfg = get_preset("seedvl-tiny")
    vlm = SeedVLM(cfg).eval()
    images, ids, *_ = _vlm_batch(cfg, torch.Generator().manual_seed(2))
    with torch.no_grad():
        visual = vlm.encode_images(images.patches, images.pos_hw, images.cu_seqlens, images.max_seqlen)
        embeds = vlm.embed(ids, visual)
    is_img = ids == cfg.image_token_id
    assert_close(embeds[is_img], visual, "placeholder rows", atol=0, rtol=0)
    assert_close(embeds[~is_img], vlm.llm.embed(ids[~is_img]), "text rows", atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="placeholder"):
        vlm.embed(ids, visual[:-1])


def test_vit_block_compiles_fullgraph():
    block = ViTBlock(get_preset("vit-tiny")).eval()
    batch = _packed_images()
    x = torch.randn(batch.patches.shape[0], 64)
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        expected = block(x, batch.pos_hw, batch.cu_seqlens, batch.max_seqlen)
        actual = compiled(x, batch.pos_hw, batch.cu_seqlens, batch.max_seqlen)
    assert_close(actual, expected, "compiled ViT block", atol=1e-5, rtol=1e-5)


def test_vlm_triton_path_matches_reference_path():
    """Every op with a Triton kernel runs it (interpreter on CPU); loss and all gradients match."""
    cfg = get_preset("seedvl-tiny")
    vlm = SeedVLM(cfg)
    batch = _vlm_batch(cfg, torch.Generator().manual_seed(3))
    kernels = {op: "triton" for op in seedvl_kernels.ops() if "triton" in seedvl_kernels.implementations(op)}
    assert {"varlen_attention", "pool_adapter", "moe_ffn"} <= kernels.keys()
    results = []
    for choice in ({}, kernels):
        vlm.zero_grad()
        with seedvl_kernels.use_impl("ref", **choice):
            loss = _vlm_loss(vlm, cfg, batch)
            loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in vlm.named_parameters()}))
    (ref_loss, ref_grads), (loss, grads) = results
    assert_close(loss, ref_loss, "loss", atol=1e-5, rtol=1e-5)
    for name, g in grads.items():
        scale = float(ref_grads[name].abs().max()) or 1.0
        assert_close(g, ref_grads[name], f"d{name}", atol=1e-4 * scale, rtol=1e-4)
