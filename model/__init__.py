"""Thin single-device PyTorch model of Seed1.5-VL: config presets, preprocessing, SeedViT, the
pooling MLP adapter, the MoE LLM and the VLM that joins them.

Model code knows nothing of parallelism (``trainer/`` applies it) and enters kernels only through
the public functions of :mod:`seedvl_kernels`.
"""

from .config import (
    PRESETS,
    AdapterConfig,
    LLMConfig,
    ViTConfig,
    VLMConfig,
    get_preset,
    preset_names,
)

__all__ = [
    "PRESETS",
    "AdapterConfig",
    "LLMConfig",
    "VLMConfig",
    "ViTConfig",
    "get_preset",
    "preset_names",
]
