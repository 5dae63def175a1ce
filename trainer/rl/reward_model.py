"""The generative reward model (Seed1.5-VL §4.2): a copy of the SFT model that judges a response.

Score. The judge prompt holds the question, the reference answer and the response's **solution**
(the thought is cut off by trainer.rl.rewards.split_response first, so the RM never sees it):

    <|im_start|>user\\nQuestion: ...\\nReference answer: ...\\nResponse: ...\\nIs the response
    correct? Answer yes or no.<|im_end|>\\n<|im_start|>assistant\\n

and the score is the probability of the first token of "yes" at the next position, in [0, 1].
The judge sees text only (the reference answer carries what the image shows), so the ViT is not
run; the critic, initialised from these weights, does see the images.

Training data: list-wise preferences synthesised from the embedded spatial data, ranked as the
report ranks them: (0) right and well formatted > (1) wrong but well formatted > (2) badly
formatted. Per question, :func:`preference_list` builds one candidate of each rank from the truth:
a right answer (the truth, or within the verifier's tolerance), a wrong one in the same form
(another colour or count, numbers off by more than the tolerance, a shuffled order) and a broken
one (the answer without its form, buried in chatter, repeated or cut short).

Loss: a Plackett-Luce list-wise loss on s = log P(yes) (each candidate against every candidate
ranked no better than it, ties included), plus anchors that pull the top rank's P(yes) to 1 and
the bottom rank's to 0, so that scores are probabilities a PPO reward can use, not only an order.
Held-out accuracy: the share of pairs of different rank, from lists of scenes never trained on,
that the RM orders correctly (per pair kind too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from model.vlm import SeedVLM

from ..data import tokenizer as T
from ..data.chat import Conversation, Turn, encode_conversation
from ..data.render import COLORS
from ..data.spatial import _NUM_RE
from .prompts import DESCRIBE, Prompt

MAX_RESPONSE_CHARS = 160  # the judge sees at most this much of a solution
RANKS = ("right", "wrong", "broken")


def judge_ids(tok: T.Tokenizer, question: str, reference: str, solution: str) -> torch.Tensor:
    text = (
        f"Question: {question}\nReference answer: {reference}\nResponse: "
        f"{solution[:MAX_RESPONSE_CHARS]}\nIs the response correct? Answer yes or no."
    )
    enc = encode_conversation(Conversation((Turn("user", (text,)),)), tok, add_generation_prompt=True)
    return torch.from_numpy(enc.ids).long()


def yes_no_ids(tok: T.Tokenizer) -> tuple[int, int]:
    return tok.encode("yes")[0], tok.encode("no")[0]


def log_p_yes(rm: SeedVLM, seqs: list[torch.Tensor], yes_id: int) -> torch.Tensor:
    """(B,) log P(yes) at the end of each judge prompt, one packed text-only forward."""
    device = rm.llm.embed.weight.device
    lengths = [int(s.numel()) for s in seqs]
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=device)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    hidden = rm.llm.forward_hidden(
        rm.llm.embed(torch.cat(seqs).to(device)), positions, cu, max(lengths)
    ).logits
    last = cu[1:].long() - 1
    return rm.llm.lm_head(hidden[last]).float().log_softmax(-1)[:, yes_id]


@torch.no_grad()
def score(
    rm: SeedVLM, tok: T.Tokenizer, items: list[tuple[str, str, str]], *, batch: int = 64
) -> list[float]:
    """P(yes) for each (question, reference, solution)."""
    yes, _ = yes_no_ids(tok)
    was = rm.training
    rm.eval()
    out: list[float] = []
    try:
        for s in range(0, len(items), batch):
            seqs = [judge_ids(tok, *it) for it in items[s : s + batch]]
            out += log_p_yes(rm, seqs, yes).exp().tolist()
    finally:
        rm.train(was)
    return out


# ----------------------------------------------------------------------------- preference lists


def _numbers(text: str) -> list[float]:
    return [float(v) for v in _NUM_RE.findall(text)]


def _with(template: str, values: list[float]) -> str:
    it = iter(values)
    return _NUM_RE.sub(lambda m: f"{next(it):.{len(m.group(0).partition('.')[2])}f}", template)


def _wrong(p: Prompt, rng: np.random.Generator) -> str:
    """An answer in the right form that the verifier rejects."""
    truth = p.truth
    if p.kind == "count":
        c = int(truth)
        return str(c + 1 if c <= 1 else c + int(rng.choice([-1, 1])))
    if p.kind == "relation":
        return "no" if truth == "yes" else "yes"
    if p.kind == "closer":
        others = [c for c in COLORS if c != truth and c in p.text] or [c for c in COLORS if c != truth]
        return str(rng.choice(others))
    if p.kind in ("depth_order", DESCRIBE):
        parts = truth.split(", ")
        while len(parts) > 1:
            perm = [parts[i] for i in rng.permutation(len(parts))]
            if perm != parts:
                return ", ".join(perm)
        return f"{truth}, {rng.choice(COLORS)} cube"
    nums = _numbers(truth)
    if p.kind == "ground2d":  # shift the box by more than its size: IoU 0
        w, h = nums[2] - nums[0], nums[3] - nums[1]
        dx = (w + 30) * float(rng.choice([-1, 1]))
        if 0 <= nums[0] + dx and nums[2] + dx <= 999:
            moved = [nums[0] + dx, nums[1], nums[2] + dx, nums[3]]
        else:
            dy = h + 30 if nums[3] + h + 30 <= 999 else -(h + 30)
            moved = [nums[0], nums[1] + dy, nums[2], nums[3] + dy]
        return _with(truth, [min(999.0, max(0.0, v)) for v in moved])
    scale = float(rng.choice([0.6, 0.7, 1.35, 1.5]))  # depths, centres: off by 30% or more
    return _with(truth, [v * scale if abs(v) > 0.05 else v + 1.0 for v in nums])


def _right(p: Prompt, rng: np.random.Generator) -> str:
    """The truth, or an answer within the verifier's tolerance."""
    if p.kind in ("depth", "ground3d") and rng.random() < 0.5:
        return _with(p.truth, [v * float(rng.uniform(0.97, 1.03)) for v in _numbers(p.truth)])
    if p.kind == "ground2d" and rng.random() < 0.5:
        return _with(p.truth, [v + float(rng.integers(-3, 4)) for v in _numbers(p.truth)])
    if p.kind in ("relation", "closer") and rng.random() < 0.3:
        return p.truth.capitalize() + "."
    return p.truth


