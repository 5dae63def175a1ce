"""Pooling MLP adapter: 2x2 average pool of ViT features, then Linear -> GELU -> Linear (paper §2).

Because preprocessing emits patches in 2x2-window order, the 2x2 spatial pool is the mean of every
4 consecutive rows; ``seedvl_kernels.pool_adapter`` fuses that mean with the first GEMM.

The weights are stored (in, out) -- the layout the op multiplies by (``x @ w1``) -- rather than
nn.Linear's (out, in), so no transpose copy is made per call.

Shape legend:
    T    ViT tokens (a multiple of 4, 2x2-window order)
    C    ViT width (in_dim), M adapter hidden (hidden_dim), D LLM hidden (out_dim)
    T/4  visual tokens handed to the LLM
"""

from __future__ import annotations

import torch
from torch import nn

import seedvl_kernels

from .config import AdapterConfig


class PoolAdapter(nn.Module):
    """(T, C) ViT features -> (T/4, D) LLM input embeddings."""

    def __init__(self, cfg: AdapterConfig, std: float = 0.02) -> None:
        super().__init__()
        self.cfg = cfg
        self.w1 = nn.Parameter(torch.empty(cfg.in_dim, cfg.hidden_dim))
        self.b1 = nn.Parameter(torch.zeros(cfg.hidden_dim))
        self.w2 = nn.Parameter(torch.empty(cfg.hidden_dim, cfg.out_dim))
        self.b2 = nn.Parameter(torch.zeros(cfg.out_dim))
        for w in (self.w1, self.w2):
            nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, C), T % 4 == 0 -> GELU(mean4(x) @ w1 + b1) @ w2 + b2, shape (T/4, D)."""
        return seedvl_kernels.pool_adapter(x.to(self.w1.dtype), self.w1, self.b1, self.w2, self.b2)
