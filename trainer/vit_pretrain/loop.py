"""The ViT pre-training loop, and the ``full`` recipe (ViT pre-training, then the VLM stages).

Stages (trainer.recipes: ``vit_mim``, ``vit_contrastive``, ``vit_video``):

- ``vit_mim``: the ViT and the MIM decoder train; a step is ``seq_len`` patches of images, 75% of
  each image's patches masked (losses.mask_packed), cosine loss to the targets at the masked places.
- ``vit_contrastive``: the ViT, the attention-pooling head, the text encoder, the SuperClass head
  and the SigLIP head (temperature and bias) train; a step is ``seq_len`` patches of images, each
  with a caption drawn for it; loss = SigLIP + SuperClass (weight ``SUPERCLASS_WEIGHT``).
- ``vit_video``: as the contrastive stage, over clips: every frame is one ViT sequence, the patches
  of a clip's frames, each with its timestamp's embedding added, pool into one video embedding.

The batch is the step's images (or clips) and their captions; every other caption of the step is
a negative (losses docstring).

Data parallelism: under ``torchrun --nproc-per-node=W trainer/run.py --recipe vit`` the stages run
over W ranks (``--parallel dp=W``, the default; cp, ep and pp split the LLM and do not apply). A
step's global batch is the single process's: every rank draws the same images and captions, takes
its contiguous share (:func:`data.shard_bounds`), and the embeddings are gathered before their
batch normalisation, so every image meets every caption of the global batch; MIM's mask is drawn
for the global batch and each rank keeps its images' part. Each tower and head is an FSDP2 unit
over the ranks (ZeRO-3; every ViT block its own), gradients are summed (the losses are normalised
by global counts), and the run matches the single process up to the order of floating-point sums
(tests/test_trainer_vit_pretrain.py). Rank 0 logs, evaluates on a gathered copy of the weights and
writes the summary and the ViT.

Precision (``--mixed-precision``, as for the VLM stages: default bf16 on a GPU, fp32 on a CPU):
the towers and heads compute in bf16 (one process: ``torch.autocast``; under torchrun: FSDP's bf16
gathers, except the SigLIP head's two scalars), with fp32 weights, gradients and optimizer. The
embeddings go to fp32 before their gather and batch normalisation, and the logits and losses are
fp32.

Learning rates scale with the ViT width (:func:`scale_vit_stages`). Each stage starts a fresh
AdamW. Checkpoints (trainer.checkpoint) hold the model with its heads, the optimizer and the
scheduler; ``--resume`` continues, and as a step's batch is a function of (seed, stage, step)
it repeats an uninterrupted run's batches. At the end: zero-shot classification on held-out
scenes (trainer.vit_pretrain.zeroshot; also every ``--eval-every`` steps of the contrastive and
video stages), ``summary.json``, ``loss.png``, ``eval_gallery.png`` and the ViT in ``seedvit/``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from model.config import ViTConfig, VLMConfig, get_preset
from model.preprocess import pack_images
from model.vit_heads import PretrainConfig, SeedViTPretrain

from .. import logs, parallel
from ..checkpoint import Checkpointer
from ..components import _device, compute_dtype, param_groups, prepare_run_dir, stage_scheduler
from ..config import RunConfig, SetupError, as_dict, validate
from ..gallery import write_gallery
from ..recipes import Stage, apply_overrides, get_recipe, with_steps
from . import zeroshot
from .data import CaptionTokenizer, ImageBank, VideoBank, pack_text, pack_videos, shard_bounds
from .export import save_pretrained_vit
from .losses import (
    gather_embeddings,
    idf_weights,
    mask_packed,
    mim_loss,
    same_caption,
    siglip_loss,
    superclass_loss,
)
from .teacher import HOGTargets, load_targets

log = logging.getLogger("trainer")

MASK_RATIO = 0.75  # paper §2.1.2
SUPERCLASS_WEIGHT = 1.0
REFERENCE_WIDTH = 1280  # SeedViT-532M: the width at which Table 2's learning rates apply
# Runs of hundreds of steps instead of the paper's 10^4-10^5, measured on the tiny preset: the
# contrastive stage at 1/width alone (2e-3) was still at chance after 150 steps, 5e-3 learned; the
# video stage, 40 steps after it, at 2.5e-3 undid part of it (count 0.62 -> 0.45), at 5e-4 not.
SHORT_RUN_LR = {"vit_mim": 2.5, "vit_contrastive": 2.5, "vit_video": 0.5}
LR_CAP = 5e-3  # MIM's 7.06e-3 x 20 x 2.5 would be 0.35
IMAGE_BANK = 2000  # rendered scenes the image stages draw from
VIDEO_BANK = 240  # rendered clips
IDF_CAPTIONS = 4096  # captions whose document frequencies give SuperClass's idf
ZERO_SHOT_PER_CLASS = 50
TRAINS = {  # which parts of SeedViTPretrain each kind of stage trains
    "vit_mim": ("vit", "mim"),
    "vit_contrastive": ("vit", "pool", "text", "superclass", "siglip"),
    "vit_video": ("vit", "pool", "time", "text", "superclass", "siglip"),
}
VIDEO_IMAGE_SHARE = 0.5  # of vit_video's patch budget spent on image-text pairs (see _step)


def is_vit_stage(name: str) -> bool:
    return name in TRAINS


def scale_vit_stages(stages: tuple[Stage, ...], vit: ViTConfig) -> tuple[Stage, ...]:
    """LRs x (1280 / width) -- the 1/width rule of trainer.recipes, from SeedViT's width -- x the
    stage's ``SHORT_RUN_LR``, capped at ``LR_CAP`` (lr_min scaled by the same factor)."""
    out = []
    for s in stages:
        mult = REFERENCE_WIDTH / vit.width * SHORT_RUN_LR.get(s.name, 1.0)
        lr_max = min(s.lr_max * mult, LR_CAP)
        out.append(replace(s, lr_max=lr_max, lr_min=s.lr_min * lr_max / s.lr_max))
    return tuple(out)


