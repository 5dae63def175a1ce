"""Held-out evaluation: answer accuracy per skill next to a baseline, graded scores for grounding,
the held-out loss, and a command line that evaluates any checkpoint.

    python -m trainer.evaluate runs/vlm-seedvl-tiny                # its latest checkpoint
    python -m trainer.evaluate runs/x/checkpoints/step_00000330 --num 100 --json
    python -m trainer.evaluate runs/x --data my.jsonl --gallery eval.png

What is held out and how answers are scored and compared with a blind baseline: trainer.heldout.
:class:`HeldOut` prepares a held-out set once (questions, baseline, packed batches for the loss) and
evaluates a model on it; the training loop and this command line share it. ``--data vst`` holds out
questions of every VST skill (single image, multi-view, video) instead: trainer.vst_eval.

Answers are greedy (model.generate), batched by skill. Generation stops ``MARGIN`` tokens after the
batch's longest reference answer: a longer reply cannot be right, and an untrained model that never
says <|im_end|> would otherwise run every question to a fixed cap.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from model.config import VLMConfig
from model.generate import generate
from model.preprocess import FACTOR, MAX_PIXELS, PackedImages, pack_images
from model.vlm import SeedVLM

from .checkpoint import Checkpointer
from .config import RunConfig
from .data import tokenizer as T
from .data.chat import LEVEL_RESPONSE, Conversation, EncodeConfig, SampleError, Turn, encode_conversation
from .data.packer import IGNORE_INDEX, PackedBatch, pack
from .data.spatial import check_answer
from .heldout import (
    FIT_STREAM,
    HELD_OUT_SEED_OFFSET,
    Baseline,
    EvalRecord,
    Question,
    graded_score,
    manifest_question,
    score_records,
    spatial_questions,
    split_manifest,
)

MARGIN = 8


@torch.no_grad()
def heldout_loss(model: SeedVLM, batches: Iterable[PackedBatch], device: torch.device) -> float | None:
    """Mean cross-entropy over the target tokens of ``batches`` (None if they have none); the model
    runs in eval mode and is put back as it was."""
    ce, targets = torch.zeros((), dtype=torch.float64, device=device), 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = batch.to(device)
            logits = model(**batch.model_inputs()).logits
            ce += F.cross_entropy(logits.float(), batch.labels, ignore_index=IGNORE_INDEX, reduction="sum")
            targets += batch.num_targets
    finally:
        model.train(was_training)
    return float(ce) / targets if targets else None


@dataclass
class EvalResult:
    loss: float | None  # held-out CE per answer token
    scores: dict[str, dict]  # score_records
    records: list[EvalRecord]

    def scalars(self) -> dict[str, float]:
        """Flat numbers for log.jsonl and TensorBoard: eval/loss, eval/accuracy/<skill>, ..."""
        out = {"eval/loss": self.loss} if self.loss is not None else {}
        for kind, s in self.scores.items():
            out[f"eval/accuracy/{kind}"] = s["accuracy"]
            if "score" in s:
                out[f"eval/{s['metric']}/{kind}"] = s["score"]
        return out


class HeldOut:
    """A held-out set, prepared once: its questions, their blind baseline, and packed batches of the
    whole conversations for the loss (answer tokens are the targets). Samples whose media fail to
    decode are dropped (counted in ``skipped``); over-long ones only leave the loss. ``check``,
    ``grade`` and ``score`` are the data's verifier, graded score and scoring (trainer.vst_eval
    swaps in its own)."""

    check = staticmethod(check_answer)
    grade = staticmethod(graded_score)
    score = staticmethod(score_records)

    def __init__(
        self, name: str, items: Iterable[tuple[Conversation, Question | None]], baseline: Baseline,
        tok: T.Tokenizer, encode: EncodeConfig, *, budget: int = 4096,
    ) -> None:  # fmt: skip
        self.name, self.baseline, self.tok, self.encode = name, baseline, tok, encode
        self.questions: list[Question] = []
        self.skipped: Counter[str] = Counter()
        samples = []
        for conv, question in items:
            try:
                sample = encode_conversation(conv, tok, encode)
            except SampleError as err:
                self.skipped[err.cause] += 1
                continue
            if question is not None:
                self.questions.append(question)
            if sample.length <= budget:
                samples.append(sample)
            else:
                self.skipped["too long for the loss"] += 1
        self.batches = pack(samples, budget, min_level=LEVEL_RESPONSE, image_token_id=tok.image_token_id)

    @classmethod
    def spatial(
        cls, tok: T.Tokenizer, encode: EncodeConfig, *, seed: int, per_skill: int, budget: int = 4096,
        fit_per_skill: int = 100,
    ) -> HeldOut:  # fmt: skip
        """``per_skill`` questions of every spatial skill about scenes never trained on; the baseline
        is fitted on ``fit_per_skill`` other questions of each skill drawn like the training data."""
        questions = spatial_questions([seed + HELD_OUT_SEED_OFFSET], per_skill)
        fit = spatial_questions([seed, FIT_STREAM], fit_per_skill)
        baseline = Baseline.fit((q.kind, q.text, q.truth) for q in fit)
        items = [
            (Conversation((*q.prompt, Turn("assistant", (q.truth,))), q.sample_id), q) for q in questions
        ]
        name = f"spatial, {per_skill} held-out questions per skill (seed {seed})"
        return cls(name, items, baseline, tok, encode, budget=budget)

    @classmethod
    def manifest(
        cls, path: str | Path, tok: T.Tokenizer, encode: EncodeConfig, *, num: int = 256,
        fraction: float = 0.05, budget: int = 4096,
    ) -> HeldOut:  # fmt: skip
        """The first ``num`` samples of the manifest's held-out split (:func:`split_manifest`); the
        baseline is fitted on the training part's answers."""
        from .data.manifest import ManifestDataset

        train, held = split_manifest(ManifestDataset(path), fraction)
        examples = (manifest_question(train[i]) for i in range(len(train)))
        baseline = Baseline.fit((q.kind, q.text, q.truth) for q in examples if q is not None)
        items = [(held[i], manifest_question(held[i])) for i in range(min(num, len(held)))]
        name = f"{held.name}: {len(items)} of {len(held)} samples"
        return cls(name, items, baseline, tok, encode, budget=budget)

    def loss(self, model: SeedVLM, device: torch.device) -> float | None:
        return heldout_loss(model, self.batches, device)

    @torch.no_grad()
    def answer(
        self, model: SeedVLM, device: torch.device, *, batch: int = 32, max_new_tokens: int | None = None
    ) -> list[EvalRecord]:
        """Greedy answers to every question (module docstring), in order."""
        records = []
        was_training = model.training
        model.eval()
        try:
            for chunk in self._batches(batch):
                records += self._answer_batch(model, chunk, device, max_new_tokens)
        finally:
            model.train(was_training)
        return records

    def _batches(self, batch: int) -> Iterator[list[Question]]:
        """The questions in generation batches: one kind per batch, so its answers are alike in length."""
        for _, same_kind in itertools.groupby(self.questions, key=lambda q: q.kind):
            group = list(same_kind)
            for start in range(0, len(group), batch):
                yield group[start : start + batch]

    def _caps(self, questions: list[Question], max_new_tokens: int | None) -> list[int]:
        """Tokens each answer may take: the batch's longest truth and a margin."""
        cap = max_new_tokens or MARGIN + max(len(self.tok.encode(q.truth)) for q in questions)
        return [cap] * len(questions)

    def _answer_batch(
        self, model: SeedVLM, questions: list[Question], device: torch.device, max_new_tokens: int | None
    ) -> list[EvalRecord]:
        prompts = [
            encode_conversation(
                Conversation(q.prompt, q.sample_id), self.tok, self.encode, add_generation_prompt=True
            )
            for q in questions
        ]
        caps = self._caps(questions, max_new_tokens)
        ids = [torch.from_numpy(p.ids).long() for p in prompts]
        images = packed_images([im for p in prompts for im in p.images], device)
        outs = generate(model, ids, max(caps), eos_id=self.tok.special_id(T.IM_END), images=images)
        records = []
        for q, out, cap in zip(questions, outs, caps, strict=True):
            text = decode_reply(self.tok, out[:cap].tolist())
            ok, score = self.check(q.kind, text, q.truth), self.grade(q.kind, text, q.truth)
            records.append(EvalRecord(q.kind, q.text, q.truth, text, ok, score, q.image, q.sample_id))
        return records

    def evaluate(self, model: SeedVLM, device: torch.device, **answer_kwargs) -> EvalResult:
        """Held-out loss, answers and their scores."""
        records = self.answer(model, device, **answer_kwargs)
        return EvalResult(self.loss(model, device), self.score(records, self.baseline), records)


