"""Greedy generation with a KV cache, for the MoE LLM and the VLM.

A reference loop for evaluation and RL rollouts at small scale, not a serving engine: the host
drives it (per-sequence lengths are host ints), and each step packs every sequence's cached keys
into one varlen batch by copying. What it shares with training is the model code itself: the same
``Attention`` runs prefill (all prompt tokens) and decode (one token per sequence) through
``seedvl_kernels.varlen_attention`` with ``cu_seqlens_k``, whose bottom-right causal alignment makes
new queries see the whole cache plus themselves.

Sequences that finish (EOS) join later steps with zero new tokens, which varlen attention allows,
so the batch never has to be re-packed.

Shape legend:
    B   sequences; L layers; S cache capacity per sequence (longest prompt + max_new_tokens)
    Hkv key/value heads, Dh head dim; T new tokens of a step, packed (cu_seqlens over B)
"""

from __future__ import annotations

import torch

from .llm import MoELLM
from .preprocess import PackedImages
from .vlm import SeedVLM


class KVCache:
    """Keys and values of B sequences for every layer: (L, B, S, Hkv, Dh) each."""

    def __init__(
        self, num_layers: int, batch: int, capacity: int, num_kv_heads: int, head_dim: int,
        *, dtype: torch.dtype, device: torch.device,
    ) -> None:  # fmt: skip
        shape = (num_layers, batch, capacity, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * batch  # committed tokens per sequence
        self._new: list[int] | None = None

    def begin(self, new_lengths: list[int]) -> None:
        """Announce how many new tokens each sequence brings in the coming forward."""
        if len(new_lengths) != len(self.lengths):
            raise ValueError(f"new_lengths: expected {len(self.lengths)} entries, got {len(new_lengths)}")
        capacity = self.k.shape[2]
        for b, (have, n) in enumerate(zip(self.lengths, new_lengths, strict=True)):
            if have + n > capacity:
                raise ValueError(f"KVCache: sequence {b} would hold {have + n} tokens, capacity {capacity}")
        self._new = list(new_lengths)

    def update(
        self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Store a layer's packed new keys/values; return every sequence's keys/values, packed,
        with their cu_seqlens_k and max_seqlen_k."""
        if self._new is None:
            raise RuntimeError("KVCache.update: call begin() before the forward")
        ks, vs, totals, row = [], [], [], 0
        for b, n in enumerate(self._new):
            start = self.lengths[b]
            self.k[layer, b, start : start + n] = k_new[row : row + n]
            self.v[layer, b, start : start + n] = v_new[row : row + n]
            ks.append(self.k[layer, b, : start + n])
            vs.append(self.v[layer, b, : start + n])
            totals.append(start + n)
            row += n
        cu_k = _cu_seqlens(totals, k_new.device)
        return torch.cat(ks), torch.cat(vs), cu_k, max(totals)

    def commit(self) -> None:
        """The forward is done: the new tokens become part of the cached sequences."""
        self.lengths = [have + n for have, n in zip(self.lengths, self._new, strict=True)]
        self._new = None


def _cumsum(lengths: list[int]) -> list[int]:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


def _cu_seqlens(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(_cumsum(lengths), dtype=torch.int32, device=device)


def _step(llm: MoELLM, cache: KVCache, embeds: torch.Tensor, new_lengths: list[int]) -> torch.Tensor:
    """Run the new tokens through the model; logits (b', V) of the last new token of each sequence
    that had any (b' <= B), in sequence order."""
    cache.begin(new_lengths)
    device = embeds.device
    pairs = list(zip(cache.lengths, new_lengths, strict=True))
    positions = torch.cat([torch.arange(have, have + n, device=device) for have, n in pairs])
    cu = _cumsum(new_lengths)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    hidden = llm.forward_hidden(embeds, positions, cu_t, max(new_lengths), cache).logits
    cache.commit()
    last = torch.tensor([end - 1 for end, n in zip(cu[1:], new_lengths, strict=True) if n], device=device)
    return llm.lm_head(hidden[last])


@torch.no_grad()
def generate(
    model: MoELLM | SeedVLM,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
    images: PackedImages | None = None,
) -> list[torch.Tensor]:
    """Greedy continuation of each prompt, up to ``max_new_tokens`` tokens or ``eos_id`` (kept).

    Args:
        model: an MoELLM, or a SeedVLM when the prompts hold image placeholders.
        prompts: B 1-D int64 token tensors (non-empty), positions start at 0 in each.
        images: the packed images whose visual tokens fill the prompts' placeholders, in order.
    Returns:
        B 1-D int64 tensors of generated tokens.
    """
    if not prompts or any(p.ndim != 1 or p.numel() == 0 for p in prompts):
        raise ValueError("prompts: expected a non-empty list of non-empty 1-D token tensors")
    if images is not None and not isinstance(model, SeedVLM):
        raise ValueError("images: only a SeedVLM takes images")
    llm = model.llm if isinstance(model, SeedVLM) else model
    cfg, weight = llm.cfg, llm.embed.weight
    capacity = max(p.numel() for p in prompts) + max_new_tokens
    cache = KVCache(
        cfg.num_layers, len(prompts), capacity, cfg.num_kv_heads, cfg.head_dim,
        dtype=weight.dtype, device=weight.device,
    )  # fmt: skip

    ids = torch.cat(prompts).to(weight.device)
    if isinstance(model, SeedVLM):
        visual = None
        if images is not None:
            visual = model.encode_images(images.patches, images.pos_hw, images.cu_seqlens, images.max_seqlen)
        embeds = model.embed(ids, visual)
    else:
        embeds = llm.embed(ids)
    logits = _step(llm, cache, embeds, [p.numel() for p in prompts])

    out: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))  # sequences still generating, in order; rows of `logits`
    for step in range(max_new_tokens):
        tokens = logits.argmax(-1)
        for b, t in zip(live, tokens.tolist(), strict=True):
            out[b].append(t)
        keep = [i for i, b in enumerate(live) if eos_id is None or out[b][-1] != eos_id]
        live = [live[i] for i in keep]
        if not live or step == max_new_tokens - 1:
            break
        new = [0] * len(prompts)
        for b in live:
            new[b] = 1
        logits = _step(llm, cache, llm.embed(tokens[keep]), new)
    return [torch.tensor(o, dtype=torch.int64) for o in out]
