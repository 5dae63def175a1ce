"""Generation with a KV cache, for the MoE LLM and the VLM: greedy (:func:`generate`) and sampled
with temperature, top-p, stop tokens and the log-probability of every sampled token (:func:`sample`,
RL rollouts).

A reference loop for evaluation and RL rollouts at small scale, not a serving engine: the host
drives it (per-sequence lengths are host ints), and each step packs every sequence's cached keys
into one varlen batch by copying. What it shares with training is the model code itself: the same
``Attention`` runs prefill (all prompt tokens) and decode (one token per sequence) through
``seedvl_kernels.varlen_attention`` with ``cu_seqlens_k``, whose bottom-right causal alignment makes
new queries see the whole cache plus themselves.

Sequences that finish (EOS, a stop token) join later steps with zero new tokens, which varlen
attention allows, so the batch never has to be re-packed.

Sampling: the next-token distribution is softmax(logits / temperature), cut to its top-p nucleus
(the smallest set of most likely tokens whose probability reaches ``top_p``) and renormalised; a
temperature of 0 is greedy. The log-probability returned for each sampled token is under the
temperature-scaled distribution *before* the nucleus cut, log_softmax(logits / temperature), the
quantity a training forward recomputes from the packed prompt + response (trainer.rl), so the two
agree up to floating-point summation order (tests/test_model_generate.py).

Shape legend:
    B   sequences; L layers; S cache capacity per sequence (longest prompt + max_new_tokens)
    Hkv key/value heads, Dh head dim; T new tokens of a step, packed (cu_seqlens over B)
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

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


def decode_step(llm: MoELLM, cache: KVCache, embeds: torch.Tensor, new_lengths: list[int]) -> torch.Tensor:
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


def _prefill(
    model: MoELLM | SeedVLM, prompts: list[torch.Tensor], max_new_tokens: int, images: PackedImages | None
) -> tuple[MoELLM, KVCache, torch.Tensor]:
    """The prompts through the model: (its LLM, the filled cache, logits (B, V) of each last token)."""
    if not prompts or any(p.ndim != 1 or p.numel() == 0 for p in prompts):
        raise ValueError("prompts: expected a non-empty list of non-empty 1-D token tensors")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
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
    return llm, cache, decode_step(llm, cache, embeds, [p.numel() for p in prompts])


def _decode(
    model: MoELLM | SeedVLM,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    pick,
    stop_ids: Collection[int],
    images: PackedImages | None,
) -> tuple[list[list[int]], list[list[float]]]:
    """The decoding loop: ``pick(logits (b', V))`` -> (tokens (b',), log-probs (b',)) each step."""
    llm, cache, logits = _prefill(model, prompts, max_new_tokens, images)
    out: list[list[int]] = [[] for _ in prompts]
    logps: list[list[float]] = [[] for _ in prompts]
    live = list(range(len(prompts)))  # sequences still generating, in order; rows of `logits`
    for step in range(max_new_tokens):
        tokens, logp = pick(logits)
        for b, t, lp in zip(live, tokens.tolist(), logp.tolist(), strict=True):
            out[b].append(t)
            logps[b].append(lp)
        keep = [i for i, b in enumerate(live) if out[b][-1] not in stop_ids]
        live = [live[i] for i in keep]
        if not live or step == max_new_tokens - 1:
            break
        new = [0] * len(prompts)
        for b in live:
            new[b] = 1
        logits = decode_step(llm, cache, llm.embed(tokens[keep]), new)
    return out, logps


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
    greedy = lambda logits: (logits.argmax(-1), logits.new_zeros(logits.shape[0]))
    stops = () if eos_id is None else (eos_id,)
    out, _ = _decode(model, prompts, max_new_tokens, greedy, stops, images)
    return [torch.tensor(o, dtype=torch.int64) for o in out]


@dataclass
class Samples:
    """Sampled continuations: ``tokens[b]`` (n_b,) int64 (the stop token kept when one ended it) and
    ``logprobs[b]`` (n_b,) fp32, each token's log-probability under log_softmax(logits / T)."""

    tokens: list[torch.Tensor]
    logprobs: list[torch.Tensor]


def next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None,
    suppress: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One draw per row of ``logits`` (b, V): (tokens (b,) int64, their log-probs (b,) fp32 under
    log_softmax(logits / temperature), before the top-p cut). Temperature 0 is greedy (log-probs
    under temperature 1). ``suppress``: token ids never drawn (their logits are -inf first)."""
    logits = logits.float()
    if suppress is not None and suppress.numel():
        logits = logits.index_fill(-1, suppress.to(logits.device), float("-inf"))
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
    logp = (logits / temperature).log_softmax(-1)
    probs = logp.exp()
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # keep a token while the mass before it is below top_p: the smallest set reaching top_p
        before = sorted_p.cumsum(-1) - sorted_p
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


@torch.no_grad()
def sample(
    model: MoELLM | SeedVLM,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_ids: Collection[int] = (),
    suppress_ids: Collection[int] = (),
    images: PackedImages | None = None,
    generator: torch.Generator | None = None,
) -> Samples:
    """Sampled continuation of each prompt (module docstring), up to ``max_new_tokens`` tokens or a
    token of ``stop_ids`` (kept).

    Args:
        model: an MoELLM, or a SeedVLM when the prompts hold image placeholders.
        prompts: B 1-D int64 token tensors (non-empty), positions start at 0 in each.
        temperature: >= 0 (0: greedy); top_p: in (0, 1].
        suppress_ids: tokens never drawn, e.g. image placeholders, which a reply must not hold; the
            log-probs are then under the distribution without them (logits -inf).
        images: the packed images whose visual tokens fill the prompts' placeholders, in order.
        generator: the random stream of the draws (on the model's device); None: torch's global one.
    """
    if not (temperature >= 0 and temperature < float("inf")):
        raise ValueError(f"temperature: expected a finite value >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a value in (0, 1], got {top_p}")
    suppress = torch.tensor(sorted(suppress_ids), dtype=torch.int64)
    pick = lambda logits: next_token(logits, temperature, top_p, generator, suppress)
    out, logps = _decode(model, prompts, max_new_tokens, pick, frozenset(stop_ids), images)
    return Samples(
        [torch.tensor(o, dtype=torch.int64) for o in out],
        [torch.tensor(lp, dtype=torch.float32) for lp in logps],
    )
