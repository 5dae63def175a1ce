"""Model configs: frozen dataclasses and a registry of named presets.

Sources:
- SeedViT: Seed1.5-VL paper Table 1 (patch 14, 2D RoPE, head_dim 64, 20 heads, width 1280, MLP
  ratio 4, depth 27). The paper does not state the norm, the MLP activation, biases or the patch
  embedding beyond "a linear patch embedding layer" (§2.1.1). We use the standard ViT block
  (LayerNorm, GELU MLP, biases on every Linear, one final LayerNorm), which lands at 532.05M
  parameters -- the paper's "532M". A SwiGLU MLP of ratio 4 would give ~709M, and dropping all
  biases or norms moves the count by < 0.1%, so Table 1 + the parameter count pin the MLP to GELU
  (see model/summary.py for the breakdown).
- Adapter: 2x2 average pooling, then a two-layer MLP (paper §2, "a two-layer MLP subsequently
  processes these pooled features"). Its hidden width is not given; we use the LLM hidden size
  (LLaVA-style Linear(C_vit, D) -> GELU -> Linear(D, D)).
- LLM: Seed's 20B-active MoE LLM is not public. Presets borrow public MoE shapes as stand-ins:
  Qwen3-235B-A22B and Qwen3-30B-A3B (HF config.json values), and DeepSeek-V2-Lite with its shared
  experts and dense first layer -- but with GQA attention instead of DeepSeek's MLA (this model
  has one attention kind; 16 query / 8 KV heads of dim 128 keep the attention parameter count
  close to MLA's).
- Tiny presets (a few hundred thousand parameters) exist for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ViTConfig:
    """SeedViT: pre-norm ViT with 2D RoPE over native-resolution 14x14 patches."""

    width: int
    depth: int
    num_heads: int
    head_dim: int
    mlp_ratio: float = 4.0
    patch_size: int = 14
    in_channels: int = 3
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        _positive(self, "width", "depth", "num_heads", "head_dim", "patch_size", "in_channels")
        if self.head_dim % 4:
            raise ValueError(f"ViTConfig.head_dim: 2D RoPE needs a multiple of 4, got {self.head_dim}")

    @property
    def patch_dim(self) -> int:
        """Length of one flattened (patch, patch, channels) patch: 14*14*3 = 588."""
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class AdapterConfig:
    """2x2 average pool (4 consecutive tokens) -> Linear -> GELU -> Linear."""

    in_dim: int
    hidden_dim: int
    out_dim: int


@dataclass(frozen=True)
class LLMConfig:
    """Decoder-only MoE LLM: RMSNorm, GQA attention with 1D RoPE, routed (+ shared) SwiGLU experts.

    ``num_dense_layers`` first layers use a dense SwiGLU MLP of width ``dense_ffn_dim`` instead of
    experts (DeepSeek's ``first_k_dense_replace``). Shared experts are fused into one SwiGLU MLP of
    width ``num_shared_experts * moe_ffn_dim`` that every token passes through (DeepSeek style).
    """

    vocab_size: int
    hidden: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_ffn_dim: int
    num_shared_experts: int = 0
    num_dense_layers: int = 0
    dense_ffn_dim: int = 0
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-6
    qk_norm: bool = True  # Qwen3 RMS-normalises q and k per head before RoPE
    tie_embeddings: bool = False
    router_score: str = "softmax"
    router_renormalize: bool = True  # renormalise the top-k gate weights to sum to 1
    aux_loss_coef: float = 1e-3
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "hidden", "num_layers", "num_q_heads", "num_kv_heads", "head_dim")
        _positive(self, "num_experts", "top_k", "moe_ffn_dim")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"LLMConfig: num_q_heads ({self.num_q_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"LLMConfig.head_dim: RoPE needs an even head_dim, got {self.head_dim}")
        if self.top_k > self.num_experts:
            raise ValueError(f"LLMConfig: top_k ({self.top_k}) > num_experts ({self.num_experts})")
        if not 0 <= self.num_dense_layers <= self.num_layers:
            raise ValueError(f"LLMConfig.num_dense_layers: expected 0..{self.num_layers}")
        if self.num_dense_layers and self.dense_ffn_dim <= 0:
            raise ValueError("LLMConfig.dense_ffn_dim: must be > 0 when num_dense_layers > 0")
        if self.router_score not in ("softmax", "sigmoid"):
            raise ValueError(
                f"LLMConfig.router_score: expected 'softmax' or 'sigmoid', got {self.router_score!r}"
            )

    def is_moe_layer(self, index: int) -> bool:
        return index >= self.num_dense_layers


@dataclass(frozen=True)
class VLMConfig:
    """The whole model: SeedViT -> pooling adapter -> MoE LLM."""

    vit: ViTConfig
    adapter: AdapterConfig
    llm: LLMConfig
    image_token_id: int  # placeholder id whose embeddings are replaced by visual tokens

    def __post_init__(self) -> None:
        if self.adapter.in_dim != self.vit.width or self.adapter.out_dim != self.llm.hidden:
            raise ValueError(
                f"VLMConfig.adapter: expected in_dim {self.vit.width} (ViT width) and out_dim "
                f"{self.llm.hidden} (LLM hidden), got {self.adapter.in_dim} and {self.adapter.out_dim}"
            )
        if not 0 <= self.image_token_id < self.llm.vocab_size:
            raise ValueError(f"VLMConfig.image_token_id: expected 0..{self.llm.vocab_size - 1}")


Config = ViTConfig | LLMConfig | VLMConfig


def _positive(cfg: object, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value <= 0:
            raise ValueError(f"{type(cfg).__name__}.{name}: expected > 0, got {value}")


# ----------------------------------------------------------------------------- presets

SEEDVIT_532M = ViTConfig(width=1280, depth=27, num_heads=20, head_dim=64, mlp_ratio=4.0)
# Three blocks: the ViT has no absolute position embedding (2D RoPE only), and a third block helps
# it tell objects apart by colour and shape in a few patches.
VIT_TINY = ViTConfig(width=64, depth=3, num_heads=4, head_dim=16, mlp_ratio=4.0)

# Qwen3-235B-A22B (config.json): 235.1B total, 22.2B active (embeddings included).
QWEN3_235B_A22B = LLMConfig(
    vocab_size=151936, hidden=4096, num_layers=94, num_q_heads=64, num_kv_heads=4, head_dim=128,
    num_experts=128, top_k=8, moe_ffn_dim=1536,
)  # fmt: skip
# Qwen3-30B-A3B (config.json): 30.5B total, 3.3B active.
QWEN3_30B_A3B = LLMConfig(
    vocab_size=151936, hidden=2048, num_layers=48, num_q_heads=32, num_kv_heads=4, head_dim=128,
    num_experts=128, top_k=8, moe_ffn_dim=768,
)  # fmt: skip
# DeepSeek-V2-Lite shapes (64 routed experts top-6, 2 shared, first layer dense) with GQA, not MLA.
DSV2_LITE_GQA = LLMConfig(
    vocab_size=102400, hidden=2048, num_layers=27, num_q_heads=16, num_kv_heads=8, head_dim=128,
    num_experts=64, top_k=6, moe_ffn_dim=1408, num_shared_experts=2, num_dense_layers=1,
    dense_ffn_dim=10944, rope_theta=10000.0, qk_norm=False, router_renormalize=False,
)  # fmt: skip
# The tiny presets speak the trainer's byte tokenizer (trainer/data/tokenizer.py): 256 bytes + 12
# special tokens in 272 rows, <|image_pad|> = 261, so preset and tokenizer agree by construction.
# Sized for the default CPU run (profiles/20261201_main_job_learning.md): the width stays 64, which
# keeps the recipe's LR and sequence-budget scaling where they were, while a third layer and
# experts of width 64 (an active MLP of 2 x hidden) give the question -> visual-token binding more
# room at ~1.5x the cost per token.
LLM_TINY = LLMConfig(
    vocab_size=272, hidden=64, num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=16,
    num_experts=4, top_k=2, moe_ffn_dim=64, rope_theta=10000.0, z_loss_coef=1e-3,
)  # fmt: skip
# Exercises the DeepSeek paths (shared experts, a dense first layer, no renormalisation); only tests
# use it, so it keeps the small experts.
LLM_TINY_SHARED = replace(
    LLM_TINY, num_layers=3, moe_ffn_dim=32, num_shared_experts=1, num_dense_layers=1, dense_ffn_dim=96,
    qk_norm=False, router_renormalize=False,
)  # fmt: skip


def _vlm(vit: ViTConfig, llm: LLMConfig, image_token_id: int) -> VLMConfig:
    adapter = AdapterConfig(in_dim=vit.width, hidden_dim=llm.hidden, out_dim=llm.hidden)
    return VLMConfig(vit=vit, adapter=adapter, llm=llm, image_token_id=image_token_id)


# Qwen's tokenizer has <|image_pad|> = 151655; DeepSeek-V2's has no image token, so the last id is
# reserved for it; the tiny presets use the byte tokenizer's <|image_pad|>.
PRESETS: dict[str, Config] = {
    "seedvit-532m": SEEDVIT_532M,
    "vit-tiny": VIT_TINY,
    "qwen3-235b-a22b": QWEN3_235B_A22B,
    "qwen3-30b-a3b": QWEN3_30B_A3B,
    "dsv2-lite-gqa": DSV2_LITE_GQA,
    "llm-tiny": LLM_TINY,
    "llm-tiny-shared": LLM_TINY_SHARED,
    "seedvl-qwen3-235b-a22b": _vlm(SEEDVIT_532M, QWEN3_235B_A22B, image_token_id=151655),
    "seedvl-qwen3-30b-a3b": _vlm(SEEDVIT_532M, QWEN3_30B_A3B, image_token_id=151655),
    "seedvl-dsv2-lite-gqa": _vlm(SEEDVIT_532M, DSV2_LITE_GQA, image_token_id=102399),
    "seedvl-tiny": _vlm(VIT_TINY, LLM_TINY, image_token_id=261),
    "seedvl-tiny-shared": _vlm(VIT_TINY, LLM_TINY_SHARED, image_token_id=261),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> Config:
    """The config registered as ``name``; a KeyError lists the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}") from None


__all__ = [
    "PRESETS",
    "AdapterConfig",
    "Config",
    "LLMConfig",
    "VLMConfig",
    "ViTConfig",
    "get_preset",
    "preset_names",
]
