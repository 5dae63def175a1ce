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

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .data import tokenizer as T
from .data import vst
from .data.chat import Conversation, EncodeConfig, Turn
from .evaluate import HeldOut
from .heldout import CHANCE as SPATIAL_CHANCE
from .heldout import (
    FIT_STREAM,
    HELD_OUT_SEED_OFFSET,
    EvalRecord,
    Question,
    _numbers,
    _with_numbers,
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


@dataclass(frozen=True)
class VSTBaseline:
    """The blind answers (module docstring), fitted on (kind, question, answer) training examples;
    the interface of trainer.heldout.Baseline."""

    by_question: dict[tuple[str, str], str]
    by_kind: dict[str, str]

    @classmethod
    def fit(cls, examples: Iterable[tuple[str, str, str]]) -> VSTBaseline:
        per_question: dict[tuple[str, str], Counter] = defaultdict(Counter)
        per_kind: dict[str, Counter] = defaultdict(Counter)
        numbers: dict[str, list[tuple[str, list[float]]]] = defaultdict(list)
        for kind, question, answer in examples:
            if kind in MEAN:
                numbers[kind].append((answer, _numbers(answer)))
            elif kind not in CHANCE:
                per_question[(kind, question)][answer] += 1
                per_kind[kind][answer] += 1
        by_kind = {k: c.most_common(1)[0][0] for k, c in per_kind.items()}
        for kind, rows in numbers.items():
            template, first = rows[0]
            alike = [v for _, v in rows if len(v) == len(first)]
            if first:
                by_kind[kind] = _with_numbers(template, np.mean(alike, axis=0).tolist())
        return cls({k: c.most_common(1)[0][0] for k, c in per_question.items()}, by_kind)

    def rule(self, kind: str) -> str:
        if kind in CHANCE:
            return f"chance 1/{round(1 / CHANCE[kind])}"
        if kind not in self.by_kind:
            return "none (no training answers)"
        return f"mean answer {self.by_kind[kind]}" if kind in MEAN else "majority answer"

    def expected(self, kind: str, question: str, truth: str) -> tuple[float, float] | None:
        """(expected pass, expected graded score) of the blind answer; None when none was fitted."""
        if kind in CHANCE:
            return CHANCE[kind], CHANCE[kind]
        guess = self.by_question.get((kind, question), self.by_kind.get(kind))
        if guess is None:
            return None
        return float(vst.check_answer(kind, guess, truth)), vst.graded_score(kind, guess, truth)


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
    """trainer.evaluate.HeldOut with the VST skills' verifier, graded score and scoring."""

    check = staticmethod(vst.check_answer)
    grade = staticmethod(vst.graded_score)
    score = staticmethod(score_vst)

    @classmethod
    def vst(
        cls, tok: T.Tokenizer, encode: EncodeConfig, *, seed: int, per_skill: int, budget: int = 4096,
        fit_per_skill: int = 50, cfg: vst.VSTConfig | None = None, skills: Iterable[str] | None = None,
    ) -> VSTHeldOut:  # fmt: skip
        """``per_skill`` held-out questions of every VST skill (or of ``skills``); the baseline is
        fitted on ``fit_per_skill`` other questions of each."""
        skills = None if skills is None else list(skills)
        questions = vst_questions([seed + HELD_OUT_SEED_OFFSET], per_skill, cfg, skills)
        fit = vst_questions([seed, FIT_STREAM], fit_per_skill, cfg, skills)
        baseline = VSTBaseline.fit((q.kind, q.text, q.truth) for q in fit)
        items = [
            (Conversation((*q.prompt, Turn("assistant", (q.truth,))), q.sample_id), q) for q in questions
        ]
        name = f"vst, {per_skill} held-out questions per skill (seed {seed})"
        return cls(name, items, baseline, tok, encode, budget=budget)
