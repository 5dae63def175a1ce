"""Vision workload balancing: the cost model, the assignment and its simulation (host logic), and
balanced against unbalanced steps across gloo ranks.

Tolerance of the multi-process comparisons: relative 1e-5 of each gradient's largest entry, in
fp32. Balanced and unbalanced steps compute the same ViT, adapter and LLM sums; only the order of
floating-point additions differs (which images share a ViT pack, FSDP's reduce-scatter over other
partial sums), about 1e-7 relative here, while a misrouted visual token moves gradients by 1e-2.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import get_preset
from tests.dist_utils import init_gloo, spawn
from trainer.balance import (
    CostModel,
    NeedRuns,
    assign,
    default_group,
    imbalance,
    loads,
    locate,
    long_tailed_step,
    lpt,
    simulate,
)

REPO = Path(__file__).resolve().parent.parent
RTOL = 1e-5


# ----------------------------------------------------------------------------- host logic


def test_cost_model_is_the_flop_counters():
    """The per-image cost is the ViT + adapter part of trainer.throughput's FLOPs model."""
    from trainer.components import build_model_config
    from trainer.data.packer import PackedBatch
    from trainer.data.tokenizer import ByteTokenizer
    from trainer.throughput import FlopCounter

    cfg = build_model_config("seedvl-tiny", ByteTokenizer())
    cost, counter = CostModel.from_config(cfg), FlopCounter(cfg)
    lengths = torch.tensor([4, 64, 400])
    z = torch.zeros(0, dtype=torch.int64)
    batch = PackedBatch(
        input_ids=z, labels=z, loss_mask=z.bool(), position_ids=z,
        cu_seqlens=torch.zeros(1, dtype=torch.int32), max_seqlen=0, image_positions=z,
        patches=torch.zeros(int(lengths.sum()), 588), pos_hw=z,
        vit_cu_seqlens=torch.cat([torch.zeros(1), lengths.cumsum(0)]).int(), vit_max_seqlen=400,
        grid_hw=torch.zeros(3, 2, dtype=torch.int32), num_targets=0,
    )  # fmt: skip
    assert counter.batch(batch) == 3 * round(cost.flops(lengths.numpy()).sum())
    big = CostModel.from_config(get_preset("seedvl-qwen3-235b-a22b"))
    assert 7000 < big.linear / big.quadratic < 8500  # attention overtakes the matmuls near 7,700 patches


def test_lpt_is_greedy_and_deterministic():
    costs = np.array([5.0, 3.0, 3.0, 2.0, 2.0, 2.0, 1.0])
    out = lpt(costs, 3)
    assert out.tolist() == [0, 1, 2, 1, 2, 0, 1]  # descending, least loaded, ties to the lowest bin
    assert loads(costs, out, 3).tolist() == [7.0, 6.0, 5.0]
    rng = np.random.default_rng(0)
    costs = rng.pareto(1.5, 500) + 0.1
    source = rng.integers(0, 16, 500)
    a, b = assign(costs, source, 16, 8), assign(costs.copy(), source.copy(), 16, 8)
    assert np.array_equal(a, b)
    assert np.array_equal(a // 8, source // 8), "an image stays in its source's group"
    for g in range(2):
        sel = source // 8 == g
        per = loads(costs[sel], a[sel] - 8 * g, 8)
        assert per.max() <= per.mean() + costs[sel].max(), "greedy bound"


def test_images_stay_local_when_already_balanced():
    costs = np.ones(12)
    source = np.repeat(np.arange(4), 3)
    assert np.array_equal(assign(costs, source, 4, 4), source)
    plain = assign(costs, source, 4, 4, local=False)
    assert (plain != source).sum() > 0 and imbalance(loads(costs, plain, 4)) == 1.0


def test_need_runs_locate_context_parallel_shards():
    rows = np.array([0, 1, 2, 7, 8, 3, 4])  # rank 0 of a cp pair takes these rows, in this order
    other = np.array([5, 6, 9])
    runs = [NeedRuns.of(rows), NeedRuns.of(other)]
    assert runs[0].start.tolist() == [0, 7, 3] and runs[0].length.tolist() == [3, 2, 2]
    owner, pos = locate(np.arange(10), runs)
    assert owner.tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0, 1]
    assert pos.tolist() == [0, 1, 2, 5, 6, 0, 1, 3, 4, 2]
    assert NeedRuns.of(np.zeros(0, np.int64)).total == 0


