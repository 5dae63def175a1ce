"""Pipeline parallelism in the trainer, on CPU with gloo: a pipeline trains like a single process.

The runs go through all four stages of the tiny preset's recipe (stage0 -> 1 -> 2 -> SFT; ``--steps
6`` gives 8 optimizer steps of 4 micro-batches each, token budgets 512 and 1024, the ViT frozen in
stage 0) with the LLM raised to 4 decoder layers (``seedvl-tiny-4l``, registered in each process
here), so pp = 2 holds 2 x 2 virtual stages. Every step's loss, gradient norm and MoE balance
losses must match the single-process run's to relative 1e-5 (fp32; the layouts differ only in the
order of floating-point sums, ~1e-7 per step), and every parameter's gradient, gathered before each
optimizer step, to 3e-4 of that tensor's largest gradient (the clipped gradients of 8 steps, each
on weights that drifted by the steps before).

Layouts: pp=2 with interleaved1f1b (V = 2, the default), pp=2,dp=2 with 1f1b (4 ranks); then a
checkpoint written at pp=2 resumes in a single process (pp = 1) and goes on as the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tests.dist_utils import assert_same_steps, logged_steps, spawn

pytestmark = pytest.mark.dist

RTOL = 1e-5  # losses, gradient norm and MoE losses against the single-process run
# The largest element's error grows with the steps: 1.2-1.5e-4 of the tensor's largest gradient at
# step 6 (mean error ~5e-6); a dropped or doubled micro-batch of the four moves gradients by tens
# of percent.
GRAD_RTOL = 3e-4
PRESET = "seedvl-tiny-4l"
# 4 micro-batches per step (2 per pipeline at dp=2); shorter stage 2 and SFT budgets keep CI quick.
OVERRIDES = ["*.accum=4", "stage2.seq_len=1024", "sft.seq_len=1024"]
LAYOUTS = {
    "pp=2": (2, {}),  # interleaved1f1b, 2 virtual stages per rank
    "pp=2,dp=2": (4, {"pp_schedule": "1f1b"}),
}


def _register_preset() -> None:
    from model import config

    base = config.PRESETS["seedvl-tiny"]
    config.PRESETS[PRESET] = dataclasses.replace(base, llm=dataclasses.replace(base.llm, num_layers=4))


def _config(layout: str | None, out: Path, **options):
    from trainer.config import RunConfig

    return RunConfig(
        preset=PRESET, out=out, overwrite=not options.get("resume"), progress=False, tensorboard=False,
        window=64, eval_samples=0, steps=6, overrides=OVERRIDES, ckpt_every=3, keep=10, parallel=layout,
        **options,
    )  # fmt: skip


def _gathered_grads(run) -> dict[str, torch.Tensor] | None:
    """Every parameter's full gradient on rank 0 (a collective; None on the other ranks)."""
    from torch.distributed.tensor import DTensor

    grads = {}
    for name, p in run.model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            grads[name] = g.detach().cpu().clone()
    if not run.distributed:
        return grads
    first = run.meshes.stage.get_local_rank() == 0
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(grads if first else None, parts, dst=0)
    return None if parts is None else {k: v for part in parts if part for k, v in part.items()}


def _train(layout: str | None, out: Path, options: dict) -> None:
    """Train (or resume) and, on rank 0, save the gradients seen before each optimizer step."""
    from trainer.loop import Run

    _register_preset()
    run = Run(_config(layout, out, **options))
    steps: list[dict] = []

    def before_step(optimizer, args, kwargs):
        grads = _gathered_grads(run)
        if grads is not None:
            steps.append(grads)

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        run.train()
        if run.rank == 0:
            torch.save(steps, out / "grads.pt")
    finally:
        handle.remove()
        run.close()


def _worker(rank: int, world_size: int, port: int, layout: str | None, out: str, options: dict) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    _train(layout, Path(out), options)


