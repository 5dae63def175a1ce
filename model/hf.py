"""Hugging Face interop for the MoE LLM: Qwen3-MoE state-dict names and layouts, both ways.

Our MoE layer stacks every expert in the layout ``seedvl_kernels.moe_ffn`` multiplies by; Hugging
Face keeps one nn.Linear per expert and projection. Per layer l and expert e:

    ours                                    Hugging Face (Qwen3-MoE), prefix model.layers.l.mlp.
    layers.l.ffn.w_gate_up[e][:, :F]  (D, F)   experts.e.gate_proj.weight (F, D), transposed
    layers.l.ffn.w_gate_up[e][:, F:]  (D, F)   experts.e.up_proj.weight   (F, D), transposed
    layers.l.ffn.w_down[e]            (F, D)   experts.e.down_proj.weight (D, F), transposed
    layers.l.ffn.router.weight        (E, D)   gate.weight

Everything else is a rename (see ``_RENAMES``). Shared experts use DeepSeek's
``mlp.shared_experts.*`` names and dense layers ``mlp.{gate,up,down}_proj``; DeepSeek-V2 checkpoints
themselves do not load, since their attention is MLA and ours is GQA.

Safetensors files are read and written with the optional ``safetensors`` package, imported only
when a file function is called.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .llm import MoELLM

_L = r"^layers\.(\d+)\."
_HL = r"^model\.layers\.(\d+)\."
_RENAMES = [  # ours -> Hugging Face
    (r"^embed\.weight$", "model.embed_tokens.weight"),
    (r"^norm\.weight$", "model.norm.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (_L + r"attn_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (_L + r"ffn_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (_L + r"attn\.([qkvo]_proj|[qk]_norm)\.weight$", r"model.layers.\1.self_attn.\2.weight"),
    (_L + r"ffn\.router\.weight$", r"model.layers.\1.mlp.gate.weight"),
    (_L + r"ffn\.shared\.(\w+_proj)\.weight$", r"model.layers.\1.mlp.shared_experts.\2.weight"),
    (_L + r"ffn\.(gate_proj|up_proj|down_proj)\.weight$", r"model.layers.\1.mlp.\2.weight"),
]
_RENAMES_FROM_HF = [  # Hugging Face -> ours
    (r"^model\.embed_tokens\.weight$", "embed.weight"),
    (r"^model\.norm\.weight$", "norm.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (_HL + r"input_layernorm\.weight$", r"layers.\1.attn_norm.weight"),
    (_HL + r"post_attention_layernorm\.weight$", r"layers.\1.ffn_norm.weight"),
    (_HL + r"self_attn\.([qkvo]_proj|[qk]_norm)\.weight$", r"layers.\1.attn.\2.weight"),
    (_HL + r"mlp\.gate\.weight$", r"layers.\1.ffn.router.weight"),
    (_HL + r"mlp\.shared_experts\.(\w+_proj)\.weight$", r"layers.\1.ffn.shared.\2.weight"),
    (_HL + r"mlp\.(gate_proj|up_proj|down_proj)\.weight$", r"layers.\1.ffn.\2.weight"),
]


def _rename(name: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise KeyError(f"no name mapping for {name!r}")


def to_hf_state_dict(llm: MoELLM) -> dict[str, torch.Tensor]:
    """Our MoELLM's weights under Qwen3-MoE names and per-expert (out, in) layouts."""
    cfg, out = llm.cfg, {}
    for name, p in llm.state_dict().items():
        m = re.match(r"^layers\.(\d+)\.ffn\.(w_gate_up|w_down)$", name)
        if m is None:
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            out[_rename(name, _RENAMES)] = p
            continue
        prefix = f"model.layers.{m[1]}.mlp.experts"
        for e in range(cfg.num_experts):
            if m[2] == "w_gate_up":
                gate, up = p[e].split(cfg.moe_ffn_dim, dim=-1)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate.t().contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = up.t().contiguous()
            else:
                out[f"{prefix}.{e}.down_proj.weight"] = p[e].t().contiguous()
    return out


def from_hf_state_dict(llm: MoELLM, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict for ``llm`` built from Qwen3-MoE-named tensors (strict: every key must map)."""
    cfg, ours = llm.cfg, {}
    experts: dict[tuple[int, int, str], torch.Tensor] = {}
    for name, t in hf.items():
        m = re.match(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$", name)
        if m:
            experts[(int(m[1]), int(m[2]), m[3])] = t
        else:
            ours[_rename(name, _RENAMES_FROM_HF)] = t
    for layer in sorted({k[0] for k in experts}):
        get = lambda e, kind, layer=layer: _expert(experts, layer, e, kind)
        ours[f"layers.{layer}.ffn.w_gate_up"] = torch.stack(
            [torch.cat([get(e, "gate").t(), get(e, "up").t()], dim=-1) for e in range(cfg.num_experts)]
        )
        ours[f"layers.{layer}.ffn.w_down"] = torch.stack([get(e, "down").t() for e in range(cfg.num_experts)])
    if cfg.tie_embeddings:
        ours.setdefault("lm_head.weight", ours["embed.weight"])
    return ours


def _expert(experts: dict, layer: int, e: int, kind: str) -> torch.Tensor:
    try:
        return experts[(layer, e, kind)]
    except KeyError:
        raise KeyError(f"missing model.layers.{layer}.mlp.experts.{e}.{kind}_proj.weight") from None


def save_safetensors(llm: MoELLM, path: str | Path) -> None:
    """Write ``llm`` as one Qwen3-MoE-named safetensors file."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in to_hf_state_dict(llm).items()}, str(path))


def load_safetensors(llm: MoELLM, paths: str | Path | list[str | Path]) -> None:
    """Load Qwen3-MoE-named safetensors shards into ``llm`` (strict)."""
    from safetensors.torch import load_file

    hf: dict[str, torch.Tensor] = {}
    for p in [paths] if isinstance(paths, str | Path) else paths:
        hf.update(load_file(str(p)))
    llm.load_state_dict(from_hf_state_dict(llm, hf), strict=True)
