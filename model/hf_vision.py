"""Hugging Face interop for vision towers: Qwen2-VL vision blocks <-> SeedViT.

Vision. A Qwen2-VL vision block is our ViTBlock: LayerNorm(eps 1e-6) -> qkv (bias, laid out
(3, heads, head_dim)) -> attention with the same 2D RoPE (``seedvl_kernels.rope_2d``) -> proj ->
LayerNorm -> fc1 -> activation -> fc2. Per block i, ``blocks.i.{norm1,norm2}`` keep their names,
``attn.{qkv,proj}`` -> ``{qkv,proj}`` and ``mlp.{fc1,fc2}`` -> ``{fc1,fc2}``. Around the blocks:

- ``patch_embed.proj``: a bias-free Conv3d over (C, 2, 14, 14) -- two consecutive frames. Qwen2-VL
  feeds a still image as two copies of itself, so for images it equals our Linear over one
  (14, 14, C) patch with the weight summed over the temporal axis (bias 0); saving splits our weight
  evenly over the two frames. For video the models differ (Qwen2-VL embeds frame pairs, SeedViT
  single frames), so a loaded tower matches Qwen2-VL on images only.
- ``merger.ln_q`` is a per-token LayerNorm(eps 1e-6) on the last block's output: our final ``norm``.
- ``merger.mlp`` (concatenate each 2x2 window to 4C -> Linear -> GELU -> Linear) does not map to our
  adapter (mean of the 4 tokens -> Linear -> GELU -> Linear); it is not loaded, and not written.
- The activation: Qwen2-VL checkpoints use ``quick_gelu`` (x * sigmoid(1.702 x)) and SeedViT exact
  GELU, so only ``hidden_act: "gelu"`` loads by default; ``allow_activation_mismatch=True`` loads
  quick_gelu weights anyway, as an initialisation whose outputs differ from Qwen2-VL's.
- Shapes: Qwen2-VL's head_dim is embed_dim / num_heads (80 in Qwen2-VL, 64 in SeedViT-532M). The
  qkv tensors of 16x80 and 20x64 heads have the same shape and split differently, so configs are
  compared field by field (``check_vit_config``), not only tensor shapes.
Qwen2.5-VL's blocks (RMSNorm, SwiGLU, window attention) are a different architecture.

Files are read and written with the safetensors helpers of :mod:`model.hf`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .config import ViTConfig
from .hf import assign, config_field, open_checkpoint, write_checkpoint
from .vit import SeedViT

# ----------------------------------------------------------------------------- Qwen2-VL vision

_VIT_BLOCK = [  # ours -> Qwen2-VL, inside blocks.i.
    ("norm1", "norm1"),
    ("qkv", "attn.qkv"),
    ("proj", "attn.proj"),
    ("norm2", "norm2"),
    ("fc1", "mlp.fc1"),
    ("fc2", "mlp.fc2"),
]
_VIT_ARCH = ("width", "depth", "num_heads", "head_dim", "mlp_dim", "patch_size", "in_channels", "norm_eps")


def vit_config_from_qwen2_vl(
    hf: Mapping[str, Any], *, allow_activation_mismatch: bool = False, **overrides: Any
) -> ViTConfig:
    """The ViTConfig of a Qwen2-VL vision config (a full Qwen2-VL config.json or its vision_config)."""
    if hf.get("model_type") not in (None, "qwen2_vl", "qwen2_vl_vision"):
        raise ValueError(
            f"config.json: expected a Qwen2-VL model (model_type 'qwen2_vl' or 'qwen2_vl_vision'), "
            f"got {hf['model_type']!r}"
        )
    hf = hf.get("vision_config") or hf
    act = hf.get("hidden_act", "quick_gelu")  # Qwen2-VL's default
    if act != "gelu" and not allow_activation_mismatch:
        raise ValueError(
            f"config.json: vision hidden_act {act!r}; SeedViT's MLP uses exact GELU ('gelu'), so the "
            "outputs would differ (pass allow_activation_mismatch=True to load the weights anyway)"
        )
    width, heads = config_field(hf, "embed_dim"), config_field(hf, "num_heads")
    patch = hf.get("patch_size") or hf.get("spatial_patch_size") or 14  # HF's default
    if isinstance(patch, list | tuple):
        if len(set(patch)) != 1:
            raise ValueError(f"config.json: non-square patch_size {patch} is not supported")
        patch = patch[0]
    if width % heads:
        raise ValueError(f"config.json: embed_dim {width} is not a multiple of num_heads {heads}")
    rope = hf.get("rope_parameters") or {}
    cfg = ViTConfig(
        width=width,
        depth=config_field(hf, "depth"),
        num_heads=heads,
        head_dim=width // heads,
        mlp_ratio=float(hf.get("mlp_ratio", 4)),
        patch_size=patch,
        in_channels=hf.get("in_channels") or hf.get("in_chans") or 3,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        norm_eps=1e-6,  # hard-coded in Qwen2-VL's vision blocks and merger
        qkv_bias=True,
    )
    return replace(cfg, **overrides)


def check_vit_config(cfg: ViTConfig, expected: ViTConfig) -> None:
    """Raise a ValueError listing every architectural field where ``cfg`` differs from ``expected``."""
    diff = [
        f"{name} {getattr(cfg, name)} (expected {getattr(expected, name)})"
        for name in (*_VIT_ARCH, "qkv_bias", "rope_theta")
        if getattr(cfg, name) != getattr(expected, name)
    ]
    if diff:
        raise ValueError(f"Qwen2-VL vision tower does not match the ViTConfig: {', '.join(diff)}")


def qwen2_vl_vision_config(cfg: ViTConfig, *, temporal_patch_size: int = 2) -> dict[str, Any]:
    """A standalone Qwen2-VL vision config.json (``Qwen2VisionTransformerPretrainedModel``)."""
    if cfg.num_heads * cfg.head_dim != cfg.width:
        raise ValueError(
            f"ViTConfig: Qwen2-VL needs num_heads * head_dim == width, got "
            f"{cfg.num_heads} * {cfg.head_dim} != {cfg.width}"
        )
    if cfg.mlp_dim != cfg.width * int(cfg.mlp_ratio) or not cfg.qkv_bias or cfg.norm_eps != 1e-6:
        raise ValueError("ViTConfig: Qwen2-VL needs an integer mlp_ratio, qkv_bias=True and norm_eps=1e-6")
    return {
        "architectures": ["Qwen2VisionTransformerPretrainedModel"],
        "model_type": "qwen2_vl_vision",
        "depth": cfg.depth,
        "embed_dim": cfg.width,
        "num_heads": cfg.num_heads,
        "mlp_ratio": int(cfg.mlp_ratio),
        "hidden_act": "gelu",
        "patch_size": cfg.patch_size,
        "temporal_patch_size": temporal_patch_size,
        "in_channels": cfg.in_channels,
        "spatial_merge_size": 2,
        "hidden_size": cfg.width,  # the merger's output width: the merger is not written
        "rope_parameters": {"rope_type": "axial", "rope_theta": cfg.rope_theta},
    }


def from_qwen2_vl_vision_state_dict(vit: SeedViT, hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict for ``vit`` from a Qwen2-VL vision tower's tensors, under any prefix
    (``visual.`` in Qwen2-VL checkpoints, none in a standalone tower); ``merger.mlp`` is skipped."""
    anchor = "blocks.0.norm1.weight"
    prefix = next((k[: -len(anchor)] for k in hf if k.endswith(anchor)), None)
    if prefix is None:
        raise KeyError(f"no Qwen2-VL vision blocks in the checkpoint (no '*{anchor}')")
    depth = vit.cfg.depth
    if f"{prefix}blocks.{depth}.norm1.weight" in hf:
        n = sum(1 for k in hf if re.fullmatch(re.escape(prefix) + r"blocks\.\d+\.norm1\.weight", k))
        raise ValueError(f"checkpoint has {n} vision blocks, the ViTConfig depth is {depth}")

    def get(name: str) -> torch.Tensor:
        try:
            return hf[prefix + name]
        except KeyError:
            raise KeyError(f"missing {prefix + name}") from None

    conv = get("patch_embed.proj.weight")  # (C, in, T, p, p)
    if conv.ndim != 5:
        raise ValueError(f"{prefix}patch_embed.proj.weight: expected 5-D (Conv3d), got {tuple(conv.shape)}")
    # A still image is two identical frames: sum the temporal taps, reorder (in, p, p) to (p, p, in).
    weight = conv.float().sum(2).permute(0, 2, 3, 1).reshape(conv.shape[0], -1).to(conv.dtype)
    bias = hf.get(prefix + "patch_embed.proj.bias")
    ours = {
        "patch_embed.weight": weight,
        "patch_embed.bias": bias if bias is not None else conv.new_zeros(conv.shape[0]),
        "norm.weight": get("merger.ln_q.weight"),
        "norm.bias": get("merger.ln_q.bias"),
    }
    for i in range(depth):
        for mine, theirs in _VIT_BLOCK:
            for kind in ("weight", "bias"):
                ours[f"blocks.{i}.{mine}.{kind}"] = get(f"blocks.{i}.{theirs}.{kind}")
    shapes = {k: v.shape for k, v in vit.state_dict().items()}
    for name, t in ours.items():
        if t.shape != shapes[name]:
            raise ValueError(
                f"Qwen2-VL tensor for {name}: shape {tuple(t.shape)}, SeedViT expects {tuple(shapes[name])}"
            )
    return ours


