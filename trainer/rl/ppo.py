"""The PPO maths of post-training (Seed1.5-VL §4.4), on padded (N, L) token tensors with a mask.

Per-token rewards. A rollout's scalar reward R (verifier or reward model, in [0, 1]) is added at its
last response token. The KL to the reference (SFT) policy enters **as a reward term**, per token:
r_t = -beta * (log pi(a_t) - log pi_ref(a_t)) (the k1 estimate), with beta chosen by the prompt's
type (1e-5 general, 0 verifiable), so a verifiable rollout's rewards are R at its end and 0 elsewhere.

Advantages: GAE with gamma and lambda over the response tokens, V past the last token = 0,

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lambda * A_{t+1},
    returns_t = A_t + V_t                    (the critic's targets)

then whitened over every token of the batch (mean 0, std 1; the returns are not).

Losses (token means over the mini-batch's response tokens):

    policy  max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)),  rho = exp(log pi - log pi_old)
    value   0.5 * max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2)

with the clip fraction (tokens where the clipped term is the larger one) and the policy's entropy
reported beside them.

Shapes: N rollouts, L the longest response; ``mask`` (N, L) bool marks real response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the True entries of ``mask`` (0 when there are none)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (population std); 0 outside the mask."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return ((x - mean) * torch.rsqrt(var + eps)) * mask.to(x.dtype)


def token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    kl_coef: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """(N, L) rewards: -kl_coef[n] * (logprobs - ref_logprobs) on every response token, plus
    ``scores[n]`` on the last one. ``kl_coef`` (N,) is each rollout's prompt-type coefficient."""
    if scores.shape != kl_coef.shape or scores.shape != mask.shape[:1]:
        raise ValueError(f"scores, kl_coef: expected ({mask.shape[0]},), got {scores.shape}, {kl_coef.shape}")
    r = -kl_coef[:, None] * (logprobs - ref_logprobs) * mask
    lengths = mask.sum(1)
    has = lengths > 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has]
    r[rows, lengths[has] - 1] += scores[has].to(r.dtype)
    return r


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (N, L), zero outside the mask (module docstring). Responses are
    left-aligned: token t of rollout n is at [n, t] for t < length_n."""
    mask_f = mask.to(rewards.dtype)
    values = values * mask_f
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        a = a * mask_f[:, t]  # past the end: nothing flows back
        adv[:, t] = a
        next_adv, next_value = a, values[:, t]
    return adv, (adv + values) * mask_f


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # scalar
    clip_fraction: torch.Tensor  # scalar: share of tokens where the clipped objective is active
    approx_kl: torch.Tensor  # scalar: mean (log pi_old - log pi), how far the mini-batch moved


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> PolicyLoss:
    """The clipped surrogate (module docstring), token mean over ``mask``."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    frac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    return PolicyLoss(loss, frac.detach(), masked_mean(old_logprobs - logprobs, mask).detach())


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped value loss, share of tokens where the clipped error is the larger one)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    err, err_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    return loss, masked_mean((err_clipped > err).to(values.dtype), mask).detach()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension, in nats."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL estimate log pi - log pi_ref over the sampled tokens (the reward term's)."""
    return masked_mean(logprobs - ref_logprobs, mask)
