"""The pre-trained SeedViT on disk: ``<run>/seedvit/model.safetensors`` + ``config.json``.

``config.json`` holds the ViTConfig's fields (``"vit"``), what trained it (``"recipe"``) and its
zero-shot scores. ``--vit-init RUN`` (or ``--recipe full``, which passes it) loads it into the VLM's
ViT; the adapter and the LLM keep their own initialisation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from model.config import ViTConfig
from model.vit import SeedViT

DIRNAME = "seedvit"


def save_pretrained_vit(vit: SeedViT, run_dir: str | Path, **info: object) -> Path:
    """Write ``vit`` under ``run_dir/seedvit``; returns that directory."""
    from safetensors.torch import save_file

    out = Path(run_dir) / DIRNAME
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in vit.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"))
    config = {"format": "seedvit", "vit": dataclasses.asdict(vit.cfg), **info}
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    for candidate in (path, path / DIRNAME, path / "vit_pretrain" / DIRNAME):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise FileNotFoundError(
        f"--vit-init {path}: no pre-trained ViT there (expected {DIRNAME}/model.safetensors and "
        "config.json, as python trainer/run.py --recipe vit writes)"
    )


def load_pretrained_vit(path: str | Path, vit: SeedViT) -> dict:
    """Load the ViT of a ViT pre-training run (its directory or its ``seedvit`` directory) into
    ``vit`` in place; returns its config.json. ValueError naming the fields where the saved
    ViTConfig differs from ``vit``'s."""
    from safetensors.torch import load_file

    where = _resolve(path)
    config = json.loads((where / "config.json").read_text())
    saved = ViTConfig(**config["vit"])
    diff = [
        f"{f.name} {getattr(saved, f.name)} (this model: {getattr(vit.cfg, f.name)})"
        for f in dataclasses.fields(ViTConfig)
        if getattr(saved, f.name) != getattr(vit.cfg, f.name)
    ]
    if diff:
        raise ValueError(
            f"--vit-init {path}: the pre-trained ViT differs from this preset's: {', '.join(diff)}"
        )
    tensors = load_file(str(where / "model.safetensors"))
    with torch.no_grad():
        vit.load_state_dict({k: v.to(vit.patch_embed.weight.dtype) for k, v in tensors.items()}, strict=True)
    return config


__all__ = ["load_pretrained_vit", "save_pretrained_vit"]