def _broken(p: Prompt, rng: np.random.Generator) -> str:
    """The answer out of its form: stripped of its tags, in chatter, repeated or cut short."""
    truth = p.truth
    choice = int(rng.integers(4))
    if choice == 0 and len(truth) > 3:
        return truth[: max(1, len(truth) // 2)]
    if choice == 1:
        return " ".join([truth.replace(T.BBOX, "").replace(T.END_BBOX, "")] * 4)
    if choice == 2:
        return f"I think it could be {truth.replace(T.BBOX, '').replace(T.END_BBOX, '')} or maybe not"
    return "".join(rng.choice(list("abcdefgh ,.0123456789"), size=int(rng.integers(3, 20))))


@dataclass(frozen=True)
class PreferenceList:
    prompt: Prompt
    responses: tuple[str, ...]
    ranks: tuple[int, ...]  # 0 best; equal ranks are ties


def preference_list(p: Prompt, rng: np.random.Generator) -> PreferenceList:
    responses = (_right(p, rng), _wrong(p, rng), _broken(p, rng))
    return PreferenceList(p, responses, (0, 1, 2))


def listwise_loss(log_yes: torch.Tensor, ranks: torch.Tensor, anchor: float = 1.0) -> torch.Tensor:
    """Plackett-Luce over one list, ``log_yes`` (n,) = log P(yes), ``ranks`` (n,) (module
    docstring): mean over candidates i ranked above the last of -log(exp s_i / sum_{rank_j >=
    rank_i} exp s_j), plus ``anchor`` x (-log P_yes of the best, -log(1 - P_yes) of the worst)."""
    terms = []
    for i in range(log_yes.shape[0]):
        pool = ranks >= ranks[i]
        if int(pool.sum()) > 1 and ranks[i] < ranks.max():
            terms.append(torch.logsumexp(log_yes[pool], 0) - log_yes[i])
    pl = torch.stack(terms).mean() if terms else log_yes.sum() * 0
    best, worst = ranks == ranks.min(), ranks == ranks.max()
    p_no = -torch.expm1(log_yes[worst].clamp(max=-1e-6))  # 1 - P(yes), stable
    anchors = -log_yes[best].mean() - torch.log(p_no).mean()
    return pl + anchor * anchors


def pairwise_accuracy(scores: list[list[float]], lists: list[PreferenceList]) -> dict[str, float]:
    """Share of pairs of different rank ordered correctly (ties count half), in all and per pair
    kind ("right>wrong", "right>broken", "wrong>broken")."""
    hits: dict[str, list[float]] = {}
    for s, pl in zip(scores, lists, strict=True):
        for i in range(len(s)):
            for j in range(len(s)):
                if pl.ranks[i] < pl.ranks[j]:
                    key = f"{RANKS[pl.ranks[i]]}>{RANKS[pl.ranks[j]]}"
                    v = 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
                    hits.setdefault(key, []).append(v)
    out = {k: float(np.mean(v)) for k, v in sorted(hits.items())}
    out["all"] = float(np.mean([x for v in hits.values() for x in v])) if hits else math.nan
    return out