def vit_config_of(preset: str) -> ViTConfig:
    cfg = get_preset(preset)
    if isinstance(cfg, VLMConfig):
        return cfg.vit
    if isinstance(cfg, ViTConfig):
        return cfg
    raise ValueError(f"preset {preset!r} has no ViT (pick a seedvl-* or a ViT preset)")


class ViTRun:
    """A run of the ViT pre-training stages of ``cfg.recipe``."""

    def __init__(self, cfg: RunConfig) -> None:
        validate(cfg)
        try:
            dims = parallel.ParallelDims.parse(cfg.parallel)
            if dims.pp > 1 or dims.cp > 1 or dims.ep > 1:
                raise parallel.LayoutError(
                    f"--parallel {cfg.parallel}: ViT pre-training is data parallel only (--parallel "
                    "dp=N over N processes, or leave it out); cp, ep and pp split the LLM, which these "
                    "stages do not train"
                )
            self.distributed = parallel.check_launch(dims)
            world = int(os.environ["WORLD_SIZE"]) if self.distributed else 1
            if cfg.parallel is None:
                dims = parallel.ParallelDims(dp=world)
            dims.validate(world, num_experts=0, moe=False, accums={})
        except parallel.LayoutError as err:
            raise SetupError(str(err)) from err
        if cfg.data.partition(":")[0] == "vst":
            raise SetupError(
                f"--data {cfg.data}: ViT pre-training reads captioned images from 'spatial' or a JSONL "
                "manifest; VST data are question-answer conversations for the VLM stages"
            )
        self.cfg = cfg
        self.device = _device(cfg.device, int(os.environ["LOCAL_RANK"]) if self.distributed else None)
        self.rank, self.world = 0, world
        if self.distributed:
            if not dist.is_initialized():  # (a caller may have joined it already)
                parallel.init_distributed(self.device, cfg.pg_timeout)
            self.rank = dist.get_rank()
        self.out = prepare_run_dir(cfg, self.rank)
        try:
            self.vit_cfg = vit_config_of(cfg.preset)
            stages = get_recipe(cfg.recipe)
            if not all(is_vit_stage(s.name) for s in stages):
                raise ValueError(f"recipe {cfg.recipe!r}: ViTRun runs ViT stages only")
            stages = with_steps(scale_vit_stages(stages, self.vit_cfg), cfg.steps, cfg.tokens)
            self.stages = apply_overrides(stages, cfg.overrides)
            self.targets = load_targets(cfg.teacher, self.device) if "vit_mim" in self._names else None
        except (KeyError, ValueError, FileNotFoundError, ImportError) as err:
            raise SetupError(str(err)[1:-1] if isinstance(err, KeyError) else str(err)) from err
        if cfg.deterministic is not False and self.device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.seed)
        self.tok = CaptionTokenizer()
        target_dim = HOGTargets.feature_dim if self.targets is None else self.targets.feature_dim
        # Every rank builds the same model (same seed); sharding then keeps each rank's part.
        self.model = SeedViTPretrain(PretrainConfig(self.vit_cfg, self.tok.vocab_size, target_dim)).to(
            self.device
        )
        self.compute_dtype = compute_dtype(cfg.mixed_precision, self.device)
        if self.distributed:
            m = self.model
            mesh = dims.build(self.device.type).world  # ("dp_cp",): every rank, dp of them
            # The SigLIP head's two scalars stay fp32: its logits are computed in fp32 either way.
            fully_shard(m.siglip, mesh=mesh, mp_policy=MixedPrecisionPolicy())
            units = [*m.vit.blocks, m.vit, m.mim, m.pool, m.time, m.text, m.superclass]
            parallel.shard_units(m, units, mesh, parallel.mixed_precision(self.compute_dtype))
        t0 = time.time()
        if cfg.data.partition(":")[0] == "spatial":  # its question options do not apply here
            self.images = ImageBank.scenes(cfg.seed, IMAGE_BANK, max_pixels=cfg.max_pixels)
        else:
            self.images = ImageBank.manifest(cfg.data, cfg.max_pixels)
        video = "vit_video" in self._names
        self.videos = VideoBank.clips(cfg.seed, VIDEO_BANK) if video else None
        self.sets = (  # evaluated on rank 0 alone
            zeroshot.build_sets(cfg.seed, ZERO_SHOT_PER_CLASS, video=video)
            if cfg.eval_samples and self.rank == 0
            else {}
        )
        rng = np.random.default_rng([cfg.seed, 3001])
        draws = rng.integers(len(self.images.items), size=IDF_CAPTIONS)
        self.idf = idf_weights(pack_text([self.images.caption(int(i), rng) for i in draws], self.tok).bags)
        log.info(
            "data: %d images%s, %d held-out zero-shot examples, built in %.1f s",
            len(self.images.items), f", {len(self.videos.items)} clips" if video else "",
            sum(len(s.labels) for s in self.sets.values()), time.time() - t0,
        )  # fmt: skip
        self.ckpt = Checkpointer(self.out / "checkpoints", cfg.keep)
        self.state = {"global_step": 0, "stage_index": 0, "stage_step": 0, "tokens": 0}
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self._image_targets: dict[int, torch.Tensor] = {}  # teacher-free MIM targets per bank image
        if cfg.resume:
            self._resume()

    @property
    def _names(self) -> list[str]:
        return [s.name for s in self.stages]

    def _signature(self) -> dict:
        return {
            "preset": self.cfg.preset, "data": self.cfg.data, "seed": self.cfg.seed,
            "teacher": str(self.cfg.teacher), "stages": [dataclasses.asdict(s) for s in self.stages],
        }  # fmt: skip

    # ------------------------------------------------------------------ stages

    def _enter(self, index: int) -> None:
        stage = self.stages[index]
        parts = TRAINS[stage.name]
        for name, p in self.model.named_parameters():
            p.requires_grad_(name.split(".")[0] in parts)
        if self.distributed:  # the gradient dtypes of units that start or stop training
            parallel.refresh_trainable(self.model)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, stage.weight_decay), lr=stage.lr_max, betas=stage.betas, eps=1e-8
        )
        self.scheduler = stage_scheduler(self.optimizer, stage)

    def _resume(self) -> None:
        path = self.ckpt.latest_good()
        if path is None:
            log.warning("--resume: no checkpoint in %s; starting from scratch", self.ckpt.root)
            return
        meta = Checkpointer.read_meta(path)
        if json.loads(json.dumps(self._signature())) != meta["run"]:
            raise SetupError(f"--resume: {path} was written by another configuration; use its config.toml")
        self._enter(meta["stage_index"])
        meta = Checkpointer.load(path, self.model, self.optimizer)
        self.scheduler.load_state_dict(meta["scheduler"])
        self.state = {k: meta[k] for k in self.state}
        log.info("resumed from %s: step %d", path, self.state["global_step"])

    def _save(self) -> Path:
        meta = {
            **self.state, "stage": self.stages[self.state["stage_index"]].name,
            "scheduler": self.scheduler.state_dict(), "run": self._signature(), "config": as_dict(self.cfg),
        }  # fmt: skip
        return self.ckpt.save(self.state["global_step"], self.model, self.optimizer, meta)

    # ------------------------------------------------------------------ steps

    def _shares(self, lengths: list[int]) -> list[tuple[int, int]]:
        """Every rank's contiguous share (start, stop) of a step's items, in rank order."""
        try:
            return shard_bounds(lengths, self.world)
        except ValueError as err:
            raise SetupError(f"step {self.state['global_step'] + 1}: {err}") from err

    def forward(self, stage: Stage) -> tuple[torch.Tensor, dict[str, torch.Tensor], int, int]:
        """The loss of this step of ``stage`` (this rank's share), its parts, and the global batch's
        patches and images (or clips). The batch is a function of (seed, stage, step).
        ``--mixed-precision bf16``: the towers compute in bf16 (a single process: autocast; under
        torchrun: FSDP's bf16 gathers), the embeddings, logits and losses in fp32."""
        # FSDP casts for itself; a single process casts through autocast.
        autocast = self.compute_dtype is not None and not self.distributed
        with torch.autocast(self.device.type, self.compute_dtype, enabled=autocast):
            return self._forward(stage)

    def _forward(self, stage: Stage) -> tuple[torch.Tensor, dict[str, torch.Tensor], int, int]:
        rng = np.random.default_rng([self.cfg.seed, self.state["stage_index"], self.state["stage_step"]])
        dev = self.device
        parts: dict[str, torch.Tensor] = {}
        if stage.name == "vit_mim":
            idx = self.images.draw(rng, stage.seq_len)
            lengths = [int(self.images.lengths[i]) for i in idx]
            cu_all = torch.zeros(len(idx) + 1, dtype=torch.int32)
            cu_all[1:] = torch.tensor(lengths).cumsum(0)
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            # The mask is the global batch's, drawn alike on every rank; each keeps its images' part.
            keep_all, masked_all, cu_keep_all, _ = mask_packed(cu_all, MASK_RATIO, gen)
            a, b = self._shares(lengths)[self.rank]
            lo, hi = int(cu_all[a]), int(cu_all[b])
            keep = keep_all[(keep_all >= lo) & (keep_all < hi)] - lo
            masked = masked_all[(masked_all >= lo) & (masked_all < hi)] - lo
            cu_keep = cu_keep_all[a : b + 1] - cu_keep_all[a]
            packed = pack_images([self.images.items[i].patches for i in idx[a:b]])
            target = self._mim_targets(idx[a:b], packed).to(dev)
            patches, pos, cu = packed.patches.to(dev), packed.pos_hw.to(dev), packed.cu_seqlens.to(dev)
            keep = keep.to(dev)
            enc = self.model.vit(patches[keep], pos[keep], cu_keep.to(dev), int(cu_keep.diff().max()))
            pred = self.model.mim(enc, keep, pos, cu, packed.max_seqlen)
            loss = mim_loss(pred, target, masked.to(dev), total=masked_all.numel())
            tokens, count = int(cu_all[-1]), len(idx)
        elif stage.name == "vit_contrastive":
            sig, sc, tokens, count = self._pairs(rng, stage.seq_len, video=False)
            loss = sig + SUPERCLASS_WEIGHT * sc
            parts = {"siglip": sig, "superclass": sc}
        else:
            # Clips, and image-text pairs beside them, so that the image side keeps its alignment
            # (the paper's stage has many more image-text pairs before it than this short run).
            image_budget = round(stage.seq_len * VIDEO_IMAGE_SHARE)
            sig, sc, tokens, count = self._pairs(rng, stage.seq_len - image_budget, video=True)
            isig, isc, itokens, _ = self._pairs(rng, image_budget, video=False)
            loss = sig + SUPERCLASS_WEIGHT * sc + isig + SUPERCLASS_WEIGHT * isc
            tokens += itokens
            parts = {"siglip": sig, "superclass": sc, "image_siglip": isig}
        return loss, parts, tokens, count

    def _step(self, stage: Stage) -> dict:
        loss, parts, tokens, count = self.forward(stage)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = parallel.clip_grad_norm_(params, stage.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        # Each rank's losses are its share of the batch's; their sum over the ranks is the batch's.
        values = torch.stack([loss.detach(), *(v.detach() for v in parts.values())]).float()
        if self.distributed:
            dist.all_reduce(values)
        value, *rest = values.tolist()
        logged = dict(zip(parts, rest, strict=True))
        if stage.name != "vit_mim":
            scale = self.model.siglip.scale.detach()
            scale = scale.full_tensor() if isinstance(scale, DTensor) else scale
            logged["logit_scale"] = float(scale.exp())
        if not math.isfinite(value):
            raise FloatingPointError(f"step {self.state['global_step'] + 1} ({stage.name}): loss is {value}")
        self.state["global_step"] += 1
        self.state["stage_step"] += 1
        self.state["tokens"] += tokens
        return {
            "step": self.state["global_step"], "stage": stage.name, "stage_step": self.state["stage_step"],
            "loss": value, "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens, "images": count,
            **logged,
        }  # fmt: skip

    def _mim_targets(self, idx: list[int], packed) -> torch.Tensor:
        """The teacher's features of the packed images, or their HOG and colour (once per image)."""
        if not isinstance(self.targets, HOGTargets):
            return self.targets(packed)
        for i in idx:
            if i not in self._image_targets:
                self._image_targets[i] = self.targets(pack_images([self.images.items[i].patches]))
        return torch.cat([self._image_targets[i] for i in idx])

    def _pairs(self, rng: np.random.Generator, budget: int, *, video: bool):
        """(SigLIP loss, SuperClass loss, patches, pairs) of a batch of image- or clip-text pairs
        within ``budget`` patches: this rank's share of the losses (module docstring), and the
        global batch's patches and pairs."""
        dev = self.device
        bank = self.videos if video else self.images
        idx = bank.draw(rng, budget)
        captions = [bank.caption(i, rng) for i in idx]
        lengths = [int(bank.lengths[i]) for i in idx]
        shares = self._shares(lengths)
        a, b = shares[self.rank]
        sizes = [stop - start for start, stop in shares]
        gather = functools.partial(gather_embeddings, sizes=sizes) if self.distributed else None
        if video:
            vb = pack_videos([self.videos.items[i] for i in idx[a:b]])
            f = vb.frames
            x = self.model.encode_images(
                f.patches.to(dev), f.pos_hw.to(dev), f.cu_seqlens.to(dev), f.max_seqlen,
                frame_times=vb.frame_times.to(dev), cu_videos=vb.cu_videos.to(dev), max_video=vb.max_video,
                gather=gather,
            )  # fmt: skip
        else:
            f = pack_images([self.images.items[i].patches for i in idx[a:b]])
            x = self.model.encode_images(
                f.patches.to(dev), f.pos_hw.to(dev), f.cu_seqlens.to(dev), f.max_seqlen, gather=gather
            )
        text = pack_text(captions[a:b], self.tok)
        t = self.model.encode_text(
            text.ids.to(dev), text.cu_seqlens.to(dev), text.max_seqlen, video=video, gather=gather
        )
        # x and t hold the global batch's rows; this rank scores its own images against every caption.
        positives = same_caption(captions)[a:b].to(dev)
        sig = siglip_loss(self.model.siglip(x[a:b], t), positives, n=len(idx))
        sc = superclass_loss(self.model.superclass(x[a:b]), text.bags.to(dev), self.idf.to(dev), n=len(idx))
        return sig, sc, sum(lengths), len(idx)

    def _plain_model(self) -> SeedViTPretrain | None:
        """The model to evaluate and export on rank 0: itself in one process; under torchrun a plain
        copy of the full weights, gathered from every rank's shards (a collective: every rank
        calls it), so rank 0 evaluates alone. None on the other ranks."""
        if not self.distributed:
            return self.model
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.model, options=options)
        if self.rank != 0:
            return None
        model = SeedViTPretrain(self.model.cfg)
        model.load_state_dict(full)
        return model.to(self.device)

    def _evaluate(self, runlog: logs.RunLog | logs.NullRunLog):
        """Zero-shot scores on rank 0 (every rank must call it: the weights are gathered first)."""
        if self.cfg.eval_samples:
            self._score(runlog, self._plain_model())

    def _score(self, runlog: logs.RunLog | logs.NullRunLog, model: SeedViTPretrain | None):
        """Zero-shot scores of ``model`` (:meth:`_plain_model`'s), logged; None on ranks other than
        0 and without held-out sets."""
        if model is None or not self.sets:
            return None
        scores, records = zeroshot.evaluate(model, self.sets, self.tok, self.device)
        scalars = {f"eval/zero_shot/{k}": v["accuracy"] for k, v in scores.items()}
        runlog.eval(self.state["global_step"], None, scores, scalars)
        log.info(
            "step %d zero-shot top-1 (chance): %s", self.state["global_step"],
            ", ".join(f"{k} {v['accuracy']:.2f} ({v['baseline']:.2f})" for k, v in scores.items()),
        )  # fmt: skip
        return scores, records

    def train(self) -> dict:
        cfg, state = self.cfg, self.state
        n = sum(p.numel() for p in self.model.vit.parameters())
        log.info(
            "ViT pre-training of %s's ViT (%.2fM parameters; heads %.2fM), recipe %s: %s; "
            "MIM targets %s; %s compute; out %s",
            cfg.preset, n / 1e6, sum(p.numel() for p in self.model.parameters()) / 1e6 - n / 1e6, cfg.recipe,
            ", ".join(f"{s.name} {s.steps} steps x {s.seq_len} patches, LR {s.lr_max:.2e}"
                      for s in self.stages),
            getattr(self.targets, "name", "-"), "bf16" if self.compute_dtype else "fp32", self.out,
        )  # fmt: skip
        if self.distributed:
            log.info("data parallel over %d ranks (FSDP2 units: each ViT block, tower and head)", self.world)
        runlog: logs.RunLog | logs.NullRunLog = logs.NullRunLog()
        if self.rank == 0:
            (self.out / "config.toml").write_text(_dump(cfg))
            runlog = logs.RunLog(
                self.out, sum(s.steps for s in self.stages), state["global_step"],
                progress=cfg.progress, tensorboard=cfg.tensorboard,
            )  # fmt: skip
        t_start = time.time()
        final, plain = None, None
        try:
            resumed = self.optimizer is not None
            for index in range(state["stage_index"], len(self.stages)):
                stage = self.stages[index]
                if not (resumed and index == state["stage_index"]):
                    state.update(stage_index=index, stage_step=0)
                    self._enter(index)
                resumed = False
                while state["stage_step"] < stage.steps:
                    t0 = time.time()
                    record = self._step(stage)
                    dt = max(time.time() - t0, 1e-9)
                    record.update(step_s=dt, tok_per_s=record["tokens"] / dt)
                    runlog.step(record)
                    if state["stage_step"] == stage.steps or state["global_step"] % cfg.ckpt_every == 0:
                        self._save()
                    if (
                        cfg.eval_every
                        and stage.name != "vit_mim"
                        and state["global_step"] % cfg.eval_every == 0
                    ):
                        self._evaluate(runlog)
                runlog.event("stage_end", stage=stage.name, step=state["global_step"])
            plain = self._plain_model()
            final = self._score(runlog, plain)
        finally:
            runlog.close()
        return self._finish(time.time() - t_start, final, plain)

    def _finish(self, wall_s: float, final: tuple[dict, list] | None, model: SeedViTPretrain | None) -> dict:
        """Summary, plot, gallery and the ViT, written by rank 0 (the others return {})."""
        if self.rank != 0:
            return {}
        records = logs.read_steps(self.out / "log.jsonl")
        latest = self.ckpt.latest()
        summary = {
            "out": str(self.out), "wall_s": round(wall_s, 1), "steps": self.state["global_step"],
            "tokens": self.state["tokens"], "stages": logs.stage_summary(records), "skipped": {},
            "checkpoint": str(latest) if latest else None, "mim_targets": getattr(self.targets, "name", None),
            "host": logs.host_info(self.device),
        }  # fmt: skip
        png = logs.plot_losses(
            records, self.out / "loss.png", logs.read_events(self.out / "log.jsonl", "eval")
        )
        summary["loss_plot"] = str(png) if png else None
        if final is not None:
            scores, eval_records = final
            summary["eval"] = scores
            summary["zero_shot"] = {
                k: {"top1": v["accuracy"], "chance": v["baseline"],
                    "above_chance": v["accuracy"] - v["baseline"], "total": v["total"]}
                for k, v in scores.items() if k != "all"
            }  # fmt: skip
            title = f"step {self.state['global_step']}: zero-shot classification of held-out scenes"
            summary["gallery"] = str(write_gallery(eval_records, self.out / "eval_gallery.png", title=title))
        summary["seedvit"] = str(
            save_pretrained_vit(
                model.vit, self.out, recipe=self.cfg.recipe, zero_shot=summary.get("zero_shot")
            )
        )
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def close(self, finished: bool = True, *, leave: bool = True) -> None:
        """After a finished run, wait for every rank (rank 0 may still be writing); then leave the
        process group, unless ``leave`` is False (a ``full`` recipe's VLM run goes on in it)."""
        if self.distributed and dist.is_initialized():
            if finished:
                dist.barrier()
            if leave or not finished:
                dist.destroy_process_group()


