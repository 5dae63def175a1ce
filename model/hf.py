"""Hugging Face interop: Qwen3-MoE checkpoints <-> MoELLM (Qwen2-VL vision towers: model.hf_vision).

LLM. Our MoE layer stacks every expert in the layout ``seedvl_kernels.moe_ffn`` multiplies by;
Hugging Face checkpoints keep one nn.Linear per expert and projection. Per layer l and expert e:

    ours                                            Hugging Face (Qwen3-MoE), prefix model.layers.l.mlp.
    layers.l.ffn.experts.w_gate_up[e][:, :F]  (D, F) experts.e.gate_proj.weight (F, D), transposed
    layers.l.ffn.experts.w_gate_up[e][:, F:]  (D, F) experts.e.up_proj.weight   (F, D), transposed
    layers.l.ffn.experts.w_down[e]            (F, D) experts.e.down_proj.weight (D, F), transposed
    layers.l.ffn.router.weight                (E, D) gate.weight

transformers 5 holds the experts in memory as ``experts.gate_up_proj`` (E, 2F, D) and
``experts.down_proj`` (E, D, F) but writes the per-expert names above; both load. Everything else is
a rename (``_RENAMES``). Shared experts use DeepSeek's ``mlp.shared_experts.*`` names and dense
layers ``mlp.{gate,up,down}_proj``. The config maps field by field (``llm_config_from_qwen3_moe``);
Qwen3-MoE's dense layers (``mlp_only_layers``, ``decoder_sparse_step``) load when they are the first
layers (our ``num_dense_layers``). What Qwen3-MoE cannot express raises: shared experts, no q/k norm
and sigmoid routing on save; attention bias, sliding windows, RoPE scaling and dense layers after
a MoE layer on load. DeepSeek-V2 checkpoints do not load (MLA attention; ours is GQA).

Files are safetensors (one file, or shards with ``model.safetensors.index.json``) next to a
config.json. Loading reads tensors on access, so a sharded checkpoint is not held in memory twice.
The ``safetensors`` package is imported only by the file functions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .config import LLMConfig
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
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_FUSED_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def _rename(name: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise KeyError(f"no name mapping for {name!r}")


# ----------------------------------------------------------------------------- Qwen3-MoE tensors


def to_hf_state_dict(llm: MoELLM) -> dict[str, torch.Tensor]:
    """Our MoELLM's weights under Qwen3-MoE names and per-expert (out, in) layouts."""
    cfg, out = llm.cfg, {}
    for name, p in llm.state_dict().items():
        m = re.match(r"^layers\.(\d+)\.ffn\.experts\.(w_gate_up|w_down)$", name)
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


