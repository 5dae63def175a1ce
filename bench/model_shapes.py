"""Model dimensions the benchmarks run at, named after the model they come from.

One place for every benchmark shape until the ``model/`` package's presets (model/config.py:
"seedvit-532m", "qwen3-30b-a3b", "qwen3-235b-a22b") are committed; then these names should come
from there. GPU runs use the model's shapes; CPU runs use the TINY_* shapes, which only
prove that the harness works.
"""

# Seed-ViT, Seed1.5-VL Table 1: patch 14, 2D RoPE, head dim 64, 20 heads, width 1280, MLP ratio 4,
# depth 27 (about 532M parameters).
SEEDVIT_PATCH = 14
SEEDVIT_HEADS = 20
SEEDVIT_HEAD_DIM = 64
SEEDVIT_WIDTH = SEEDVIT_HEADS * SEEDVIT_HEAD_DIM  # 1280
SEEDVIT_MLP_RATIO = 4
SEEDVIT_DEPTH = 27
SEEDVIT_ROPE_THETA = 10000.0

# Packed vision tokens in one ViT call (14 px patches before the 2x2 pool): 4k is a few ordinary
# images (one 896 x 896 image is 64 x 64 = 4096 patches), 16k a training micro-batch of images,
# 64k a long video or a batch near the largest the ViT sees at once.
SEEDVIT_TOKENS = (4096, 16384, 65536)
# Largest (row, col) patch index used for positions: 128 patches = 1792 px per side.
SEEDVIT_MAX_PATCHES_PER_SIDE = 128

# The MLP adapter maps pooled ViT features (SEEDVIT_WIDTH) to the LLM's hidden size. Seed1.5-VL
# publishes neither its LLM hidden size nor the adapter's hidden width. Stand-ins, as in
# ARCHITECTURE.md: the hidden sizes of Qwen3-30B-A3B (2048) and Qwen3-235B-A22B (4096); the adapter's
# hidden width equals the output width (the LLaVA-1.5 "mlp2x_gelu" projector's convention).
LLM_HIDDEN_STANDINS = (2048, 4096)
ADAPTER_TOKENS = (4096, 16384)  # ViT tokens entering the adapter (T/4 come out)
# The extremes the adapter must also serve: a 64k-token pack (SEEDVIT_TOKENS' largest) and the
# widest public MoE hidden size, DeepSeek-V3's 7168.
ADAPTER_LARGE_PACK = 65536
LLM_HIDDEN_WIDEST = 7168

# Tiny shapes for CPU runs (harness proof only; the numbers mean nothing).
TINY_VIT_TOKENS = 64
TINY_VIT_HEADS = 2
TINY_VIT_HEAD_DIM = 16
TINY_VIT_WIDTH = 32
TINY_LLM_HIDDEN = 48
