"""python -m trainer.chat on a checkpoint of a fresh tiny model (tests/test_trainer_evaluate.py's
make_run): greedy replies equal evaluation's answers, sampling is seeded and its nucleus narrows to
the greedy token, images, frame directories and GIFs work, and bad input is one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_trainer_evaluate import make_run

from model.generate import generate
from trainer.chat import ask, main, sample
from trainer.evaluate import HeldOut, load_checkpoint
from trainer.heldout import spatial_questions

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_checkpoint(run_dir, CPU)


def test_greedy_reply_is_what_evaluation_scores(loaded, tmp_path):
    heldout = HeldOut.spatial(loaded.tok, loaded.encode, seed=0, per_skill=1, fit_per_skill=1)
    records = heldout.answer(loaded.model, CPU, batch=1)
    for question, record in zip(heldout.questions, records, strict=True):
        png = tmp_path / f"{question.kind}.png"
        Image.fromarray(question.image).save(png)  # lossless: the same pixels
        cap = len(loaded.tok.encode(question.truth)) + 8  # evaluation's cap (trainer.evaluate.MARGIN)
        reply = ask(loaded, question.text, device=CPU, images=[png], max_new_tokens=cap)
        assert reply == record.answer, question.kind


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(loaded):
    prompt = torch.tensor(loaded.tok.encode("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"))
    eos = loaded.tok.special_id("<|im_end|>")
    draw = lambda seed, top_p=1.0: sample(
        loaded.model, prompt, 12, eos_id=eos, temperature=1.0, top_p=top_p,
        vocab_size=loaded.tok.vocab_size, generator=torch.Generator().manual_seed(seed),
    ).tolist()  # fmt: skip
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)  # 12 draws from ~268 tokens: equal by chance with negligible odds
    greedy = generate(loaded.model, [prompt], 12, eos_id=eos)[0].tolist()
    assert draw(3, top_p=1e-6) == greedy
    with pytest.raises(ValueError, match="temperature"):
        sample(loaded.model, prompt, 4, eos_id=eos, temperature=0.0)


def test_video_and_command_line(run_dir, tmp_path, capsys):
    frames = [Image.fromarray(q.image[:56, :56]) for q in spatial_questions([3], 1)[:3]]
    (tmp_path / "frames").mkdir()
    for i, frame in enumerate(frames):
        frame.save(tmp_path / "frames" / f"{i:03d}.png")
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=500)
    for video in ("frames", "clip.gif"):
        args = [str(run_dir), "--video", str(tmp_path / video), "What moves?", "--max-new-tokens", "4"]
        assert main(args) == 0, video
    capsys.readouterr()

    frames[0].save(tmp_path / "scene.png")
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.chat", str(run_dir), "--image", str(tmp_path / "scene.png"),
         "How many cubes are there?", "--max-new-tokens", "6", "--temperature", "0.8", "--seed", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.endswith("\n") and proc.stdout.count("\n") >= 1


def test_bad_input_is_one_line(run_dir, tmp_path, capsys):
    assert main([str(run_dir), "--image", str(tmp_path / "none.png"), "Hi?"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([str(tmp_path), "Hi?"]) == 2
    assert "no checkpoint there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(run_dir), "Hi?", "--top-p", "0"])
    assert "--top-p in (0, 1]" in capsys.readouterr().err
