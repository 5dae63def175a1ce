"""Settings of post-training as one frozen dataclass, the report's values and the rule that scales
them to a preset (the recipe rule of trainer.recipes: learning rates x 4096 / LLM hidden).

Report values (Seed1.5-VL §4.4): actor LR 6e-7, critic LR 7.5e-7, clip 0.2, gamma 1, KL 1e-5 for
general prompts and 0 for verifiable ones, 4,096 rollouts per episode in mini-batches of 512 (8
gradient steps), one rollout per RM prompt and 4-8 per verifier prompt, 100 critic warm-up steps.
CPU-scale defaults below keep the 8 gradient steps per episode (4 mini-batches x 2 epochs) and
shrink the rest. Change any of them with ``--set rl.FIELD=VALUE`` (e.g. ``rl.episodes=40``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import TypeVar

from ..recipes import REFERENCE_HIDDEN

T = TypeVar("T")


@dataclass(frozen=True)
class PostConfig:
    # PPO
    episodes: int = 20  # PPO episodes per round (after the critic's warm-up)
    prompts_per_episode: int = 16
    general_frac: float = 0.25  # share of general (reward-model) prompts among the candidates
    samples_verifiable: int = 4  # rollouts per verifiable prompt
    samples_general: int = 1  # rollouts per general prompt
    mini_batches: int = 4  # per epoch
    ppo_epochs: int = 2
    clip: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    kl_general: float = 1e-5
    kl_verifiable: float = 0.0
    actor_lr: float = 6e-7  # the report's; scaled
    critic_lr: float = 7.5e-7  # the report's; scaled
    critic_warmup_steps: int = 16  # critic-only gradient steps on SFT-model rollouts before the actor moves
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    require_think: bool = False  # the embedded SFT data answers without a thought
    # prompt curation
    curate_k: int = 4  # responses per candidate (0: no curation)
    curate_candidates: int = 128
    max_solved: float = 0.75
    min_spread: float = 0.05
    # reward model
    rm_steps: int = 60
    rm_lists_per_step: int = 8
    rm_lr: float = 2e-5  # the SFT stage's peak LR; scaled
    rm_heldout_lists: int = 100
    # rejection-sampling fine-tuning
    rs_rounds: int = 0  # the ``rl`` recipe: none; ``post``: 1
    rs_prompts: int = 96
    rs_k: int = 4
    rs_steps: int = 20
    rs_lr: float = 2e-6  # the SFT stage's final LR; scaled
    # verifiers
    verifier_workers: int = 2
    verifier_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        positive = (
            "prompts_per_episode",
            "samples_verifiable",
            "samples_general",
            "mini_batches",
            "ppo_epochs",
            "max_new_tokens",
            "rm_lists_per_step",
            "verifier_workers",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"rl.{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("episodes", "critic_warmup_steps", "curate_k", "rm_steps", "rs_rounds", "rs_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"rl.{name}: expected >= 0, got {getattr(self, name)}")
        if not 0 <= self.general_frac <= 1 or not 0 < self.max_solved <= 1:
            raise ValueError("rl.general_frac and rl.max_solved: expected fractions in [0, 1]")
        if not 0 <= self.lam <= 1 or not 0 < self.gamma <= 1:
            raise ValueError(
                f"rl.lam, rl.gamma: expected lam in [0, 1] and gamma in (0, 1], got {self.lam}, {self.gamma}"
            )
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("rl.temperature: expected > 0; rl.top_p: expected in (0, 1]")

    @property
    def grad_steps_per_episode(self) -> int:
        return self.mini_batches * self.ppo_epochs

    @property
    def warmup_episodes(self) -> int:
        return -(-self.critic_warmup_steps // self.grad_steps_per_episode)


# What a recipe changes in PostConfig before the --set overrides apply.
RECIPE_DEFAULTS: dict[str, dict[str, object]] = {
    "rl": {},
    "post": {"rs_rounds": 1},
    # VST (trainer.rl.vst): verifiable prompts only (every VST skill has a verifier), so no RM
    # training (the critic starts from the SFT model's yes/no log-odds head); replies carry a
    # thought after VST-R, hence the longer responses; fewer, smaller episodes, as its rollouts
    # hold views and videos (several times a single image's tokens).
    "vst": {
        "general_frac": 0.0,
        "rm_steps": 0,
        "rm_heldout_lists": 0,
        "max_new_tokens": 160,
        "episodes": 6,
        "prompts_per_episode": 8,
        "critic_warmup_steps": 8,
        "curate_candidates": 48,
        "curate_k": 4,
    },
}


def scale(cfg: PostConfig, hidden: int) -> PostConfig:
    """Learning rates x REFERENCE_HIDDEN / hidden (trainer.recipes.scale_to's rule)."""
    m = REFERENCE_HIDDEN / hidden
    return replace(
        cfg, actor_lr=cfg.actor_lr * m, critic_lr=cfg.critic_lr * m, rm_lr=cfg.rm_lr * m, rs_lr=cfg.rs_lr * m
    )


def apply_overrides(cfg: T, overrides: list[str], prefix: str = "rl") -> tuple[T, list[str]]:
    """``rl.FIELD=VALUE`` overrides applied (after scaling: a learning rate set here is used as
    given); returns the config and the overrides that are not ``rl.*`` (for the SFT stages). Any
    frozen settings dataclass takes its own ``prefix`` (trainer.rl.vst: ``vst.FIELD=VALUE``)."""
    fields = {f.name: str(f.type) for f in dataclasses.fields(cfg)}
    changes, rest = {}, []
    for item in overrides:
        key, sep, value = item.partition("=")
        target, _, name = key.partition(".")
        if target != prefix:
            rest.append(item)
            continue
        if not sep or name not in fields:
            raise ValueError(
                f"override {item!r}: expected {prefix}.FIELD=VALUE with FIELD one of {sorted(fields)}"
            )
        typ = fields[name]
        try:
            if typ == "bool":
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                changes[name] = value.lower() in ("true", "1")
            elif typ == "int":
                changes[name] = int(float(value))
            elif typ == "str":
                changes[name] = value
            else:
                changes[name] = float(value)
        except ValueError:
            raise ValueError(
                f"override {item!r}: {prefix}.{name} expects {'an integer' if typ == 'int' else typ}, "
                f"got {value!r}"
            ) from None
    return replace(cfg, **changes), rest