def packed_images(images: list, device: torch.device) -> PackedImages | None:
    """The prompts' patchified images packed for the ViT on ``device``; None without images."""
    if not images:
        return None
    p = pack_images(images)
    return PackedImages(
        p.patches.to(device), p.pos_hw.to(device), p.cu_seqlens.to(device), p.max_seqlen, p.grid_hw
    )


def decode_reply(tok: T.Tokenizer, ids: list[int]) -> str:
    """The text of generated ``ids`` up to <|im_end|>. Ids past the tokenizer's vocabulary (the
    embedding's rounding rows, which no text maps to) are dropped."""
    eos = tok.special_id(T.IM_END)
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return tok.decode([i for i in ids if i < tok.vocab_size])


def evaluate_spatial(
    model: SeedVLM, tok: T.Tokenizer, *, seed: int, num: int, encode: EncodeConfig, device: torch.device,
    batch: int = 32,
) -> dict[str, dict]:  # fmt: skip
    """:func:`score_records` of ``num`` held-out questions per spatial skill (see :class:`HeldOut`)."""
    heldout = HeldOut.spatial(tok, encode, seed=seed, per_skill=num)
    return score_records(heldout.answer(model, device, batch=batch), heldout.baseline)


# ----------------------------------------------------------------------------- checkpoints and the CLI