def from_hf_state_dict(llm: MoELLM, hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict for ``llm`` from Qwen3-MoE-named tensors (strict: every key must map).

    ``hf`` may be lazy (a checkpoint that reads on access): each tensor is read once, when used.
    """
    cfg, ours = llm.cfg, {}
    experts: dict[int, dict[tuple[int, str], str]] = {}  # layer -> (expert, kind) -> HF name
    for name in hf:
        if m := _EXPERT.match(name):
            experts.setdefault(int(m[1]), {})[(int(m[2]), m[3])] = name
        elif m := _FUSED_EXPERTS.match(name):  # transformers 5 in-memory layout
            ours[f"layers.{m[1]}.ffn.experts.{'w_gate_up' if m[2] == 'gate_up_proj' else 'w_down'}"] = (
                hf[name].transpose(1, 2).contiguous()
            )
        else:
            ours[_rename(name, _RENAMES_FROM_HF)] = hf[name]
    for layer, names in sorted(experts.items()):

        def get(e: int, kind: str, layer: int = layer, names: dict = names) -> torch.Tensor:
            try:
                return hf[names[(e, kind)]]
            except KeyError:
                raise KeyError(f"missing model.layers.{layer}.mlp.experts.{e}.{kind}_proj.weight") from None

        ours[f"layers.{layer}.ffn.experts.w_gate_up"] = torch.stack(
            [torch.cat([get(e, "gate").t(), get(e, "up").t()], dim=-1) for e in range(cfg.num_experts)]
        )
        ours[f"layers.{layer}.ffn.experts.w_down"] = torch.stack(
            [get(e, "down").t() for e in range(cfg.num_experts)]
        )
    if cfg.tie_embeddings:
        ours.setdefault("lm_head.weight", ours["embed.weight"])
    return ours


# ----------------------------------------------------------------------------- Qwen3-MoE config


def config_field(hf: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    raise KeyError(f"config.json: missing {' / '.join(repr(n) for n in names)}")


def llm_config_from_qwen3_moe(hf: Mapping[str, Any], **overrides: Any) -> LLMConfig:
    """The LLMConfig of a Qwen3-MoE config.json (transformers 4 or 5 spelling); ``overrides`` then
    replace fields that are not in the checkpoint (e.g. ``z_loss_coef``)."""
    if hf.get("model_type", "qwen3_moe") != "qwen3_moe":
        raise ValueError(f"config.json: expected model_type 'qwen3_moe', got {hf['model_type']!r}")
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu") != "silu", "the experts are SwiGLU (silu)"),
        "attention_bias": (bool(hf.get("attention_bias")), "q/k/v/o projections have no bias"),
        "use_sliding_window": (bool(hf.get("use_sliding_window")), "attention is full causal"),
    }
    for key, (bad, why) in unsupported.items():
        if bad:
            raise ValueError(f"config.json: {key}={hf[key]!r} is not supported: {why}")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"config.json: RoPE type {rope_type!r} is not supported (plain RoPE only)")
    layers, experts = (
        config_field(hf, "num_hidden_layers"),
        config_field(hf, "num_experts", "num_local_experts"),
    )
    if experts <= 0:
        raise ValueError(f"config.json: num_experts={experts}: not a MoE model")
    # Qwen3-MoE's rule for which layers are dense; ours puts the dense layers first.
    step, mlp_only = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or [])
    dense = [i for i in range(layers) if i in mlp_only or (i + 1) % step]
    if dense != list(range(len(dense))):
        raise ValueError(
            f"config.json: dense layers {dense} (mlp_only_layers={sorted(mlp_only)}, decoder_sparse_step="
            f"{step}): this model supports dense layers only before the first MoE layer"
        )
    heads = config_field(hf, "num_attention_heads")
    cfg = LLMConfig(
        vocab_size=config_field(hf, "vocab_size"),
        hidden=config_field(hf, "hidden_size"),
        num_layers=layers,
        num_q_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or config_field(hf, "hidden_size") // heads,
        num_experts=experts,
        top_k=config_field(hf, "num_experts_per_tok"),
        moe_ffn_dim=config_field(hf, "moe_intermediate_size"),
        num_dense_layers=len(dense),
        dense_ffn_dim=config_field(hf, "intermediate_size") if dense else 0,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),  # HF's defaults
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qk_norm=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        router_score="softmax",
        router_renormalize=bool(hf.get("norm_topk_prob", False)),
        aux_loss_coef=float(hf.get("router_aux_loss_coef", 1e-3)),
    )
    return replace(cfg, **overrides)


def qwen3_moe_config(cfg: LLMConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A config.json (transformers 4 spelling, which 5 reads too) for ``cfg`` as Qwen3-MoE."""
    if cfg.num_shared_experts:
        raise ValueError("LLMConfig.num_shared_experts: Qwen3-MoE has no shared experts, expected 0")
    if not cfg.qk_norm:
        raise ValueError("LLMConfig.qk_norm: Qwen3-MoE always RMS-normalises q and k, expected True")
    if cfg.router_score != "softmax":
        raise ValueError(f"LLMConfig.router_score: Qwen3-MoE routes by softmax, got {cfg.router_score!r}")
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_q_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": 40960,  # Qwen3's; our RoPE has no length limit
        "use_sliding_window": False,
        "sliding_window": None,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "moe_intermediate_size": cfg.moe_ffn_dim,
        "norm_topk_prob": cfg.router_renormalize,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(cfg.num_dense_layers)),
        "intermediate_size": cfg.dense_ffn_dim or cfg.moe_ffn_dim,  # read only for mlp_only_layers
        "tie_word_embeddings": cfg.tie_embeddings,
        "router_aux_loss_coef": cfg.aux_loss_coef,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ----------------------------------------------------------------------------- safetensors files