def to_qwen2_vl_vision_state_dict(vit: SeedViT, *, temporal_patch_size: int = 2) -> dict[str, torch.Tensor]:
    """``vit``'s weights as a standalone Qwen2-VL vision tower's, less ``merger.mlp``."""
    cfg = vit.cfg
    qwen2_vl_vision_config(cfg, temporal_patch_size=temporal_patch_size)  # raises if not expressible
    sd = vit.state_dict()
    if sd["patch_embed.bias"].any():
        raise ValueError("SeedViT patch_embed.bias: Qwen2-VL's patch embedding has no bias, expected zeros")
    p, c = cfg.patch_size, cfg.in_channels
    w = sd["patch_embed.weight"].reshape(-1, p, p, c).permute(0, 3, 1, 2)  # (C, in, p, p)
    conv = w[:, :, None].expand(-1, -1, temporal_patch_size, -1, -1) / temporal_patch_size
    out = {
        "patch_embed.proj.weight": conv.contiguous(),
        "merger.ln_q.weight": sd["norm.weight"],
        "merger.ln_q.bias": sd["norm.bias"],
    }
    for i in range(cfg.depth):
        for mine, theirs in _VIT_BLOCK:
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{theirs}.{kind}"] = sd[f"blocks.{i}.{mine}.{kind}"]
    return out


