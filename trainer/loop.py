"""The training loop: stages in order, one packed batch (or ``accum`` of them) per optimizer step.

Per stage: freeze what the stage does not train, start or keep the AdamW optimizer (stage 2 keeps
stage 1's), build the LR schedule, stream packed batches from the stage's start position, and
step. A frozen ViT runs under no_grad (nothing upstream needs its gradient); a frozen LLM still
runs backward, because the adapter's gradient passes through it.

The loss is the cross-entropy summed over the step's target tokens divided by their number (over
all micro-batches), plus the MoE balance and z-losses scaled by the config's coefficients. Each step
is wrapped in NVTX ranges (``forward``, ``backward``, ``optimizer``; torch profiler
record_function ranges as well), and ``profile_steps`` records steps a..b with the torch profiler,
or brackets them with cudaProfilerStart/Stop for ``nsys --capture-range=cudaProfilerApi``.
Training runs in fp32: under torch.autocast the model mixes dtypes (RMSNorm's fp32 weight promotes
q and k to fp32 while v stays bf16), which varlen_attention rightly rejects.

Checkpoints (trainer.checkpoint) carry the model, the optimizer, the scheduler, the data positions
and the RNG states; resuming rebuilds the stage's optimizer, loads them, and continues with the
batch after the last one trained, so a resumed run repeats an uninterrupted one's losses exactly in
deterministic mode.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from model.config import VLMConfig, get_preset
from model.preprocess import FACTOR, MAX_PIXELS
from model.vlm import SeedVLM

from . import logs
from .checkpoint import Checkpointer
from .data.chat import EncodeConfig, SkipLog
from .data.packer import IGNORE_INDEX, PackedBatch
from .data.stream import BatchStream, Position, Prefetcher, Source
from .data.tokenizer import Tokenizer, load_tokenizer, model_vocab_size
from .profiling import StepProfiler, nvtx_range
from .recipes import MODULES, Stage, apply_overrides, get_recipe, scale_to, with_steps

log = logging.getLogger("trainer")


@dataclass
class RunConfig:
    recipe: str = "vlm"
    preset: str = "seedvl-tiny"
    data: str = "spatial"  # "spatial" (embedded procedural data) or a JSONL manifest path
    tokenizer: str = "bytes"  # "bytes" or a local Hugging Face tokenizer directory
    out: Path | None = None  # default runs/<recipe>-<preset>
    steps: int | None = None  # total steps over all stages (proportions kept)
    tokens: int | None = None  # or a total token budget
    overrides: list[str] = field(default_factory=list)
    seed: int = 0
    device: str = "auto"
    deterministic: bool | None = None  # default: on for CPU, off for GPU
    resume: bool = False
    overwrite: bool = False
    init: Path | None = None  # start from the model weights of this checkpoint (or run directory)
    ckpt_every: int = 100
    keep: int = 2
    window: int = 256  # samples planned together by the packer
    max_pixels: int | None = None  # per-image pixel budget; default by preset
    eval_samples: int = 64  # held-out spatial questions answered at the end (spatial data only)
    profile_steps: tuple[int, int] | None = None
    profiler: str = "torch"  # "torch" (trace file) or "nsys" (cudaProfilerStart/Stop only)
    progress: bool = True
    tensorboard: bool = True
    prefetch: int = 2


class SetupError(RuntimeError):
    """The run cannot start as configured (unknown preset, bad override, unusable data, an occupied
    output directory, a checkpoint from another configuration); the message says what to change."""


# ----------------------------------------------------------------------------- model and optimizer


def build_model_config(preset: str, tok: Tokenizer) -> VLMConfig:
    """The preset with its vocabulary sized for ``tok`` and the placeholder id taken from it."""
    cfg = get_preset(preset)
    if not isinstance(cfg, VLMConfig):
        raise ValueError(
            f"preset {preset!r} is not a vision-language model (pick one starting with 'seedvl-')"
        )
    vocab = model_vocab_size(tok, cfg.llm.vocab_size)
    return replace(cfg, llm=replace(cfg.llm, vocab_size=vocab), image_token_id=tok.image_token_id)


def set_trainable(model: SeedVLM, trainable: tuple[str, ...]) -> None:
    for name in MODULES:
        getattr(model, name).requires_grad_(name in trainable)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: matrices (and expert stacks) decay; biases and norm
    weights -- every parameter with fewer than 2 dimensions -- do not (paper §3.2)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, stage: Stage) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, stage.weight_decay), lr=stage.lr_max, betas=stage.betas, eps=1e-8
    )


def stage_scheduler(optimizer: torch.optim.Optimizer, stage: Stage) -> torch.optim.lr_scheduler.LambdaLR:
    for group in optimizer.param_groups:  # a kept optimizer must not keep the last stage's base LR
        group["lr"] = group["initial_lr"] = stage.lr_max
    return torch.optim.lr_scheduler.LambdaLR(optimizer, stage.lr_factor)


# ----------------------------------------------------------------------------- one step


def forward_loss(
    model: SeedVLM, batch: PackedBatch, *, vit_frozen: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed CE over the batch's targets, load-balancing loss, z-loss) of one packed batch."""
    visual = None
    if batch.num_images:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not vit_frozen):
            feats = model.vit(batch.patches, batch.pos_hw, batch.vit_cu_seqlens, batch.vit_max_seqlen)
        visual = model.adapter(feats)
    embeds = model.embed(batch.input_ids, visual)
    out = model.llm(None, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, inputs_embeds=embeds)
    ce = F.cross_entropy(out.logits.float(), batch.labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return ce, out.load_balancing_loss, out.router_z_loss


# ----------------------------------------------------------------------------- the run


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _source(spec: str, seed: int, skips: SkipLog) -> Source:
    if spec == "spatial":
        from .data.spatial import SpatialDataset

        return SpatialDataset(seed)
    from .data.manifest import ManifestDataset

    return ManifestDataset(spec, skips=skips)


def _signature(cfg: RunConfig, model_cfg: VLMConfig, stages: tuple[Stage, ...]) -> dict:
    """What a resumed run must share with the checkpoint's run."""
    return {
        "preset": cfg.preset,
        "tokenizer": cfg.tokenizer,
        "vocab_size": model_cfg.llm.vocab_size,
        "seed": cfg.seed,
        "window": cfg.window,
        "stages": [dataclasses.asdict(s) for s in stages],
    }


def _check_resume(saved: dict, current: dict, path: Path) -> None:
    for key in ("preset", "tokenizer", "vocab_size"):
        if saved.get(key) != current[key]:
            raise SetupError(
                f"--resume: checkpoint {path} was written with {key}={saved.get(key)!r}, this run has "
                f"{key}={current[key]!r}; use the same settings or another --out"
            )
    for key in ("seed", "window", "stages"):
        if saved.get(key) != current[key]:
            log.warning(
                "--resume: %s differs from the checkpoint's run; batches or LRs will not repeat it", key
            )


def prepare_out_dir(cfg: RunConfig) -> Path:
    out = cfg.out if cfg.out is not None else Path("runs") / f"{cfg.recipe.replace(',', '+')}-{cfg.preset}"
    ckpts = Checkpointer(out / "checkpoints")
    previous = ckpts.latest() is not None or (out / "log.jsonl").exists()
    if previous and cfg.overwrite:
        for name in ("checkpoints", "tensorboard", "profile"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("log.jsonl", "train.log", "loss.png", "summary.json"):
            (out / name).unlink(missing_ok=True)
    elif previous and not cfg.resume:
        raise SetupError(
            f"{out} holds a previous run; pass --resume to continue it, --overwrite to start over, "
            "or --out DIR for a new one"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


class Run:
    """One training run: set up from a RunConfig (or resume), then :meth:`train` through the stages."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.out = prepare_out_dir(cfg)
        logs.setup_logging(self.out)
        self.device = _device(cfg.device)
        self.skips = SkipLog(logging.getLogger("trainer.data"))
        try:
            self.tok = load_tokenizer(cfg.tokenizer)
            self.model_cfg = build_model_config(cfg.preset, self.tok)
            stages = scale_to(get_recipe(cfg.recipe), self.model_cfg)
            self.stages = apply_overrides(with_steps(stages, cfg.steps, cfg.tokens), cfg.overrides)
            tiny = self.model_cfg.llm.hidden < 2048
            self.encode = EncodeConfig(
                max_pixels=cfg.max_pixels or (64 * FACTOR * FACTOR if tiny else MAX_PIXELS)
            )
            keys = dict.fromkeys(s.data or cfg.data for s in self.stages)
            self.streams = {key: self._stream(key) for key in keys}
        except (KeyError, ValueError, FileNotFoundError, ImportError) as err:
            raise SetupError(str(err).strip("'\"")) from err

        self.deterministic = cfg.deterministic if cfg.deterministic is not None else self.device.type == "cpu"
        if self.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.seed)
        self.model = SeedVLM(self.model_cfg).to(self.device)
        self.model.train()
        self.signature = _signature(cfg, self.model_cfg, self.stages)
        self.ckpt = Checkpointer(self.out / "checkpoints", cfg.keep)
        self.state = {"global_step": 0, "stage_index": 0, "stage_step": 0, "positions": {}, "tokens": 0}
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.resumed_stage: int | None = None
        if cfg.resume:
            self._resume()
        if cfg.init is not None and self.resumed_stage is None:
            self._init_weights(Path(cfg.init))

    def _stream(self, key: str) -> BatchStream:
        source = _source(key, self.cfg.seed, self.skips)
        return BatchStream(
            source, self.tok, seed=self.cfg.seed, window=self.cfg.window, encode=self.encode, skips=self.skips
        )

    def _resume(self) -> None:
        path = self.ckpt.latest()
        if path is None:
            log.info("--resume: no checkpoint in %s; starting from scratch", self.ckpt.root)
            return
        meta = Checkpointer.read_meta(path)
        _check_resume(meta["run"], self.signature, path)
        stage = self.stages[meta["stage_index"]]
        set_trainable(self.model, stage.trainable)
        self.optimizer = build_optimizer(self.model, stage)
        meta = Checkpointer.load(path, self.model, self.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, stage.lr_factor)
        self.scheduler.load_state_dict(meta["scheduler"])
        self.state = {k: meta[k] for k in self.state}
        self.resumed_stage = meta["stage_index"]
        log.info(
            "resumed from %s: step %d (%s step %d)", path, meta["global_step"], stage.name, meta["stage_step"]
        )

    def _init_weights(self, path: Path) -> None:
        """Model weights from a checkpoint directory, or from the latest checkpoint of a run."""
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

    def _enter_stage(self, index: int) -> None:
        """Freeze, build or keep the optimizer, start the LR schedule and the data at a new window."""
        stage = self.stages[index]
        set_trainable(self.model, stage.trainable)
        if self.optimizer is None or stage.reset_optimizer:
            self.optimizer = build_optimizer(self.model, stage)
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
        }
        return self.ckpt.save(self.state["global_step"], self.model, self.optimizer, meta)

    def _step(self, stage: Stage, batches: Prefetcher, key: str) -> dict:
        """One optimizer step over ``stage.accum`` packed micro-batches; returns its log record."""
        t0 = time.time()
        micro = [next(batches) for _ in range(stage.accum)]
        wait = time.time() - t0
        targets = max(1, sum(b.num_targets for b, _ in micro))
        lr = self.optimizer.param_groups[0]["lr"]
        llm = self.model_cfg.llm
        vit_frozen = "vit" not in stage.trainable
        ce_sum = lb_sum = z_sum = 0.0
        for batch, _ in micro:
            batch = batch.to(self.device, non_blocking=True)
            with nvtx_range("forward"):
                ce, lb, z = forward_loss(self.model, batch, vit_frozen=vit_frozen)
                loss = ce / targets + (llm.aux_loss_coef * lb + llm.z_loss_coef * z) / stage.accum
            with nvtx_range("backward"):
                loss.backward()
            ce_sum, lb_sum, z_sum = ce_sum + ce.detach(), lb_sum + lb.detach(), z_sum + z.detach()
        with nvtx_range("optimizer"):
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        tokens = sum(b.num_tokens for b, _ in micro)
        self.state["global_step"] += 1
        self.state["stage_step"] += 1
        self.state["tokens"] += tokens
        self.state["positions"][key] = list(dataclasses.astuple(micro[-1][1]))
        loss_value = float(ce_sum) / targets  # the step's one host synchronisation, for the log
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"step {self.state['global_step']} ({stage.name}): loss is {loss_value}")
        return {
            "step": self.state["global_step"], "stage": stage.name, "stage_step": self.state["stage_step"],
            "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
            "lb_loss": float(lb_sum) / stage.accum, "z_loss": float(z_sum) / stage.accum,
            "tokens": tokens, "targets": targets, "docs": sum(b.num_documents for b, _ in micro),
            "images": sum(b.num_images for b, _ in micro), "data_wait_s": round(wait, 4),
        }  # fmt: skip

    def train(self) -> dict:
        """Run the remaining stages; returns the summary (also written to <out>/summary.json)."""
        cfg, state = self.cfg, self.state
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info(
            "preset %s (%.2fM parameters, vocab %d), recipe %s: %s; data %s; device %s%s; out %s",
            cfg.preset, n_params / 1e6, self.model_cfg.llm.vocab_size, cfg.recipe,
            ", ".join(f"{s.name} {s.steps} steps x {s.seq_len} tok, LR {s.lr_max:.2e}" for s in self.stages),
            cfg.data, self.device, " (deterministic)" if self.deterministic else "", self.out,
        )  # fmt: skip
        runlog = logs.RunLog(
            self.out, sum(s.steps for s in self.stages), state["global_step"],
            progress=cfg.progress, tensorboard=cfg.tensorboard,
        )  # fmt: skip
        profiler = StepProfiler(cfg.profile_steps, self.out, cfg.profiler)
        t_start = time.time()
        try:
            for index in range(state["stage_index"], len(self.stages)):
                stage = self.stages[index]
                if index != self.resumed_stage:
                    self._enter_stage(index)
                if state["stage_step"] >= stage.steps:
                    continue
                key = stage.data or cfg.data
                start = Position(*state["positions"][key])
                batches = Prefetcher(
                    self.streams[key].batches(start, stage.seq_len, min_level=stage.min_level),
                    depth=cfg.prefetch,
                    pin=self.device.type == "cuda",
                )
                t_last = time.time()
                try:
                    while state["stage_step"] < stage.steps:
                        profiler.begin(state["global_step"] + 1)
                        record = self._step(stage, batches, key)
                        profiler.end(state["global_step"])
                        now = time.time()
                        record["tok_per_s"] = record["tokens"] / max(now - t_last, 1e-9)
                        t_last = now
                        runlog.step(record)
                        if state["stage_step"] == stage.steps or state["global_step"] % cfg.ckpt_every == 0:
                            self.save()
                finally:
                    batches.close()
                runlog.event(
                    "stage_end", stage=stage.name, step=state["global_step"], skipped=dict(self.skips.counts)
                )
        finally:
            profiler.end(state["global_step"], force=True)
            runlog.close()
        return self._finish(time.time() - t_start)

    def _finish(self, wall_s: float) -> dict:
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
        }
        png = logs.plot_losses(records, self.out / "loss.png")
        summary["loss_plot"] = str(png) if png else None
        if self.cfg.eval_samples > 0 and self.cfg.data == "spatial":
            from .evaluate import evaluate_spatial

            summary["eval"] = evaluate_spatial(
                self.model, self.tok, seed=self.cfg.seed, num=self.cfg.eval_samples, encode=self.encode,
                device=self.device,
            )  # fmt: skip
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary


def train(cfg: RunConfig) -> dict:
    """Set up (or resume) and run; returns the summary. SetupError: the configuration is unusable."""
    return Run(cfg).train()
