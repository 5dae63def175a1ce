"""Held-out questions and the scoring of answers to them: accuracy per skill next to a baseline,
and a graded score for grounding.

Held-out questions. Spatial (:func:`spatial_questions`): per skill, questions about scenes drawn
from a seed the training stream never uses (``seed + HELD_OUT_SEED_OFFSET``), so they measure
generalisation to new scenes, not memorisation. A manifest (:func:`split_manifest`): the fraction of
its samples whose ids hash lowest, stable when lines are added or reordered; a run on the manifest
holds them out by training on the other part. A manifest sample is a question when its ``meta``
gives an ``answer`` (and optionally a ``kind``).

Scores. An answer is right when the data's verifier accepts it (trainer.data.spatial.check_answer:
exact for counts and choices, IoU >= 0.5 for boxes, within 10% for depths and 3D centres; exact,
after normalising case and spaces, for any other kind). Grounding also gets a graded score: the box
IoU (ground2d), or the closeness max(0, 1 - |p - t| / |t|) of depths and 3D centres; 0 for an
answer that does not parse.

Baselines are what a model could score without looking at the image, fitted on training data (never
the held-out questions): the majority answer to the same question text, else the skill's majority
answer; the mean answer (mean box, depth, centre) for the graded skills; chance where the data balances
the answers by construction, so that no blind rule beats it: choices among the objects the question
names (closer 1/2, depth_order 1/6: questions list their objects in random order) and relation's
yes/no (1/2: a random ordered pair and a random side). A majority fitted per question would be
noise there, since nearly every relation question names its own pair of objects: on the default
run's 50 held-out relation questions it scored 0.42, where answering "yes" to all scored 0.56.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .data.chat import Conversation, Media, Turn
from .data.spatial import _NUM_RE, KINDS, _iou, _norm, ask, check_answer, sample_scene

HELD_OUT_SEED_OFFSET = 1_000_003
# Training sample i draws from rng([seed, i]), held-out question i of skill k from
# rng([seed + HELD_OUT_SEED_OFFSET, k, i]), the questions a baseline is fitted on from
# rng([seed, FIT_STREAM, k, i]): three disjoint streams of scenes.
FIT_STREAM = 7

CHANCE = {"closer": 1 / 2, "relation": 1 / 2, "depth_order": 1 / 6}
GRADED = {"ground2d": "IoU", "depth": "closeness", "ground3d": "closeness"}


# ----------------------------------------------------------------------------- held-out questions


@dataclass(frozen=True)
class Question:
    """One held-out question with a verifiable answer."""

    kind: str
    prompt: tuple[Turn, ...]  # the conversation up to the reply
    text: str  # the question (text of the last user turn)
    truth: str
    image: np.ndarray | str | None = field(default=None, repr=False)  # its first image, for the gallery
    sample_id: str = ""


def spatial_questions(key: Sequence[int], per_skill: int) -> list[Question]:
    """``per_skill`` questions of every skill, scene ``i`` of skill ``k`` drawn from rng([*key, k, i])
    (scenes without a question of that skill are passed over)."""
    out = []
    for k, kind in enumerate(KINDS):
        found = 0
        for i in itertools.count():
            if found == per_skill:
                break
            rng = np.random.default_rng([*key, k, i])
            scene = sample_scene(rng)
            qa = ask(scene, kind, rng)
            if qa is None:
                continue
            text, answer, _ = qa
            prompt = (Turn("user", (Media("image", scene.image), text)),)
            out.append(Question(kind, prompt, text, answer, scene.image, f"held-out-{kind}-{i}"))
            found += 1
    return out


class Subset:
    """The samples ``indices`` of a source, itself a source (trainer.data.stream.Source)."""

    def __init__(self, source, indices: Sequence[int], name: str) -> None:
        self.source, self.indices, self.name = source, list(indices), name

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Conversation:
        return self.source[self.indices[index]]


def split_manifest(ds, fraction: float = 0.05) -> tuple[Subset, Subset]:
    """(training part, held-out part) of a ManifestDataset: the held-out part is the round(fraction
    * n) samples (at least 1, at most n - 1) whose sample ids have the smallest BLAKE2 hashes."""
    n = len(ds)
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction: expected a value in (0, 1), got {fraction}")
    if n < 2:
        raise ValueError(f"{ds.name}: {n} usable sample; a held-out split needs at least 2")
    digest = lambda i: hashlib.blake2b(ds[i].sample_id.encode(), digest_size=8).digest()
    order = sorted(range(n), key=digest)
    held = min(n - 1, max(1, round(fraction * n)))
    return (
        Subset(ds, sorted(order[held:]), f"{ds.name}[train]"),
        Subset(ds, sorted(order[:held]), f"{ds.name}[held out]"),
    )


def manifest_question(conv: Conversation) -> Question | None:
    """The last assistant turn's question, when the sample's meta gives its answer."""
    replies = [i for i, t in enumerate(conv.turns) if t.role == "assistant"]
    if "answer" not in conv.meta or not replies:
        return None
    prompt = conv.turns[: replies[-1]]
    users = [t for t in prompt if t.role == "user"]
    text = " ".join(p for p in users[-1].parts if isinstance(p, str)) if users else ""
    media = [p for t in prompt for p in t.parts if isinstance(p, Media) and p.kind == "image"]
    kind = str(conv.meta.get("kind", "answer"))
    return Question(
        kind, prompt, text, str(conv.meta["answer"]), media[0].source if media else None, conv.sample_id
    )


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class EvalRecord:
    """A held-out question answered: what the gallery draws and the scores count."""

    kind: str
    question: str
    truth: str
    answer: str
    ok: bool  # the verifier accepts the answer
    score: float  # graded score (IoU, closeness) for grounding, else 1.0 / 0.0
    image: np.ndarray | str | None = field(default=None, repr=False)
    sample_id: str = ""


def graded_score(kind: str, prediction: str, truth: str) -> float:
    """IoU of the boxes (ground2d); max(0, 1 - |p - t| / |t|) for depths and 3D centres; 0 when the
    prediction does not parse; 1.0 or 0.0 by :func:`check_answer` for the other kinds."""
    if kind not in GRADED:
        return float(check_answer(kind, prediction, truth))
    p, t = _numbers(prediction), _numbers(truth)
    if len(p) != len(t) or not t:
        return 0.0
    if kind == "ground2d":
        return _iou(p, t) if len(p) == 4 else 0.0
    err, ref = float(np.linalg.norm(np.subtract(p, t))), float(np.linalg.norm(t))
    return max(0.0, 1.0 - err / ref) if ref > 0 else float(err == 0)


def _numbers(text: str) -> list[float]:
    return [float(v) for v in _NUM_RE.findall(_norm(text))]


def _with_numbers(template: str, values: Sequence[float]) -> str:
    """``template`` with its numbers replaced by ``values``, each with the decimals it had."""
    it = iter(values)

    def sub(m) -> str:
        decimals = len(m.group(0).partition(".")[2])
        return f"{next(it):.{decimals}f}"

    return _NUM_RE.sub(sub, template)


@dataclass(frozen=True)
class Baseline:
    """The blind answers (module docstring), fitted on (kind, question, answer) training examples.

    The skills it knows come from class attributes, so that another data source (trainer.vst_eval)
    subclasses it with its own: ``chance`` (kinds scored by chance, and that chance), ``numeric``
    (kinds whose blind answer is the mean of the numbers), ``verify`` and ``grade``."""

    by_question: dict[tuple[str, str], str]
    by_kind: dict[str, str]

    chance: ClassVar[dict[str, float]] = CHANCE
    numeric: ClassVar[Collection[str]] = GRADED
    verify: ClassVar[Callable[[str, str, str], bool]] = staticmethod(check_answer)
    grade: ClassVar[Callable[[str, str, str], float]] = staticmethod(graded_score)

    @classmethod
    def fit(cls, examples: Iterable[tuple[str, str, str]]) -> Baseline:
        per_question: dict[tuple[str, str], Counter] = defaultdict(Counter)
        per_kind: dict[str, Counter] = defaultdict(Counter)
        numbers: dict[str, list[tuple[str, list[float]]]] = defaultdict(list)
        for kind, question, answer in examples:
            if kind in cls.numeric:
                numbers[kind].append((answer, _numbers(answer)))
            elif kind not in cls.chance:
                per_question[(kind, question)][answer] += 1
                per_kind[kind][answer] += 1
        by_kind = {k: c.most_common(1)[0][0] for k, c in per_kind.items()}
        for kind, rows in numbers.items():
            template, first = rows[0]
            alike = [v for _, v in rows if len(v) == len(first)]  # drop answers of another shape
            if first:
                by_kind[kind] = _with_numbers(template, np.mean(alike, axis=0).tolist())
        by_question = {k: c.most_common(1)[0][0] for k, c in per_question.items()}
        return cls(by_question, by_kind)

    def rule(self, kind: str) -> str:
        if kind in self.chance:
            return f"chance 1/{round(1 / self.chance[kind])}"
        if kind not in self.by_kind:
            return "none (no training answers)"
        return f"mean answer {self.by_kind[kind]}" if kind in self.numeric else "majority answer"

    def expected(self, kind: str, question: str, truth: str) -> tuple[float, float] | None:
        """(expected pass, expected graded score) of the blind answer; None when none was fitted."""
        if kind in self.chance:
            return self.chance[kind], self.chance[kind]
        guess = self.by_question.get((kind, question), self.by_kind.get(kind))
        if guess is None:
            return None
        return float(self.verify(kind, guess, truth)), self.grade(kind, guess, truth)


def score_records(records: Sequence[EvalRecord], baseline: Baseline) -> dict[str, dict]:
    """Per skill, then "all": accuracy, baseline (the blind answers' expected accuracy), correct,
    total, baseline_rule; for the graded skills also metric, score and baseline_score; per skill
    also top_answer and top_share, the model's most frequent (normalised) answer and the share of
    questions it gave it to: a model that ignores the picture answers one constant (share 1.0), and
    on a small held-out set a constant can land above the baseline by chance."""
    groups: dict[str, list[EvalRecord]] = defaultdict(list)
    for r in records:
        groups[r.kind].append(r)
    out = {}
    for kind in sorted(groups, key=skill_order):
        out[kind] = _entry(groups[kind], baseline, kind)
    if records:
        out["all"] = _entry(records, baseline, None)
    return out


def skill_order(kind: str) -> tuple[int, str]:
    return (KINDS.index(kind) if kind in KINDS else len(KINDS), kind)


def _entry(rs: Sequence[EvalRecord], baseline: Baseline, kind: str | None) -> dict:
    correct = sum(r.ok for r in rs)
    blind = [baseline.expected(r.kind, r.question, r.truth) for r in rs]
    known = None not in blind
    entry = {
        "accuracy": correct / len(rs),
        "baseline": sum(b[0] for b in blind) / len(rs) if known else None,
        "correct": correct,
        "total": len(rs),
        "baseline_rule": baseline.rule(kind) if kind else "per skill",
    }
    if kind is not None:
        top, n = Counter(_norm(r.answer) for r in rs).most_common(1)[0]
        entry["top_answer"], entry["top_share"] = top, n / len(rs)
    if kind in GRADED:
        entry["metric"] = GRADED[kind]
        entry["score"] = sum(r.score for r in rs) / len(rs)
        entry["baseline_score"] = sum(b[1] for b in blind) / len(rs) if known else None
    return entry
