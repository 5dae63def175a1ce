"""The parts a training run is built from: the model's config for a tokenizer, what trains in a
stage, the optimizer and its schedule, the loss of a micro-batch, the device, the data source and
the output directory. trainer.loop assembles them into a run."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.config import LLMConfig, VLMConfig, get_preset
from model.llm import LLMOutput
from model.vlm import SeedVLM

from . import logs
from .checkpoint import Checkpointer
from .config import RunConfig, SetupError
from .data.chat import EncodeConfig, SkipLog
from .data.packer import IGNORE_INDEX
from .data.stream import Source
from .data.tokenizer import Tokenizer, model_vocab_size
from .evaluate import split_manifest
from .recipes import MODULES, Stage

if TYPE_CHECKING:
    from .vst_eval import VSTHeldOut


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


def build_optimizer(
    model: torch.nn.Module, stage: Stage, *, foreach: bool | None = None
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters. ``foreach=False`` when parameters live on more than one
    device mesh (expert parallelism): a multi-tensor kernel cannot mix DTensors of two meshes."""
    return torch.optim.AdamW(
        param_groups(model, stage.weight_decay), lr=stage.lr_max, betas=stage.betas, eps=1e-8, foreach=foreach
    )


def stage_scheduler(optimizer: torch.optim.Optimizer, stage: Stage) -> torch.optim.lr_scheduler.LambdaLR:
    for group in optimizer.param_groups:  # a kept optimizer must not keep the last stage's base LR
        group["lr"] = group["initial_lr"] = stage.lr_max
    return torch.optim.lr_scheduler.LambdaLR(optimizer, stage.lr_factor)


# ----------------------------------------------------------------------------- one step


def micro_batch_loss(
    out: LLMOutput, labels: torch.Tensor, *, targets: int, accum: int, llm: LLMConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed CE over this micro-batch's targets, its share of the step's loss to backpropagate).

    ``targets`` is the step's target count over every micro-batch of every rank and ``accum`` the
    step's micro-batches (the global batch), so the shares of all micro-batches and ranks sum to
    CE / targets + mean over micro-batches of (aux * balance loss + z * z-loss): the step's loss,
    whatever the layout. Under context parallelism the balance losses are already this rank's
    share of its micro-batch's (model.llm.MoE).
    """
    ce = F.cross_entropy(out.logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    aux = llm.aux_loss_coef * out.load_balancing_loss + llm.z_loss_coef * out.router_z_loss
    return ce, ce / targets + aux / accum


# ----------------------------------------------------------------------------- the run


def _device(spec: str, local_rank: int | None = None) -> torch.device:
    """The device of this process; under torchrun "auto" and "cuda" mean cuda:LOCAL_RANK."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and local_rank is not None:
        spec = f"cuda:{local_rank}"
    return torch.device(spec)


def compute_dtype(spec: str, device: torch.device) -> torch.dtype | None:
    """The dtype a run computes in (None: fp32) for ``--mixed-precision``: bf16 when asked, or by
    default on a GPU."""
    if spec == "bf16" or (spec == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _source(spec: str, seed: int, skips: SkipLog) -> Source:
    """The dataset of data spec ``spec`` (``--data``, or a stage's ``data`` from its recipe or
    ``--set STAGE.data=...``): the embedded spatial data (``spatial[:OPTIONS]``,
    trainer.data.spatial.training_config), the VST data (``vst[:MIX]``, trainer.data.vst.parse_spec),
    else a JSONL manifest without its held-out part. A bad spec is a ValueError naming the argument."""
    from .data import vst

    try:
        if spec == "spatial" or spec.startswith("spatial:"):
            from .data.spatial import SpatialDataset, training_config

            return SpatialDataset(seed, training_config(spec.partition(":")[2]))
        if vst.is_spec(spec):
            return vst.VSTDataset(seed, vst.parse_spec(spec))
    except ValueError as err:
        raise ValueError(f"--data / STAGE.data: {err}") from None
    from .data.manifest import ManifestDataset

    return split_manifest(ManifestDataset(spec, skips=skips))[0]  # its held-out part is never trained on


def vst_heldout(
    spec: str, tok: Tokenizer, encode: EncodeConfig, *, seed: int, per_skill: int, budget: int
) -> VSTHeldOut:
    """The held-out questions of a run that trains on VST data ``spec`` (trainer.vst_eval.VSTHeldOut):
    ``per_skill`` of each skill the mix draws, the blind baselines fitted as the vst recipe's, and
    the vst recipe's room for a thought when the mix answers with one."""
    from .data import vst
    from .rl.vst import VSTSettings
    from .vst_eval import VSTHeldOut

    mix, recipe = vst.parse_spec(spec), VSTSettings()
    return VSTHeldOut.vst(
        tok, encode, seed=seed, per_skill=per_skill, budget=budget, fit_per_skill=recipe.baseline_per_skill,
        skills=list(mix.mix()), think_tokens=recipe.eval_think_tokens if mix.think_prob > 0 else 0,
    )  # fmt: skip


def prepare_out_dir(cfg: RunConfig, *, write: bool = True) -> Path:
    """The run's output directory; refuses to mix runs. With ``write`` False only checks (the ranks
    other than 0 of a distributed run, which must not race rank 0's deletions)."""
    out = cfg.out if cfg.out is not None else Path("runs") / f"{cfg.recipe.replace(',', '+')}-{cfg.preset}"
    ckpts = Checkpointer(out / "checkpoints")
    previous = ckpts.latest() is not None or (out / "log.jsonl").exists()
    if not write:
        if previous and not (cfg.overwrite or cfg.resume):
            raise SetupError(f"{out} holds a previous run; pass --resume, --overwrite or another --out")
        return out
    if previous and cfg.overwrite:
        for name in ("checkpoints", "tensorboard", "profile"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("log.jsonl", "train.log", "loss.png", "summary.json", "eval_gallery.png", "config.toml"):
            (out / name).unlink(missing_ok=True)
    elif previous and not cfg.resume:
        raise SetupError(
            f"{out} holds a previous run; pass --resume to continue it, --overwrite to start over, "
            "or --out DIR for a new one"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def prepare_run_dir(cfg: RunConfig, rank: int) -> Path:
    """The run's output directory (:func:`prepare_out_dir`) under one or more ranks: every rank
    checks it, then rank 0 alone changes it and logs to its ``train.log`` (every rank calls this;
    with torch.distributed initialised, the ranks wait for each other in between)."""
    out = prepare_out_dir(cfg, write=False)
    if dist.is_initialized():
        dist.barrier()  # every rank has checked the directory before rank 0 changes it
    if rank == 0:
        prepare_out_dir(cfg)
        logs.setup_logging(out)
    return out
