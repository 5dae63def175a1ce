"""Parallelism-aware loading: a loading group decodes each window once between its ranks, and the
batches each rank trains on are exactly those of the stream that decodes everything itself.

The stream-level test runs the group's stream through the Prefetcher (the metadata gather runs in
the main thread), completes each batch with ``VisionBalancer.fill`` and compares every field with
the single-process stream's batch; it also counts the pixel bytes each rank decoded and sent. The
trainer-level test runs two steps under torchrun at dp=2 x cp=2 and compares the losses with a
single process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dist_utils import init_gloo, spawn
from trainer.data.chat import LEVEL_PROMPT, Conversation, EncodeConfig, Media, Turn
from trainer.data.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parent.parent
TOK = ByteTokenizer()
ENCODE = EncodeConfig(max_pixels=64 * 28 * 28)
BUDGET, WINDOW, STEPS = 300, 16, 6


class _Mixed:
    """0-3 images of sizes from 28 px to 196 px a sample; every 11th is undecodable, and long texts
    make some samples longer than the budget."""

    name = "mixed"
    num_samples = 50

    def __getitem__(self, i: int) -> Conversation:
        rng = np.random.default_rng(i)
        sizes = [tuple(28 * rng.integers(1, 8, 2)) for _ in range(rng.integers(0, 4))]
        images = [Media("image", rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
        if i % 11 == 3:
            images.append(Media("image", np.zeros((4, 4), dtype=np.float32)))
        text = "q" * int(rng.integers(5, 260))
        return Conversation((Turn("user", (*images, text)), Turn("assistant", (f"a{i}",))), f"m{i}")


def _window_bytes(stream) -> int:
    """Pixel bytes a stream's rank decodes of window 0 (decoding it again)."""
    return sum(
        im.patches.nbytes for _, _, s in stream._encode(0) if not isinstance(s, tuple) for im in s.images
    )


def _stream_worker(rank: int, world_size: int, port: int, cp: int, out: str) -> None:
    import torch.distributed as dist

    from trainer import parallel
    from trainer.balance import CostModel
    from trainer.components import build_model_config
    from trainer.data.packer import PackedBatch
    from trainer.data.stream import BatchStream, Loading, Position, Prefetcher

    init_gloo(rank, world_size, port)
    torch.set_num_threads(1)
    dp, (dp_rank, cp_rank) = world_size // cp, divmod(rank, cp)
    cost = CostModel.from_config(build_model_config("seedvl-tiny", TOK))
    balancer = parallel.VisionBalancer("off", world_size, cost, cp=cp, timeout_s=60)
    source = _Mixed()
    shared = BatchStream(
        source, TOK, seed=3, window=WINDOW, encode=ENCODE, loading=Loading(rank, world_size, dp)
    )
    alone = BatchStream(source, TOK, seed=3, window=WINDOW, encode=ENCODE)
    kw = {"min_level": LEVEL_PROMPT, "rank": dp_rank, "ranks": dp}
    it = Prefetcher(shared.batches(Position(), BUDGET, group=balancer.host_group, **kw), depth=2)
    ref = alone.batches(Position(), BUDGET, **kw)
    steps = []
    for _ in range(STEPS):
        (got, pos), (want, want_pos) = next(it), next(ref)
        assert pos == want_pos
        decoded = got.held.nbytes
        if cp > 1:
            got, want = (parallel.shard_batch(b, cp, cp_rank, TOK.image_token_id) for b in (got, want))
        (full,) = balancer.fill([got])
        assert type(full) is PackedBatch
        for f in dataclasses.fields(PackedBatch):
            a, b = getattr(full, f.name), getattr(want, f.name)
            same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
            assert same, f"rank {rank}: {f.name} differs from the single-process stream's"
        steps.append((decoded, balancer.last.sent_bytes, int(want.patches.nbytes)))
    it.close()
    assert alone.skips.total > alone.skips.counts["too long"] > 0  # both kinds of skip exercised
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, (steps, _window_bytes(shared), _window_bytes(alone)))
    if rank == 0:
        torch.save(gathered, Path(out) / "stats.pt")
    dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize("world,cp", [(4, 2)])
def test_loading_group_decodes_once(tmp_path, world, cp):
    """dp=2 x cp=2 (cp=1 is the same code with one rank a replica): each rank decodes 1/world of a
    window; each step's images are decoded once in the group, and every micro-batch arrives whole
    and equal to the single-process one."""
    spawn(_stream_worker, world, cp, str(tmp_path))
    ranks = torch.load(tmp_path / "stats.pt")
    window0 = [r[1] for r in ranks]  # each rank's share
    assert sum(window0) == ranks[0][2] > 0, "window 0 decoded exactly once over the group"
    assert max(window0) < 0.75 * ranks[0][2], f"a rank decoded most of window 0: {window0}"
    for k in range(STEPS):
        decoded = [r[0][k][0] for r in ranks]
        needed = sum(r[0][k][2] for r in ranks) // cp  # each replica's images (a cp group shares them)
        assert sum(decoded) == needed, f"step {k}: {decoded} decoded for {needed} bytes of images"
        sent = sum(r[0][k][1] for r in ranks)
        assert sent <= needed * cp, f"step {k}: an image moved twice to a rank"


@pytest.mark.dist
def test_trainer_loads_once_under_dp_and_cp(tmp_path):
    """Two stage-1 steps at dp=2 x cp=2 without balancing: the same losses as a single process, and
    log.jsonl counts the pixel bytes decoded and sent, each rank decoding part of the step's."""
    args = ["trainer/run.py", "--recipe", "stage1", "--steps", "2", "--window", "64", "--eval-samples", "0",
            "--no-progress", "--no-tensorboard"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONWARNINGS": "ignore"}
    runs = {
        "single": [sys.executable, *args],
        "dp2cp2": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", *args,
                   "--parallel", "dp=2,cp=2", "--vit-balance", "off"],
    }  # fmt: skip
    steps = {}
    for name, cmd in runs.items():
        out = tmp_path / name
        proc = subprocess.run(
            [*cmd, "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        steps[name] = [
            r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r
        ]
    for one, par in zip(steps["single"], steps["dp2cp2"], strict=True):
        assert one["tokens"] == par["tokens"]
        rel = abs(one["loss"] - par["loss"]) / one["loss"]
        assert rel <= 1e-5, f"step {one['step']}: loss {par['loss']} vs {one['loss']}"
        assert 0 < par["load_decoded_bytes_max"] < par["load_decoded_bytes"]
        assert par["load_sent_bytes"] > 0 and par["vit_pixel_bytes"] == 0
