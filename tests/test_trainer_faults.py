"""Fault tolerance of the main job (report section 5.1.4), in subprocesses as a user meets it:

- preemption: SIGTERM (or SIGINT) saves a checkpoint at the next step boundary and exits 0 with
  one line saying where; --resume then logs bit-for-bit the losses of an uninterrupted run;
- damaged checkpoints: a truncated shard or broken metadata is named in one line and --resume
  falls back to the newest intact checkpoint, deleting nothing;
- --resume with no checkpoint says so and starts from scratch.
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

import torch

from trainer.checkpoint import Checkpointer, verify
from trainer.logs import read_steps

REPO = Path(__file__).resolve().parent.parent
ARGS = ["--window", "32", "--no-progress", "--no-tensorboard", "--set", "*.seq_len=384", "--recipe",
        "stage1", "--steps", "12", "--ckpt-every", "4", "--keep", "5", "--eval-samples", "0",
        "--eval-every", "0"]  # fmt: skip


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "trainer" / "run.py"), *ARGS, "--out", str(out), *extra]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(out, *extra), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_steps(out / "log.jsonl")}


def test_sigterm_saves_and_resumes_identically(tmp_path):
    reference = tmp_path / "reference"
    _run(reference)
    out = tmp_path / "preempted"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        _cmd(out), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.time() + 180
    while not (out / "log.jsonl").exists() or len(read_steps(out / "log.jsonl")) < 5:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    step = max(_losses(out))
    assert 5 <= step < 12, "stopped at the next step boundary, before the end"
    saved = out / "checkpoints" / f"step_{step:08d}"
    assert stdout.strip().splitlines() == [
        f"preempted by SIGTERM: saved step {step} to {saved}; continue with --resume"
    ]
    assert Checkpointer(out / "checkpoints").latest().name == f"step_{step:08d}"

    _run(out, "--resume")
    assert _losses(out) == _losses(reference), "the resumed run repeats the uninterrupted one bit for bit"


def test_damaged_checkpoints_fall_back(tmp_path, caplog):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ck = Checkpointer(tmp_path, keep=5)
    paths = [ck.save(step, model, opt, {"global_step": step}) for step in (1, 2, 3)]
    assert all(verify(p) is None for p in paths)
    assert set(json.loads((paths[0] / "meta.json").read_text())["files"]) >= {".metadata", "__0_0.distcp"}

    shard = paths[2] / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])  # a truncated shard
    (paths[1] / "meta.json").write_text('{"global_step": 2, "fil')  # broken metadata
    with caplog.at_level("WARNING"):
        assert ck.latest_good() == paths[0]
    warnings = [r.getMessage() for r in caplog.records if r.name == "trainer.checkpoint"]
    assert len(warnings) == 2
    assert (
        "step_00000003 is damaged (__0_0.distcp has" in warnings[0]
        and "bytes, " in warnings[0]
        and "were written" in warnings[0]
    )
    assert "step_00000002 is damaged (meta.json is unreadable" in warnings[1]
    assert all(p.is_dir() for p in paths), "damaged checkpoints are kept for inspection"

    paths[0].joinpath("__0_0.distcp").write_bytes(b"x" * paths[0].joinpath("__0_0.distcp").stat().st_size)
    assert "does not match its SHA-256" in verify(paths[0])


def test_resume_falls_back_past_a_damaged_latest(tmp_path):
    out = tmp_path / "run"
    _run(out)
    latest = Checkpointer(out / "checkpoints").latest()
    assert latest.name == "step_00000012"
    shard = next(latest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = _run(out, "--resume")
    log = (out / "train.log").read_text()
    assert "step_00000012 is damaged" in log and "resumed from" in log and "step_00000008" in log
    assert max(_losses(out)) == 12, proc.stdout
    assert verify(latest) is None, "step 12 saved again"
    assert (latest.parent / "step_00000012.damaged").is_dir(), "the damaged one is kept, out of the way"


def test_resume_without_a_checkpoint_says_so(tmp_path):
    out = tmp_path / "fresh"
    proc = _run(out, "--resume", "--steps", "2")
    assert f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch" in proc.stderr
    shutil.rmtree(out)


def test_async_save_checkpoints_resume_identically(tmp_path):
    """--async-save: the checkpoints are committed intact (checksums) and resume bit for bit."""
    reference, out = tmp_path / "reference", tmp_path / "async"
    _run(reference)
    _run(out, "--async-save")
    ckpts = Checkpointer(out / "checkpoints")
    assert [p.name for p in ckpts.complete()] == ["step_00000004", "step_00000008", "step_00000012"]
    assert all(verify(p) is None for p in ckpts.complete())
    shutil.rmtree(out / "checkpoints" / "step_00000012")
    (out / "checkpoints" / "latest").write_text("step_00000008\n")
    _run(out, "--async-save", "--resume")
    assert _losses(out) == _losses(reference)
