"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically.

A checkpoint is a directory ``<root>/step_<8 digits>`` holding the DCP files of

    model     the model's state dict (torch.distributed.checkpoint.state_dict.get_state_dict)
    optim     the optimizer's state, keyed by parameter name
    rng       torch's CPU (and CUDA) generator states
    trainer   JSON: step, stage, stage step, data positions, the LR scheduler's state, run config

plus ``meta.json`` (the same trainer JSON, for people). It is written into ``<root>/.tmp-step_N``
and renamed into place only when complete, then ``<root>/latest`` is replaced (write + os.replace)
to name it, so a crash mid-save leaves the previous checkpoint intact and ``latest`` pointing at it;
leftover ``.tmp-*`` directories are removed by the next save. Only the newest ``keep`` are kept.

Under torch.distributed every rank calls :meth:`Checkpointer.save` and :meth:`Checkpointer.load`
(they are collectives). Every rank writes its own shard (``__<rank>_0.distcp``) into the one
temporary directory; rank 0 writes DCP's metadata and, once every rank has finished (a barrier),
``meta.json``, commits the directory by renaming it and moves ``latest``. DCP stores each tensor's
global shape and every shard's offsets, so a checkpoint loads under any other layout (resharding),
single process included. The RNG states saved are rank 0's (every rank is seeded alike).

Integrity: ``meta.json`` lists every file of the checkpoint with its size and SHA-256 (each rank
hashes the files it wrote). :meth:`Checkpointer.latest_good` verifies them and falls back past a
damaged checkpoint (a truncated shard, broken metadata) to the newest intact one, saying in one
line what is wrong; it never deletes anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
LATEST = "latest"


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            state[f"cuda{i}"] = torch.cuda.get_rng_state(i)
    return state


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns that it assumes one process when torch.distributed is not initialised: expected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_records(directory: Path) -> dict[str, dict]:
    """Size and SHA-256 of the files this rank wrote (its shards; rank 0 also DCP's metadata),
    gathered on every rank."""
    rank = dist.get_rank() if dist.is_initialized() else None
    mine = {}
    for f in sorted(directory.iterdir()):
        if rank is None or f.name.startswith(f"__{rank}_") or (rank == 0 and not f.name.startswith("__")):
            mine[f.name] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    if rank is None:
        return mine
    gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, mine)
    return {k: v for part in gathered for k, v in part.items()}


def verify(path: Path) -> str | None:
    """What is wrong with checkpoint ``path`` (None: intact, or written before checksums)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as err:
        return f"meta.json is unreadable ({type(err).__name__}: {err})"
    for name, want in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, {want['bytes']} were written"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    def __init__(self, root: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep: expected >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self._pending: tuple | None = None  # an asynchronous save not yet committed

    def complete(self) -> list[Path]:
        """Finished checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, or the newest complete one if that file is missing."""
        pointer = self.root / LATEST
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            if (path / "meta.json").is_file():
                return path
            log.warning(
                "checkpoint pointer %s names %s, which is incomplete; scanning instead", pointer, path
            )
        done = self.complete()
        return done[-1] if done else None

    def latest_good(self) -> Path | None:
        """The newest intact checkpoint, starting from :meth:`latest`; each damaged one passed over
        is named in one warning line (and kept). Every rank calls it; rank 0 decides."""
        chosen: list[str | None] = [None]
        if _is_rank0():
            latest = self.latest()
            candidates = [latest] if latest is not None else []
            candidates += [p for p in reversed(self.complete()) if p != latest]
            for path in candidates:
                problem = verify(path)
                if problem is None:
                    chosen[0] = str(path)
                    break
                log.warning("checkpoint %s is damaged (%s); falling back to an earlier one", path, problem)
        if dist.is_initialized():
            dist.broadcast_object_list(chosen, src=0)
        return None if chosen[0] is None else Path(chosen[0])

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict,
        *,
        asynchronous: bool = False,
        group: dist.ProcessGroup | None = None,
    ) -> Path:
        """Write the checkpoint of ``step`` atomically; returns its directory. Every rank calls it.

        ``asynchronous``: the state is copied to host memory now and written by ``dcp.async_save``
        in the background (over ``group``, a process group of its own so that its collectives never
        interleave with training's); the directory is committed by :meth:`finalize`, which the next
        save calls first and the trainer calls at the end of a run or a preemption.
        """
        self.finalize()
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-{final.name}"
        if _is_rank0():
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()
        meta = json.dumps(trainer_state, indent=1, sort_keys=True)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, "rng": _rng_state(), "trainer": meta}
        if asynchronous:
            with _single_process_ok():
                future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=group)
            self._pending = (future, tmp, final, trainer_state)
            return final
        with _single_process_ok():
            dcp.save(state, checkpoint_id=str(tmp))
        self._commit(tmp, final, trainer_state)
        return final

    def finalize(self) -> None:
        """Wait for a pending asynchronous save and commit it (every rank; nothing when none)."""
        if self._pending is None:
            return
        future, tmp, final, trainer_state = self._pending
        self._pending = None
        future.result()
        self._commit(tmp, final, trainer_state)

    def _commit(self, tmp: Path, final: Path, trainer_state: dict) -> None:
        _barrier()  # every rank's shard is on disk
        files = _file_records(tmp)
        if _is_rank0():
            (tmp / "meta.json").write_text(
                json.dumps({**trainer_state, "files": files}, indent=1, sort_keys=True) + "\n"
            )
            _fsync_dir(tmp)
            if final.exists():  # the same step saved again (e.g. resumed at a stage end): replace it
                problem = verify(final)
                if problem is None:
                    shutil.rmtree(final)
                else:  # kept for inspection, out of the way
                    aside = final.with_name(f"{final.name}.damaged")
                    shutil.rmtree(aside, ignore_errors=True)
                    os.rename(final, aside)
                    log.warning("moved the damaged %s (%s) to %s", final, problem, aside)
            os.rename(tmp, final)
            pointer_tmp = self.root / f".{LATEST}.tmp"
            pointer_tmp.write_text(final.name + "\n")
            os.replace(pointer_tmp, self.root / LATEST)
            _fsync_dir(self.root)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()  # committed: every rank sees the same latest checkpoint

    @staticmethod
    def read_meta(path: Path) -> dict:
        return json.loads((Path(path) / "meta.json").read_text())

    @staticmethod
    def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Load model, optimizer and RNG states in place from ``path``; returns the trainer state."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        rng = {k: torch.empty_like(v) for k, v in _rng_state().items()}
        state = {"model": model_sd, "optim": optim_sd, "rng": rng, "trainer": ""}
        with _single_process_ok():
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        torch.set_rng_state(state["rng"]["cpu"])
        for key, value in state["rng"].items():
            if key.startswith("cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state(value, int(key[4:]))
        return json.loads(state["trainer"])

    @staticmethod
    def load_model(path: Path, model: nn.Module) -> None:
        """Only the model weights of a checkpoint (``--init``: e.g. SFT from a pre-training run)."""
        state = {"model": get_model_state_dict(model)}
        with _single_process_ok():
            dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"])
