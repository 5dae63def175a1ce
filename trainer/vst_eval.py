"""Held-out evaluation of the VST skills: accuracy per skill and per scenario (single image,
multi-view, video) beside a blind baseline, in the form of the main job's evaluation
(trainer.heldout, trainer.evaluate), which it reuses.

    python -m trainer.evaluate runs/x --data vst --num 20

Held-out questions (:func:`vst_questions`): skill ``k`` of trainer.data.vst's table, question ``i``
about a scene drawn from rng([*key, k, i]) with key [seed + HELD_OUT_SEED_OFFSET], a stream the
training data (rng([seed, i])) never draws; the baseline is fitted on rng([seed, FIT_STREAM, k, i]).

Blind baselines (:class:`VSTBaseline`), as trainer.heldout's: chance where the question lists its
options in random order (closer, relative_size 1/2; vid_moved_most 1/3; depth_order, vid_order
1/6), the mean answer for numeric answers (boxes, depths, centres, distances, 3D boxes, times), else
the majority answer to the same question text, falling back to the skill's majority answer.

Scores (:func:`score_vst`): one entry per skill as trainer.heldout.score_records (accuracy,
baseline, correct, total, baseline_rule; metric, score and baseline_score for the graded skills),
then ``single/all``, ``multiview/all``, ``video/all`` and ``all``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import ClassVar

import numpy as np

from .data import tokenizer as T
from .data import vst
from .data.chat import Conversation, EncodeConfig, Turn
from .evaluate import MARGIN, HeldOut
from .heldout import CHANCE as SPATIAL_CHANCE
from .heldout import (
    FIT_STREAM,
    HELD_OUT_SEED_OFFSET,
    Baseline,
    EvalRecord,
    Question,
    score_records,
)

CHANCE = {**SPATIAL_CHANCE, "relative_size": 1 / 2, "vid_moved_most": 1 / 3, "vid_order": 1 / 6}
MEAN = {*vst.GRADED, "box3d", "vid_when"}  # numeric answers: the blind answer is their mean


def vst_questions(
    key: Sequence[int],
    per_skill: int,
    cfg: vst.VSTConfig | None = None,
    skills: Iterable[str] | None = None,
) -> list[Question]:
    """``per_skill`` questions of every skill (or of ``skills``), in the table's order."""
    cfg = cfg if cfg is not None else vst.VSTConfig()
    chosen = set(vst.SKILLS if skills is None else skills)
    unknown = chosen - set(vst.SKILLS)
    if unknown:
        raise ValueError(f"skills: unknown {sorted(unknown)}; known: {tuple(vst.SKILLS)}")
    out = []
    for k, skill in enumerate(vst.SKILLS):
        if skill not in chosen:
            continue
        for i in range(per_skill):
            s = vst.generate(skill, np.random.default_rng([*key, k, i]), cfg)
            prompt = (Turn("user", s.parts),)
            out.append(Question(skill, prompt, s.question, s.answer, s.image, f"held-out-{skill}-{i}"))
    return out


class VSTBaseline(Baseline):
    """The blind answers (module docstring): trainer.heldout.Baseline with the VST skills' chance
    rates, numeric skills and verifiers."""

    chance: ClassVar[dict[str, float]] = CHANCE
    numeric: ClassVar[Collection[str]] = MEAN
    verify: ClassVar[Callable[[str, str, str], bool]] = staticmethod(vst.check_answer)
    grade: ClassVar[Callable[[str, str, str], float]] = staticmethod(vst.graded_score)


def score_vst(records: Sequence[EvalRecord], baseline: VSTBaseline) -> dict[str, dict]:
    """Per skill (table order), per scenario (``<scenario>/all``) and ``all``: the entries of
    trainer.heldout.score_records, with the graded score of every graded VST skill."""
    by_kind: dict[str, list[EvalRecord]] = defaultdict(list)
    for r in records:
        by_kind[r.kind].append(r)
    out = {}
    order = list(vst.SKILLS)
    for kind in sorted(by_kind, key=lambda k: order.index(k) if k in order else len(order)):
        rs = by_kind[kind]
        entry = score_records(rs, baseline)[kind]
        if kind in vst.GRADED:
            blind = [baseline.expected(kind, r.question, r.truth) for r in rs]
            entry["metric"] = vst.GRADED[kind]
            entry["score"] = sum(r.score for r in rs) / len(rs)
            entry["baseline_score"] = None if None in blind else sum(b[1] for b in blind) / len(rs)
        out[kind] = entry
    for scenario in vst.SCENARIOS:
        rs = [r for r in records if vst.SKILLS.get(r.kind) == scenario]
        if rs:
            out[f"{scenario}/all"] = score_records(rs, baseline)["all"]
    if records:
        out["all"] = score_records(records, baseline)["all"]
    return out


class VSTHeldOut(HeldOut):
    """trainer.evaluate.HeldOut with the VST skills' verifier, graded score and scoring.

    Answers are greedy as there, each cut at its own budget (trainer.evaluate's MARGIN tokens past
    its truth's length), but batches mix skills: ``batch`` questions in order decode together up
    to the longest budget among them, and each answer keeps the tokens of its own budget (greedy
    decoding is causal, so those are what a shorter run gives). Twenty-one skills then take a few
    batches rather than one batch each, which is what a small model's decoding time depends on.

    ``think_tokens`` (default 0) lengthens every budget by that many tokens, room for a
    ``<think>`` span before the answer: a model trained on the reasoning variant (VST-R) thinks
    first. A model that answers at once stops at ``<|im_end|>`` as before, so both are scored alike."""

    check = staticmethod(vst.check_answer)
    grade = staticmethod(vst.graded_score)
    score = staticmethod(score_vst)
    think_tokens = 0

    @classmethod
    def vst(
        cls, tok: T.Tokenizer, encode: EncodeConfig, *, seed: int, per_skill: int, budget: int = 4096,
        fit_per_skill: int = 50, cfg: vst.VSTConfig | None = None, skills: Iterable[str] | None = None,
        think_tokens: int = 0,
    ) -> VSTHeldOut:  # fmt: skip
        """``per_skill`` held-out questions of every VST skill (or of ``skills``); the baseline is
        fitted on ``fit_per_skill`` other questions of each."""
        if think_tokens < 0:
            raise ValueError(f"think_tokens: expected >= 0, got {think_tokens}")
        skills = None if skills is None else list(skills)
        questions = vst_questions([seed + HELD_OUT_SEED_OFFSET], per_skill, cfg, skills)
        fit = vst_questions([seed, FIT_STREAM], fit_per_skill, cfg, skills)
        baseline = VSTBaseline.fit((q.kind, q.text, q.truth) for q in fit)
        items = [
            (Conversation((*q.prompt, Turn("assistant", (q.truth,))), q.sample_id), q) for q in questions
        ]
        name = f"vst, {per_skill} held-out questions per skill (seed {seed})"
        held = cls(name, items, baseline, tok, encode, budget=budget)
        held.think_tokens = think_tokens
        return held

    def _batches(self, batch: int) -> Iterator[list[Question]]:
        """Consecutive questions, skills mixed: each answer is cut at its own cap (:meth:`_caps`),
        so a batch need not share a kind."""
        for start in range(0, len(self.questions), batch):
            yield self.questions[start : start + batch]

    def _caps(self, questions: list[Question], max_new_tokens: int | None) -> list[int]:
        return [
            max_new_tokens or MARGIN + self.think_tokens + len(self.tok.encode(q.truth)) for q in questions
        ]