class CheckpointError(ValueError):
    """A path that holds no usable checkpoint; the message says what was expected."""


@dataclass
class Loaded:
    model: SeedVLM  # in eval mode
    tok: T.Tokenizer
    encode: EncodeConfig  # the run's image budget
    path: Path  # the checkpoint directory
    meta: dict  # its meta.json


def encode_config(model_cfg: VLMConfig, max_pixels: int | None = None) -> EncodeConfig:
    """The image budget a run of ``model_cfg`` trains with unless --max-pixels says otherwise: 64
    tokens per image for the CPU-scale presets, the paper's budget for the others."""
    tiny = model_cfg.llm.hidden < 2048
    return EncodeConfig(max_pixels=max_pixels or (64 * FACTOR * FACTOR if tiny else MAX_PIXELS))


def find_checkpoint(path: str | Path) -> Path:
    """``path`` if it is a checkpoint directory, else the latest checkpoint of the run at ``path``."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = Checkpointer(root).latest()
        if found is not None:
            return found
    raise CheckpointError(
        f"{path}: no checkpoint there (expected a run directory with checkpoints/, or a "
        "checkpoints/step_* directory holding meta.json)"
    )


def load_checkpoint(path: str | Path, device: torch.device, *, max_pixels: int | None = None) -> Loaded:
    """The model of a run or checkpoint directory, rebuilt from its meta.json's run signature
    (preset, tokenizer) with its weights loaded; CheckpointError if that cannot be done."""
    from .components import build_model_config  # imported here: trainer.components imports this module
    from .data.tokenizer import load_tokenizer

    ckpt = find_checkpoint(path)
    meta = Checkpointer.read_meta(ckpt)
    run = meta.get("run") or {}
    if "preset" not in run:
        raise CheckpointError(
            f"{ckpt}/meta.json: no run signature (preset, tokenizer); not written by trainer/run.py?"
        )
    try:
        tok = load_tokenizer(run.get("tokenizer", "bytes"))
        model_cfg = build_model_config(run["preset"], tok)
    except (KeyError, ValueError, FileNotFoundError, ImportError) as err:
        raise CheckpointError(f"{ckpt}: cannot rebuild its model: {str(err).strip(chr(39))}") from err
    if run.get("vocab_size", model_cfg.llm.vocab_size) != model_cfg.llm.vocab_size:
        raise CheckpointError(
            f"{ckpt}: written with vocab_size {run['vocab_size']}, but preset {run['preset']!r} with "
            f"tokenizer {run.get('tokenizer')!r} gives {model_cfg.llm.vocab_size} here"
        )
    model = SeedVLM(model_cfg)
    Checkpointer.load_model(ckpt, model)
    encode = encode_config(model_cfg, max_pixels or run.get("max_pixels"))
    return Loaded(model.to(device).eval(), tok, encode, ckpt, meta)


def device_arg(spec: str) -> torch.device:
    """The --device argument: "auto" is the GPU when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {spec!r}") from None


