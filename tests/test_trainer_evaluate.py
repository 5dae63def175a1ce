"""Held-out evaluation (trainer.evaluate, trainer.heldout, trainer.gallery): scores and baselines on
a known set, held-out sets that are disjoint from training, the held-out loss against a direct
computation, and the command line on a checkpoint -- of a fresh tiny model saved with
Checkpointer.save as a run saves it: no training, so the output's structure is tested, not its
accuracy."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.vlm import SeedVLM
from trainer.checkpoint import Checkpointer
from trainer.components import build_model_config
from trainer.data.manifest import ManifestDataset
from trainer.data.spatial import KINDS, SpatialDataset, ask, export_spatial, sample_scene
from trainer.data.tokenizer import ByteTokenizer
from trainer.evaluate import HeldOut, evaluate_spatial, load_checkpoint, main
from trainer.gallery import write_gallery
from trainer.heldout import (
    FIT_STREAM,
    HELD_OUT_SEED_OFFSET,
    Baseline,
    EvalRecord,
    graded_score,
    score_records,
    spatial_questions,
    split_manifest,
)

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def make_run(root: Path) -> Path:
    """A run directory with one checkpoint of a fresh seedvl-tiny model, meta.json as a run writes
    it. The embedding's rounding rows (ids past the tokenizer's) get zero logits, as training
    leaves them far below the real tokens', so greedy decoding never picks them."""
    tok = ByteTokenizer()
    cfg = build_model_config("seedvl-tiny", tok)
    torch.manual_seed(0)
    model = SeedVLM(cfg)
    with torch.no_grad():
        model.llm.lm_head.weight[tok.vocab_size :] = 0
    run = {"preset": "seedvl-tiny", "tokenizer": "bytes", "vocab_size": cfg.llm.vocab_size, "seed": 0}
    run["stages"] = [{"name": "sft", "seq_len": 1024}]
    meta = {"global_step": 3, "stage": "sft", "run": run}
    Checkpointer(root / "checkpoints").save(3, model, torch.optim.AdamW(model.parameters()), meta)
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"))


def test_graded_scores():
    assert graded_score("ground2d", "<bbox>0,0,100,100</bbox>", "<bbox>0,0,100,100</bbox>") == 1.0
    assert graded_score("ground2d", "<bbox>0,0,100,50</bbox>", "<bbox>0,0,100,100</bbox>") == 0.5
    assert graded_score("ground2d", "a box", "<bbox>0,0,100,100</bbox>") == 0.0
    assert graded_score("depth", "4.5", "5.0") == pytest.approx(0.9)
    assert graded_score("depth", "20", "5.0") == 0.0  # clipped at 0, never negative
    assert graded_score("ground3d", "(0.0, 0.0, 5.0)", "(0.0, 0.0, 4.0)") == pytest.approx(0.75)
    assert graded_score("ground3d", "(1.0, 2.0)", "(0.0, 0.0, 4.0)") == 0.0
    assert graded_score("count", "3", "3") == 1.0 and graded_score("count", "2", "3") == 0.0


