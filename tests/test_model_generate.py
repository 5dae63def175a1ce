"""KV-cache generation equals recomputing the whole sequence at every step."""

from __future__ import annotations

import pytest
import torch

from model.config import get_preset
from model.generate import KVCache, generate
from model.llm import MoELLM
from model.vlm import SeedVLM
from tests.test_model_forward import _vlm_batch


def _greedy_without_cache(llm: MoELLM, prompt: torch.Tensor, n: int) -> torch.Tensor:
    seq = prompt.clone()
    for _ in range(n):
        L = seq.numel()
        logits = llm(seq, torch.arange(L), torch.tensor([0, L], dtype=torch.int32), L).logits
        seq = torch.cat([seq, logits[-1:].argmax(-1)])
    return seq[prompt.numel() :]


@pytest.mark.parametrize("preset", ["llm-tiny", "llm-tiny-shared"])
def test_cached_generation_matches_recompute(preset):
    cfg = get_preset(preset)
    llm = MoELLM(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen) for n in (5, 1, 9)]
    with torch.no_grad():
        expected = [_greedy_without_cache(llm, p, 6) for p in prompts]
    actual = generate(llm, prompts, 6)
    for b, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert torch.equal(a, e), f"sequence {b}: cached {a.tolist()} != recomputed {e.tolist()}"


def test_generation_stops_at_eos_per_sequence():
    cfg = get_preset("llm-tiny")
    llm = MoELLM(cfg).eval()
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    free = generate(llm, prompts, 5)
    eos = int(free[0][1])  # a token sequence 0 emits becomes the EOS
    stopped = generate(llm, prompts, 5, eos_id=eos)
    for b in range(2):
        n = next((i + 1 for i, t in enumerate(free[b].tolist()) if t == eos), 5)
        assert stopped[b].tolist() == free[b][:n].tolist(), f"sequence {b}"
    assert len(stopped[0]) <= 2


def test_vlm_generation_with_images():
    cfg = get_preset("seedvl-tiny")
    vlm = SeedVLM(cfg).eval()
    images, ids, _, cu, _ = _vlm_batch(cfg, torch.Generator().manual_seed(3))
    prompt = ids[: cu[1]]  # the document holding the image placeholders
    out = generate(vlm, [prompt], 4, images=images)
    assert out[0].shape == (4,)
    # Same as recomputing the full multimodal sequence for the first token.
    with torch.no_grad():
        L = prompt.numel()
        logits = vlm(
            prompt, torch.arange(L), torch.tensor([0, L], dtype=torch.int32), L,
            patches=images.patches, pos_hw=images.pos_hw,
            vit_cu_seqlens=images.cu_seqlens, vit_max_seqlen=images.max_seqlen,
        ).logits  # fmt: skip
    assert out[0][0] == logits[-1].argmax()


def test_kv_cache_rejects_overflow():
    cache = KVCache(1, 2, 4, 1, 8, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="capacity 4"):
        cache.begin([5, 0])
    with pytest.raises(ValueError, match="entries"):
        cache.begin([1])
