"""SeedViT: a pre-norm ViT over native-resolution patches with 2D RoPE (paper §2.1.1, Table 1).

Patches of many images are packed into one sequence (NaViT); attention stays inside each image
through ``cu_seqlens``. The 2D RoPE is applied inside ``seedvl_kernels.varlen_attention`` (its
``pos_hw`` argument), so no layer here touches positions.

Shape legend:
    T   total patches in the packed batch (sum over images of h_i * w_i, in 2x2-window order)
    P   flattened patch length, patch * patch * channels = 14 * 14 * 3 = 588
    C   width (1280)
    H   attention heads (20), D head dim (64)
    F   MLP hidden (mlp_ratio * C = 5120)
    B   images in the batch; cu_seqlens (B+1,) int32, pos_hw (T, 2) int32 = (row, col)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import seedvl_kernels

from .config import ViTConfig


def init_linear(linear: nn.Linear, std: float = 0.02) -> None:
    """Truncated-normal weights, zero bias: the usual ViT/GPT init, cheap on the meta device."""
    nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class ViTBlock(nn.Module):
    """LN -> qkv -> varlen attention (2D RoPE) -> proj -> residual; LN -> MLP(GELU) -> residual."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.rope_theta = cfg.num_heads, cfg.head_dim, cfg.rope_theta
        inner = cfg.num_heads * cfg.head_dim
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.qkv = nn.Linear(cfg.width, 3 * inner, bias=cfg.qkv_bias)
        self.proj = nn.Linear(inner, cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)
        for linear in (self.qkv, self.proj, self.fc1, self.fc2):
            init_linear(linear)

    def forward(
        self, x: torch.Tensor, pos_hw: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        """x (T, C) -> (T, C)."""
        T = x.shape[0]
        # One fused projection; unbind gives strided views whose last dim is contiguous, which is
        # all the op asks for, so q, k, v are not copied.
        q, k, v = self.qkv(self.norm1(x)).view(T, 3, self.num_heads, self.head_dim).unbind(1)
        attn = seedvl_kernels.varlen_attention(
            q, k, v, cu_seqlens, max_seqlen, pos_hw=pos_hw, rope_theta=self.rope_theta
        )
        x = x + self.proj(attn.reshape(T, self.num_heads * self.head_dim))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SeedViT(nn.Module):
    """Linear patch embedding -> depth x ViTBlock -> final LayerNorm."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.width)
        init_linear(self.patch_embed)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)

    def forward(
        self, patches: torch.Tensor, pos_hw: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        """Encode packed patches.

        Args:
            patches: (T, P) float, each row one flattened (14, 14, 3) patch (model.preprocess).
            pos_hw: (T, 2) int32, each patch's (row, col) inside its image.
            cu_seqlens: (B+1,) int32 image boundaries in the packed sequence.
            max_seqlen: host int, the largest image's patch count (from the packer: no sync here).
        Returns:
            (T, C) patch features in the input order (2x2-window order is preserved).
        """
        if patches.ndim != 2 or patches.shape[1] != self.cfg.patch_dim:
            raise ValueError(f"patches: expected (T, {self.cfg.patch_dim}), got {tuple(patches.shape)}")
        x = self.patch_embed(patches.to(self.patch_embed.weight.dtype))
        for block in self.blocks:
            x = block(x, pos_hw, cu_seqlens, max_seqlen)
        return self.norm(x)