class SafetensorsCheckpoint(Mapping[str, torch.Tensor]):
    """The tensors of one or more safetensors files, each read from disk when it is looked up."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self._where: dict[str, Any] = {}
        for f in files:
            handle = safe_open(str(f), framework="pt", device="cpu")
            for key in handle.keys():
                if key in self._where:
                    raise ValueError(f"{f}: tensor {key!r} is also in another shard")
                self._where[key] = handle

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


_INDEX = "model.safetensors.index.json"


def open_checkpoint(path: str | Path) -> tuple[dict[str, Any], SafetensorsCheckpoint]:
    """(config.json, lazy tensors) of a checkpoint: a directory, its index file or one .safetensors."""
    p = Path(path)
    root = p if p.is_dir() else p.parent
    if p.is_dir() and (p / _INDEX).exists():
        p = p / _INDEX
    if p.name.endswith(".index.json"):
        weight_map = json.loads(p.read_text())["weight_map"]
        files = [root / f for f in dict.fromkeys(weight_map.values())]
    elif (p / "model.safetensors").is_file():
        files = [p / "model.safetensors"]
    elif p.is_dir():
        files = sorted(p.glob("*.safetensors"))
    else:
        files = [p]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise FileNotFoundError(f"{path}: no safetensors checkpoint (missing: {missing or '*.safetensors'})")
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json in {root}")
    ckpt = SafetensorsCheckpoint(files)
    if p.name.endswith(".index.json") and (absent := set(weight_map) - set(ckpt)):
        raise ValueError(f"{p}: tensors listed in the index but in no shard: {sorted(absent)[:5]}")
    return json.loads((root / "config.json").read_text()), ckpt


def write_checkpoint(
    directory: str | Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    max_shard_size: int | None = None,
) -> None:
    """Write config.json and ``tensors`` as model.safetensors, or as shards of at most
    ``max_shard_size`` bytes (a tensor larger than that gets a shard of its own) plus the index."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # A previous save's files would shadow or mix with this one's (loaders prefer the index).
    for stale in [out / _INDEX, out / "model.safetensors", *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_size is not None and shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / _INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def assign(
    module: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype | None, device
) -> None:
    """Load ``state`` into a module built on the meta device, converting to one dtype."""
    dtype = dtype or next(iter(state.values())).dtype
    module.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)


# ----------------------------------------------------------------------------- Qwen3-MoE files


def load_qwen3_moe(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    **overrides: Any,
) -> MoELLM:
    """A MoELLM from a Qwen3-MoE checkpoint (directory, index file or .safetensors file).

    The config comes from config.json (``llm_config_from_qwen3_moe``; ``overrides`` replace fields);
    weights are cast to ``dtype`` (default: the checkpoint's) on ``device``.
    """
    hf_config, ckpt = open_checkpoint(path)
    cfg = llm_config_from_qwen3_moe(hf_config, **overrides)
    with torch.device("meta"):
        llm = MoELLM(cfg)
    assign(llm, from_hf_state_dict(llm, ckpt), dtype, device)
    if cfg.tie_embeddings:  # assign=True gave the two names separate Parameters
        llm.lm_head.weight = llm.embed.weight
    return llm


def save_qwen3_moe(
    llm: MoELLM, directory: str | Path, *, dtype: torch.dtype | None = None, max_shard_size: int | None = None
) -> None:
    """Write ``llm`` as a Qwen3-MoE checkpoint that ``Qwen3MoeForCausalLM.from_pretrained`` loads."""
    dtype = dtype or llm.embed.weight.dtype
    config = qwen3_moe_config(llm.cfg, dtype)
    tensors = {k: v.to(dtype) for k, v in to_hf_state_dict(llm).items()}
    write_checkpoint(directory, tensors, config, max_shard_size)


def save_safetensors(llm: MoELLM, path: str | Path) -> None:
    """Write ``llm``'s Qwen3-MoE-named tensors as one safetensors file (no config.json)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in to_hf_state_dict(llm).items()}, str(path))


def load_safetensors(llm: MoELLM, paths: str | Path | list[str | Path]) -> None:
    """Load Qwen3-MoE-named safetensors shards into an existing ``llm`` (strict)."""
    files = [Path(p) for p in ([paths] if isinstance(paths, str | Path) else paths)]
    llm.load_state_dict(from_hf_state_dict(llm, SafetensorsCheckpoint(files)), strict=True)


__all__ = [
    "SafetensorsCheckpoint",
    "from_hf_state_dict",
    "llm_config_from_qwen3_moe",
    "load_qwen3_moe",
    "load_safetensors",
    "open_checkpoint",
    "qwen3_moe_config",
    "save_qwen3_moe",
    "save_safetensors",
    "to_hf_state_dict",
]