def _assert_same_grads(expected: list[dict], actual: list[dict], what: str) -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} optimizer steps, expected {len(expected)}"
    for step, (e, a) in enumerate(zip(expected, actual, strict=True), start=1):
        assert a.keys() == e.keys(), f"{what}: step {step} parameters {sorted(set(a) ^ set(e))}"
        for name, g in e.items():
            scale = g.abs().max().item()
            err = (a[name] - g).abs().max().item()
            assert err <= GRAD_RTOL * max(scale, 1e-12), (
                f"{what}: step {step} {name} max error {err:.2e} (scale {scale:.2e}, "
                f"mean error {(a[name] - g).abs().mean().item():.2e})"
            )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Run directories by layout ("single" and each of LAYOUTS), each made once when first asked."""
    root = tmp_path_factory.mktemp("pipeline")

    class Runs(dict):
        def __missing__(self, layout: str) -> Path:
            out = root / layout.replace(",", "_").replace("=", "")
            nproc, options = LAYOUTS.get(layout, (1, {}))
            spawn(_worker, nproc, None if layout == "single" else layout, str(out), options)
            self[layout] = out
            return out

    return Runs()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_matches_single_process(runs, layout):
    single = logged_steps(runs["single"])
    assert len(single) == 8 and {r["stage"] for r in single} == {"stage0", "stage1", "stage2", "sft"}
    assert_same_steps(single, logged_steps(runs[layout]), f"--parallel {layout}", rtol=RTOL)
    expected = torch.load(runs["single"] / "grads.pt")
    _assert_same_grads(expected, torch.load(runs[layout] / "grads.pt"), f"--parallel {layout}")
    assert any(n.startswith("vit.") for n in expected[1]), "the ViT trains in stage 1"
    shards = sorted(p.name for p in (runs[layout] / "checkpoints" / "step_00000008").glob("*.distcp"))
    assert len(shards) == LAYOUTS[layout][0], f"one shard per rank, got {shards}"


def test_pp2_checkpoint_resumes_at_pp1(runs, tmp_path):
    """Saved at pp=2 after step 3 (mid-stage 1); resumed in a single process, the losses go on as
    in the uninterrupted run."""
    out = tmp_path / "run"
    shutil.copytree(runs["pp=2"], out)
    ckpts = out / "checkpoints"
    for p in ckpts.glob("step_*"):
        if int(p.name[5:]) > 3:
            shutil.rmtree(p)
    (ckpts / "latest").write_text("step_00000003\n")
    kept = [
        line for line in (out / "log.jsonl").read_text().splitlines() if json.loads(line).get("step", 0) <= 3
    ]
    (out / "log.jsonl").write_text("\n".join(kept) + "\n")
    spawn(_worker, 1, None, str(out), {"resume": True})
    assert "resumed from" in (out / "train.log").read_text()
    assert_same_steps(
        logged_steps(runs["single"]), logged_steps(out), "saved at pp=2, resumed at pp=1", rtol=RTOL
    )


# ----------------------------------------------------------------------------- the plan, no processes


def test_plan_splits_layers():
    from trainer.parallel import LayoutError, ParallelDims, plan_pipeline

    assert plan_pipeline(4, 2, 2, "interleaved1f1b", None).layers == ((0, 1), (1, 2), (2, 3), (3, 4))
    plan = plan_pipeline(94, 8, 4, "Interleaved1F1B", None)  # Qwen3-235B-A22B's layers at the report's pp
    counts = [b - a for a, b in plan.layers]
    assert sum(counts) == 94 and counts[0] == counts[-1] == 2 and max(counts) == 3
    assert plan.stages_of(1) == [1, 9, 17, 25]
    assert plan_pipeline(4, 2, 1, "1f1b", "1,3").layers == ((0, 1), (1, 4))
    assert plan_pipeline(4, 2, 2, "loopedbfs", "0,2,2,0").layers[0] == (0, 0)
    for args, message in [
        ((4, 2, 2, "1f1b", None), "runs one stage per rank"),
        ((3, 2, 2, "interleaved1f1b", None), "need at least 4 decoder layers"),
        ((4, 2, 2, "interleaved1f1b", "1,1,1"), "expected 4 counts"),
        ((4, 2, 2, "interleaved1f1b", "1,0,2,1"), "only the first and last stage"),
        ((4, 2, 1, "zbv", None), "expected one of interleaved1f1b, 1f1b, gpipe, loopedbfs"),
    ]:
        with pytest.raises(LayoutError, match=message):
            plan_pipeline(*args)
    dims = ParallelDims.parse("pp=2,dp=2,ep=2")
    assert (dims.pp, dims.dp, dims.world_size, dims.stage_size, str(dims)) == (
        2,
        2,
        4,
        2,
        "pp=2,dp=2,cp=1,ep=2",
    )
    assert str(ParallelDims.parse("dp=2")) == "dp=2,cp=1,ep=1"
    with pytest.raises(LayoutError, match="pp x dp x cp = 4 must equal the number of processes, 2"):
        dims.validate(2, num_experts=4, moe=True, accums={})


def test_micro_batches_checked():
    from trainer.parallel import LayoutError, plan_pipeline
    from trainer.parallel.pipeline import check_micro_batches

    check_micro_batches(plan_pipeline(4, 2, 2, "interleaved1f1b", None), 4, "stage x")
    with pytest.raises(LayoutError, match="1 micro-batches per step and pipeline"):
        check_micro_batches(plan_pipeline(4, 2, 1, "1f1b", None), 1, "stage x")
    with pytest.raises(LayoutError, match="needs a multiple of 2"):
        check_micro_batches(plan_pipeline(8, 4, 2, "interleaved1f1b", None), 10 - 1, "stage x")
