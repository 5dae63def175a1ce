"""The run's configuration: every setting of ``trainer/run.py`` as one dataclass, its checks, and its
TOML form.

``--config run.toml`` reads the same settings as the command line, under the long flag names
(``steps = 12``, ``parallel = "dp=2"``, ``set = ["stage1.lr_max=1e-3"]``); flags given on the
command line win. Every run writes its resolved configuration to ``<out>/config.toml`` (and into
each checkpoint's metadata), so ``--config <out>/config.toml`` repeats it.

A resumed run must share the checkpoint's :func:`signature` (what decides its batches, model and
schedule); ``--resume`` with another one is refused with the differing keys named.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.config import VLMConfig

from .recipes import Stage

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class SetupError(RuntimeError):
    """The run cannot start as configured (unknown preset, bad override, unusable data, an occupied
    output directory, a checkpoint from another configuration); the message says what to change."""


@dataclass
class RunConfig:
    recipe: str = "vlm"
    preset: str = "seedvl-tiny"
    data: str = "spatial"  # "spatial" (embedded procedural data) or a JSONL manifest path
    tokenizer: str = "words"  # "words", "bytes" or a local Hugging Face tokenizer directory
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
    # Held-out questions per skill answered at the end (0: no evaluation). 200 puts a skill's standard
    # error near 3.5 points (about 14 s on one CPU thread for the tiny preset); at 50 it is about 7,
    # and the default run's count read +14 on 50 questions where 200 said +7.
    eval_samples: int = 200
    eval_every: int = 100  # held-out loss and accuracy every N steps (0: off)
    profile_steps: tuple[int, int] | None = None
    profiler: str = "torch"  # "torch" (trace file) or "nsys" (cudaProfilerStart/Stop only)
    progress: bool = True
    tensorboard: bool = True
    prefetch: int = 2
    parallel: str | None = None  # "pp=P,dp=D,cp=C,ep=E" under torchrun; None: dp = the world size
    pp_schedule: str = "interleaved1f1b"  # torch.distributed.pipelining schedule (trainer.parallel.pipeline)
    pp_virtual: int | None = None  # stages per pipeline rank; default 2 for looped schedules if layers allow
    pp_layers: str | None = None  # decoder layers of each stage, "a,b,..."; default as even as possible
    mixed_precision: str = "auto"  # "auto" (bf16 on a GPU, fp32 on a CPU), "bf16", "fp32"
    pg_timeout: float = 600.0  # seconds a collective may wait for a peer before the job fails
    activation_checkpointing: str = "none"  # "none", "selective" or "full" per ViT block / decoder layer
    compile: bool = False  # torch.compile each ViT block and decoder layer
    async_save: bool = False  # checkpoints written in the background (dcp.async_save)
    vit_balance: str = "auto"  # "auto" (flops under torchrun), "off", "flops", "patches", "patches2"
    vit_balance_group: int | None = None  # ranks per balancing group; default the largest divisor <= 128
    teacher: Path | None = None  # vit_mim's teacher: a local HF vision tower (None: HOG and colour targets)
    vit_init: Path | None = None  # the ViT from a ViT pre-training run (trainer.vit_pretrain)


# RunConfig field -> the command-line flag (and TOML key) that sets it, where the names differ.
FLAGS = {"overrides": "set", "progress": "no-progress", "tensorboard": "no-tensorboard"}


def flag(name: str) -> str:
    return "--" + FLAGS.get(name, name).replace("_", "-")


def validate(cfg: RunConfig) -> None:
    """One line naming the flag for every value the run cannot use (before any work)."""
    at_least = {"ckpt_every": 1, "keep": 1, "window": 1, "prefetch": 1, "eval_samples": 0, "eval_every": 0}
    at_least |= {"steps": 1, "tokens": 1, "max_pixels": 28 * 28}
    for name, low in at_least.items():
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise SetupError(f"{flag(name)}: expected an integer >= {low}, got {value}")
    if not (math.isfinite(cfg.pg_timeout) and cfg.pg_timeout > 0):
        raise SetupError(f"--pg-timeout: expected seconds > 0, got {cfg.pg_timeout}")
    if cfg.profiler not in ("torch", "nsys"):
        raise SetupError(f"--profiler: expected torch or nsys, got {cfg.profiler!r}")
    if (ac := cfg.activation_checkpointing) not in ("none", "selective", "full"):
        raise SetupError(f"--activation-checkpointing: expected none, selective or full, got {ac!r}")
    if cfg.vit_balance not in ("auto", "off", "flops", "patches", "patches2"):
        raise SetupError(
            f"--vit-balance: expected auto, off, flops, patches or patches2, got {cfg.vit_balance!r}"
        )
    if cfg.pp_virtual is not None and cfg.pp_virtual < 1:
        raise SetupError(f"--pp-virtual: expected an integer >= 1, got {cfg.pp_virtual}")
    if cfg.vit_balance_group is not None and cfg.vit_balance_group < 1:
        raise SetupError(f"--vit-balance-group: expected an integer >= 1, got {cfg.vit_balance_group}")
    if cfg.mixed_precision not in ("auto", "bf16", "fp32"):
        raise SetupError(f"--mixed-precision: expected auto, bf16 or fp32, got {cfg.mixed_precision!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise SetupError(f"--device: expected auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SetupError(f"--device {cfg.device}: no CUDA GPU is available here; use --device cpu")
        index = int(cfg.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise SetupError(f"--device {cfg.device}: only {torch.cuda.device_count()} CUDA GPU(s) here")


# ----------------------------------------------------------------------------- TOML


def load_toml(path: Path) -> dict[str, object]:
    """The settings of a --config file as RunConfig field -> value (paths and pairs converted)."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise SetupError(f"--config {path}: {err}") from err
    by_key = {FLAGS.get(f.name, f.name).replace("_", "-"): f.name for f in dataclasses.fields(RunConfig)}
    by_key |= {k.replace("-", "_"): v for k, v in by_key.items()} | {
        f.name: f.name for f in dataclasses.fields(RunConfig)
    }
    values = {}
    for key, value in raw.items():
        name = by_key.get(key)
        if name is None:
            known = ", ".join(sorted(f.name for f in dataclasses.fields(RunConfig)))
            raise SetupError(f"--config {path}: unknown key {key!r} (known: {known})")
        if name in ("progress", "tensorboard") and key.startswith("no"):
            value = not value
        if name in ("out", "init", "teacher", "vit_init") and isinstance(value, str):
            value = Path(value)
        if name == "profile_steps" and isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return values


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def dump_toml(cfg: RunConfig) -> str:
    """``cfg`` as a --config file (unset values left out: they take their defaults)."""
    lines = ["# Resolved configuration of this run: python trainer/run.py --config <this file>"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None or f.name in ("resume", "overwrite"):
            continue
        lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def as_dict(cfg: RunConfig) -> dict[str, object]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}


