"""Rejection-sampling fine-tuning (Seed1.5-VL §4.5): after an RL round, sample ``rs_k`` responses
to new verifiable prompts (a stream of their own) with the actor, keep the verified-correct ones
in the right format, drop those that repeat themselves (trainer.rl.rewards.is_repetitive, regular
expressions) and duplicates, and train an SFT round on them: answer-only cross-entropy, a fresh
AdamW at ``rs_lr`` (the SFT stage's final LR, scaled), the ViT frozen as in SFT, ``rs_steps``
steps over the packed kept conversations.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from model.vlm import SeedVLM

from ..components import param_groups
from ..data import tokenizer as T
from ..data.chat import LEVEL_RESPONSE, Conversation, EncodeConfig, Turn, encode_conversation
from ..data.packer import IGNORE_INDEX, pack
from .config import PostConfig
from .prompts import RS_STREAM, PromptSource, make_prompt, make_prompts
from .rewards import is_repetitive
from .rollout import sample_rollouts
from .workers import VerifierPool

BUDGET = 2048  # tokens per packed SFT batch


def select(rollouts, verdicts) -> tuple[list, dict]:
    """The rollouts to train on: verified correct, well formatted, not repetitive, one per distinct
    (prompt, reply); with counts of what was dropped."""
    kept, seen = [], set()
    dropped = {"wrong": 0, "format": 0, "repetitive": 0, "duplicate": 0}
    for r, v in zip(rollouts, verdicts, strict=True):
        info = v.info if isinstance(v.info, dict) else {}
        if not info.get("correct"):
            dropped["wrong"] += 1
        elif not info.get("format_ok"):
            dropped["format"] += 1
        elif is_repetitive(r.text):
            dropped["repetitive"] += 1
        elif (r.prompt.key, r.text) in seen:
            dropped["duplicate"] += 1
        else:
            seen.add((r.prompt.key, r.text))
            kept.append(r)
    return kept, dropped


def rejection_round(
    actor: SeedVLM,
    tok: T.Tokenizer,
    encode: EncodeConfig,
    s: PostConfig,
    pool: VerifierPool,
    *,
    seed: int,
    round_index: int,
    device: torch.device,
    source: PromptSource = make_prompt,
) -> dict:
    prompts = make_prompts(seed, RS_STREAM, round_index * s.rs_prompts, s.rs_prompts, 0.0, source)
    gen = torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, RS_STREAM, round_index]).generate_state(1)[0])
    )
    rolls = sample_rollouts(
        actor,
        prompts,
        s.rs_k,
        tok=tok,
        encode=encode,
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        generator=gen,
    )
    verdicts = pool.map([(r.prompt.kind, r.text, r.prompt.truth, s.require_think) for r in rolls])
    kept, dropped = select(rolls, verdicts)
    out = {"round": round_index, "sampled": len(rolls), "kept": len(kept), "dropped": dropped, "steps": 0}
    if not kept or s.rs_steps == 0:
        return out
    samples = []
    for r in kept:
        conv = Conversation((Turn("user", r.prompt.user_parts), Turn("assistant", (r.text,))))
        samples.append(encode_conversation(conv, tok, encode))
    batches = pack(samples, BUDGET, min_level=LEVEL_RESPONSE, image_token_id=tok.image_token_id)
    actor.train()
    opt = torch.optim.AdamW(param_groups(actor, 0.1), lr=s.rs_lr, betas=(0.9, 0.95))
    losses = []
    for step in range(s.rs_steps):
        batch = batches[step % len(batches)].to(device)
        logits = actor(**batch.model_inputs()).logits
        loss = F.cross_entropy(logits.float(), batch.labels, ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    out.update(steps=s.rs_steps, loss_first=losses[0], loss_last=losses[-1])
    return out
