"""Hybrid parallelism in the trainer, on CPU with gloo: every layout trains like a single process.

The runs launch the real entry point (``torchrun ... trainer/run.py --parallel ...``) on the tiny
preset through all four stages (stage0 -> 1 -> 2 -> SFT; ``--steps 7`` gives 9 optimizer steps of
2 micro-batches each) and compare each step's logged loss, gradient norm and MoE balance losses
with the single-process run of the same global batch. Tolerance: relative 1e-5 in fp32. The
layouts differ from a single process only in the order of floating-point sums (FSDP's
reduce-scatter, the expert all-to-all, ring attention's log-sum-exp merge), about 1e-7 relative
per step here, so 1e-5 leaves room for 9 steps of drift and still fails on any real difference (a
wrong normaliser or a dropped micro-batch moves the loss by more than 1e-2).
"""

from __future__ import annotations

import contextlib
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

from tests.dist_utils import assert_same_steps, logged_steps, spawn

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parent.parent
RTOL = 1e-5
COMMON = [
    "--steps", "7", "--window", "64", "--eval-samples", "0", "--no-progress", "--no-tensorboard",
    "--ckpt-every", "3", "--keep", "10",
]  # fmt: skip
LAYOUTS = [("dp=2", 2), ("cp=2", 2), ("dp=2,ep=2", 2), ("dp=2,cp=2,ep=4", 4)]


def _env() -> dict[str, str]:
    # One intra-op thread per rank: 4 ranks share 2 cores; GLOO on the loopback interface.
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONWARNINGS": "ignore"}