# ----------------------------------------------------------------------------- resume


def signature(cfg: RunConfig, model_cfg: VLMConfig, stages: tuple[Stage, ...]) -> dict:
    """What a resumed run must share with the checkpoint's run: it decides the model, the batches
    and the schedule. The layout, the output and logging options may change."""
    return {
        "preset": cfg.preset,
        "tokenizer": cfg.tokenizer,
        "data": cfg.data,
        "max_pixels": cfg.max_pixels,
        "vocab_size": model_cfg.llm.vocab_size,
        "seed": cfg.seed,
        "window": cfg.window,
        "stages": [dataclasses.asdict(s) for s in stages],
    }


def check_resume(saved: dict, current: dict, path: Path) -> None:
    """Refuse to resume a checkpoint written under another signature, naming what differs."""
    current = json.loads(json.dumps(current))  # as the checkpoint stored it (tuples become lists)
    diffs = []
    for key, now in current.items():
        before = saved.get(key)
        if key == "stages" and before is not None:
            diffs += _stage_diffs(before, now)
        elif before != now and not (key in ("data", "max_pixels") and key not in saved):
            diffs.append(f"{key} {before!r} -> {now!r}")
    if diffs:
        raise SetupError(
            f"--resume: this run differs from the one that wrote {path}: {'; '.join(diffs)}. "
            "Resume with the same settings (its config.toml), or start another --out"
        )


def _stage_diffs(before: list[dict], now: list[dict]) -> list[str]:
    if [s["name"] for s in before] != [s["name"] for s in now]:
        return [f"stages {[s['name'] for s in before]} -> {[s['name'] for s in now]}"]
    out = []
    for b, n in zip(before, now, strict=True):
        for key in n:
            if b.get(key) != n[key]:
                out.append(f"{n['name']}.{key} {b.get(key)!r} -> {n[key]!r}")
    return out
