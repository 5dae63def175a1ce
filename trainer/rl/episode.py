"""One PPO episode over scored rollouts: rewards per token, GAE advantages, and ``ppo_epochs`` x
``mini_batches`` gradient steps of the actor and the shared critic (trainer.rl.ppo for the maths).

Scoring (:func:`score_rollouts`): verifiable rollouts go to the verifiers in worker processes
(trainer.rl.workers: a failure scores 0 with its reason); general ones are checked for format and
their solutions scored by the reward model. During the critic's warm-up (``update_actor`` False)
the rollouts come from the unchanged SFT actor and only the critic steps.

The MoE balance losses are not added in RL: the router is trained by the pre-training and SFT
stages, and the policy gradient alone moves the routed experts here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from model.vlm import SeedVLM

from ..data import tokenizer as T
from . import ppo, reward_model
from .config import PostConfig
from .prompts import GENERAL
from .rewards import split_response
from .rollout import Critic, Rollout, pack_rollouts, policy_outputs
from .workers import VerifierPool


def score_rollouts(
    rollouts: list[Rollout], pool: VerifierPool, rm: SeedVLM, tok: T.Tokenizer, *, require_think: bool
) -> None:
    """Set each rollout's reward, correct and reason (module docstring)."""
    verifiable = [r for r in rollouts if r.prompt.ptype != GENERAL]
    jobs = [(r.prompt.kind, r.text, r.prompt.truth, require_think) for r in verifiable]
    for r, s in zip(verifiable, pool.map(jobs), strict=True):
        info = s.info if isinstance(s.info, dict) else {}
        r.reward, r.correct, r.reason = (
            s.reward,
            bool(info.get("correct")),
            s.reason or info.get("reason", ""),
        )
    general = [r for r in rollouts if r.prompt.ptype == GENERAL]
    items, judged = [], []
    for r in general:
        parsed = split_response(r.text, require_think=require_think)
        if parsed.problem is not None:
            r.reward, r.correct, r.reason = 0.0, False, f"format: {parsed.problem}"
            continue
        items.append((r.prompt.text, r.prompt.truth, parsed.solution))
        judged.append(r)
    for r, p in zip(judged, reward_model.score(rm, tok, items), strict=True):
        r.reward, r.correct, r.reason = p, p > 0.5, ""