def _torchrun(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "trainer/run.py", *args]  # fmt: skip


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Run directories by layout ("single" and each of LAYOUTS), each made once when first asked."""
    root = tmp_path_factory.mktemp("parallel")

    class Runs(dict):
        def __missing__(self, layout: str) -> Path:
            out = root / layout.replace(",", "_").replace("=", "")
            if layout == "single":
                _run([sys.executable, "trainer/run.py", *COMMON, "--out", str(out)])
            else:
                nproc = dict(LAYOUTS)[layout]
                _run(_torchrun(nproc, [*COMMON, "--parallel", layout, "--out", str(out)]))
            self[layout] = out
            return out

    return Runs()


@pytest.mark.parametrize("layout", [name for name, _ in LAYOUTS])
def test_layout_matches_single_process(runs, layout):
    single, parallel = logged_steps(runs["single"]), logged_steps(runs[layout])
    assert len(single) == 9 and {r["stage"] for r in single} == {"stage0", "stage1", "stage2", "sft"}
    assert_same_steps(single, parallel, f"--parallel {layout}", rtol=RTOL)
    assert (runs[layout] / "summary.json").is_file() and (runs[layout] / "loss.png").is_file()
    ckpt = runs[layout] / "checkpoints" / "step_00000009"
    shards = sorted(p.name for p in ckpt.glob("*.distcp"))
    assert len(shards) == dict(LAYOUTS)[layout], f"one shard per rank in one directory, got {shards}"


def _resume_dir(src: Path, dst: Path, step: int) -> Path:
    """A copy of run ``src`` as it was right after checkpoint ``step``."""
    shutil.copytree(src, dst)
    ckpts = dst / "checkpoints"
    for p in ckpts.glob("step_*"):
        if int(p.name[5:]) > step:
            shutil.rmtree(p)
    (ckpts / "latest").write_text(f"step_{step:08d}\n")
    keep = [
        line
        for line in (dst / "log.jsonl").read_text().splitlines()
        if json.loads(line).get("step", 0) <= step
    ]
    (dst / "log.jsonl").write_text("\n".join(keep) + "\n")
    return dst


@pytest.mark.parametrize("resume_layout", ["dp=2,ep=2", "single"])
def test_resume_under_another_layout(runs, tmp_path, resume_layout):
    """Saved at dp=2,cp=2,ep=4 on 4 ranks after step 3 (mid-stage 1, mid-epoch); resumed on 2 ranks
    or in a single process, the losses go on as in the uninterrupted run."""
    out = _resume_dir(runs["dp=2,cp=2,ep=4"], tmp_path / "run", step=3)
    if resume_layout == "single":
        cmd = [sys.executable, "trainer/run.py", *COMMON, "--out", str(out), "--resume"]
    else:
        cmd = _torchrun(2, [*COMMON, "--parallel", resume_layout, "--out", str(out), "--resume"])
    proc = _run(cmd)
    assert "resumed from" in (out / "train.log").read_text(), proc.stderr[-2000:]
    assert_same_steps(
        logged_steps(runs["single"]),
        logged_steps(out),
        f"saved at dp=2,cp=2,ep=4, resumed at {resume_layout}",
        rtol=RTOL,
    )


# ----------------------------------------------------------------------------- gradients of one step


def _grads_worker(rank: int, world_size: int, port: int, layout: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
    )  # fmt: skip
    torch.set_num_threads(1)
    _one_step_grads(layout, Path(out))


def _one_step_grads(layout: str | None, out: Path) -> None:
    """Full gradients after the first stage-1 step (everything trainable), written by rank 0."""
    from torch.distributed.tensor import DTensor

    from trainer.loop import Run, RunConfig

    cfg = RunConfig(
        recipe="stage1", out=out / "run", overwrite=True, progress=False, tensorboard=False, window=64,
        parallel=layout, eval_samples=0,
    )  # fmt: skip
    run = Run(cfg)
    try:
        stage = run.stages[0]
        run._enter_stage(0)
        batches = run._batches(stage, "spatial")
        micro = [next(batches)[0] for _ in range(stage.accum // run.dims.dp)]
        batches.close()
        run.forward_backward(stage, micro)
        grads = {}
        for name, p in run.model.named_parameters():
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            grads[name] = g.detach().clone()
        if run.rank == 0:
            torch.save(grads, out / "grads.pt")
    finally:
        run.close()


@pytest.mark.parametrize("layout,nproc", LAYOUTS)
def test_one_step_gradients_match(tmp_path, layout, nproc):
    (tmp_path / "single").mkdir()
    (tmp_path / "par").mkdir()
    _one_step_grads(None, tmp_path / "single")
    spawn(_grads_worker, nproc, layout, str(tmp_path / "par"))
    ref = torch.load(tmp_path / "single" / "grads.pt")
    got = torch.load(tmp_path / "par" / "grads.pt")
    assert ref.keys() == got.keys() and len(ref) > 40
    for name, g in ref.items():
        scale = g.abs().max().item()
        err = (got[name] - g).abs().max().item()
        assert err <= RTOL * max(scale, 1e-12), f"{layout}: {name} max error {err:.2e} (scale {scale:.2e})"
    assert any(g.abs().max() > 0 for n, g in ref.items() if n.startswith("vit.")), "the ViT got gradients"


# ----------------------------------------------------------------------------- bad layouts and faults


def test_layout_without_torchrun_is_one_line():
    proc = subprocess.run(
        [sys.executable, "trainer/run.py", "--parallel", "dp=2", "--out", "/nonexistent/x"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --parallel dp=2,cp=1,ep=1 needs 2 processes: launch with torchrun --nproc-per-node=2 "
        "trainer/run.py ..."
    ]


def test_bad_layout_under_torchrun_fails_before_work(tmp_path):
    """ep must divide the 4 experts of the tiny preset: refused at start, one line from rank 0."""
    out = tmp_path / "run"
    proc = subprocess.run(
        _torchrun(2, [*COMMON, "--parallel", "cp=2,ep=3", "--out", str(out)]),
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert errors == [
        "error: --parallel dp=1,cp=2,ep=3: ep = 3 must divide dp x cp = 2 (expert-parallel ranks are "
        "drawn from the data- and context-parallel ranks)"
    ]
    assert not (out / "log.jsonl").exists()


def _children_with(parent: int, local_rank: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"LOCAL_RANK={local_rank}".encode() in env:
            found.append(int(pid))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_dead_rank_ends_the_job(tmp_path):
    """Killing rank 1 mid-run ends the job with an error naming it, well within the timeout."""
    out = tmp_path / "run"
    args = ["--steps", "400", "--window", "64", "--eval-samples", "0", "--no-progress", "--no-tensorboard",
            "--pg-timeout", "60", "--parallel", "dp=2", "--out", str(out)]  # fmt: skip
    cmd = _torchrun(2, args)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 180
        while not (out / "log.jsonl").exists() or len(logged_steps(out)) < 2:
            assert proc.poll() is None and time.time() < deadline, "the run did not get to step 2"
            time.sleep(0.5)
        victims, survivors = _children_with(proc.pid, "1"), _children_with(proc.pid, "0")
        assert len(victims) == 1 and len(survivors) == 1, f"torchrun's workers: {victims}, {survivors}"
        os.kill(victims[0], signal.SIGKILL)
        t0 = time.time()
        output, _ = proc.communicate(timeout=90)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end after a rank died"
    assert "local_rank: 1" in output and "Signal 9" in output, output[-3000:]
    assert (
        not Path(f"/proc/{survivors[0]}").exists()
        or "zombie" in Path(f"/proc/{survivors[0]}/status").read_text()
    ), "rank 0 outlived the job"


def test_hf_init_under_a_layout(tmp_path):
    """--init of a Hugging Face Qwen3-MoE checkpoint: the same first losses in a single process and
    at dp=2,ep=2 (each rank loads the full weights, then the layout shards them)."""
    from model.hf import save_qwen3_moe
    from model.llm import MoELLM
    from trainer.components import build_model_config
    from trainer.data.tokenizer import ByteTokenizer

    llm_cfg = build_model_config("seedvl-tiny", ByteTokenizer()).llm
    torch.manual_seed(123)
    save_qwen3_moe(MoELLM(llm_cfg), tmp_path / "hf")
    args = ["--steps", "2", "--recipe", "stage1", "--window", "64", "--eval-samples", "0", "--no-progress",
            "--no-tensorboard", "--tokenizer", "bytes", "--init", str(tmp_path / "hf")]  # fmt: skip
    _run([sys.executable, "trainer/run.py", *args, "--out", str(tmp_path / "single")])
    _run(_torchrun(2, [*args, "--parallel", "dp=2,ep=2", "--out", str(tmp_path / "par")]))
    _run([sys.executable, "trainer/run.py", *args[:-2], "--out", str(tmp_path / "scratch")])
    single = logged_steps(tmp_path / "single")
    assert_same_steps(single, logged_steps(tmp_path / "par"), "--init HF at dp=2,ep=2", rtol=RTOL)
    assert abs(single[0]["loss"] - logged_steps(tmp_path / "scratch")[0]["loss"]) > 1e-3, (
        "the weights were loaded"
    )
    assert (
        "initialised the LLM from the Hugging Face checkpoint" in (tmp_path / "par" / "train.log").read_text()
    )


def test_bf16_mixed_precision(runs, tmp_path):
    """--mixed-precision bf16 (FSDP's policy): bf16 compute follows the fp32 run to bf16 accuracy,
    and the checkpoint keeps fp32 master weights."""
    import torch.distributed.checkpoint as dcp

    out = tmp_path / "bf16"
    _run(_torchrun(2, [*COMMON, "--parallel", "cp=2,ep=2", "--mixed-precision", "bf16", "--out", str(out)]))
    for e, a in zip(logged_steps(runs["single"]), logged_steps(out), strict=True):
        assert abs(a["loss"] - e["loss"]) <= 2e-2 * e["loss"], f"step {e['step']}: {a['loss']} vs {e['loss']}"
    meta = dcp.FileSystemReader(str(out / "checkpoints" / "step_00000009")).read_metadata()
    dtypes = {k: v.properties.dtype for k, v in meta.state_dict_metadata.items() if k.startswith("model.")}
    assert set(dtypes.values()) == {torch.float32}, dtypes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_stalled_rank_times_out(tmp_path):
    """A rank that stops answering (SIGSTOP: alive, so torchrun does not notice) makes its peer's
    next collective fail after --pg-timeout, and the job ends instead of hanging.

    Once rank 0 has given up, the test kills the stopped rank itself: torchrun would, but only after
    its fixed 30 s grace period for workers that ignore SIGTERM (a stopped process cannot act on it),
    which is torchrun's behaviour, not the trainer's."""
    out = tmp_path / "run"
    args = ["--steps", "400", "--window", "64", "--eval-samples", "0", "--no-progress", "--no-tensorboard",
            "--pg-timeout", "10", "--parallel", "dp=2", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(
        _torchrun(2, args), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    victims: list[int] = []
    try:
        deadline = time.time() + 180
        while not (out / "log.jsonl").exists() or len(logged_steps(out)) < 2:
            assert proc.poll() is None and time.time() < deadline, "the run did not get to step 2"
            time.sleep(0.5)
        victims = _children_with(proc.pid, "1")
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGSTOP)
        log = out / "train.log"
        while "rank 0 stops at step" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline + 60, "rank 0 did not time out"
            time.sleep(0.5)
        os.kill(victims[0], signal.SIGKILL)
        output, _ = proc.communicate(timeout=150)
    finally:
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "Timed out" in output and "rank 0 stops at step" in (out / "train.log").read_text(), output[-3000:]


# ----------------------------------------------------------------------------- a rank without images


def _image_and_text_batches():
    import numpy as np

    from trainer.data.chat import LEVEL_PROMPT, Conversation, Turn, encode_conversation
    from trainer.data.packer import SamplePool
    from trainer.data.spatial import SpatialDataset
    from trainer.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    ds = SpatialDataset(0)
    text = Conversation((Turn("user", ("How many sides has a square?",)), Turn("assistant", ("4",))), "t")

    def batch(convs):
        pool = SamplePool([encode_conversation(c, tok) for c in convs])
        return pool.collate(np.arange(len(convs)), min_level=LEVEL_PROMPT, image_token_id=tok.image_token_id)

    return tok, [batch([ds[0], ds[1]]), batch([text, text])]


def _empty_vit_grads(model, batches, targets, accum):
    from torch.distributed.tensor import DTensor

    from trainer.components import micro_batch_loss

    for b in batches:
        _, loss = micro_batch_loss(
            model(**b.model_inputs()), b.labels, targets=targets, accum=accum, llm=model.cfg.llm
        )
        loss.backward()
    return {
        n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
        for n, p in model.named_parameters()
    }


def _empty_vit_worker(rank: int, world_size: int, port: int, out: str) -> None:
    from model.vlm import SeedVLM
    from trainer import parallel
    from trainer.components import build_model_config

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    parallel.init_distributed(torch.device("cpu"), 60)
    tok, batches = _image_and_text_batches()
    torch.manual_seed(0)
    model = SeedVLM(build_model_config("seedvl-tiny", tok))
    parallel.parallelize(model, parallel.ParallelDims(dp=2, ep=2).build("cpu"))
    targets = sum(b.num_targets for b in batches)
    grads = _empty_vit_grads(model, batches[rank : rank + 1], targets, accum=2)
    if rank == 0:
        torch.save(grads, Path(out) / "grads.pt")
    torch.distributed.destroy_process_group()


def test_rank_without_images(tmp_path):
    """dp=2,ep=2 where rank 1's micro-batch has no image: it runs the ViT on nothing, the collectives
    stay in step, and the gradients equal the single-process ones over both micro-batches."""
    from model.vlm import SeedVLM
    from trainer.components import build_model_config

    tok, batches = _image_and_text_batches()
    assert batches[0].num_images == 2 and batches[1].num_images == 0
    torch.manual_seed(0)
    model = SeedVLM(build_model_config("seedvl-tiny", tok))
    ref = _empty_vit_grads(model, batches, sum(b.num_targets for b in batches), accum=2)
    spawn(_empty_vit_worker, 2, str(tmp_path))
    got = torch.load(tmp_path / "grads.pt")
    for name, g in ref.items():
        err, scale = (got[name] - g).abs().max().item(), g.abs().max().item()
        assert err <= RTOL * max(scale, 1e-12), f"{name}: max error {err:.2e} (scale {scale:.2e})"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_sigterm_to_one_rank_stops_all_after_the_same_step(tmp_path):
    """Preemption under torchrun: SIGTERM reaches rank 1 only; the ranks agree through the step's
    all-reduce, save one checkpoint together and exit 0."""
    out = tmp_path / "run"
    args = ["--steps", "400", "--window", "64", "--eval-samples", "0", "--eval-every", "0", "--no-progress",
            "--no-tensorboard", "--parallel", "dp=2", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(
        _torchrun(2, args), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 180
        while not (out / "log.jsonl").exists() or len(logged_steps(out)) < 3:
            assert proc.poll() is None and time.time() < deadline, "the run did not get to step 3"
            time.sleep(0.3)
        os.kill(_children_with(proc.pid, "1")[0], signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    step = logged_steps(out)[-1]["step"]
    assert f"preempted by a stop signal: saved step {step} to " in output
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