def test_baseline_and_scores_on_a_known_set():
    fit = [("count", "How many cubes are there?", a) for a in ("2", "2", "1")]
    fit += [("count", "How many objects are there?", a) for a in ("4", "4", "3", "3", "3")]
    fit += [("ground2d", "Box of the red cube.", "<bbox>0,0,100,100</bbox>")]
    fit += [("ground2d", "Box of the blue cube.", "<bbox>100,100,300,300</bbox>")]
    fit += [("depth", "Depth?", "3.0"), ("depth", "Depth?", "5.0"), ("closer", "A or B?", "the A")]
    fit += [("relation", "Is A left of B?", "no")] * 3
    base = Baseline.fit(fit)
    # Majority per question, else the skill's majority; the mean box and depth; chance for choices.
    assert base.expected("count", "How many cubes are there?", "2") == (1.0, 1.0)
    assert base.expected("count", "How many spheres are there?", "3") == (1.0, 1.0)
    assert base.by_kind["ground2d"] == "<bbox>50,50,200,200</bbox>" and base.by_kind["depth"] == "4.0"
    assert base.expected("closer", "C or D?", "the D") == (0.5, 0.5)
    # Relation's answers are balanced by construction: chance, not the per-question majority.
    assert base.expected("relation", "Is A left of B?", "yes") == (0.5, 0.5)
    assert base.expected("ground3d", "Centre of A?", "(0.0, 0.0, 4.0)") is None  # nothing fitted
    assert base.rule("depth_order") == "chance 1/6" and base.rule("relation") == "chance 1/2"

    rec = lambda kind, q, truth, answer: EvalRecord(
        kind, q, truth, answer, graded_score(kind, answer, truth) >= (0.5 if kind == "ground2d" else 1),
        graded_score(kind, answer, truth),
    )  # fmt: skip
    records = [
        rec("count", "How many cubes are there?", "2", "2"),
        rec("count", "How many cubes are there?", "1", "2"),
        rec("count", "How many objects are there?", "3", "3"),
        rec("count", "How many objects are there?", "4", "5"),
        rec("ground2d", "Box of the gray cube.", "<bbox>50,50,200,200</bbox>", "<bbox>50,50,200,125</bbox>"),
        rec("closer", "A or B?", "the B", "the A"),
    ]
    scores = score_records(records, base)
    assert list(scores) == ["count", "closer", "ground2d", "all"]
    assert scores["count"] == {
        "accuracy": 0.5, "baseline": 0.5, "correct": 2, "total": 4, "baseline_rule": "majority answer",
        "top_answer": "2", "top_share": 0.5,
    }  # fmt: skip
    # The most frequent answer shows a model answering one constant; "all" has none.
    assert (scores["closer"]["top_answer"], scores["closer"]["top_share"]) == ("the a", 1.0)
    assert "top_share" not in scores["all"]
    g = scores["ground2d"]
    assert (g["accuracy"], g["baseline"], g["score"], g["baseline_score"]) == (1.0, 1.0, 0.5, 1.0)
    assert g["metric"] == "IoU" and g["baseline_rule"] == "mean answer <bbox>50,50,200,200</bbox>"
    assert scores["closer"]["baseline"] == 0.5
    assert scores["all"]["total"] == 6 and scores["all"]["correct"] == 3
    assert scores["all"]["baseline"] == pytest.approx((2 + 1 + 0.5) / 6)


def test_chance_baselines_hold_for_the_data():
    """The skills scored against chance balance their answers: relation says "yes" about half the
    time, and closer's answer is the first-named object about half the time (300 scenes: 0.5 within
    about three standard errors)."""
    yes, first = [], []
    for i in range(300):
        rng = np.random.default_rng([3, i])
        scene = sample_scene(rng)
        if (qa := ask(scene, "relation", rng)) is not None:
            yes.append(qa[1] == "yes")
        if (qa := ask(scene, "closer", rng)) is not None:
            first.append(qa[0].split(", the ")[1].startswith(qa[1] + " "))
    assert len(yes) > 200 and len(first) > 200
    assert 0.4 < np.mean(yes) < 0.6 and 0.4 < np.mean(first) < 0.6


def test_held_out_scenes_are_never_trained_on():
    questions = spatial_questions([0 + HELD_OUT_SEED_OFFSET], 3)
    assert [q.kind for q in questions] == [k for k in KINDS for _ in range(3)]
    fit = spatial_questions([0, FIT_STREAM], 3)
    train = SpatialDataset(0)
    seen = {train.sample(i)[0].image.tobytes() for i in range(60)} | {q.image.tobytes() for q in fit}
    assert not seen & {q.image.tobytes() for q in questions}