def test_default_group():
    assert default_group(2) == 2 and default_group(256) == 128 and default_group(192) == 96
    assert default_group(8, multiple=4) == 8 and default_group(12, multiple=4) == 12


def test_simulation_meets_its_targets():
    """R = 256, G = 128 on the long-tailed distribution: FLOPs greedy in groups reaches max/mean
    <= 1.05 where no balancing is above 1.5, and beats the patch and squared-patch rules."""
    big = get_preset("seedvl-qwen3-235b-a22b")
    sim = simulate(long_tailed_step(256), CostModel.from_config(big), 128, 2 * big.llm.hidden)
    rules = sim["rules"]
    assert rules["none"]["max_over_mean"] > 1.5
    assert rules["flops_group128"]["max_over_mean"] <= 1.05
    ratio = {k: v["max_over_mean"] for k, v in rules.items()}
    assert ratio["flops"] < ratio["patches2"] < ratio["patches"]
    assert rules["flops_group128"]["pixel_bytes"] < rules["flops_group128_plain_lpt"]["pixel_bytes"] / 2


# ----------------------------------------------------------------------------- across ranks


def _conv(sizes: list[tuple[int, int]], text: str, seed: int):
    from trainer.data.chat import Conversation, Media, Turn

    rng = np.random.default_rng(seed)
    images = tuple(Media("image", rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes)
    return Conversation((Turn("user", (*images, text)), Turn("assistant", (f"answer {seed}",))), f"s{seed}")


def _batch(convs):
    from trainer.data.chat import LEVEL_PROMPT, encode_conversation
    from trainer.data.packer import SamplePool
    from trainer.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    pool = SamplePool([encode_conversation(c, tok) for c in convs])
    return pool.collate(np.arange(len(convs)), min_level=LEVEL_PROMPT, image_token_id=tok.image_token_id)


def _cases(cp: int) -> dict[str, list[list]]:
    """Micro-batches of each of the two dp replicas, per case (the same on every rank)."""
    c = _conv
    if cp == 1:
        return {
            # one replica holds every image: half of the work moves to the other
            "one_side": [[_batch([c([(112, 112), (56, 84)], "two", 0)])], [_batch([c([], "text", 1)])]],
            # a replica's single small image stays: the other rank encodes nothing (an empty pack)
            "empty": [[_batch([c([(28, 56)], "one", 2)])], [_batch([c([], "none", 3)])]],
            # sizes from one 28 px patch window to 224 px, two micro-batches a replica
            "mixed": [
                [_batch([c([(224, 224), (28, 28)], "a", 4), c([(56, 56)], "b", 5)]), _batch([c([], "c", 6)])],
                [_batch([c([(84, 168)], "d", 7)]), _batch([c([(112, 56), (28, 84), (168, 140)], "e", 8)])],
            ],
        }
    return {
        "cp": [
            [_batch([c([(224, 196), (28, 28)], "a long question " * 6, 9), c([(56, 112)], "b", 10)])],
            [_batch([c([(84, 84)], "c", 11), c([], "text only " * 8, 12)])],
        ]
    }


def _grads(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for n, p in model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        out[n] = g.detach().clone()
    return out


def _balance_worker(rank: int, world_size: int, port: int, layout: str, out: str) -> None:
    import torch.distributed as dist

    from model.vlm import SeedVLM
    from trainer import parallel
    from trainer.components import build_model_config, micro_batch_loss
    from trainer.data.tokenizer import ByteTokenizer

    init_gloo(rank, world_size, port)
    torch.set_num_threads(1)
    dims = parallel.ParallelDims.parse(layout)
    meshes = dims.build("cpu")
    tok = ByteTokenizer()
    cfg = build_model_config("seedvl-tiny", tok)
    torch.manual_seed(0)
    base = SeedVLM(cfg)
    cost = CostModel.from_config(cfg)
    balancer = parallel.VisionBalancer("flops", world_size, cost, cp=dims.cp, timeout_s=60)
    for name, replicas in _cases(dims.cp).items():
        micro = replicas[meshes.dp_rank]
        if dims.cp > 1:
            micro = [parallel.shard_batch(b, dims.cp, meshes.cp_rank, cfg.image_token_id) for b in micro]
        targets = sum(b.num_targets for r in replicas for b in r)
        accum = sum(len(r) for r in replicas)
        per_mode = {}
        for mode in ("off", "flops"):
            model = copy.deepcopy(base)
            parallel.parallelize(model, meshes)
            items = balancer.balance(micro) if mode == "flops" else micro
            if mode == "flops":  # the same plan again: the assignment is a function of the sizes
                again = balancer.balance(micro)
                for a, b in zip(items, again, strict=True):
                    assert a.route.send_splits == b.route.send_splits
                    assert torch.equal(a.route.recv_index, b.route.recv_index)
                    assert torch.equal(a.batch.patches, b.batch.patches)
            losses = []
            for item in items:
                b = parallel.unwrap(item)
                o = model(**item.model_inputs())
                ce, loss = micro_batch_loss(o, b.labels, targets=targets, accum=accum, llm=cfg.llm)
                loss.backward()
                losses.append(ce.item())
            moved = sum(int(parallel.unwrap(i).patches.nbytes) for i in items)  # host -> device
            stats = [losses, moved, sum(parallel.unwrap(i).num_images for i in items)]
            stats.append(sum(getattr(i, "pixel_bytes", 0) for i in items))
            gathered: list = [None] * world_size
            dist.all_gather_object(gathered, stats)
            per_mode[mode] = {"grads": _grads(model), "ranks": gathered}
        if rank == 0:
            torch.save(per_mode, Path(out) / f"{name}.pt")
    dist.destroy_process_group()


def _check(path: Path) -> dict:
    got = torch.load(path)
    off, on = got["off"], got["flops"]
    for (l_off, *_), (l_on, *_) in zip(off["ranks"], on["ranks"], strict=True):
        assert np.allclose(l_off, l_on, rtol=RTOL, atol=0), f"{path.stem}: CE {l_off} vs {l_on}"
    assert any(g.abs().max() > 0 for n, g in off["grads"].items() if n.startswith("vit."))
    for name, g in off["grads"].items():
        err, scale = (on["grads"][name] - g).abs().max().item(), g.abs().max().item()
        assert err <= RTOL * max(scale, 1e-12), f"{path.stem}: {name} max error {err:.2e} (scale {scale:.2e})"
    return got


@pytest.mark.dist
def test_balanced_step_matches_unbalanced_dp2(tmp_path):
    """dp=2 on gloo: the same CE and gradients with and without balancing; a rank given no image
    runs the ViT on an empty pack; each rank moves only the images it encodes to its device."""
    spawn(_balance_worker, 2, "dp=2", str(tmp_path))
    for case in ("one_side", "empty", "mixed"):
        got = _check(tmp_path / f"{case}.pt")
        off, on = got["off"]["ranks"], got["flops"]["ranks"]
        total = sum(r[1] for r in off)
        assert sum(r[1] for r in on) == total, f"{case}: each image's pixels reach one device once"
        if case == "one_side":
            assert [r[2] for r in on] == [1, 1] and off[1][2] == 0, "the idle rank took one image"
            assert max(r[1] for r in on) < total and on[0][3] > 0
        if case == "empty":
            assert [r[2] for r in on] == [1, 0] and on[0][3] == 0, "the lone image stays where it is"


@pytest.mark.dist
def test_balanced_step_matches_unbalanced_context_parallel(tmp_path):
    """dp=2,cp=2: unbalanced, both cp ranks of a replica encode all of its images; balanced, each
    image is encoded once and its tokens reach the zigzag shards that hold its placeholders."""
    spawn(_balance_worker, 4, "dp=2,cp=2", str(tmp_path))
    got = _check(tmp_path / "cp.pt")
    off, on = got["off"]["ranks"], got["flops"]["ranks"]
    assert sum(r[1] for r in off) == 2 * sum(r[1] for r in on), "cp=2 moved every image twice"
    assert sum(r[2] for r in on) == 4


@pytest.mark.dist
def test_trainer_logs_vit_balance(tmp_path):
    """Under torchrun every step's record in log.jsonl carries the ViT load imbalance and the bytes
    balancing moved."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "trainer/run.py", "--recipe", "stage1", "--steps", "2", "--window", "64", "--eval-samples", "0",
           "--no-progress", "--no-tensorboard", "--parallel", "dp=2", "--vit-balance", "flops",
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["vit_imbalance"] >= 1.0 and r["vit_pixel_bytes"] >= 0 and r["vit_token_bytes"] >= 0
    assert "images balanced by flops in groups of 2" in (out / "train.log").read_text()
