"""Multi-process test helpers: spawn CPU workers joined in a gloo group over the loopback interface.

Spawning costs seconds per process (each imports torch), so tests batch many cases into one spawn
and return results through files rather than spawning per case.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world_size: int, port: int) -> None:
    """Join the default gloo group on 127.0.0.1 (a hung peer fails the test after a minute)."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )


def spawn(worker: Callable[..., None], world_size: int, *args: object) -> None:
    """Run ``worker(rank, world_size, port, *args)`` in ``world_size`` processes; re-raises a failure.

    The worker must call ``init_gloo(rank, world_size, port)`` first and
    ``dist.destroy_process_group()`` last.
    """
    mp.spawn(worker, args=(world_size, free_port(), *args), nprocs=world_size, join=True)


def logged_steps(run_dir: Path) -> list[dict]:
    """The per-step records of a run's log.jsonl."""
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def assert_same_steps(expected: list[dict], actual: list[dict], what: str, rtol: float = 1e-5) -> None:
    """Two runs logged the same steps: the same batches, and losses, gradient norm and MoE losses
    within relative ``rtol``."""
    assert [r["step"] for r in actual] == [r["step"] for r in expected], what
    for e, a in zip(expected, actual, strict=True):
        assert a["tokens"] == e["tokens"] and a["targets"] == e["targets"], f"{what}: step {e['step']} batch"
        for key in ("loss", "grad_norm", "lb_loss", "z_loss"):
            rel = abs(a[key] - e[key]) / abs(e[key])
            assert rel <= rtol, f"{what}: step {e['step']} {key} {a[key]!r} vs {e[key]!r} (rel {rel:.1e})"
