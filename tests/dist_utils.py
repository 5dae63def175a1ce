"""Multi-process test helpers: spawn CPU workers joined in a gloo group over the loopback interface.

Spawning costs seconds per process (each imports torch), so tests batch many cases into one spawn
and return results through files rather than spawning per case.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable

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
