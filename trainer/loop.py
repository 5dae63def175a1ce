"""The training loop: stages in order, one packed batch (or ``accum`` of them) per optimizer step.

Per stage: freeze what the stage does not train, start or keep the AdamW optimizer (stage 2 keeps
stage 1's), build the LR schedule, stream packed batches from the stage's start position, and
step. A frozen ViT runs under no_grad (nothing upstream needs its gradient); a frozen LLM still
runs backward, because the adapter's gradient passes through it.

The loss is the cross-entropy summed over the step's target tokens divided by their number (over
all micro-batches, on all ranks), plus the MoE balance and z-losses scaled by the config's
coefficients and averaged over the step's micro-batches (:func:`micro_batch_loss`). Each step
is wrapped in NVTX ranges (``forward``, ``backward``, ``optimizer``; torch profiler
record_function ranges as well), and ``profile_steps`` records steps a..b with the torch profiler,
or brackets them with cudaProfilerStart/Stop for ``nsys --capture-range=cudaProfilerApi``.
Precision (``--mixed-precision``, default auto: bf16 on a GPU, fp32 on a CPU): a single process
computes under ``torch.autocast`` in bf16 with fp32 weights and optimizer; under torchrun FSDP's
MixedPrecisionPolicy gathers bf16 weights and reduces fp32 gradients. ``--activation-checkpointing``
and ``--compile`` apply per ViT block and decoder layer (trainer.parallel), defaults off.

Checkpoints (trainer.checkpoint) carry the model, the optimizer, the scheduler, the data positions
and the RNG states; resuming rebuilds the stage's optimizer, loads them, and continues with the
batch after the last one trained, so a resumed run repeats an uninterrupted one's losses exactly in
deterministic mode.

Under torchrun (``--parallel dp=D,cp=C,ep=E``) every rank builds the same single-device model, and
trainer.parallel applies the layout to it. A step's ``accum`` micro-batches are the global batch:
dp rank r takes every dp-th of them (trainer.data.stream), the cp ranks of a dp replica each take
a zigzag shard of the same ones, and one all-reduce of the step's counts makes the loss
normaliser global, so a step's loss and gradients do not depend on the layout. Rank 0 alone writes
logs; every rank writes its checkpoint shard. With ``--vit-balance`` (flops by default under
torchrun) the step's images are first spread over the ranks by their ViT FLOPs
(trainer.parallel.vit_balance), and each step's record carries the ViT load imbalance and the bytes
that moved. The balancing group is also the loading group (trainer.data.stream): its ranks decode a
window once between them, and each image's pixels go from the rank that decoded it to the ranks
that encode it; the record counts the pixel bytes decoded and sent (all ranks, and the busiest).

With ``pp`` > 1 (``--parallel pp=P,...``, ``--pp-schedule``, ``--pp-virtual``, ``--pp-layers``) the
LLM's layers run as pipeline stages (trainer.parallel.pipeline): every pp rank of a dp/cp place
takes the same micro-batches, encodes a share of their images, and the step's micro-batches go
through the schedule together; only the first pp rank counts them in the step's totals. Vision
balancing across dp ranks is off under a pipeline (the pp ranks share the images instead).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from model.vlm import SeedVLM

from . import logs, parallel
from .balance import CostModel, check_group, default_group
from .checkpoint import Checkpointer
from .components import (
    _device,
    _source,
    build_model_config,
    build_optimizer,
    compute_dtype,
    micro_batch_loss,
    prepare_run_dir,
    set_trainable,
    stage_scheduler,
    vst_heldout,
)
from .config import RunConfig, SetupError, as_dict, check_resume, dump_toml, signature, validate
from .data.chat import SkipLog
from .data.packer import PackedBatch
from .data.stream import BatchStream, Gather, Loading, PartialBatch, Position, Prefetcher
from .data.tokenizer import load_tokenizer
from .data.vst import is_spec as is_vst_spec
from .evaluate import EvalResult, HeldOut, encode_config
from .gallery import write_gallery
from .profiling import StepProfiler, nvtx_range
from .recipes import RECIPES, Stage, apply_overrides, get_recipe, scale_to, with_steps
from .throughput import FlopCounter, measure_peak

log = logging.getLogger("trainer")

_DIST_KEYS = (
    "vit_imbalance", "vit_pixel_bytes", "vit_token_bytes",
    "load_decoded_bytes", "load_decoded_bytes_max", "load_sent_bytes", "load_sent_bytes_max",
)  # fmt: skip
PERIODIC_PER_SKILL = 16  # held-out questions per skill in the periodic evaluation (~2 s on a CPU)


class Preempted(Exception):
    """SIGTERM or SIGINT arrived: the run saved a checkpoint at the next step boundary and stopped."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path) -> None:
        super().__init__(f"{signal_name}: saved step {step} to {checkpoint}; continue with --resume")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