def _optimizer_step(opt: torch.optim.Optimizer, clip: float) -> float:
    params = [p for g in opt.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


@dataclass
class Targets:
    old_logp: torch.Tensor  # (N, L)
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    mask: torch.Tensor
    kl: torch.Tensor  # (N,) per-rollout mean k1 KL to the reference


@torch.no_grad()
def targets(
    actor: SeedVLM,
    critic: Critic,
    ref: SeedVLM,
    rollouts: list[Rollout],
    s: PostConfig,
    device: torch.device,
    suppress: list[int],
) -> Targets:
    """Old log-probs (the training forward's), reference log-probs, old values, per-token rewards
    with the per-type KL term, and whitened GAE advantages with their returns."""
    packed = pack_rollouts(rollouts, device)
    old_logp, _ = policy_outputs(actor, packed, s.temperature, suppress)
    ref_logp, _ = policy_outputs(ref, packed, s.temperature, suppress)
    values = critic.values(packed)
    mask = packed.mask
    coef = torch.tensor(
        [s.kl_general if r.prompt.ptype == GENERAL else s.kl_verifiable for r in rollouts], device=device
    )
    scores = torch.tensor([r.reward for r in rollouts], device=device, dtype=torch.float32)
    rewards = ppo.token_rewards(scores, old_logp, ref_logp, coef, mask)
    adv, ret = ppo.gae(rewards, values, mask, s.gamma, s.lam)
    kl = ((old_logp - ref_logp) * mask).sum(1) / mask.sum(1).clamp(min=1)
    return Targets(old_logp, values, ppo.masked_whiten(adv, mask), ret, mask, kl)


def ppo_update(
    actor: SeedVLM,
    critic: Critic,
    ref: SeedVLM,
    rollouts: list[Rollout],
    s: PostConfig,
    opt_actor: torch.optim.Optimizer,
    opt_critic: torch.optim.Optimizer,
    *,
    generator: torch.Generator,
    update_actor: bool,
    device: torch.device,
    suppress: list[int],
) -> dict:
    """The episode's gradient steps; returns its metrics (module docstring of trainer.rl.run).
    ``suppress``: the tokens sampling never draws (trainer.rl.rollout.suppressed)."""
    t = targets(actor, critic, ref, rollouts, s, device, suppress)
    n = len(rollouts)
    sums: dict[str, list[float]] = {}
    add = lambda k, v: sums.setdefault(k, []).append(float(v))
    for _ in range(s.ppo_epochs):
        order = torch.randperm(n, generator=generator).tolist()
        for m in range(s.mini_batches):
            idx = order[m * n // s.mini_batches : (m + 1) * n // s.mini_batches]
            if not idx:
                continue
            batch = [rollouts[i] for i in idx]
            packed = pack_rollouts(batch, device)
            sel, width = torch.tensor(idx, device=device), packed.mask.shape[1]

            def pick(x: torch.Tensor, sel=sel, width=width) -> torch.Tensor:
                return x[sel][:, :width]

            mask = pick(t.mask)
            if update_actor:
                logp, ent = policy_outputs(actor, packed, s.temperature, suppress)
                pl = ppo.policy_loss(logp, pick(t.old_logp), pick(t.advantages), mask, s.clip)
                pl.loss.backward()
                add("grad_norm_actor", _optimizer_step(opt_actor, s.grad_clip))
                add("policy_loss", pl.loss.detach())
                add("clip_fraction", pl.clip_fraction)
                add("approx_kl", pl.approx_kl)
                add("entropy", ppo.masked_mean(ent.detach(), mask))
            v = critic.values(packed)
            vl, vclip = ppo.value_loss(v, pick(t.old_values), pick(t.returns), mask, s.value_clip)
            vl.backward()
            add("grad_norm_critic", _optimizer_step(opt_critic, s.grad_clip))
            add("value_loss", vl.detach())
            add("value_clip_fraction", vclip)
    out = {k: float(np.mean(v)) for k, v in sums.items()}
    general = [i for i, r in enumerate(rollouts) if r.prompt.ptype == GENERAL]
    verif = [i for i, r in enumerate(rollouts) if r.prompt.ptype != GENERAL]
    mean = lambda xs: float(np.mean(xs)) if xs else math.nan
    out.update(
        rollouts=n,
        reward=mean([r.reward for r in rollouts]),
        reward_general=mean([rollouts[i].reward for i in general]),
        reward_verifiable=mean([rollouts[i].reward for i in verif]),
        correct_verifiable=mean([float(rollouts[i].correct) for i in verif]),
        kl=float(t.kl.mean()),
        kl_general=mean([float(t.kl[i]) for i in general]),
        kl_verifiable=mean([float(t.kl[i]) for i in verif]),
        response_length=mean([int(r.response.numel()) for r in rollouts]),
        logprob_gap=float(
            max(
                (
                    (r.sampled_logprobs.to(device) - t.old_logp[i, : r.response.numel()]).abs().max()
                    for i, r in enumerate(rollouts)
                    if r.response.numel()
                ),
                default=torch.tensor(0.0),
            )
        ),
        value_mean=float(ppo.masked_mean(t.old_values, t.mask)),
    )
    if "entropy" not in out:  # warm-up: the entropy of the rollouts' policy, for the log
        with torch.no_grad():
            _, ent = policy_outputs(actor, pack_rollouts(rollouts, device), s.temperature, suppress)
        out["entropy"] = float(ppo.masked_mean(ent, t.mask))
    by_kind: dict[str, list[float]] = {}
    for r in rollouts:
        by_kind.setdefault(r.prompt.kind, []).append(r.reward)
    out["reward_by_kind"] = {k: float(np.mean(v)) for k, v in sorted(by_kind.items())}
    return out
