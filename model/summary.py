"""Parameter counts and FLOPs per token of a preset, from a model built on the meta device.

    python -m model.summary seedvit-532m
    python -m model.summary seedvl-qwen3-235b-a22b --json --seq-len 8192

Nothing is allocated: modules are built under ``torch.device("meta")`` and only shapes are read, so
a 235B model summarises in a second and no kernel op is needed.

What is counted:
- params: every parameter once (tied embeddings once). For MoE, "active" counts a token's share of
  the routed experts (top_k / num_experts of them); attention, router, shared experts, norms and
  embeddings are all active.
- FLOPs per token, forward only (training is about 3x: the backward is twice the forward):
  2 * (active matmul weights) -- every weight matrix a token is multiplied by, the LM head included,
  the embedding lookup and norm/bias vectors excluded -- plus attention scores and the weighted
  sum, 4 * ctx * heads * head_dim per layer, where ctx is the sequence length S for the
  bidirectional ViT (S patches of one image) and (S + 1) / 2 on average for the causal LLM
  (documents of S tokens). Adapter FLOPs are per visual (LLM-side) token.

The seedvit-532m check (paper: 532M). Table 1 with a standard ViT block gives 532,047,360:
    patch embedding Linear(588 -> 1280) with bias      753,920
    27 blocks x 19,677,440                          531,290,880
        qkv 1280 -> 3840 (+bias)   4,919,040   proj 1280 -> 1280 (+bias) 1,639,680
        MLP 1280 -> 5120 -> 1280 (GELU, +biases) 13,113,600   2 LayerNorms 5,120
    final LayerNorm                                      2,560
i.e. +0.009% from 532M. A SwiGLU MLP (3 matrices of 5120) would give ~709M, so the MLP is the
classic 2-matrix GELU one; biases (0.31M) and norms (0.14M) are within the paper's rounding, so
they cannot be pinned down by the count; we keep them (standard ViT). RoPE has no parameters.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass

import torch
from torch import nn

from .config import Config, LLMConfig, ViTConfig, VLMConfig, get_preset, preset_names

# Counts the paper states, checked by the summary.
PAPER_PARAMS = {"seedvit-532m": 532_000_000}

# (component, pattern on the parameter name without its "vit."/"adapter."/"llm." prefix).
_VIT_PARTS = [
    ("patch_embed", r"^patch_embed\."),
    ("attention", r"\.(qkv|proj)\."),
    ("mlp", r"\.fc[12]\."),
    ("norms", r"norm"),
]
_LLM_PARTS = [
    ("embed", r"^embed\."),
    ("lm_head", r"^lm_head\."),
    ("attention", r"\.attn\.(q|k|v|o)_proj\."),
    ("router", r"\.ffn\.router\."),
    ("routed_experts", r"\.ffn\.experts\.w_(gate_up|down)$"),
    ("shared_experts", r"\.ffn\.shared\."),
    ("dense_mlp", r"\.ffn\.(gate|up|down)_proj\."),
    ("norms", r"norm"),
]


@dataclass
class Part:
    params: int = 0
    active: int = 0
    matmul_active: int = 0  # active weights a token is multiplied by (matrices, not lookups)


def build(cfg: Config) -> nn.Module:
    """The nn.Module of a config (SeedViT, MoELLM or SeedVLM), parameters wherever torch.device says."""
    from .llm import MoELLM
    from .vit import SeedViT
    from .vlm import SeedVLM

    if isinstance(cfg, VLMConfig):
        return SeedVLM(cfg)
    if isinstance(cfg, LLMConfig):
        return MoELLM(cfg)
    return SeedViT(cfg)


def _classify(name: str, parts: list[tuple[str, str]]) -> str:
    for part, pattern in parts:
        if re.search(pattern, name):
            return part
    raise AssertionError(f"summary: parameter {name!r} fits no component; add it to the table")


def _tower(module: nn.Module, prefix: str, parts, llm: LLMConfig | None) -> dict[str, Part]:
    out: dict[str, Part] = {}
    for name, p in module.named_parameters():
        part = _classify(name, parts)
        n = p.numel()
        active = n * llm.top_k // llm.num_experts if part == "routed_experts" else n
        row = out.setdefault(f"{prefix}{part}", Part())
        row.params += n
        row.active += active
        if p.ndim >= 2 and part != "embed":
            row.matmul_active += active
    if llm is not None and llm.tie_embeddings:  # the head reuses the embedding matrix as a matmul
        out.setdefault(f"{prefix}lm_head", Part()).matmul_active += llm.vocab_size * llm.hidden
    return out


def count(cfg: Config) -> dict[str, Part]:
    """Per-component parameter counts of ``cfg``, built on the meta device."""
    with torch.device("meta"):
        model = build(cfg)
    if isinstance(cfg, ViTConfig):
        return _tower(model, "vit.", _VIT_PARTS, None)
    if isinstance(cfg, LLMConfig):
        return _tower(model, "llm.", _LLM_PARTS, cfg)
    parts = _tower(model.vit, "vit.", _VIT_PARTS, None)
    n = sum(p.numel() for p in model.adapter.parameters())
    w = sum(p.numel() for p in model.adapter.parameters() if p.ndim >= 2)
    parts["adapter"] = Part(n, n, w)
    parts.update(_tower(model.llm, "llm.", _LLM_PARTS, cfg.llm))
    return parts


def vit_flops_per_token(cfg: ViTConfig, parts: dict[str, Part], seq_len: int) -> dict[str, int]:
    matmul = 2 * sum(p.matmul_active for k, p in parts.items() if k.startswith("vit."))
    attn = 4 * seq_len * cfg.num_heads * cfg.head_dim * cfg.depth
    return {"matmul": matmul, "attention": attn, "total": matmul + attn, "seq_len": seq_len}


def llm_flops_per_token(cfg: LLMConfig, parts: dict[str, Part], seq_len: int) -> dict[str, int]:
    matmul = 2 * sum(p.matmul_active for k, p in parts.items() if k.startswith("llm."))
    attn = 4 * (seq_len + 1) // 2 * cfg.num_q_heads * cfg.head_dim * cfg.num_layers
    return {"matmul": matmul, "attention": attn, "total": matmul + attn, "seq_len": seq_len}


def summarize(name: str, seq_len: int = 4096, vit_seq_len: int = 1024) -> dict:
    """Everything the CLI prints, as a JSON-ready dict."""
    cfg = get_preset(name)
    parts = count(cfg)
    total = sum(p.params for p in parts.values())
    active = sum(p.active for p in parts.values())
    flops: dict[str, dict[str, int]] = {}
    vit = cfg if isinstance(cfg, ViTConfig) else getattr(cfg, "vit", None)
    llm = cfg if isinstance(cfg, LLMConfig) else getattr(cfg, "llm", None)
    if vit is not None:
        flops["vit_per_patch"] = vit_flops_per_token(vit, parts, vit_seq_len)
    if "adapter" in parts:
        flops["adapter_per_visual_token"] = {"total": 2 * parts["adapter"].matmul_active}
    if llm is not None:
        flops["llm_per_token"] = llm_flops_per_token(llm, parts, seq_len)
    out = {
        "preset": name,
        "config": type(cfg).__name__,
        "components": {k: {"params": p.params, "active": p.active} for k, p in parts.items()},
        "total_params": total,
        "active_params": active,
        "flops_forward": flops,
    }
    if name in PAPER_PARAMS:
        paper = PAPER_PARAMS[name]
        out["paper_params"] = {"stated": paper, "relative_diff": (total - paper) / paper}
    return out


def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def render(s: dict) -> str:
    lines = [f"{s['preset']} ({s['config']})", f"{'component':<22}{'params':>18}{'active':>18}"]
    for name, c in s["components"].items():
        lines.append(f"{name:<22}{c['params']:>18,}{c['active']:>18,}")
    lines.append(f"{'total':<22}{s['total_params']:>18,}{s['active_params']:>18,}")
    lines.append(f"= {_fmt(s['total_params'])} total, {_fmt(s['active_params'])} active")
    if "paper_params" in s:
        p = s["paper_params"]
        lines.append(f"paper: {_fmt(p['stated'])}; ours differs by {100 * p['relative_diff']:+.3f}%")
    lines.append("forward FLOPs per token (2 x active matmul weights + attention; training ~3x):")
    for name, f in s["flops_forward"].items():
        detail = (
            f" = {_fmt(f['matmul'])} matmul + {_fmt(f['attention'])} attention at seq len {f['seq_len']}"
            if "matmul" in f
            else ""
        )
        lines.append(f"  {name:<26}{_fmt(f['total']):>10}{detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.summary", description=__doc__.split("\n")[0])
    ap.add_argument("preset", help=f"one of: {', '.join(preset_names())}")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--seq-len", type=int, default=4096, help="LLM document length for attention FLOPs")
    ap.add_argument("--vit-seq-len", type=int, default=1024, help="patches per image (1024 = 448x448 px)")
    args = ap.parse_args(argv)
    try:
        s = summarize(args.preset, args.seq_len, args.vit_seq_len)
    except KeyError as e:
        print(e.args[0], file=sys.stderr)
        return 2
    print(json.dumps(s, indent=2) if args.json else render(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
