"""Rollouts: sampling responses to prompts with the actor (model.generate.sample, through the KV
cache and varlen attention, images included), and the packed training forwards that give each
response token's log-prob, entropy and value.

Log-probs for PPO are **recomputed by the training forward** (:func:`policy_outputs` on the packed
prompt + response), not taken from the sampling pass: the ratio's denominator then comes from the
very computation the numerator does, so the first mini-batch starts at ratio 1 exactly. The
sampling pass's own log-probs are kept and the episode logs their largest difference from the
recomputed ones (``logprob_gap``), which tests/test_model_generate.py pins near 0.

Shapes: N rollouts, L the longest response, V vocab, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.generate import sample
from model.preprocess import ImagePatches
from model.vlm import SeedVLM

from ..data import tokenizer as T
from ..data.chat import EncodeConfig
from ..evaluate import decode_reply, packed_images
from .prompts import Prompt


@dataclass
class Rollout:
    prompt: Prompt
    prompt_ids: torch.Tensor  # (P,) int64, image placeholders included
    images: list[ImagePatches]
    response: torch.Tensor  # (n,) int64, <|im_end|> kept when it ended the response
    sampled_logprobs: torch.Tensor  # (n,) fp32 from the sampling pass
    text: str  # the decoded reply, up to <|im_end|>
    reward: float = 0.0
    correct: bool = False
    reason: str = ""


def sample_rollouts(
    actor: SeedVLM,
    prompts: list[Prompt],
    n: int | list[int],
    *,
    tok: T.Tokenizer,
    encode: EncodeConfig,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator,
    batch: int = 64,
) -> list[Rollout]:
    """``n`` sampled responses per prompt (or ``n[i]`` for prompt i), prompt by prompt, in order."""
    counts = [n] * len(prompts) if isinstance(n, int) else n
    device = actor.llm.embed.weight.device
    jobs = []
    for p, k in zip(prompts, counts, strict=True):
        enc = p.encode(tok, encode)
        jobs += [(p, torch.from_numpy(enc.ids).long(), enc.images)] * k
    stop = (tok.special_id(T.IM_END), tok.eos_id)
    out: list[Rollout] = []
    was_training = actor.training
    actor.eval()
    try:
        for s in range(0, len(jobs), batch):
            chunk = jobs[s : s + batch]
            images = packed_images([im for _, _, ims in chunk for im in ims], device)
            got = sample(
                actor,
                [ids for _, ids, _ in chunk],
                max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                stop_ids=stop,
                suppress_ids=suppressed(tok),
                images=images,
                generator=generator,
            )
            for (p, ids, ims), r, lp in zip(chunk, got.tokens, got.logprobs, strict=True):
                out.append(Rollout(p, ids, ims, r, lp, decode_reply(tok, r.tolist())))
    finally:
        actor.train(was_training)
    return out


def suppressed(tok: T.Tokenizer) -> list[int]:
    """Tokens a reply never holds: the vision markers and placeholders (a placeholder in a reply
    would take a visual token that does not exist)."""
    ids = (tok.special_id(t) for t in (T.VISION_START, T.VISION_END, T.IMAGE_PAD))
    return sorted({i for i in ids if i is not None})


@dataclass
class Packed:
    """Rollouts packed as one document each (prompt + response) for a training forward."""

    input_ids: torch.Tensor  # (T,)
    position_ids: torch.Tensor  # (T,)
    cu_seqlens: torch.Tensor  # (N+1,) int32
    max_seqlen: int
    images: object  # PackedImages or None
    rows: torch.Tensor  # (N, L) int64: the row whose output predicts each response token
    targets: torch.Tensor  # (N, L) int64: the response tokens (0 on padding)
    mask: torch.Tensor  # (N, L) bool: real response tokens


def pack_rollouts(rollouts: list[Rollout], device: torch.device) -> Packed:
    seqs = [torch.cat([r.prompt_ids, r.response]) for r in rollouts]
    lengths = [int(s.numel()) for s in seqs]
    L = max(1, max(int(r.response.numel()) for r in rollouts))
    rows = torch.zeros(len(rollouts), L, dtype=torch.int64)
    targets = torch.zeros(len(rollouts), L, dtype=torch.int64)
    mask = torch.zeros(len(rollouts), L, dtype=torch.bool)
    start = 0
    for i, r in enumerate(rollouts):
        n, p = int(r.response.numel()), int(r.prompt_ids.numel())
        rows[i, :n] = start + p - 1 + torch.arange(n)
        targets[i, :n] = r.response
        mask[i, :n] = True
        start += lengths[i]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return Packed(
        torch.cat(seqs).to(device),
        torch.cat([torch.arange(n) for n in lengths]).to(device),
        cu.to(device),
        max(lengths),
        packed_images([im for r in rollouts for im in r.images], device),
        rows.to(device),
        targets.to(device),
        mask.to(device),
    )


def hidden_states(model: SeedVLM, packed: Packed) -> torch.Tensor:
    """(T, D) final-normed hidden states of the packed rollouts (images through the ViT)."""
    visual = None
    im = packed.images
    if im is not None:
        visual = model.encode_images(im.patches, im.pos_hw, im.cu_seqlens, im.max_seqlen)
    embeds = model.embed(packed.input_ids, visual)
    return model.llm.forward_hidden(embeds, packed.position_ids, packed.cu_seqlens, packed.max_seqlen).logits


def policy_outputs(
    actor: SeedVLM, packed: Packed, temperature: float, suppress: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs (N, L) of the response tokens under log_softmax(logits / T) with the
    ``suppress`` tokens removed, as sampling drew them; entropies (N, L)), 0 on padding."""
    hidden = hidden_states(actor, packed)
    logits = actor.llm.lm_head(hidden[packed.rows]).float() / max(temperature, 1e-6)
    if suppress:
        logits = logits.index_fill(-1, torch.tensor(suppress, device=logits.device), float("-inf"))
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, packed.targets[..., None])[..., 0]
    ent = -(logp_all.exp() * logp_all.clamp(min=-1e30)).sum(-1)  # 0 * -inf would be nan
    return logp * packed.mask, ent * packed.mask


class Critic(torch.nn.Module):
    """The shared value model: a SeedVLM body and a linear value head on its last hidden state.

    :meth:`from_reward_model` initialises it from the reward model's weights (§4.4): the body is a
    copy of the RM, and the head is the RM's "yes" minus "no" unembedding row, so the critic starts
    out predicting the RM's log-odds of "yes" for the sequence so far."""

    def __init__(self, body: SeedVLM) -> None:
        super().__init__()
        self.body = body
        self.head = torch.nn.Linear(body.cfg.llm.hidden, 1)

    @classmethod
    def from_reward_model(cls, rm: SeedVLM, yes_id: int, no_id: int) -> Critic:
        body = SeedVLM(rm.cfg).to(rm.llm.embed.weight.device)
        body.load_state_dict(rm.state_dict())
        critic = cls(body)
        with torch.no_grad():
            w = rm.llm.lm_head.weight
            critic.head.weight.copy_((w[yes_id] - w[no_id])[None])
            critic.head.bias.zero_()
        return critic

    def values(self, packed: Packed) -> torch.Tensor:
        """(N, L) value of the state before each response token, 0 on padding."""
        hidden = hidden_states(self.body, packed)
        return self.head(hidden[packed.rows]).float()[..., 0] * packed.mask
