"""The heads SeedViT is pre-trained with (paper §2.1.2), and the model that holds them.

- :class:`MIMDecoder`: masked image modelling. The ViT encodes only the kept patches (with their
  own 2D RoPE positions); the decoder puts the encoded tokens back at their places, fills the masked
  places with a learned mask token, runs one ViT block over each whole image (2D RoPE of every
  place, packed through ``varlen_attention``) and predicts the teacher's feature at every place.
- :class:`AttentionPool`: a learned probe attends over an image's (or a video's) patch features
  and, through a residual MLP, gives one embedding per sequence (the SigLIP "MAP" head). The
  probe's attention is one query per sequence against its keys (``cu_seqlens_k``), so packing
  never mixes images.
- :class:`TextEncoder`: a small pre-norm transformer over caption token ids, mean-pooled per
  caption. Its blocks are :class:`model.vit.ViTBlock` with positions (0, i): 2D RoPE with a zero
  row is 1D RoPE on half of each head.
- :func:`embedding_norm`: batch normalisation (no affine) of each tower's embeddings before the
  losses (why: its docstring); images, videos and their captions keep separate statistics.
- :class:`SigLIPHead`: the sigmoid loss's temperature and bias, and the pairwise logits they give.
- :class:`SeedViTPretrain`: SeedViT plus these heads and a SuperClass classifier (the image
  embedding -> one logit per subword of the caption vocabulary).

Every parameter lives in a submodule that a step calls (none on :class:`SeedViTPretrain` itself),
so that each can be its own FSDP2 unit: the trainer calls the towers and heads one by one, and a
unit's parameters are gathered when its own forward runs.

Shape legend:
    T   patches in the packed batch; B images (or videos); C ViT width; E embedding width
    L   caption tokens in the packed batch; N captions; V caption vocabulary; K teacher feature
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

import seedvl_kernels

from .config import ViTConfig
from .vit import SeedViT, ViTBlock, init_linear

TIME_FEATURES = 16  # sinusoidal features of a video frame's timestamp


@dataclass(frozen=True)
class PretrainConfig:
    """The ViT and its pre-training heads. ``embed_dim``: the joint image-text space (the paper
    pools to 1280, SeedViT's width); ``target_dim``: the MIM teacher's feature width."""

    vit: ViTConfig
    text_vocab: int
    target_dim: int
    embed_dim: int = 0  # 0: the ViT width
    text_width: int = 0  # 0: the ViT width
    text_depth: int = 2

    def __post_init__(self) -> None:
        if self.text_vocab <= 0 or self.target_dim <= 0 or self.text_depth <= 0:
            raise ValueError("PretrainConfig: text_vocab, target_dim and text_depth must be > 0")

    @property
    def embed(self) -> int:
        return self.embed_dim or self.vit.width

    @property
    def text(self) -> ViTConfig:
        width = self.text_width or self.vit.width
        heads = max(1, width // self.vit.head_dim)
        return replace(self.vit, width=width, depth=self.text_depth, num_heads=heads)


def _segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64: which sequence each packed row belongs to."""
    lengths = cu_seqlens.diff().long()
    return torch.repeat_interleave(
        torch.arange(lengths.numel(), device=cu_seqlens.device), lengths, output_size=total
    )


class MIMDecoder(nn.Module):
    """Encoded kept tokens + mask tokens -> one ViT block over whole images -> teacher features."""

    def __init__(self, cfg: ViTConfig, target_dim: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(cfg.width, cfg.width)
        self.mask_token = nn.Parameter(torch.zeros(cfg.width))
        self.block = ViTBlock(cfg)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.width, target_dim)
        for linear in (self.proj_in, self.head):
            init_linear(linear)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(
        self,
        kept: torch.Tensor,
        keep_idx: torch.Tensor,
        pos_hw: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
    ) -> torch.Tensor:
        """kept (Tk, C) encoder outputs of the rows ``keep_idx`` (Tk,) of the full packed batch,
        whose positions are pos_hw (T, 2) and images cu_seqlens; returns (T, target_dim)."""
        T = pos_hw.shape[0]
        x = self.mask_token.to(kept.dtype).expand(T, -1).clone()
        x = x.index_copy(0, keep_idx, self.proj_in(kept))
        x = self.block(x, pos_hw, cu_seqlens, max_seqlen)
        return self.head(self.norm(x))


class AttentionPool(nn.Module):
    """One learned probe per head attends over each sequence's tokens; + residual MLP; -> (B, E)."""

    def __init__(self, cfg: ViTConfig, out_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        inner = cfg.num_heads * cfg.head_dim
        self.probe = nn.Parameter(torch.randn(cfg.num_heads, cfg.head_dim) * 0.02)
        self.kv = nn.Linear(cfg.width, 2 * inner)
        self.proj = nn.Linear(inner, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)  # see embedding_norm
        self.out = nn.Linear(cfg.width, out_dim, bias=False)
        for linear in (self.kv, self.proj, self.fc1, self.fc2, self.out):
            init_linear(linear)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """x (T, C) packed by cu_seqlens (B+1,) -> (B, E); an empty sequence pools to the MLP of 0."""
        B = cu_seqlens.numel() - 1
        k, v = self.kv(x).view(x.shape[0], 2, self.num_heads, self.head_dim).unbind(1)
        q = self.probe.to(x.dtype).expand(B, -1, -1).contiguous()
        cu_q = torch.arange(B + 1, dtype=torch.int32, device=x.device)
        pooled = seedvl_kernels.varlen_attention(
            q, k, v, cu_q, 1, cu_seqlens_k=cu_seqlens, max_seqlen_k=max(1, max_seqlen)
        )
        h = self.proj(pooled.reshape(B, -1))
        h = h + self.fc2(F.gelu(self.fc1(self.norm(h))))
        return self.out(h)


class TextEncoder(nn.Module):
    """Token embedding -> depth x ViTBlock (1D RoPE as 2D with row 0) -> LN -> mean per caption -> (N, E)."""

    def __init__(self, cfg: ViTConfig, vocab: int, out_dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.width)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps, bias=False)  # see embedding_norm
        self.out = nn.Linear(cfg.width, out_dim, bias=False)
        init_linear(self.out)

    def forward(self, ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """ids (L,) int64 packed by cu_seqlens (N+1,) int32 -> (N, E)."""
        L = ids.shape[0]
        seg = _segment_ids(cu_seqlens, L)
        col = torch.arange(L, device=ids.device) - cu_seqlens.long()[seg]
        pos = torch.stack([torch.zeros_like(col), col], dim=-1).to(torch.int32)
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, pos, cu_seqlens, max_seqlen)
        x = self.norm(x)
        N = cu_seqlens.numel() - 1
        sums = x.new_zeros(N, x.shape[1]).index_add_(0, seg, x)
        mean = sums / cu_seqlens.diff().clamp(min=1).to(x.dtype)[:, None]
        return self.out(mean)


def time_features(seconds: torch.Tensor, dim: int = TIME_FEATURES) -> torch.Tensor:
    """(T,) seconds -> (T, dim) sines and cosines at periods from 0.5 s to about 60 s."""
    freqs = 2 * math.pi / (0.5 * (120.0 ** (torch.arange(dim // 2, dtype=torch.float32) / (dim // 2 - 1))))
    angles = seconds.float()[:, None] * freqs.to(seconds.device)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def embedding_norm(dim: int) -> nn.BatchNorm1d:
    """Batch normalisation without affine parameters of a tower's embeddings (the running
    statistics in evaluation).

    Rendered scenes share most of their pixels, so a fresh encoder's pooled embeddings are nearly
    parallel (cosine 0.98 between images). Measured on the tiny preset, the sigmoid loss then pulls
    both towers onto one direction within ten steps, where its gradient vanishes (the loss stays
    at the trivial ln N + 1, zero-shot at chance); centred and scaled per batch, the embeddings
    start spread out and the same 16 pairs are matched in 20 steps. Under data parallelism the
    statistics are the global batch's (the rows are gathered first: ``gather`` of
    :meth:`SeedViTPretrain.encode_images`), so every rank keeps the same running statistics.

    A bias whose only effect is a constant shift of the normalised rows (the pooling head's last
    residual branch and output, the text encoder's final norm and output) would have a gradient of
    exactly zero, and AdamW turned its rounding noise into full learning-rate steps (measured: the
    one-process and two-rank runs of the same batches drifted apart by 1e-3 in those biases and 2e-5
    in the loss after one step), so those layers have none."""
    return nn.BatchNorm1d(dim, affine=False)


class SigLIPHead(nn.Module):
    """SigLIP's temperature t and bias b (Zhai et al. 2023 initialise them to log 10 and -10):
    ``forward(image, text)`` gives the logits exp(t) cos(x_i, y_j) + b of every pair. Both are
    one-element vectors rather than scalars, which FSDP2 cannot shard."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([math.log(10.0)]))
        self.bias = nn.Parameter(torch.tensor([-10.0]))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(N, E) image and (M, E) text embeddings -> (N, M) fp32 logits (also under autocast: the
        cosines of nearly equal embeddings need more than bf16's 8 bits)."""
        if image.ndim != 2 or text.ndim != 2 or image.shape[1] != text.shape[1]:
            raise ValueError(
                f"image, text: expected (N, E) and (M, E), got {tuple(image.shape)}, {tuple(text.shape)}"
            )
        with torch.autocast(image.device.type, enabled=False):
            x, y = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
            return self.scale.float().exp() * (x @ y.t()) + self.bias.float()


class SeedViTPretrain(nn.Module):
    """SeedViT + MIM decoder + attention pooling + text encoder + SuperClass head + SigLIP head."""

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vit = SeedViT(cfg.vit)
        self.mim = MIMDecoder(cfg.vit, cfg.target_dim)
        self.pool = AttentionPool(cfg.vit, cfg.embed)
        # A frame's timestamp, added to its patch features before pooling a video; zero at the
        # start, so images (no timestamps) and videos share the pooling head.
        self.time = nn.Linear(TIME_FEATURES, cfg.vit.width)
        nn.init.zeros_(self.time.weight)
        nn.init.zeros_(self.time.bias)
        self.text = TextEncoder(cfg.text, cfg.text_vocab, cfg.embed)
        self.image_norm, self.video_norm = embedding_norm(cfg.embed), embedding_norm(cfg.embed)
        # Clips' captions (motion) and images' captions (scenes) keep separate statistics too: the
        # video stage alternates the two, and one running mean over both shifted the scene prompts
        # of the image zero-shot sets (measured: colour 0.48 -> 0.39, count 0.58 -> 0.53).
        self.text_norm, self.video_text_norm = embedding_norm(cfg.embed), embedding_norm(cfg.embed)
        self.superclass = nn.Linear(cfg.embed, cfg.text_vocab)
        init_linear(self.superclass)
        self.siglip = SigLIPHead()

    def encode_images(
        self,
        patches: torch.Tensor,
        pos_hw: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        *,
        frame_times: torch.Tensor | None = None,
        cu_videos: torch.Tensor | None = None,
        max_video: int = 0,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(B, E) one embedding per image; with ``frame_times`` (T,) and ``cu_videos`` (V+1,) the
        patches of consecutive frames pool together into one embedding per video, (V, E).
        ``gather``: applied to the pooled rows before the batch normalisation; under data
        parallelism it collects every rank's rows (trainer.vit_pretrain.losses.gather_embeddings),
        so that the statistics, and the rows returned, are the global batch's. The rows are fp32
        from the gather on, whatever the towers compute in (bf16 under mixed precision)."""
        x = self.vit(patches, pos_hw, cu_seqlens, max_seqlen)
        if frame_times is None:
            pooled, norm = self.pool(x, cu_seqlens, max_seqlen), self.image_norm
        else:
            x = x + self.time(time_features(frame_times)).to(x.dtype)
            pooled, norm = self.pool(x, cu_videos, max_video), self.video_norm
        pooled = pooled.float()
        return norm(pooled if gather is None else gather(pooled))

    def encode_text(
        self,
        ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        *,
        video: bool = False,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(N, E) one embedding per caption; ``video``: captions of clips (their own statistics);
        ``gather`` as for :meth:`encode_images`."""
        norm = self.video_text_norm if video else self.text_norm
        x = self.text(ids, cu_seqlens, max_seqlen).float()
        return norm(x if gather is None else gather(x))


__all__ = [
    "AttentionPool",
    "MIMDecoder",
    "PretrainConfig",
    "SeedViTPretrain",
    "SigLIPHead",
    "TextEncoder",
    "time_features",
]