def load_qwen2_vl_vision(
    path: str | Path,
    *,
    cfg: ViTConfig | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    allow_activation_mismatch: bool = False,
) -> SeedViT:
    """A SeedViT from a Qwen2-VL checkpoint (full model or standalone vision tower).

    With ``cfg`` (e.g. the VLM's ViT config) the checkpoint must match it field by field; without,
    the config is derived from config.json. Only the vision tensors are read.
    """
    hf_config, ckpt = open_checkpoint(path)
    derived = vit_config_from_qwen2_vl(hf_config, allow_activation_mismatch=allow_activation_mismatch)
    if cfg is not None:
        check_vit_config(derived, cfg)
    with torch.device("meta"):
        vit = SeedViT(cfg or derived)
    assign(vit, from_qwen2_vl_vision_state_dict(vit, ckpt), dtype, device)
    return vit


def save_qwen2_vl_vision(
    vit: SeedViT, directory: str | Path, *, dtype: torch.dtype | None = None, temporal_patch_size: int = 2
) -> None:
    """Write ``vit`` as a standalone Qwen2-VL vision tower (``Qwen2VisionTransformerPretrainedModel``).

    The merger MLP is not written (SeedViT has none), so transformers initialises it at random;
    the blocks' output (``last_hidden_state``) matches ours on still images.
    """
    dtype = dtype or vit.patch_embed.weight.dtype
    config = qwen2_vl_vision_config(vit.cfg, temporal_patch_size=temporal_patch_size)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    vit_tensors = to_qwen2_vl_vision_state_dict(vit, temporal_patch_size=temporal_patch_size)
    tensors = {k: v.to(dtype) for k, v in vit_tensors.items()}
    write_checkpoint(directory, tensors, config)


__all__ = [
    "check_vit_config",
    "from_qwen2_vl_vision_state_dict",
    "load_qwen2_vl_vision",
    "qwen2_vl_vision_config",
    "save_qwen2_vl_vision",
    "to_qwen2_vl_vision_state_dict",
    "vit_config_from_qwen2_vl",
]
