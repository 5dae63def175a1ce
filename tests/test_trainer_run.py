"""The main job end to end, in subprocesses as a user runs it:

- kill and resume: a run killed from outside (SIGKILL) after a checkpoint and resumed with
  --resume logs bit-for-bit the losses of an uninterrupted run (deterministic mode, CPU) -- on a
  manifest that also holds bad data (missing image, corrupt file, empty conversation, over-long
  sample), which is reported and skipped;
- the default recipe (stage 0 -> 1 -> 2 -> SFT) on the embedded spatial data, shortened, writes its
  log, TensorBoard scalars, checkpoints, loss plot, profile trace and summary;
- setup errors are one clear line, not a traceback.

The three training processes run concurrently to keep the wall time down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.data.spatial import export_spatial
from trainer.logs import read_steps
from trainer.loop import RunConfig, train
from trainer.run import main

REPO = Path(__file__).resolve().parent.parent
SHORT = ["--window", "32", "--no-progress", "--set", "*.seq_len=384"]
RESUMABLE = [*SHORT, "--recipe", "stage1,stage2", "--steps", "16", "--ckpt-every", "4", "--eval-samples", "0"]
RESUMABLE += ["--no-tensorboard"]


def _start(args: list[str], out: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, str(REPO / "trainer" / "run.py"), *args, "--out", str(out)],
            cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    proc.wait(timeout=timeout)
    text = log.read_text()
    assert proc.returncode == 0, f"run failed (exit {proc.returncode}):\n{text[-3000:]}"
    return text


def _manifest_with_bad_data(root: Path) -> Path:
    manifest = export_spatial(root, 40, seed=9)
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    user = lambda text: {"role": "user", "content": text}
    bot = lambda text: {"role": "assistant", "content": text}
    bad = [
        {"id": "missing", "images": ["images/none.png"], "messages": [user("<image>Hi?"), bot("1")]},
        {"id": "corrupt", "images": ["images/corrupt.png"], "messages": [user("<image>Hi?"), bot("1")]},
        {"id": "empty", "messages": []},
        {"id": "long", "messages": [user("Say a lot."), bot("blah " * 200)]},
    ]
    lines = manifest.read_text().splitlines()
    for k, record in enumerate(bad):
        lines.insert(5 + 9 * k, json.dumps(record))
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_kill_resume_and_default_recipe(tmp_path):
    manifest = _manifest_with_bad_data(tmp_path / "data")
    data = ["--data", str(manifest)]
    full, killed = tmp_path / "full", tmp_path / "killed"
    default = tmp_path / "default"
    default_args = [*SHORT, "--steps", "8", "--eval-samples", "2", "--profile-steps", "2:3"]
    default_args += ["--ckpt-every", "5"]
    procs = {
        "full": _start([*RESUMABLE, *data], full, tmp_path / "full.txt"),
        "killed": _start([*RESUMABLE, *data], killed, tmp_path / "killed.txt"),
        "default": _start(default_args, default, tmp_path / "default.txt"),
    }
    try:
        # Kill from outside as soon as a mid-stage checkpoint exists.
        marker = killed / "checkpoints" / "step_00000008" / "meta.json"
        deadline = time.time() + 240
        while not marker.exists():
            assert procs["killed"].poll() is None, (tmp_path / "killed.txt").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint at step 8"
            time.sleep(0.02)
        procs["killed"].send_signal(signal.SIGKILL)
        procs["killed"].wait(timeout=60)
        assert procs["killed"].returncode == -signal.SIGKILL
        assert not (killed / "checkpoints" / "step_00000016").exists(), "killed before the end"
        logged_before_kill = len(read_steps(killed / "log.jsonl"))
        assert 8 <= logged_before_kill < 16
        procs["resumed"] = _start([*RESUMABLE, *data, "--resume"], killed, tmp_path / "resumed.txt")
        resumed_text = _finish(procs["resumed"], tmp_path / "resumed.txt")
        full_text = _finish(procs["full"], tmp_path / "full.txt")
        default_text = _finish(procs["default"], tmp_path / "default.txt")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()

    # Identical losses, step for step, including every step the killed run logged before dying.
    want = {r["step"]: r["loss"] for r in read_steps(full / "log.jsonl")}
    assert sorted(want) == list(range(1, 17))
    records = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines() if line.strip()]
    got = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert {s for s, _ in got} == set(want)
    mismatch = [(s, loss, want[s]) for s, loss in got if loss != want[s]]
    assert not mismatch, f"resumed losses differ from the uninterrupted run: {mismatch[:5]}"
    assert "resumed from" in resumed_text and "step_0000000" in resumed_text
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["steps"] == 16

    # Bad data was reported with its cause and skipped; the runs went on.
    full_summary = json.loads((full / "summary.json").read_text())
    assert set(full_summary["skipped"]) == {
        "missing media",
        "corrupt media",
        "empty conversation",
        "too long",
    }
    train_log = (full / "train.log").read_text()
    for message in (
        "not found",
        "cannot decode image",
        "empty conversation",
        "exceed the step's token budget",
    ):
        assert message in train_log, message
    assert "done in" in full_text

    # The default recipe: four stages, every artefact written.
    default_summary = json.loads((default / "summary.json").read_text())
    assert [s["stage"] for s in default_summary["stages"]] == ["stage0", "stage1", "stage2", "sft"]
    assert (default / "loss.png").stat().st_size > 10_000
    assert list((default / "tensorboard").glob("events.out.tfevents.*"))
    assert (default / "checkpoints" / "latest").read_text().strip() == f"step_{default_summary['steps']:08d}"
    assert list((default / "profile").glob("trace_steps_2-3.json"))
    assert "held-out accuracy (blind baseline), per skill:" in default_text
    assert set(default_summary["eval"]) >= {"count", "closer", "all"}
    assert default_summary["eval"]["count"]["total"] == 2 and "baseline" in default_summary["eval"]["count"]
    assert (default / "eval_gallery.png").stat().st_size > 10_000
    # What ran it: on a CPU the CPU's model and the thread count decide how floats are summed.
    host = default_summary["host"]
    assert host["device"] == "cpu" and host["cpu"] and host["threads"] >= 1, host
    assert host["torch"] == torch.__version__


def test_setup_errors_are_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--preset", "nope", "--out", str(out), "--no-progress"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["--preset", "llm-tiny", "--out", str(out), "--no-progress"]) == 2
    assert "not a vision-language model" in capsys.readouterr().err
    assert main(["--set", "stage1.lr=3", "--out", str(out), "--no-progress"]) == 2
    assert "STAGE.FIELD=VALUE" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "none.jsonl"), "--out", str(out), "--no-progress"]) == 2
    assert "not found" in capsys.readouterr().err
    (out / "log.jsonl").write_text("")
    assert main(["--out", str(out), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["3", "3:", "0:2", "4:2"])
def test_profile_steps_argument(text):
    with pytest.raises(SystemExit):
        main(["--profile-steps", text])


@pytest.fixture
def _restore_determinism():
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


@pytest.mark.usefixtures("_restore_determinism")
def test_resume_at_a_stage_boundary_keeps_stage1_optimizer(tmp_path):
    """Resumed from the checkpoint that ends stage 1, stage 2 continues stage 1's AdamW states and
    repeats the uninterrupted run's losses (in process: same thread count, so bit for bit)."""
    args = dict(
        recipe="stage1,stage2", overrides=["*.seq_len=384", "stage1.steps=4", "stage2.steps=3"],
        window=32, eval_samples=0, ckpt_every=100, keep=10, progress=False, tensorboard=False,
    )  # fmt: skip
    full = train(RunConfig(out=tmp_path / "full", **args))
    assert full["steps"] == 7
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "full" / "checkpoints" / "step_00000004", resumed_dir / "checkpoints" / "step_00000004"
    )
    train(RunConfig(out=resumed_dir, resume=True, **args))
    want = {r["step"]: r["loss"] for r in read_steps(tmp_path / "full" / "log.jsonl")}
    got = {r["step"]: r["loss"] for r in read_steps(resumed_dir / "log.jsonl")}
    assert sorted(got) == [5, 6, 7]
    assert all(got[s] == want[s] for s in got), (got, want)
