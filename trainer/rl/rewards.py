"""Rewards of post-training: the response format, the verifiers of verifiable prompts, and the
repetition filter of rejection sampling (Seed1.5-VL §4.2-4.3, §4.5). Every reward lies in [0, 1].

Format. A response is ``<think>{thought}</think>{solution}``; :func:`split_response` returns the
solution or what breaks the format (several or unbalanced think tags, a think span that is not at
the start, an empty solution), and a broken format scores 0. ``require_think`` is a recipe setting:
the embedded SFT data teaches bare answers (``think_prob`` 0), so by default the thought may be
absent, but a think span that is there must be well formed. Only the solution is scored: a
verifier, like the reward model (trainer.rl.reward_model), never sees the thought.

Answers. The answer is the content of the solution's last ``\\boxed{...}`` when it has one, else the
whole solution. Verifiers (:func:`verify`):

| kind | reward | verifier form (else -0.5) |
|---|---|---|
| count, closer, relation, depth_order | 1 if vst.check_answer accepts it | integer, word, yes/no, list |
| ground2d, mv_correspondence | IoU of ``<bbox>x1,y1,x2,y2</bbox>`` | the tags and 4 numbers |
| depth, ground3d, distance | closeness max(0, 1 - abs(p - t) / abs(t)) | a number, a 3-vector |
| point | 1 in the truth box, else 1 - distance to it / its diagonal | ``<point>x,y</point>`` |

Graded rewards (IoU, closeness) for the continuous skills, as the report's IoU reward for boxes;
the held-out accuracy still uses the thresholded verifiers (IoU >= 0.5, within 10%).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..data.spatial import _NUM_RE
from ..data.tokenizer import BBOX, END_BBOX, END_THINK, THINK
from ..data.vst import check_answer, graded_score

POINT, END_POINT = "<point>", "</point>"
FORMAT_PENALTY = 0.5  # subtracted (floor 0) when the answer is right but not in the verifier's form
MAX_ANSWER_CHARS = 2000  # longer answers are not parsed (no verifier answer is anywhere near)

_BOXED = "\\boxed{"
_NUMBER = r"\s*-?\d+(?:\.\d+)?\s*"
_FORMS = {
    "count": re.compile(r"\d+"),
    "relation": re.compile(r"yes|no", re.IGNORECASE),
    "closer": re.compile(r"[a-z]+", re.IGNORECASE),
    "relative_size": re.compile(r"[a-z]+", re.IGNORECASE),
    "depth_order": re.compile(r"[a-z]+(?:\s*,\s*[a-z]+)+", re.IGNORECASE),
    "depth": re.compile(_NUMBER),
    "distance": re.compile(_NUMBER),
    "ground3d": re.compile(rf"\({_NUMBER},{_NUMBER},{_NUMBER}\)"),
    "ground2d": re.compile(rf"{re.escape(BBOX)}{_NUMBER},{_NUMBER},{_NUMBER},{_NUMBER}{re.escape(END_BBOX)}"),
    "mv_correspondence": re.compile(
        rf"{re.escape(BBOX)}{_NUMBER},{_NUMBER},{_NUMBER},{_NUMBER}{re.escape(END_BBOX)}"
    ),
    "point": re.compile(rf"{re.escape(POINT)}{_NUMBER},{_NUMBER}{re.escape(END_POINT)}"),
}
# A run of 3 to 40 characters 4 times in a row (bounded, so linear in the text).
_REPEAT = re.compile(r"(.{3,40}?)\1{3,}", re.DOTALL)
_REPEAT_WORD = re.compile(r"\b(\w+)(?:\W+\1\b){5,}")


@dataclass(frozen=True)
class Parsed:
    solution: str  # the text after the thought ("" when the format is broken)
    thought: str | None  # None without a think span
    problem: str | None  # what breaks the format; None when it is well formed


def split_response(text: str, *, require_think: bool = False) -> Parsed:
    """The thought and solution of ``<think>{thought}</think>{solution}`` (module docstring)."""
    opens, closes = text.count(THINK), text.count(END_THINK)
    if opens > 1 or closes > 1:
        return Parsed("", None, "several think spans")
    if opens != closes:
        return Parsed("", None, "unbalanced think tags")
    thought = None
    solution = text
    if opens:
        head, _, rest = text.partition(THINK)
        if head.strip():
            return Parsed("", None, "text before <think>")
        thought, sep, solution = rest.partition(END_THINK)
        if not sep:
            return Parsed("", None, "</think> before <think>")
    elif require_think:
        return Parsed("", None, "no <think> span")
    solution = solution.strip()
    if not solution:
        return Parsed("", thought, "empty solution")
    return Parsed(solution, thought, None)


def extract_answer(solution: str) -> str:
    """The content of the last ``\\boxed{...}`` (braces balanced) of ``solution``, else all of it."""
    start = solution.rfind(_BOXED)
    if start < 0:
        return solution.strip()
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[j], 0)
        if depth == 0:
            return solution[i:j].strip()
    return solution.strip()  # unclosed: the verifier sees the raw solution (and fails it)


@dataclass(frozen=True)
class Verdict:
    reward: float  # in [0, 1]
    correct: bool  # the thresholded verifier accepts the answer (held-out accuracy's rule)
    format_ok: bool  # the response format and the verifier's answer form
    reason: str = ""  # why the reward is 0 or penalised ("" when nothing is wrong)


def point_reward(answer: str, truth_box: str) -> float:
    """1 when the point of ``<point>x,y</point>`` lies in ``truth_box`` (x1,y1,x2,y2), else
    max(0, 1 - distance to the box / the box's diagonal); 0 when it does not parse."""
    p = [float(v) for v in _NUM_RE.findall(answer)]
    b = [float(v) for v in _NUM_RE.findall(truth_box)]
    if len(p) != 2 or len(b) != 4 or not all(math.isfinite(v) for v in (*p, *b)):
        return 0.0
    dx = max(b[0] - p[0], 0.0, p[0] - b[2])
    dy = max(b[1] - p[1], 0.0, p[1] - b[3])
    diag = math.hypot(b[2] - b[0], b[3] - b[1])
    if dx == dy == 0:
        return 1.0
    return max(0.0, 1.0 - math.hypot(dx, dy) / diag) if diag > 0 else 0.0


def verify(kind: str, reply: str, truth: str, *, require_think: bool = False) -> Verdict:
    """The reward of ``reply`` to a ``kind`` question whose answer is ``truth`` (module docstring)."""
    parsed = split_response(reply, require_think=require_think)
    if parsed.problem is not None:
        return Verdict(0.0, False, False, f"format: {parsed.problem}")
    answer = extract_answer(parsed.solution)
    if len(answer) > MAX_ANSWER_CHARS:
        return Verdict(0.0, False, False, f"answer of {len(answer)} characters")
    if kind == "point":
        score = point_reward(answer, truth)
        correct = score == 1.0
    else:
        correct = bool(check_answer(kind, answer, truth))
        score = float(graded_score(kind, answer, truth))
    if not math.isfinite(score):
        return Verdict(0.0, False, True, "non-finite score")
    score = min(1.0, max(0.0, score))
    form = _FORMS.get(kind)
    if form is not None and not form.fullmatch(answer.strip().rstrip(".")):
        return Verdict(max(0.0, score - FORMAT_PENALTY), correct, False, f"not in the {kind} answer form")
    return Verdict(score, correct, True)


def is_repetitive(text: str) -> bool:
    """Whether ``text`` repeats itself: a run of 3-40 characters 4 times in a row, or a word 6
    times in a row (rejection sampling drops such responses)."""
    return bool(_REPEAT.search(text) or _REPEAT_WORD.search(text))


def verify_job(job: tuple[str, str, str, bool]) -> tuple[float, dict]:
    """:func:`verify` of a (kind, reply, truth, require_think) job, as trainer.rl.workers runs it:
    (reward, {"correct", "format_ok", "reason"})."""
    kind, reply, truth, require_think = job
    v = verify(kind, reply, truth, require_think=require_think)
    return v.reward, {"correct": v.correct, "format_ok": v.format_ok, "reason": v.reason}
