"""RL prompts from the embedded spatial data: verifiable questions of the seven skills and general
(reward-model scored) free-form scene descriptions, mixed in each batch; and prompt curation.

A prompt is a pure function of (seed, stream, index): ``np.random.default_rng([seed, stream, i])``
draws the scene, then whether the prompt is general (probability ``general_frac``), then the
skill (trainer.data.spatial.DEFAULT_MIX) and its question. Streams are disjoint from the training
samples' (rng([seed, i])), the baselines' (FIT_STREAM) and the held-out questions', so RL never
sees a held-out scene: RL prompts, curation candidates, reward-model lists (training and held-out)
and the new prompts of rejection sampling each have a stream of their own.

General prompts ask to describe the scene; the reference lists the objects from left to right
("red cube, blue sphere, gray cylinder"), the response is free-form and the reward model scores it.

Curation (§4.4, prompt curation): sample K responses per candidate with the SFT model; a
verifiable prompt is kept when its share of right answers is in (0, ``max_solved``] (0.75: never
solved and mostly solved prompts teach nothing), a general one when max - mean of its K reward-
model scores reaches ``min_spread`` (the responses differ enough for the RM to tell them apart).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..data.chat import Conversation, EncodeConfig, EncodedSample, Media, Turn, encode_conversation
from ..data.spatial import DEFAULT_MIX, ask, sample_scene
from ..data.tokenizer import Tokenizer

RL_STREAM, CURATE_STREAM, RM_STREAM, RM_HELDOUT_STREAM, RS_STREAM = 11, 12, 13, 14, 15
GENERAL = "general"
VERIFIABLE = "verifiable"
DESCRIBE = "describe"  # the general prompts' kind
DESCRIBE_QUESTION = "Describe the objects in the scene from left to right."


@dataclass(frozen=True)
class Prompt:
    kind: str  # a spatial skill, or "describe"
    text: str  # the question
    truth: str  # the reference answer
    image: np.ndarray = field(repr=False, compare=False)  # the (first) image
    key: tuple[int, ...] = ()  # (seed, stream, index): what drew it
    # The user turn when it is more than the image and the question (views, a video): its media
    # and texts in order, the question last (trainer.rl.vst_prompts).
    parts: tuple = field(default=(), repr=False, compare=False)

    @property
    def ptype(self) -> str:
        return GENERAL if self.kind == DESCRIBE else VERIFIABLE

    @property
    def user_parts(self) -> tuple:
        return self.parts or (Media("image", self.image), self.text)

    def encode(self, tok: Tokenizer, cfg: EncodeConfig) -> EncodedSample:
        """The chat prompt up to ``<|im_start|>assistant\\n``, with the media's placeholders."""
        conv = Conversation((Turn("user", self.user_parts),), f"rl-{self.key}")
        return encode_conversation(conv, tok, cfg, add_generation_prompt=True)


def describe(scene) -> str:
    """The objects of ``scene`` from left to right in the image (camera x), by name."""
    xs = [float(scene.camera.to_camera(o.center)[0]) for o in scene.objects]
    return ", ".join(scene.objects[k].name for k in np.argsort(xs, kind="stable"))


def make_prompt(seed: int, stream: int, index: int, general_frac: float) -> Prompt:
    rng = np.random.default_rng([seed, stream, index])
    scene = sample_scene(rng)
    key = (seed, stream, index)
    if rng.random() < general_frac:
        return Prompt(DESCRIBE, DESCRIBE_QUESTION, describe(scene), scene.image, key)
    kinds, weights = zip(*DEFAULT_MIX, strict=True)
    kind = str(rng.choice(kinds, p=np.asarray(weights) / sum(weights)))
    qa = ask(scene, kind, rng)
    if qa is None:  # no such question about this scene: count instead (as the training stream)
        kind, qa = "count", ask(scene, "count", rng)
    return Prompt(kind, qa[0], qa[1], scene.image, key)


# A prompt source is a function of (seed, stream, index, general_frac) -> Prompt, pure in its
# arguments: make_prompt (the seven spatial skills) or trainer.rl.vst_prompts.VSTPrompts.
PromptSource = Callable[[int, int, int, float], Prompt]


def make_prompts(
    seed: int, stream: int, start: int, n: int, general_frac: float, source: PromptSource = make_prompt
) -> list[Prompt]:
    return [source(seed, stream, i, general_frac) for i in range(start, start + n)]


@dataclass(frozen=True)
class Curation:
    kept: list[Prompt]
    stats: dict  # candidates, kept, dropped by reason, per type


def curate(
    prompts: list[Prompt],
    rewards: list[list[float]],
    correct: list[list[bool]],
    *,
    max_solved: float,
    min_spread: float,
) -> Curation:
    """Keep the prompts worth training on (module docstring), given each prompt's K rewards and
    verdicts from the SFT model."""
    kept, dropped = [], {"never solved": 0, "mostly solved": 0, "low RM spread": 0}
    for p, r, ok in zip(prompts, rewards, correct, strict=True):
        if p.ptype == GENERAL:
            if max(r) - float(np.mean(r)) < min_spread:
                dropped["low RM spread"] += 1
                continue
        else:
            solved = float(np.mean(ok))
            if solved == 0:
                dropped["never solved"] += 1
                continue
            if solved > max_solved:
                dropped["mostly solved"] += 1
                continue
        kept.append(p)
    by_kind: dict[str, int] = {}
    for p in kept:
        by_kind[p.kind] = by_kind.get(p.kind, 0) + 1
    stats = {"candidates": len(prompts), "kept": len(kept), "dropped": dropped, "kept_by_kind": by_kind}
    return Curation(kept, stats)