def _dump(cfg: RunConfig) -> str:
    from ..config import dump_toml

    return dump_toml(cfg)


# ----------------------------------------------------------------------------- recipes


def _split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(ViT stages' overrides, the VLM stages'); ``*.field`` goes to both."""
    vit, vlm = [], []
    for item in overrides:
        target = item.partition("=")[0].partition(".")[0]
        if target == "*" or is_vit_stage(target):
            vit.append(item)
        if target == "*" or not is_vit_stage(target):
            vlm.append(item)
    return vit, vlm


def _train_vit(cfg: RunConfig, *, then_vlm: bool = False) -> dict:
    """Set up and run the ViT stages. Under torchrun the process group is left afterwards, or kept
    for the VLM run when ``then_vlm`` (leaving and joining again on the same rendezvous port can
    race: a rank may reach the old store)."""
    run, finished = None, False
    try:
        run = ViTRun(cfg)
        summary = run.train()
        finished = True
        return summary
    finally:
        if run is not None:
            run.close(finished, leave=not then_vlm)


def train_recipe(cfg: RunConfig, train_vlm) -> dict:
    """Run ``cfg.recipe`` when it holds ViT stages: only those (``--recipe vit``), or those and then
    the VLM stages through ``train_vlm`` from the pre-trained ViT (``--recipe full``: the ViT run
    is ``<out>/vit_pretrain``; ``--steps``/``--tokens`` scale the VLM stages, ``--set vit_*.steps=N``
    the ViT ones)."""
    try:
        names = [s.name for s in get_recipe(cfg.recipe)]
    except KeyError as err:
        raise SetupError(str(err)[1:-1]) from err
    vit = [n for n in names if is_vit_stage(n)]
    rest = [n for n in names if not is_vit_stage(n)]
    if names[: len(vit)] != vit:
        raise SetupError(
            f"recipe {cfg.recipe!r}: the ViT stages ({', '.join(vit)}) must come before the VLM stages"
        )
    if not rest:
        return _train_vit(cfg)
    if cfg.vit_init is not None:
        raise SetupError(f"--vit-init with recipe {cfg.recipe!r}: the recipe pre-trains its own ViT")
    out = cfg.out if cfg.out is not None else Path("runs") / f"{cfg.recipe.replace(',', '+')}-{cfg.preset}"
    vit_overrides, vlm_overrides = _split_overrides(cfg.overrides)
    # The ViT stages are data parallel over every rank whatever --parallel gives the VLM stages.
    vit_cfg = replace(cfg, recipe=",".join(vit), out=out / "vit_pretrain", steps=None, tokens=None,
                      overrides=vit_overrides, parallel=None)  # fmt: skip
    done = out / "vit_pretrain" / "summary.json"
    if cfg.resume and done.is_file():
        vit_summary = json.loads(done.read_text())
        log.info("ViT pre-training already done in %s", vit_cfg.out)
    else:
        vit_summary = _train_vit(vit_cfg, then_vlm=True)
    vlm_cfg = replace(cfg, recipe=",".join(rest), out=out, overrides=vlm_overrides, vit_init=vit_cfg.out)
    summary = train_vlm(vlm_cfg)
    if summary:
        summary["vit_pretrain"] = {
            k: vit_summary.get(k) for k in ("out", "wall_s", "steps", "zero_shot", "seedvit")
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


__all__ = ["ViTRun", "is_vit_stage", "scale_vit_stages", "train_recipe"]
