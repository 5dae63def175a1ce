"""MIM targets: a frozen Hugging Face vision tower (``--teacher PATH``), or HOG and colour without one.

The paper distils from EVA02-CLIP-E's patch features (§2.1.2). Here the teacher is any local
transformers vision tower of these kinds (read from ``config.json``, never downloaded):

- CLIP (``clip`` / ``clip_vision_model``) and SigLIP (``siglip`` / ``siglip_vision_model``): each
  image is rebuilt from its packed patches, renormalised with the teacher's own mean and std
  (``preprocessor_config.json``, else the family's defaults), resized so that the teacher's patch
  grid is the student's (gh x gw patches of the teacher's patch size) and encoded with
  ``interpolate_pos_encoding=True``; the last hidden state without CLIP's class token is the
  target of each student patch, one to one. The teachers' learned position embeddings are
  interpolated to the grid, while the student has 2D RoPE -- the paper's setting.
- Qwen2-VL vision towers (``qwen2_vl_vision``, e.g. written by model.hf_vision.save_qwen2_vl_vision):
  native resolution with 14-px patches in the same 2x2-window order as ours, so the packed patches
  go in as they are (each as two identical frames); the target is ``merger.ln_q`` of the last
  hidden state, before the merger's 2x2 MLP. A full Qwen2-VL checkpoint (``qwen2_vl``, with its
  LLM) is refused: save its vision tower on its own first.

Teachers run under no_grad in eval mode in fp32 on the run's device.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from model.preprocess import CLIP_MEAN, CLIP_STD, MERGE, PATCH, PackedImages

from .losses import hog_colour

_FAMILIES = {
    "clip": "clip", "clip_vision_model": "clip",
    "siglip": "siglip", "siglip_vision_model": "siglip",
    "qwen2_vl_vision": "qwen2_vl",
}  # fmt: skip
_DEFAULT_NORM = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def unpatchify(patches: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(gh*gw, 14*14*3) patches in 2x2-window order -> (gh*14, gw*14, 3) pixels."""
    g = patches.reshape(grid_h // MERGE, grid_w // MERGE, MERGE, MERGE, PATCH, PATCH, -1)
    return g.permute(0, 2, 4, 1, 3, 5, 6).reshape(grid_h * PATCH, grid_w * PATCH, -1)


def _window_order(grid: torch.Tensor) -> torch.Tensor:
    """(gh, gw, K) -> (gh*gw, K) in 2x2-window order."""
    gh, gw, k = grid.shape
    return grid.reshape(gh // MERGE, MERGE, gw // MERGE, MERGE, k).transpose(1, 2).reshape(gh * gw, k)


class HOGTargets:
    """The targets without a teacher: MaskFeat's HOG of each patch and its mean colour
    (trainer.vit_pretrain.losses.hog_colour), 108 + 3 values."""

    name = "hog+colour"
    feature_dim = 111

    def __call__(self, packed: PackedImages) -> torch.Tensor:
        return hog_colour(packed.patches)


class HFTeacher:
    """A frozen transformers vision tower whose patch features are the MIM targets."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"--teacher {path}: no config.json (expected a Hugging Face model directory)"
            )
        config = json.loads(config_file.read_text())
        model_type = config.get("model_type")
        if model_type == "qwen2_vl":
            raise ValueError(
                f"--teacher {path}: a full Qwen2-VL checkpoint; save its vision tower on its own "
                "(Qwen2VisionTransformerPretrainedModel.save_pretrained) and pass that directory"
            )
        if model_type not in _FAMILIES:
            raise ValueError(
                f"--teacher {path}: model_type {model_type!r}; expected one of {sorted(_FAMILIES)} "
                "(CLIP, SigLIP or Qwen2-VL vision towers)"
            )
        self.family = _FAMILIES[model_type]
        self.name = f"{self.family}:{path}"
        self.device = torch.device(device)
        self.model = self._load(path, config).to(self.device).float().eval().requires_grad_(False)
        if self.family == "qwen2_vl":
            self.feature_dim = self.model.config.embed_dim
            self.patch = self.model.config.patch_size
            if self.patch != PATCH:
                raise ValueError(f"--teacher {path}: patch_size {self.patch}, SeedViT's is {PATCH}")
        else:
            vision = self.model.config
            self.feature_dim, self.patch = vision.hidden_size, vision.patch_size
            mean, std = _DEFAULT_NORM[self.family]
            pre = path / "preprocessor_config.json"
            if pre.is_file():
                p = json.loads(pre.read_text())
                mean, std = p.get("image_mean", mean), p.get("image_std", std)
            self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def _load(self, path: Path, config: dict) -> torch.nn.Module:
        import transformers

        if self.family == "qwen2_vl":
            from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

            return Qwen2VisionTransformerPretrainedModel.from_pretrained(path, local_files_only=True)
        cls = {"clip": transformers.CLIPVisionModel, "siglip": transformers.SiglipVisionModel}[self.family]
        return cls.from_pretrained(path, local_files_only=True)

    @torch.no_grad()
    def __call__(self, packed: PackedImages) -> torch.Tensor:
        """(T, feature_dim) targets, row for row with ``packed.patches``."""
        patches = packed.patches.to(self.device, torch.float32)
        if self.family == "qwen2_vl":
            T = patches.shape[0]
            pixels = patches.view(T, PATCH, PATCH, 3).permute(0, 3, 1, 2)[:, :, None]
            pixels = pixels.expand(T, 3, self.model.config.temporal_patch_size, PATCH, PATCH).reshape(T, -1)
            grid_thw = torch.cat([torch.ones_like(packed.grid_hw[:, :1]), packed.grid_hw], 1).to(self.device)
            hidden = self.model(pixels, grid_thw=grid_thw).last_hidden_state
            return self.model.merger.ln_q(hidden)
        out = []
        clip_mean, clip_std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        cu = packed.cu_seqlens.tolist()
        for i, (gh, gw) in enumerate(packed.grid_hw.tolist()):
            if cu[i + 1] == cu[i]:
                continue
            rgb = unpatchify(patches[cu[i] : cu[i + 1]].cpu(), gh, gw) * clip_std + clip_mean  # [0, 1]
            x = ((rgb - self.mean) / self.std).permute(2, 0, 1)[None].to(self.device)
            if self.patch != PATCH:
                x = F.interpolate(
                    x, size=(gh * self.patch, gw * self.patch), mode="bilinear", align_corners=False
                )
            hidden = self.model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[0]
            hidden = hidden[hidden.shape[0] - gh * gw :]  # CLIP's class token comes first
            out.append(_window_order(hidden.view(gh, gw, -1)))
        if not out:
            return patches.new_zeros(0, self.feature_dim)
        return torch.cat(out)


def load_targets(teacher: str | Path | None, device: torch.device | str = "cpu") -> HOGTargets | HFTeacher:
    """The MIM target maker: the HF teacher at ``teacher``, or HOG and colour when it is None."""
    return HOGTargets() if teacher is None else HFTeacher(teacher, device)


__all__ = ["HFTeacher", "HOGTargets", "load_targets", "unpatchify"]
