"""The layout: how many ranks each parallel dimension takes, validated once, and the meshes it builds.

    world = dp x cp                 dp: data parallel (each dp rank its own micro-batches)
                                    cp: context parallel (the ranks of one dp replica share each
                                        micro-batch: zigzag shards, ring attention)
    ep | dp x cp                    ep: expert parallel, drawn from the dp x cp ranks (torchtitan's
                                        dp2ep): blocks of ep consecutive ranks share the experts of
                                        every MoE layer, E/ep each

Ranks are numbered dp-major (rank = dp_rank * cp + cp_rank), so a cp group and an ep block are
neighbours: on a GPU cluster they sit inside one node's NVLink domain when cp and ep fit in it.

Meshes (``torch.distributed.device_mesh``):
    mesh     ("dp", "cp")           cp groups for ring attention, dp/cp ranks for the data
    world    ("dp_cp",)             the flattened mesh every dense parameter is sharded over (ZeRO-3)
    experts  ("edp", "ep")          world viewed as (dp*cp/ep, ep): expert weights Shard(0) over "ep",
                                    ZeRO over "edp" (the ranks that hold the same experts)

Pipeline parallelism (``pp`` > 1, trainer.parallel.pipeline) adds an outermost dimension:

    world = pp x dp x cp            pp: the LLM's decoder layers split into pp x V stages; the ViT
                                        and the adapter stay outside the pipeline, ZeRO over all ranks
    rank = pp_rank * dp * cp + dp_rank * cp + cp_rank

    mesh     ("pp", "dp", "cp")     pp groups (the ranks of one dp/cp place, one per pipeline rank)
    world    ("world",)             every rank: the ViT and the adapter
    stage    ("dp_cp",)             this pipeline rank's dp x cp ranks: its LLM layers (ZeRO-3)
    experts  ("pp", "edp", "ep")    each pipeline rank's dp x cp ranks viewed as (dp*cp/ep, ep)

With pp = 1, ``stage`` is ``world``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


class LayoutError(ValueError):
    """The layout cannot run this model, recipe or world; the message names the rule."""


@dataclass(frozen=True)
class ParallelDims:
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1

    @classmethod
    def parse(cls, text: str | None) -> ParallelDims:
        """``"pp=2,dp=2,cp=2,ep=4"``; a missing dimension is 1; None or "" is the single-process layout."""
        values: dict[str, int] = {}
        names = [f.name for f in fields(cls)]
        for item in (text or "").replace(" ", "").split(","):
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep or key not in names:
                raise LayoutError(f"--parallel {item!r}: expected NAME=N with NAME one of {', '.join(names)}")
            if key in values:
                raise LayoutError(f"--parallel: {key} given twice")
            if not value.isdigit() or int(value) < 1:
                raise LayoutError(f"--parallel {item!r}: expected a positive integer")
            values[key] = int(value)
        return cls(**values)

    def __str__(self) -> str:
        # pp is named only when used, so the messages of layouts without a pipeline stay as they were.
        return ",".join(
            f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.name != "pp" or self.pp > 1
        )

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp

    @property
    def stage_size(self) -> int:
        """Ranks of one pipeline rank (dp x cp): the ranks its LLM layers are sharded over."""
        return self.dp * self.cp

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def validate(self, world_size: int, *, num_experts: int, moe: bool, accums: dict[str, int]) -> None:
        """Refuse, before any work, a layout that does not fit the world, the model or the recipe."""
        if self.world_size != world_size:
            product = "pp x dp x cp" if self.pp > 1 else "dp x cp"
            raise LayoutError(
                f"--parallel {self}: {product} = {self.world_size} must equal the number of processes, "
                f"{world_size} (torchrun --nnodes x --nproc-per-node)"
            )
        if self.stage_size % self.ep:
            raise LayoutError(
                f"--parallel {self}: ep = {self.ep} must divide dp x cp = {self.stage_size} "
                "(expert-parallel ranks are drawn from the data- and context-parallel ranks)"
            )
        if self.ep > 1 and not moe:
            raise LayoutError(f"--parallel {self}: ep > 1 needs a model with MoE layers")
        if self.ep > 1 and num_experts % self.ep:
            raise LayoutError(
                f"--parallel {self}: the {num_experts} routed experts of each MoE layer must divide "
                f"evenly over ep = {self.ep}"
            )
        for stage, accum in accums.items():
            if accum % self.dp:
                raise LayoutError(
                    f"--parallel {self}: stage {stage} has {accum} micro-batches per step, which must be "
                    f"a multiple of dp = {self.dp} (every dp rank takes the same number); "
                    f"pass --set '*.accum={self.dp * -(-accum // self.dp)}'"
                )

    def build(self, device_type: str) -> Meshes:
        if self.pp == 1:
            mesh = init_device_mesh(device_type, (self.dp, self.cp), mesh_dim_names=("dp", "cp"))
            world = mesh["dp", "cp"]._flatten("dp_cp")
            experts = None
            if self.ep > 1:
                ranks = torch.arange(self.world_size).view(self.world_size // self.ep, self.ep)
                experts = DeviceMesh(device_type, ranks, mesh_dim_names=("edp", "ep"))
            return Meshes(self, mesh, world, experts, world)
        mesh = init_device_mesh(device_type, (self.pp, self.dp, self.cp), mesh_dim_names=("pp", "dp", "cp"))
        world = mesh["pp", "dp", "cp"]._flatten("world")
        stage = mesh["dp", "cp"]._flatten("dp_cp")
        experts = None
        if self.ep > 1:
            ranks = torch.arange(self.world_size).view(self.pp, self.stage_size // self.ep, self.ep)
            experts = DeviceMesh(device_type, ranks, mesh_dim_names=("pp", "edp", "ep"))
        return Meshes(self, mesh, world, experts, stage)


@dataclass(frozen=True)
class Meshes:
    dims: ParallelDims
    mesh: DeviceMesh  # ("dp", "cp"), or ("pp", "dp", "cp") when pp > 1
    world: DeviceMesh  # ("dp_cp",), or ("world",) when pp > 1
    experts: DeviceMesh | None  # ("edp", "ep"), or ("pp", "edp", "ep") when pp > 1; when ep > 1
    stage: DeviceMesh  # ("dp_cp",): this pipeline rank's dp x cp ranks (world when pp = 1)

    @property
    def pp_rank(self) -> int:
        return self.mesh.get_local_rank("pp") if self.dims.pp > 1 else 0

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        return self.mesh.get_group("pp") if self.dims.pp > 1 else None

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")

    @property
    def cp_rank(self) -> int:
        return self.mesh.get_local_rank("cp")

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        return self.mesh.get_group("cp") if self.dims.cp > 1 else None


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(device: torch.device, timeout_s: float) -> None:
    """Join the torchrun job's default process group: NCCL on GPUs, gloo on CPUs. A collective that
    waits longer than ``timeout_s`` (a dead or stuck peer) raises instead of hanging."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def check_launch(dims: ParallelDims) -> bool:
    """Whether this process is one of several torchrun ranks; LayoutError when ``dims`` needs
    processes that were not launched (one line saying how to launch them)."""
    distributed = launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1
    if dims.enabled and not distributed:
        raise LayoutError(
            f"--parallel {dims} needs {dims.world_size} processes: launch with "
            f"torchrun --nproc-per-node={dims.world_size} trainer/run.py ..."
        )
    return distributed