def test_manifest_split_is_disjoint_and_stable(tmp_path):
    manifest = export_spatial(tmp_path, 30, seed=4)
    train, held = split_manifest(ManifestDataset(manifest), 0.2)
    assert len(held) == 6 and len(train) == 24
    assert sorted(train.indices + held.indices) == list(range(30))
    ids = {held[i].sample_id for i in range(len(held))}
    lines = manifest.read_text().splitlines()
    random.Random(0).shuffle(lines)
    manifest.write_text("\n".join(lines) + "\n")
    _, reshuffled = split_manifest(ManifestDataset(manifest), 0.2)
    assert {reshuffled[i].sample_id for i in range(len(reshuffled))} == ids
    with pytest.raises(ValueError, match="fraction"):
        split_manifest(ManifestDataset(manifest), 1.5)


def test_heldout_set_on_a_checkpoint(run_dir):
    loaded = load_checkpoint(run_dir, CPU)
    assert loaded.path.name == "step_00000003" and not loaded.model.training
    heldout = HeldOut.spatial(loaded.tok, loaded.encode, seed=0, per_skill=2, fit_per_skill=10)
    loaded.model.train()
    result = heldout.evaluate(loaded.model, CPU, batch=4)
    assert loaded.model.training  # put back as it was
    assert list(result.scores) == [*KINDS, "all"]
    assert all(result.scores[k]["total"] == 2 and 0 <= result.scores[k]["baseline"] <= 1 for k in KINDS)
    assert result.scores["all"]["total"] == 14 and len(result.records) == 14
    assert {"eval/loss", "eval/accuracy/count", "eval/IoU/ground2d"} <= set(result.scalars())

    # The loss is the mean CE over the answer tokens, as a direct computation gives it.
    ce, n = 0.0, 0
    with torch.no_grad():
        for batch in heldout.batches:
            logits = loaded.model(**batch.model_inputs()).logits
            ce += F.cross_entropy(logits, batch.labels, ignore_index=-100, reduction="sum").item()
            n += int((batch.labels != -100).sum())
    assert result.loss == pytest.approx(ce / n, rel=1e-5)

    # The end-of-run call of trainer.loop keeps its keys.
    legacy = evaluate_spatial(loaded.model, loaded.tok, seed=0, num=1, encode=loaded.encode, device=CPU)
    assert {"correct", "total", "accuracy", "baseline"} <= set(legacy["all"]) and legacy["all"]["total"] == 7


def test_gallery_is_a_png(tmp_path):
    qs = spatial_questions([5], 2)
    records = [EvalRecord(q.kind, q.text, q.truth, q.truth if i % 2 else "?", bool(i % 2), 1.0, q.image)
               for i, q in enumerate(qs)]  # fmt: skip
    records.append(EvalRecord("answer", "A text-only question?", "yes", "no", False, 0.0))
    png = write_gallery(records, tmp_path / "g" / "gallery.png", rows=2, title="$not math$")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.width > im.height > 300  # 8 columns of 2 rows


def test_command_line(run_dir, tmp_path, capsys):
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.evaluate", str(run_dir), "--num", "1", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["checkpoint"].endswith("step_00000003") and np.isfinite(out["loss"])
    assert set(out["eval"]) == {*KINDS, "all"} and out["eval"]["ground3d"]["metric"] == "closeness"

    ckpt = run_dir / "checkpoints" / "step_00000003"
    assert main([str(ckpt), "--num", "1", "--gallery", str(tmp_path / "eval.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {line.split()[0]: line.split() for line in lines[4:] if line.strip()}
    assert set(table) == {*KINDS, "all", "gallery"}
    assert table["closer"][1:4] == [table["closer"][1], "0.500", "1"]  # accuracy, chance, n
    assert Image.open(tmp_path / "eval.png").format == "PNG"

    manifest = export_spatial(tmp_path / "data", 12, seed=2)
    assert main([str(run_dir), "--data", str(manifest), "--fraction", "0.25", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["eval"]["all"]["total"] == 3 and "held out" in result["data"]


def test_command_line_errors(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no checkpoint there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--num", "0"])
    assert "--num: expected >= 1" in capsys.readouterr().err