# ----------------------------------------------------------------------------- model and optimizer


class Run:
    """One training run: set up from a RunConfig (or resume), then :meth:`train` through the stages."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        validate(cfg)
        try:
            dims = parallel.ParallelDims.parse(cfg.parallel)
            self.distributed = parallel.check_launch(dims)
        except parallel.LayoutError as err:
            raise SetupError(str(err)) from err
        local_rank = int(os.environ["LOCAL_RANK"]) if self.distributed else None
        self.device = _device(cfg.device, local_rank)
        self.meshes: parallel.Meshes | None = None
        self.rank = 0
        if self.distributed:
            if not dist.is_initialized():  # --recipe full: the ViT stages' group goes on
                parallel.init_distributed(self.device, cfg.pg_timeout)
            self.rank = dist.get_rank()
            if cfg.parallel is None:  # plain data parallelism over the whole world
                dims = parallel.ParallelDims(dp=dist.get_world_size())
        self.dims = dims
        self.out = prepare_run_dir(cfg, self.rank)
        self.skips = SkipLog(logging.getLogger("trainer.data"))
        try:
            self.tok = load_tokenizer(cfg.tokenizer)
            self.model_cfg = build_model_config(cfg.preset, self.tok)
            stages = scale_to(get_recipe(cfg.recipe), self.model_cfg)
            self.stages = apply_overrides(with_steps(stages, cfg.steps, cfg.tokens), cfg.overrides)
            self.encode = encode_config(self.model_cfg, cfg.max_pixels)
            self.balance_rule, self.balance_group = self._balance_layout()
            keys = dict.fromkeys(s.data or cfg.data for s in self.stages)
            self.streams = {key: self._stream(key) for key in keys}
            self.streams[self.stages[0].data or cfg.data].warm(0)  # a fresh run's first window
            llm = self.model_cfg.llm
            self.dims.validate(
                dist.get_world_size() if self.distributed else 1,
                num_experts=llm.num_experts,
                moe=any(llm.is_moe_layer(i) for i in range(llm.num_layers)),
                accums={s.name: s.accum for s in self.stages},
            )
            self.pipeline_plan = self._pipeline_plan()
            self.compute_dtype = compute_dtype(cfg.mixed_precision, self.device)
            self.flops = FlopCounter(self.model_cfg)
            self.vit_cost = CostModel.from_config(self.model_cfg)
        except (KeyError, ValueError, FileNotFoundError, ImportError) as err:
            raise SetupError(str(err)[1:-1] if isinstance(err, KeyError) else str(err)) from err

        self.deterministic = cfg.deterministic if cfg.deterministic is not None else self.device.type == "cpu"
        if self.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.seed)
        # Every rank builds the same full model (same seed, same --init weights); parallelize then
        # keeps each rank's shards.
        self.model = SeedVLM(self.model_cfg).to(self.device)
        self.model.train()
        self.signature = signature(cfg, self.model_cfg, self.stages)
        self.ckpt = Checkpointer(self.out / "checkpoints", cfg.keep)
        self.state = {"global_step": 0, "stage_index": 0, "stage_step": 0, "positions": {}, "tokens": 0}
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.resumed_stage: int | None = None
        self._heldouts: dict[int, HeldOut] = {}
        self._stop_signal: str | None = None  # set by SIGTERM/SIGINT (see _catch_stop_signals)
        self._stop_agreed = False
        resume_from = self.ckpt.latest_good() if cfg.resume else None
        if cfg.init is not None and resume_from is None:
            self._init_weights(Path(cfg.init))
        if cfg.vit_init is not None and resume_from is None:
            self._init_vit(Path(cfg.vit_init))
        self._ckpt_group = None
        if self.distributed:
            self.meshes = self.dims.build(self.device.type)
            if cfg.async_save:  # background checkpoint collectives on a group of their own
                self._ckpt_group = dist.new_group(backend="gloo")
        self.pp_stages = parallel.parallelize(
            self.model, self.meshes, param_dtype=self.compute_dtype,
            activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile,
            pipeline=self.pipeline_plan,
        )  # fmt: skip
        self.pipeline: parallel.Pipeline | None = None
        if self.pipeline_plan is not None:
            self.pipeline = parallel.Pipeline(
                self.model, self.pp_stages, self.pipeline_plan, self.meshes,
                device=self.device, compute_dtype=self.compute_dtype,
            )  # fmt: skip
        # The balancing group is also the loading group: it decodes each window once, and the
        # balancer moves the pixels (fill, when balancing is off) from where they were decoded.
        self.balancer: parallel.VisionBalancer | None = None
        if self.balance_rule != "off" or self.balance_group > 1:
            self.balancer = parallel.VisionBalancer(
                self.balance_rule, self.balance_group, self.vit_cost,
                cp=self.dims.cp, timeout_s=cfg.pg_timeout,
            )  # fmt: skip
        # Parameters on more than one mesh (experts; the ViT and a pipeline stage) cannot share a
        # multi-tensor kernel.
        self.foreach = False if self.dims.ep > 1 or self.dims.pp > 1 else None
        if cfg.resume:
            self._resume(resume_from)

    def _pipeline_plan(self) -> parallel.PipelinePlan | None:
        """The pipeline's stages with pp > 1 (None without); LayoutError for a layout the model or
        the options cannot run."""
        if self.dims.pp == 1:
            return None
        llm, cfg = self.model_cfg.llm, self.cfg
        if llm.tie_embeddings:
            raise parallel.LayoutError(
                f"--parallel {self.dims}: a pipeline cannot split an LLM whose embedding and head share "
                "their weights (tie_embeddings) over two stages"
            )
        virtual = cfg.pp_virtual
        if virtual is None:
            single = cfg.pp_schedule.lower() in ("1f1b", "gpipe")
            virtual = 1 if single or llm.num_layers < 2 * self.dims.pp else 2
        plan = parallel.plan_pipeline(llm.num_layers, self.dims.pp, virtual, cfg.pp_schedule, cfg.pp_layers)
        for stage in self.stages:
            parallel.pipeline.check_micro_batches(plan, stage.accum // self.dims.dp, f"stage {stage.name}")
        return plan

    def _balance_layout(self) -> tuple[str, int]:
        """(rule, group size) of vision workload balancing: off in a single process; under
        torchrun ``--vit-balance`` (auto: flops) in groups of ``--vit-balance-group`` ranks. Under a
        pipeline it is off (the pp ranks share the images), in groups of cp for the loading."""
        if not self.distributed:
            return "off", 1
        if self.dims.pp > 1:
            if self.cfg.vit_balance not in ("auto", "off"):
                raise parallel.LayoutError(
                    f"--vit-balance {self.cfg.vit_balance} with pp > 1: vision balancing across dp ranks "
                    "is not composed with pipeline stages; the pp ranks share each step's images"
                )
            return "off", self.dims.cp
        rule = "flops" if self.cfg.vit_balance == "auto" else self.cfg.vit_balance
        world = dist.get_world_size()
        group = self.cfg.vit_balance_group or default_group(world, self.dims.cp)
        return rule, check_group(group, world, self.dims.cp)

    def _stream(self, key: str) -> BatchStream:
        """The stream of data ``key``; under torchrun this rank decodes its share of each window
        for its loading group (the balancing group)."""
        source = _source(key, self.cfg.seed, self.skips)
        group = self.balance_group
        return BatchStream(
            source, self.tok, seed=self.cfg.seed, window=self.cfg.window, encode=self.encode,
            skips=self.skips, loading=Loading(self.rank % group, group, group // self.dims.cp),
        )  # fmt: skip

    def _batches(self, stage: Stage, key: str) -> Prefetcher:
        """This rank's micro-batches of ``stage`` from the saved position: every dp-th one, and under
        context parallelism this rank's zigzag shard of it (built in the prefetch thread)."""
        start = Position(*self.state["positions"][key])
        dp_rank, cp_rank = (self.meshes.dp_rank, self.meshes.cp_rank) if self.meshes else (0, 0)
        it = self.streams[key].batches(
            start, stage.seq_len, min_level=stage.min_level, rank=dp_rank, ranks=self.dims.dp,
            group=self.balancer.host_group if self.balancer else None,
        )  # fmt: skip
        if self.dims.cp > 1:
            cp, image_id = self.dims.cp, self.model_cfg.image_token_id
            it = (
                x if isinstance(x, Gather) else (parallel.shard_batch(x[0], cp, cp_rank, image_id), x[1])
                for x in it
            )
        return Prefetcher(it, depth=self.cfg.prefetch, pin=self.device.type == "cuda")

    def _resume(self, path: Path | None) -> None:
        if path is None:
            log.warning("--resume: no checkpoint in %s; starting from scratch", self.ckpt.root)
            return
        meta = Checkpointer.read_meta(path)
        check_resume(meta["run"], self.signature, path)
        stage = self.stages[meta["stage_index"]]
        self._set_trainable(stage)
        self.optimizer = build_optimizer(self.model, stage, foreach=self.foreach)
        meta = Checkpointer.load(path, self.model, self.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, stage.lr_factor)
        self.scheduler.load_state_dict(meta["scheduler"])
        self.state = {k: meta[k] for k in self.state}
        self.resumed_stage = meta["stage_index"]
        log.info(
            "resumed from %s: step %d (%s step %d)", path, meta["global_step"], stage.name, meta["stage_step"]
        )

    def _init_weights(self, path: Path) -> None:
        """Model weights from a checkpoint directory, the latest checkpoint of a run, or (a directory
        with config.json and safetensors) the LLM's weights from a Hugging Face Qwen3-MoE checkpoint.
        Every rank loads the full weights before the layout is applied, so any layout works."""
        if (path / "config.json").is_file() and not (path / "meta.json").is_file():
            self._init_llm_from_hf(path)
            return
        if (path / "meta.json").is_file():
            ckpt = path
        else:
            ckpt = Checkpointer(path).latest() or Checkpointer(path / "checkpoints").latest()
        if ckpt is None:
            raise SetupError(
                f"--init {path}: no checkpoint there (expected a step_* directory or a run directory)"
            )
        meta = Checkpointer.read_meta(ckpt)
        if (
            meta.get("run", {}).get("vocab_size", self.model_cfg.llm.vocab_size)
            != self.model_cfg.llm.vocab_size
        ):
            raise SetupError(
                f"--init {ckpt}: written with another vocabulary than this run's preset and tokenizer"
            )
        Checkpointer.load_model(ckpt, self.model)
        log.info("initialised the model from %s (step %s)", ckpt, meta.get("global_step"))

    def _init_vit(self, path: Path) -> None:
        """The ViT's weights from a ViT pre-training run (trainer.vit_pretrain.export)."""
        from .vit_pretrain.export import load_pretrained_vit

        try:
            load_pretrained_vit(path, self.model.vit)
        except (FileNotFoundError, ValueError) as err:
            raise SetupError(str(err)) from err
        log.info("initialised the ViT from the pre-trained ViT of %s", path)

    def _set_trainable(self, stage: Stage) -> None:
        set_trainable(self.model, stage.trainable)
        if self.distributed:
            parallel.refresh_trainable(self.model)
            for module in self.pp_stages:
                parallel.refresh_trainable(module)

    def _init_llm_from_hf(self, path: Path) -> None:
        from model.hf import from_hf_state_dict, open_checkpoint

        _, tensors = open_checkpoint(path)
        llm = self.model.llm
        try:
            llm.load_state_dict(from_hf_state_dict(llm, tensors), strict=True)
        except (KeyError, RuntimeError) as err:
            raise SetupError(
                f"--init {path}: its weights do not fit preset {self.cfg.preset!r}'s LLM "
                f"(with tokenizer {self.cfg.tokenizer!r}): {str(err).strip()[:300]}"
            ) from err
        log.info("initialised the LLM from the Hugging Face checkpoint %s", path)

    def _enter_stage(self, index: int) -> None:
        """Freeze, build or keep the optimizer, start the LR schedule and the data at a new window."""
        stage = self.stages[index]
        self._set_trainable(stage)
        if self.optimizer is None or stage.reset_optimizer:
            self.optimizer = build_optimizer(self.model, stage, foreach=self.foreach)
        else:
            kept = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
            if kept != {id(p) for p in self.model.parameters() if p.requires_grad}:
                raise SetupError(
                    f"stage {stage.name}: reset_optimizer=False needs the previous stage's trainable parts"
                )
        self.scheduler = stage_scheduler(self.optimizer, stage)
        key = stage.data or self.cfg.data
        position = Position(*self.state["positions"].get(key, (0, 0))).next_window()
        self.state["positions"][key] = [position.window, position.bin]
        self.state.update(stage_index=index, stage_step=0)

    def save(self) -> Path:
        stage = self.stages[self.state["stage_index"]]
        meta = {
            **self.state,
            "stage": stage.name,
            "scheduler": self.scheduler.state_dict(),
            "run": self.signature,
            "config": as_dict(self.cfg),
        }
        return self.ckpt.save(
            self.state["global_step"], self.model, self.optimizer, meta,
            asynchronous=self.cfg.async_save, group=self._ckpt_group,
        )  # fmt: skip

    def _step(self, stage: Stage, batches: Prefetcher, key: str) -> dict:
        """One optimizer step over the stage's ``accum`` micro-batches (this rank's share of them);
        returns its log record."""
        t0 = time.time()
        micro = [next(batches) for _ in range(stage.accum // self.dims.dp)]
        wait = time.time() - t0
        lr = self.optimizer.param_groups[0]["lr"]
        batches_ = [b for b, _ in micro]
        if self.balance_rule != "off":
            batches_ = self.balancer.balance(batches_)
        counts, sums = self.forward_backward(stage, batches_)
        targets = max(1, counts["targets"])
        with nvtx_range("optimizer"):
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if self.pipeline is not None:
                grad_norm = parallel.pipeline.clip_grad_norm_(params, stage.grad_clip, self.meshes)
            else:
                grad_norm = parallel.clip_grad_norm_(params, stage.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        # A stop signal reaches the ranks at different moments; summing the flags with the step's
        # numbers makes every rank see it after the same step.
        sums = torch.cat([sums, sums.new_tensor([float(self._stop_signal is not None)])])
        if self.distributed:
            dist.all_reduce(sums)
        ce_sum, lb_sum, z_sum, stop = sums.tolist()  # the step's host synchronisation, for the log
        self._stop_agreed = stop > 0
        self.state["global_step"] += 1
        self.state["stage_step"] += 1
        self.state["tokens"] += counts["tokens"]
        self.state["positions"][key] = list(dataclasses.astuple(micro[-1][1]))
        loss_value = ce_sum / targets
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"step {self.state['global_step']} ({stage.name}): loss is {loss_value}")
        return {
            "step": self.state["global_step"], "stage": stage.name, "stage_step": self.state["stage_step"],
            "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
            "lb_loss": lb_sum / stage.accum, "z_loss": z_sum / stage.accum,
            "tokens": counts["tokens"], "rank_tokens": counts["rank_tokens"], "targets": targets,
            "model_flops": counts["flops"],
            "docs": counts["docs"], "images": counts["images"], "data_wait_s": round(wait, 4),
            **{k: counts[k] for k in _DIST_KEYS if k in counts},
        }  # fmt: skip

    def forward_backward(
        self, stage: Stage, micro: list[PackedBatch | parallel.BalancedBatch]
    ) -> tuple[dict, torch.Tensor]:
        """Accumulate the gradients of this rank's micro-batches of one step (balanced ones carry
        the images this rank encodes and their tokens' route); returns the step's global counts
        and this rank's (CE, balance, z) sums."""
        if any(isinstance(b, PartialBatch) for b in micro):
            micro = self.balancer.fill(micro)  # pixels decoded elsewhere in the loading group
        counts = self._global_counts(micro)
        targets = max(1, counts["targets"])
        if self.pipeline is not None:
            costs = [float(self.vit_cost.flops(b.vit_cu_seqlens.diff().numpy()).sum()) for b in micro]
            with nvtx_range("forward_backward"):
                sums = self.pipeline.step(
                    [b.to(self.device, non_blocking=True) for b in micro],
                    targets=targets, accum=stage.accum, budget=stage.seq_len, costs=costs,
                )  # fmt: skip
            return counts, sums
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # CE, balance, z
        for item in micro:
            item = item.to(self.device, non_blocking=True)
            batch = parallel.unwrap(item)
            # FSDP casts for itself; a single process casts through autocast.
            autocast = self.compute_dtype is not None and not self.distributed
            with (
                nvtx_range("forward"),
                torch.autocast(self.device.type, self.compute_dtype, enabled=autocast),
            ):
                out = self.model(**item.model_inputs())
                ce, loss = micro_batch_loss(
                    out, batch.labels, targets=targets, accum=stage.accum, llm=self.model_cfg.llm
                )
            with nvtx_range("backward"):
                loss.backward()
            with torch.no_grad():
                sums += torch.stack([ce, out.load_balancing_loss, out.router_z_loss]).double()
        return counts, sums

    def _global_counts(self, micro: list[PackedBatch | parallel.BalancedBatch]) -> dict:
        """The step's targets, tokens (padding excluded), documents and images over all ranks, and
        when distributed the ViT load imbalance and the bytes balancing moved; one all-gather of
        a few integers per rank (the loss normaliser must be the global target count).

        ``vit_imbalance`` is sum over micro-batches of (max over ranks of the ViT + adapter FLOPs
        a rank computes) / sum of their mean: the ViT's time against a perfect spread, as each
        micro-batch's ViT waits for its slowest rank at the FSDP collectives."""
        first_of_group = self.meshes is None or self.meshes.cp_rank == 0  # a cp group shares documents
        batches = [parallel.unwrap(b) for b in micro]
        balanced = [b for b in micro if isinstance(b, parallel.BalancedBatch)]
        itemsize = (self.compute_dtype or torch.float32).itemsize
        local = [
            sum(self.flops.batch(b) for b in batches),
            sum(b.num_targets for b in batches),
            sum(b.num_tokens if b.token_mask is None else int(b.token_mask.sum()) for b in batches),
            sum(b.num_documents for b in batches) if first_of_group else 0,
            sum(b.num_images for b in micro) if first_of_group else 0,  # the micro-batches' own
            sum(b.pixel_bytes for b in balanced),
            sum(b.token_rows for b in balanced) * self.model_cfg.llm.hidden * itemsize,
            *((self.balancer.last.decoded_bytes, self.balancer.last.sent_bytes) if self.balancer else (0, 0)),
        ]
        vit = [int(self.vit_cost.flops(b.vit_cu_seqlens.diff().numpy()).sum()) for b in batches]
        if self.meshes is not None and self.meshes.pp_rank > 0:  # the first pp rank counts the batches
            local, vit = [0] * len(local), [0] * len(vit)
        rank_tokens = sum(b.num_tokens for b in batches)
        names = ("flops", "targets", "tokens", "docs", "images", "vit_pixel_bytes", "vit_token_bytes",
                 "load_decoded_bytes", "load_sent_bytes")  # fmt: skip
        if not self.distributed:
            return dict(zip(names[:5], local[:5], strict=True), rank_tokens=rank_tokens)
        t = torch.tensor(local + vit, dtype=torch.int64, device=self.device)
        every = t.new_empty(dist.get_world_size() * t.numel())
        dist.all_gather_into_tensor(every, t)
        every = every.view(dist.get_world_size(), -1).cpu()
        out = dict(zip(names, every[:, : len(names)].sum(0).tolist(), strict=True), rank_tokens=rank_tokens)
        for k in (len(names) - 2, len(names) - 1):  # the busiest rank's share of the loading work
            out[names[k] + "_max"] = int(every[:, k].max())
        vit_all = every[:, len(names) :].double()
        mean = vit_all.mean(0).sum().item()
        out["vit_imbalance"] = round(vit_all.max(0).values.sum().item() / mean, 4) if mean > 0 else 1.0
        return out

    def train(self) -> dict:
        """Run the remaining stages; returns the summary (also written to <out>/summary.json)."""
        cfg, state = self.cfg, self.state
        n_params = sum(p.numel() for p in self.model.parameters())
        layout = f"; {self.dims} over {dist.get_world_size()} ranks" if self.distributed else ""
        if self.balancer is not None:
            layout += f", images balanced by {self.balance_rule} in groups of {self.balance_group}"
        log.info(
            "preset %s (%.2fM parameters, vocab %d), recipe %s: %s; data %s; device %s%s%s; out %s",
            cfg.preset, n_params / 1e6, self.model_cfg.llm.vocab_size, cfg.recipe,
            ", ".join(f"{s.name} {s.steps} steps x {s.accum} x {s.seq_len} tok, LR {s.lr_max:.2e}"
                      for s in self.stages),
            ", ".join(dict.fromkeys(s.data or cfg.data for s in self.stages)), self.device,
            " (deterministic)" if self.deterministic else "", layout, self.out,
        )  # fmt: skip
        if self.rank == 0:
            (self.out / "config.toml").write_text(dump_toml(cfg))  # set up and accepted: this is the run
            runlog = logs.RunLog(
                self.out, sum(s.steps for s in self.stages), state["global_step"],
                progress=cfg.progress, tensorboard=cfg.tensorboard,
            )  # fmt: skip
        else:
            runlog = logs.NullRunLog()
        profiler = StepProfiler(cfg.profile_steps if self.rank == 0 else None, self.out, cfg.profiler)
        self.peak = measure_peak(self.device, self.compute_dtype or torch.float32)
        if self.peak is not None:
            log.info("measured matmul peak %.0f TFLOP/s per device (MFU is against it)", self.peak / 1e12)
        t_start = time.time()
        restore = self._catch_stop_signals()
        try:
            for index in range(state["stage_index"], len(self.stages)):
                stage = self.stages[index]
                if index != self.resumed_stage:
                    self._enter_stage(index)
                if state["stage_step"] >= stage.steps:
                    continue
                key = stage.data or cfg.data
                batches = self._batches(stage, key)
                t_last = time.time()
                try:
                    while state["stage_step"] < stage.steps:
                        profiler.begin(state["global_step"] + 1)
                        record = self._step(stage, batches, key)
                        profiler.end(state["global_step"])
                        record.update(self._throughput(record, max(time.time() - t_last, 1e-9)))
                        runlog.step(record)
                        saved = None
                        if state["stage_step"] == stage.steps or state["global_step"] % cfg.ckpt_every == 0:
                            saved = self.save()
                        if self._stop_agreed:
                            saved = saved or self.save()
                            self.ckpt.finalize()
                            raise Preempted(self._stop_signal or "a stop signal", state["global_step"], saved)
                        if cfg.eval_every and state["global_step"] % cfg.eval_every == 0:
                            self._evaluate(runlog, PERIODIC_PER_SKILL)
                        t_last = time.time()
                finally:
                    batches.close()
                runlog.event(
                    "stage_end", stage=stage.name, step=state["global_step"], skipped=dict(self.skips.counts)
                )
            self.ckpt.finalize()
            final = self._evaluate(runlog, cfg.eval_samples)
        finally:
            restore()
            profiler.end(state["global_step"], force=True)
            runlog.close()
        return self._finish(time.time() - t_start, final)

    def _throughput(self, record: dict, step_s: float) -> dict:
        """Tokens/s (all ranks and this rank), model TFLOP/s and MFU against the measured peak of
        all ranks' devices, and the peak memory of this step on a GPU."""
        out = {
            "step_s": step_s,
            "tok_per_s": record["tokens"] / step_s,
            "tflops": record["model_flops"] / step_s / 1e12,
        }
        if self.distributed:
            out["rank_tok_per_s"] = record["rank_tokens"] / step_s
        if self.peak is not None:
            world = dist.get_world_size() if self.distributed else 1
            out["mfu"] = record["model_flops"] / step_s / (self.peak * world)
        if self.device.type == "cuda":
            out["mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
            torch.cuda.reset_peak_memory_stats(self.device)
        return out

    def _catch_stop_signals(self):
        """SIGTERM and SIGINT ask for a checkpoint at the next step boundary and a clean stop
        (preemption); a second SIGINT interrupts at once. Returns what restores the old handlers."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def request(signum, frame):
            name = signal.Signals(signum).name
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = name
            log.warning("%s: saving a checkpoint after this step, then stopping", name)

        old = {sig: signal.signal(sig, request) for sig in (signal.SIGTERM, signal.SIGINT)}
        return lambda: [signal.signal(sig, handler) for sig, handler in old.items()]

    def _heldout(self, per_skill: int) -> HeldOut:
        """The held-out set of ``per_skill`` questions per skill (or manifest samples), built once."""
        if per_skill not in self._heldouts:
            budget = max(s.seq_len for s in self.stages)
            last = self.stages[-1].data or self.cfg.data  # VST data: the skills the run ends on
            if is_vst_spec(last):
                held = vst_heldout(
                    last, self.tok, self.encode, seed=self.cfg.seed, per_skill=per_skill, budget=budget
                )
            elif self.cfg.data.partition(":")[0] == "spatial":
                held = HeldOut.spatial(
                    self.tok, self.encode, seed=self.cfg.seed, per_skill=per_skill, budget=budget
                )
            else:
                held = HeldOut.manifest(self.cfg.data, self.tok, self.encode, num=per_skill, budget=budget)
            self._heldouts[per_skill] = held
        return self._heldouts[per_skill]

    def _evaluate(self, runlog: logs.RunLog | logs.NullRunLog, per_skill: int) -> EvalResult | None:
        """Held-out loss and answers, on rank 0 (every rank takes part in gathering the weights)."""
        if per_skill <= 0:
            return None
        model = self._gathered_model()
        if self.rank != 0:
            return None
        result = self._heldout(per_skill).evaluate(model, self.device)
        runlog.eval(self.state["global_step"], result.loss, result.scores, result.scalars())
        return result

    def _finish(self, wall_s: float, final: EvalResult | None) -> dict:
        """Summary, plot and gallery, written by rank 0 (the others return {})."""
        if self.rank != 0:
            return {}
        records = logs.read_steps(self.out / "log.jsonl")
        latest = self.ckpt.latest()
        summary = {
            "out": str(self.out),
            "wall_s": round(wall_s, 1),
            "steps": self.state["global_step"],
            "tokens": self.state["tokens"],
            "stages": logs.stage_summary(records),
            "skipped": dict(self.skips.counts),
            "checkpoint": str(latest) if latest else None,
            "host": logs.host_info(self.device),
        }
        png = logs.plot_losses(
            records, self.out / "loss.png", logs.read_events(self.out / "log.jsonl", "eval")
        )
        summary["loss_plot"] = str(png) if png else None
        if final is not None:
            summary["eval"] = final.scores
            summary["eval_loss"] = final.loss
            title = f"step {self.state['global_step']}: {self._heldout(self.cfg.eval_samples).name}"
            summary["gallery"] = str(write_gallery(final.records, self.out / "eval_gallery.png", title=title))
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def _gathered_model(self) -> SeedVLM | None:
        """The model to evaluate on rank 0: itself in a single process; under a layout, a plain
        single-device copy of the full weights (gathered from every rank's shards, a collective),
        so evaluation runs on rank 0 alone without collectives. None on other ranks."""
        if not self.distributed:
            return self.model
        if self.pipeline is not None:
            full = parallel.pipeline.full_state_dict(self.model, self.meshes)
        else:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(self.model, options=options)
        if self.rank != 0:
            return None
        model = SeedVLM(self.model_cfg)
        model.load_state_dict(full)
        return model.to(self.device)

    def close(self, finished: bool = True) -> None:
        """Leave the process group; after a finished run, together (rank 0 may still be evaluating)."""
        if self.distributed and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def train(cfg: RunConfig) -> dict:
    """Set up (or resume) and run; returns the summary (empty on ranks other than 0). SetupError:
    the configuration is unusable."""
    from .vit_pretrain.loop import is_vit_stage, train_recipe

    if any(is_vit_stage(name.strip()) for name in RECIPES.get(cfg.recipe, cfg.recipe.split(","))):
        return train_recipe(cfg, train)  # ViT pre-training first (--recipe vit, full)
    run, finished = None, False
    try:
        run = Run(cfg)
        summary = run.train()
        finished = True
        return summary
    except Exception as err:
        if run is not None and run.distributed and not isinstance(err, Preempted):
            log.error(
                "rank %d stops at step %d: %s (a failed or stalled peer surfaces here, at the latest "
                "after --pg-timeout %g s)", run.rank, run.state["global_step"] + 1,
                str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__, cfg.pg_timeout,
            )  # fmt: skip
        raise
    finally:
        if run is not None:
            run.close(finished)
        elif dist.is_initialized():
            dist.destroy_process_group()
