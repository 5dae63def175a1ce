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


# ----------------------------------------------------------------------------- sampling


def _recomputed_logprobs(vlm, prompts, responses, images, temperature):
    """Log-probs of each response token under log_softmax(logits / T) of one packed training
    forward over every prompt + response (what trainer.rl's PPO step computes)."""
    seqs = [torch.cat([p, r]) for p, r in zip(prompts, responses, strict=True)]
    lengths = [s.numel() for s in seqs]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])
    logits = vlm(
        torch.cat(seqs), positions, cu, max(lengths),
        patches=images.patches, pos_hw=images.pos_hw,
        vit_cu_seqlens=images.cu_seqlens, vit_max_seqlen=images.max_seqlen,
    ).logits  # fmt: skip
    out = []
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        rows = cu[b] + p.numel() - 1 + torch.arange(r.numel())  # the row before each response token
        logp = (logits[rows].float() / temperature).log_softmax(-1)
        out.append(logp.gather(-1, r[:, None])[:, 0])
    return out


def _image_prompts(cfg, n):
    """n prompts, each with one image's placeholders, and the packed images."""
    from model.generate import PackedImages
    from model.preprocess import pack_images, patchify

    gen = torch.Generator().manual_seed(5)
    prompts, patches = [], []
    for i in range(n):
        im = patchify((torch.rand(56 + 28 * i, 56, 3, generator=gen) * 255).to(torch.uint8).numpy())
        tokens = int(im.grid_hw[0] * im.grid_hw[1]) // 4
        text = torch.randint(0, 200, (3 + 2 * i,), generator=gen)
        prompts.append(torch.cat([text[:2], torch.full((tokens,), cfg.image_token_id), text[2:]]))
        patches.append(im)
    p = pack_images(patches)
    return prompts, PackedImages(p.patches, p.pos_hw, p.cu_seqlens, p.max_seqlen, p.grid_hw)


def test_sampled_logprobs_match_the_training_forward():
    cfg = get_preset("seedvl-tiny")
    vlm = SeedVLM(cfg).eval()
    prompts, images = _image_prompts(cfg, 3)
    from model.generate import sample

    gen = torch.Generator().manual_seed(1)
    out = sample(vlm, prompts, 7, temperature=0.7, top_p=0.9, images=images, generator=gen)
    with torch.no_grad():
        expected = _recomputed_logprobs(vlm, prompts, out.tokens, images, 0.7)
    for b, (got, want) in enumerate(zip(out.logprobs, expected, strict=True)):
        assert got.shape == want.shape == (7,)
        err = (got - want).abs()
        # fp32 everywhere; only the summation order differs (cached decode vs one packed forward)
        assert err.max() < 1e-4, f"sequence {b}: max err {err.max():.2e}, mean {err.mean():.2e}"


def test_sampling_at_temperature_zero_is_greedy_and_seeded_draws_repeat():
    from model.generate import sample

    cfg = get_preset("llm-tiny")
    llm = MoELLM(cfg).eval()
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5]), torch.tensor([9])]
    greedy = generate(llm, prompts, 5)
    cold = sample(llm, prompts, 5, temperature=0.0)
    assert [t.tolist() for t in cold.tokens] == [t.tolist() for t in greedy]
    a = sample(llm, prompts, 5, temperature=1.3, generator=torch.Generator().manual_seed(7))
    b = sample(llm, prompts, 5, temperature=1.3, generator=torch.Generator().manual_seed(7))
    assert [t.tolist() for t in a.tokens] == [t.tolist() for t in b.tokens]
    assert all(torch.equal(x, y) for x, y in zip(a.logprobs, b.logprobs, strict=True))
    assert all((lp <= 0).all() for lp in a.logprobs)


def test_top_p_keeps_the_smallest_nucleus():
    from model.generate import next_token

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).contiguous()
    gen = torch.Generator().manual_seed(0)
    tokens, logp = next_token(logits, 1.0, 0.7, gen)  # 0.5 < 0.7 <= 0.8: tokens {0, 1}
    counts = torch.bincount(tokens, minlength=4)
    assert counts[2:].sum() == 0, counts.tolist()
    share = counts[0].item() / 4000
    assert abs(share - 0.5 / 0.8) < 0.03, f"token 0 drawn {share:.3f}, expected 0.625"
    # the returned log-prob is the unnucleated one (what a training forward recomputes)
    assert torch.allclose(logp, probs.log()[tokens], atol=1e-6)
    only_top, _ = next_token(logits[:50], 1.0, 0.45, gen)  # mass before token 1 is 0.5 >= 0.45
    assert (only_top == 0).all()
    hot, _ = next_token(logits, 1.0, 1.0, gen)
    assert torch.bincount(hot, minlength=4)[3] > 100  # no cut at top_p = 1


def test_sampling_stops_at_any_stop_token():
    from model.generate import sample

    cfg = get_preset("llm-tiny")
    llm = MoELLM(cfg).eval()
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    free = sample(llm, prompts, 8, temperature=0.0).tokens
    stops = {int(free[0][2]), int(free[1][0])}
    cut = sample(llm, prompts, 8, temperature=0.0, stop_ids=stops).tokens
    for b in range(2):
        n = next(i + 1 for i, t in enumerate(free[b].tolist()) if t in stops)
        assert cut[b].tolist() == free[b][:n].tolist(), f"sequence {b}"


def test_sampling_rejects_bad_arguments():
    from model.generate import sample

    llm = MoELLM(get_preset("llm-tiny")).eval()
    with pytest.raises(ValueError, match="temperature"):
        sample(llm, [torch.tensor([1])], 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        sample(llm, [torch.tensor([1])], 2, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample(llm, [torch.tensor([1])], -1)