def _top(s: dict) -> str:
    """ "; most often 'yes' (0.94)" for a skill's entry, "" for the "all" row."""
    return f"; most often {s['top_answer']!r} ({s['top_share']:.2f})" if "top_share" in s else ""


def format_table(result: EvalResult) -> str:
    """One line per skill: accuracy and baseline, the graded score and its baseline, n, and the
    model's most frequent answer with its share (1.00: one constant answer)."""
    fmt = lambda v: "   -  " if v is None else f"{v:6.3f}"
    lines = [
        f"held-out loss {fmt(result.loss).strip()} (CE per answer token)",
        f"{'skill':<12} {'accuracy':>8} {'baseline':>8}  {'graded':>16} {'baseline':>8} {'n':>5}  "
        "baseline rule; most frequent answer (share)",
    ]
    for kind, s in result.scores.items():
        graded = f"{s['metric']:>9} {fmt(s['score'])}" if "score" in s else " " * 16
        lines.append(
            f"{kind:<12} {fmt(s['accuracy']):>8} {fmt(s['baseline']):>8}  {graded} "
            f"{fmt(s.get('baseline_score')) if 'score' in s else '':>8} {s['total']:>5}  "
            f"{s['baseline_rule']}{_top(s)}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    # fmt: off
    p = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description="Evaluate a checkpoint on held-out data: held-out loss, and per skill the answer "
        "accuracy next to a blind baseline (majority, chance or mean answer), with a graded score "
        "(IoU, closeness) for grounding.",
    )
    add = p.add_argument
    add("checkpoint", type=Path,
        help="a run directory (its latest checkpoint) or a checkpoints/step_* directory")
    add("--data", default="spatial",
        help="'spatial' (held-out procedural scenes, default), 'vst' (every VST skill: single image, "
        "multi-view, video) or a JSONL manifest (its held-out split)")
    add("--num", type=int, default=RunConfig.eval_samples,
        help="questions per skill (spatial), or at most this many held-out samples (manifest); default "
        f"{RunConfig.eval_samples}, as at the end of a run")
    add("--fraction", type=float, default=0.05, help="a manifest's held-out fraction (0.05)")
    add("--batch", type=int, default=32, help="questions answered together (32)")
    add("--device", type=device_arg, default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    add("--max-pixels", type=int, help="per-image pixel budget (default: the run's)")
    add("--gallery", type=Path, metavar="PNG", help="also draw the answers as a grid of scenes into PNG")
    add("--json", action="store_true", help="print the result as JSON instead of a table")
    # fmt: on
    a = p.parse_args(argv)
    for flag, value in (("--num", a.num), ("--batch", a.batch)):
        if value < 1:
            p.error(f"{flag}: expected >= 1, got {value}")
    try:
        loaded = load_checkpoint(a.checkpoint, a.device, max_pixels=a.max_pixels)
        run = loaded.meta["run"]
        budget = max((s["seq_len"] for s in run.get("stages", ())), default=4096)
        if a.data == "spatial":
            heldout = HeldOut.spatial(
                loaded.tok, loaded.encode, seed=run.get("seed", 0), per_skill=a.num, budget=budget
            )
        elif a.data == "vst":
            from .vst_eval import VSTHeldOut

            heldout = VSTHeldOut.vst(
                loaded.tok, loaded.encode, seed=run.get("seed", 0), per_skill=a.num, budget=budget
            )
        else:
            heldout = HeldOut.manifest(
                a.data, loaded.tok, loaded.encode, num=a.num, fraction=a.fraction, budget=budget
            )
    except (ValueError, FileNotFoundError) as err:  # CheckpointError, and bad data
        print(f"error: {str(err).strip(chr(39))}", file=sys.stderr)
        return 2
    result = heldout.evaluate(loaded.model, a.device, batch=a.batch)
    where = f"{loaded.path} (step {loaded.meta.get('global_step')}, stage {loaded.meta.get('stage')})"
    if a.gallery is not None:
        from .gallery import write_gallery

        write_gallery(result.records, a.gallery, title=f"{where}: {heldout.name}")
    if a.json:
        out = {
            "checkpoint": str(loaded.path),
            "data": heldout.name,
            "loss": result.loss,
            "eval": result.scores,
        }
        print(json.dumps(out, indent=1))
    else:
        print(f"{where}\n{heldout.name}" + (f"; skipped {dict(heldout.skipped)}" if heldout.skipped else ""))
        print(format_table(result))
        if a.gallery is not None:
            print(f"gallery {a.gallery}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
