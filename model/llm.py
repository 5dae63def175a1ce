"""Decoder-only MoE LLM over packed documents (Qwen3-MoE / DeepSeek-style, GQA attention).

Each layer: x + Attention(RMSNorm(x)), then h + FFN(RMSNorm(h)) where FFN is a routed-expert MoE
(``seedvl_kernels.route`` + ``seedvl_kernels.moe_ffn``, optionally plus always-on shared experts) or,
for the first ``num_dense_layers`` layers, a dense SwiGLU MLP. Attention is causal per document:
documents are packed back to back and ``cu_seqlens`` keeps each one to itself, so a packed
forward equals per-document forwards. RoPE is 1D over ``position_ids`` (restarting at 0 in each
document, which the packer provides) with the rotate_half convention of Llama/Qwen, so Hugging Face
weights drop in.

Each MoE layer's load-balancing and router z-losses are averaged over MoE layers and returned with
the output; the trainer scales them by ``aux_loss_coef`` / ``z_loss_coef``.

Shape legend:
    T    total tokens in the packed batch; B documents; cu_seqlens (B+1,) int32
    D    hidden size, V vocab
    Hq   query heads, Hkv key/value heads (Hq % Hkv == 0), Dh head dim
    E    routed experts, k experts per token, F expert FFN width
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

import seedvl_kernels

from .config import LLMConfig

if TYPE_CHECKING:
    from .generate import KVCache


class LLMOutput(NamedTuple):
    logits: torch.Tensor  # (T, V), or the final hidden states (T, D) from ``forward_hidden``
    load_balancing_loss: torch.Tensor  # scalar fp32, mean over MoE layers (0 without MoE layers)
    router_z_loss: torch.Tensor  # scalar fp32, mean over MoE layers


def _normal_(w: torch.Tensor, std: float = 0.02) -> None:
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with the statistics in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # Hugging Face's rounding order (normalise, round, scale), returned in the input dtype so that
        # an fp32 weight under autocast does not promote q/k away from v.
        return (self.weight * x32.to(x.dtype)).to(x.dtype)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, 1, Dh/2) fp32 cos and sin of position * theta^(-2j/Dh), shared by all layers."""
    j = torch.arange(0, head_dim, 2, dtype=torch.float64, device=position_ids.device)
    inv_freq = (1.0 / theta ** (j / head_dim)).to(torch.float32)
    angle = position_ids.to(torch.float32)[:, None] * inv_freq
    return angle.cos()[:, None, :], angle.sin()[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate_half RoPE on (T, H, Dh): dim i rotates with dim i + Dh/2; math in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    """GQA attention: q/k/v projections (no bias), optional per-head q/k RMSNorm, RoPE, causal varlen.

    With a KV cache (generation), the new keys/values are appended to the cache and the new queries
    attend to each sequence's whole cache; the causal mask aligns bottom-right, so prefill and
    one-token decode steps are the same call.

    Context parallel: when the trainer sets ``cp_group``, the inputs are this rank's zigzag shard
    (``seedvl_kernels.zigzag_shard``: local cu_seqlens and max_seqlen, global position
    ids) and attention runs as ``ring_attention`` over the group. Nothing else in the model changes.
    """

    cp_group: dist.ProcessGroup | None = None

    def __init__(self, cfg: LLMConfig, index: int = 0) -> None:
        super().__init__()
        self.index = index
        self.hq, self.hkv, self.dh = cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden, self.hq * self.dh, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, self.hkv * self.dh, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, self.hkv * self.dh, bias=False)
        self.o_proj = nn.Linear(self.hq * self.dh, cfg.hidden, bias=False)
        self.q_norm = RMSNorm(self.dh, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.dh, cfg.norm_eps) if cfg.qk_norm else None
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            _normal_(linear.weight)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x (T, D) -> (T, D)."""
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.hq, self.dh)
        k = self.k_proj(x).view(T, self.hkv, self.dh)
        v = self.v_proj(x).view(T, self.hkv, self.dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is None and self.cp_group is not None:
            out = seedvl_kernels.ring_attention(q, k, v, cu_seqlens, max_seqlen, group=self.cp_group)
        elif kv_cache is None:
            out = seedvl_kernels.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True)
        else:
            k, v, cu_k, max_k = kv_cache.update(self.index, k, v)
            out = seedvl_kernels.varlen_attention(
                q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k=cu_k, max_seqlen_k=max_k, causal=True
            )
        return self.o_proj(out.reshape(T, self.hq * self.dh))


class SwiGLU(nn.Module):
    """Dense down(silu(gate(x)) * up(x)): the dense first layers and the shared experts."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)
        for linear in (self.gate_proj, self.up_proj, self.down_proj):
            _normal_(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RoutedExperts(nn.Module):
    """The routed experts of one MoE layer, stacked in the layout ``moe_ffn`` multiplies by:
    w_gate_up (E, D, 2F) with the gate half first (Hugging Face Qwen3-MoE order, transposed) and
    w_down (E, F, D).

    Expert parallel: when the trainer sets ``ep_group``, the weights are DTensors sharded on the
    expert dimension over that group (this rank holds E/W experts) and the layer runs as
    ``ep_moe_ffn``: tokens travel to the rank of their expert and back. Nothing else changes.
    """

    ep_group: dist.ProcessGroup | None = None

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.w_gate_up = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden, 2 * cfg.moe_ffn_dim))
        self.w_down = nn.Parameter(torch.empty(cfg.num_experts, cfg.moe_ffn_dim, cfg.hidden))
        # Initialised by MoE, which owns the order of the random draws.

    def forward(self, x: torch.Tensor, gate_weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x (T, D), gate_weights (T, k) fp32, expert_ids (T, k) int32 -> (T, D)."""
        if self.ep_group is None:
            return seedvl_kernels.moe_ffn(x, gate_weights, expert_ids, self.w_gate_up, self.w_down)
        w_gate_up, w_down = (
            w.to_local() if isinstance(w, DTensor) else w for w in (self.w_gate_up, self.w_down)
        )
        return seedvl_kernels.ep_moe_ffn(x, gate_weights, expert_ids, w_gate_up, w_down, group=self.ep_group)


class MoE(nn.Module):
    """Router -> top-k routed SwiGLU experts (one fused op) [+ shared experts every token uses].

    The balance statistics (load-balancing and z-loss) cover the rows where ``token_mask`` is True
    (all rows when it is None). Context parallel: when the trainer sets ``cp_group``, they cover
    the tokens of every rank of the group and each rank returns its share, so the shares sum to the
    losses of the unsharded batch (``seedvl_kernels.route``'s ``group``).
    """

    cp_group: dist.ProcessGroup | None = None

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.top_k, self.score, self.renormalize = cfg.top_k, cfg.router_score, cfg.router_renormalize
        router = nn.Linear(cfg.hidden, cfg.num_experts, bias=False)
        # Experts registered first: parameter order (and so the optimizer's) stays experts, router.
        self.experts = RoutedExperts(cfg)
        self.router = router
        for w in (self.router.weight, self.experts.w_gate_up, self.experts.w_down):
            _normal_(w)
        shared = cfg.num_shared_experts * cfg.moe_ffn_dim
        self.shared = SwiGLU(cfg.hidden, shared) if shared else None

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, D) -> (y (T, D), load-balancing loss, router z-loss)."""
        # Router logits in fp32: small (T, E) GEMM, and top-k choices must not flip on bf16 rounding.
        logits = F.linear(x.float(), self.router.weight.float())
        r = seedvl_kernels.route(
            logits, self.top_k, score=self.score, renormalize=self.renormalize,
            token_mask=token_mask, group=self.cp_group,
        )  # fmt: skip
        y = self.experts(x, r.gate_weights, r.expert_ids)
        if self.shared is not None:
            y = y + self.shared(x)
        return y, r.load_balancing_loss, r.router_z_loss


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, index: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.attn = Attention(cfg, index)
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(index)
        self.ffn = MoE(cfg) if self.is_moe else SwiGLU(cfg.hidden, cfg.dense_ffn_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        kv_cache: KVCache | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        h = x + self.attn(self.attn_norm(x), cos, sin, cu_seqlens, max_seqlen, kv_cache)
        if not self.is_moe:
            return h + self.ffn(self.ffn_norm(h)), None, None
        y, lb, z = self.ffn(self.ffn_norm(h), token_mask)
        return h + y, lb, z


class MoELLM(nn.Module):
    """Token embedding -> num_layers x DecoderLayer -> RMSNorm -> LM head."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        _normal_(self.embed.weight)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            _normal_(self.lm_head.weight)

    def forward_hidden(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        kv_cache: KVCache | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> LLMOutput:
        """Final-normed hidden states (T, D) of packed input embeddings, plus the MoE losses.

        The LM head is left to the caller, so a trainer can fuse it with the loss (vocab 152k).
        With ``kv_cache`` (model.generate) the tokens extend the cached sequences. ``token_mask``
        (T,) bool marks the rows the MoE balance statistics count (padding rows are False).
        """
        if inputs_embeds.ndim != 2 or inputs_embeds.shape[1] != self.cfg.hidden:
            raise ValueError(
                f"inputs_embeds: expected (T, {self.cfg.hidden}), got {tuple(inputs_embeds.shape)}"
            )
        if position_ids.shape != inputs_embeds.shape[:1]:
            raise ValueError(
                f"position_ids: expected shape ({inputs_embeds.shape[0]},), got {tuple(position_ids.shape)}"
            )
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        x = inputs_embeds
        lb_losses, z_losses = [], []
        for layer in self.layers:
            x, lb, z = layer(x, cos, sin, cu_seqlens, max_seqlen, kv_cache, token_mask)
            if lb is not None:
                lb_losses.append(lb)
                z_losses.append(z)
        zero = x.new_zeros((), dtype=torch.float32)
        lb_loss = torch.stack(lb_losses).float().mean() if lb_losses else zero
        z_loss = torch.stack(z_losses).float().mean() if z_losses else zero
        return LLMOutput(self.norm(x), lb_loss, z_loss)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        *,
        inputs_embeds: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> LLMOutput:
        """Logits of a packed batch of documents.

        Args:
            input_ids: (T,) int64 token ids, or None when ``inputs_embeds`` is given.
            position_ids: (T,) int positions, restarting at 0 in each document.
            cu_seqlens: (B+1,) int32 document boundaries; attention is causal inside each.
            max_seqlen: host int, the longest document (from the packer: no sync here).
            inputs_embeds: (T, D) embeddings to use instead of ``embed(input_ids)`` (the VLM).
            kv_cache: generation only (model.generate): the tokens extend the cached sequences.
            token_mask: (T,) bool, the rows the MoE balance statistics count (None: all); the
                trainer clears it on padding rows (context-parallel shards).
        Returns:
            LLMOutput with logits (T, V) and the mean MoE load-balancing and z-losses.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MoELLM: pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        hidden, lb, z = self.forward_hidden(
            inputs_embeds, position_ids, cu_seqlens, max_seqlen, kv_cache, token_mask
        )
        return LLMOutput(self.lm_head(hidden), lb, z)
