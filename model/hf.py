"""Hugging Face interop: Qwen3-MoE checkpoints <-> MoELLM, and Qwen2-VL vision towers <-> SeedViT.

LLM. Our MoE layer stacks every expert in the layout ``seedvl_kernels.moe_ffn`` multiplies by;
Hugging Face checkpoints keep one nn.Linear per expert and projection. Per layer l and expert e:

    ours                                    Hugging Face (Qwen3-MoE), prefix model.layers.l.mlp.
    layers.l.ffn.w_gate_up[e][:, :F]  (D, F)   experts.e.gate_proj.weight (F, D), transposed
    layers.l.ffn.w_gate_up[e][:, F:]  (D, F)   experts.e.up_proj.weight   (F, D), transposed
    layers.l.ffn.w_down[e]            (F, D)   experts.e.down_proj.weight (D, F), transposed
    layers.l.ffn.router.weight        (E, D)   gate.weight

transformers 5 holds the experts in memory as ``experts.gate_up_proj`` (E, 2F, D) and
``experts.down_proj`` (E, D, F) but writes the per-expert names above; both load. Everything else is
a rename (``_RENAMES``). Shared experts use DeepSeek's ``mlp.shared_experts.*`` names and dense
layers ``mlp.{gate,up,down}_proj``. The config maps field by field (``llm_config_from_qwen3_moe``);
Qwen3-MoE's dense layers (``mlp_only_layers``, ``decoder_sparse_step``) load when they are the first
layers (our ``num_dense_layers``). What Qwen3-MoE cannot express raises: shared experts, no q/k norm
and sigmoid routing on save; attention bias, sliding windows, RoPE scaling and dense layers after
a MoE layer on load. DeepSeek-V2 checkpoints do not load (MLA attention; ours is GQA).

Vision. A Qwen2-VL vision block is our ViTBlock: LayerNorm(eps 1e-6) -> qkv (bias, laid out
(3, heads, head_dim)) -> attention with the same 2D RoPE (``seedvl_kernels.rope_2d``) -> proj ->
LayerNorm -> fc1 -> activation -> fc2. Per block i, ``blocks.i.{norm1,norm2}`` keep their names,
``attn.{qkv,proj}`` -> ``{qkv,proj}`` and ``mlp.{fc1,fc2}`` -> ``{fc1,fc2}``. Around the blocks:

- ``patch_embed.proj``: a bias-free Conv3d over (C, 2, 14, 14) -- two consecutive frames. Qwen2-VL
  feeds a still image as two copies of itself, so for images it equals our Linear over one
  (14, 14, C) patch with the weight summed over the temporal axis (bias 0); saving splits our weight
  evenly over the two frames. For video the models differ (Qwen2-VL embeds frame pairs, SeedViT
  single frames), so a loaded tower matches Qwen2-VL on images only.
- ``merger.ln_q`` is a per-token LayerNorm(eps 1e-6) on the last block's output: our final ``norm``.
- ``merger.mlp`` (concatenate each 2x2 window to 4C -> Linear -> GELU -> Linear) does not map to our
  adapter (mean of the 4 tokens -> Linear -> GELU -> Linear); it is not loaded, and not written.
- The activation: Qwen2-VL checkpoints use ``quick_gelu`` (x * sigmoid(1.702 x)) and SeedViT exact
  GELU, so only ``hidden_act: "gelu"`` loads by default; ``allow_activation_mismatch=True`` loads
  quick_gelu weights anyway, as an initialisation whose outputs differ from Qwen2-VL's.
- Shapes: Qwen2-VL's head_dim is embed_dim / num_heads (80 in Qwen2-VL, 64 in SeedViT-532M). The
  qkv tensors of 16x80 and 20x64 heads have the same shape and split differently, so configs are
  compared field by field (``check_vit_config``), not only tensor shapes.
Qwen2.5-VL's blocks (RMSNorm, SwiGLU, window attention) are a different architecture.

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

from .config import LLMConfig, ViTConfig
from .llm import MoELLM
from .vit import SeedViT

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
            ours[f"layers.{m[1]}.ffn.{'w_gate_up' if m[2] == 'gate_up_proj' else 'w_down'}"] = (
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

        ours[f"layers.{layer}.ffn.w_gate_up"] = torch.stack(
            [torch.cat([get(e, "gate").t(), get(e, "up").t()], dim=-1) for e in range(cfg.num_experts)]
        )
        ours[f"layers.{layer}.ffn.w_down"] = torch.stack([get(e, "down").t() for e in range(cfg.num_experts)])
    if cfg.tie_embeddings:
        ours.setdefault("lm_head.weight", ours["embed.weight"])
    return ours


# ----------------------------------------------------------------------------- Qwen3-MoE config


def _get(hf: Mapping[str, Any], *names: str) -> Any:
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
    layers, experts = _get(hf, "num_hidden_layers"), _get(hf, "num_experts", "num_local_experts")
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
    heads = _get(hf, "num_attention_heads")
    cfg = LLMConfig(
        vocab_size=_get(hf, "vocab_size"),
        hidden=_get(hf, "hidden_size"),
        num_layers=layers,
        num_q_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or _get(hf, "hidden_size") // heads,
        num_experts=experts,
        top_k=_get(hf, "num_experts_per_tok"),
        moe_ffn_dim=_get(hf, "moe_intermediate_size"),
        num_dense_layers=len(dense),
        dense_ffn_dim=_get(hf, "intermediate_size") if dense else 0,
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


def _assign(
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
    _assign(llm, from_hf_state_dict(llm, ckpt), dtype, device)
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


# ----------------------------------------------------------------------------- Qwen2-VL vision

_VIT_BLOCK = [  # ours -> Qwen2-VL, inside blocks.i.
    ("norm1", "norm1"),
    ("qkv", "attn.qkv"),
    ("proj", "attn.proj"),
    ("norm2", "norm2"),
    ("fc1", "mlp.fc1"),
    ("fc2", "mlp.fc2"),
]
_VIT_ARCH = ("width", "depth", "num_heads", "head_dim", "mlp_dim", "patch_size", "in_channels", "norm_eps")


def vit_config_from_qwen2_vl(
    hf: Mapping[str, Any], *, allow_activation_mismatch: bool = False, **overrides: Any
) -> ViTConfig:
    """The ViTConfig of a Qwen2-VL vision config (a full Qwen2-VL config.json or its vision_config)."""
    if hf.get("model_type") not in (None, "qwen2_vl", "qwen2_vl_vision"):
        raise ValueError(
            f"config.json: expected a Qwen2-VL model (model_type 'qwen2_vl' or 'qwen2_vl_vision'), "
            f"got {hf['model_type']!r}"
        )
    hf = hf.get("vision_config") or hf
    act = hf.get("hidden_act", "quick_gelu")  # Qwen2-VL's default
    if act != "gelu" and not allow_activation_mismatch:
        raise ValueError(
            f"config.json: vision hidden_act {act!r}; SeedViT's MLP uses exact GELU ('gelu'), so the "
            "outputs would differ (pass allow_activation_mismatch=True to load the weights anyway)"
        )
    width, heads = _get(hf, "embed_dim"), _get(hf, "num_heads")
    patch = hf.get("patch_size") or hf.get("spatial_patch_size") or 14  # HF's default
    if isinstance(patch, list | tuple):
        if len(set(patch)) != 1:
            raise ValueError(f"config.json: non-square patch_size {patch} is not supported")
        patch = patch[0]
    if width % heads:
        raise ValueError(f"config.json: embed_dim {width} is not a multiple of num_heads {heads}")
    rope = hf.get("rope_parameters") or {}
    cfg = ViTConfig(
        width=width,
        depth=_get(hf, "depth"),
        num_heads=heads,
        head_dim=width // heads,
        mlp_ratio=float(hf.get("mlp_ratio", 4)),
        patch_size=patch,
        in_channels=hf.get("in_channels") or hf.get("in_chans") or 3,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        norm_eps=1e-6,  # hard-coded in Qwen2-VL's vision blocks and merger
        qkv_bias=True,
    )
    return replace(cfg, **overrides)


def check_vit_config(cfg: ViTConfig, expected: ViTConfig) -> None:
    """Raise a ValueError listing every architectural field where ``cfg`` differs from ``expected``."""
    diff = [
        f"{name} {getattr(cfg, name)} (expected {getattr(expected, name)})"
        for name in (*_VIT_ARCH, "qkv_bias", "rope_theta")
        if getattr(cfg, name) != getattr(expected, name)
    ]
    if diff:
        raise ValueError(f"Qwen2-VL vision tower does not match the ViTConfig: {', '.join(diff)}")


def qwen2_vl_vision_config(cfg: ViTConfig, *, temporal_patch_size: int = 2) -> dict[str, Any]:
    """A standalone Qwen2-VL vision config.json (``Qwen2VisionTransformerPretrainedModel``)."""
    if cfg.num_heads * cfg.head_dim != cfg.width:
        raise ValueError(
            f"ViTConfig: Qwen2-VL needs num_heads * head_dim == width, got "
            f"{cfg.num_heads} * {cfg.head_dim} != {cfg.width}"
        )
    if cfg.mlp_dim != cfg.width * int(cfg.mlp_ratio) or not cfg.qkv_bias or cfg.norm_eps != 1e-6:
        raise ValueError("ViTConfig: Qwen2-VL needs an integer mlp_ratio, qkv_bias=True and norm_eps=1e-6")
    return {
        "architectures": ["Qwen2VisionTransformerPretrainedModel"],
        "model_type": "qwen2_vl_vision",
        "depth": cfg.depth,
        "embed_dim": cfg.width,
        "num_heads": cfg.num_heads,
        "mlp_ratio": int(cfg.mlp_ratio),
        "hidden_act": "gelu",
        "patch_size": cfg.patch_size,
        "temporal_patch_size": temporal_patch_size,
        "in_channels": cfg.in_channels,
        "spatial_merge_size": 2,
        "hidden_size": cfg.width,  # the merger's output width: the merger is not written
        "rope_parameters": {"rope_type": "axial", "rope_theta": cfg.rope_theta},
    }


def from_qwen2_vl_vision_state_dict(vit: SeedViT, hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict for ``vit`` from a Qwen2-VL vision tower's tensors, under any prefix
    (``visual.`` in Qwen2-VL checkpoints, none in a standalone tower); ``merger.mlp`` is skipped."""
    anchor = "blocks.0.norm1.weight"
    prefix = next((k[: -len(anchor)] for k in hf if k.endswith(anchor)), None)
    if prefix is None:
        raise KeyError(f"no Qwen2-VL vision blocks in the checkpoint (no '*{anchor}')")
    depth = vit.cfg.depth
    if f"{prefix}blocks.{depth}.norm1.weight" in hf:
        n = sum(1 for k in hf if re.fullmatch(re.escape(prefix) + r"blocks\.\d+\.norm1\.weight", k))
        raise ValueError(f"checkpoint has {n} vision blocks, the ViTConfig depth is {depth}")

    def get(name: str) -> torch.Tensor:
        try:
            return hf[prefix + name]
        except KeyError:
            raise KeyError(f"missing {prefix + name}") from None

    conv = get("patch_embed.proj.weight")  # (C, in, T, p, p)
    if conv.ndim != 5:
        raise ValueError(f"{prefix}patch_embed.proj.weight: expected 5-D (Conv3d), got {tuple(conv.shape)}")
    # A still image is two identical frames: sum the temporal taps, reorder (in, p, p) to (p, p, in).
    weight = conv.float().sum(2).permute(0, 2, 3, 1).reshape(conv.shape[0], -1).to(conv.dtype)
    bias = hf.get(prefix + "patch_embed.proj.bias")
    ours = {
        "patch_embed.weight": weight,
        "patch_embed.bias": bias if bias is not None else conv.new_zeros(conv.shape[0]),
        "norm.weight": get("merger.ln_q.weight"),
        "norm.bias": get("merger.ln_q.bias"),
    }
    for i in range(depth):
        for mine, theirs in _VIT_BLOCK:
            for kind in ("weight", "bias"):
                ours[f"blocks.{i}.{mine}.{kind}"] = get(f"blocks.{i}.{theirs}.{kind}")
    shapes = {k: v.shape for k, v in vit.state_dict().items()}
    for name, t in ours.items():
        if t.shape != shapes[name]:
            raise ValueError(
                f"Qwen2-VL tensor for {name}: shape {tuple(t.shape)}, SeedViT expects {tuple(shapes[name])}"
            )
    return ours


def to_qwen2_vl_vision_state_dict(vit: SeedViT, *, temporal_patch_size: int = 2) -> dict[str, torch.Tensor]:
    """``vit``'s weights as a standalone Qwen2-VL vision tower's, less ``merger.mlp``."""
    cfg = vit.cfg
    qwen2_vl_vision_config(cfg, temporal_patch_size=temporal_patch_size)  # raises if not expressible
    sd = vit.state_dict()
    if sd["patch_embed.bias"].any():
        raise ValueError("SeedViT patch_embed.bias: Qwen2-VL's patch embedding has no bias, expected zeros")
    p, c = cfg.patch_size, cfg.in_channels
    w = sd["patch_embed.weight"].reshape(-1, p, p, c).permute(0, 3, 1, 2)  # (C, in, p, p)
    conv = w[:, :, None].expand(-1, -1, temporal_patch_size, -1, -1) / temporal_patch_size
    out = {
        "patch_embed.proj.weight": conv.contiguous(),
        "merger.ln_q.weight": sd["norm.weight"],
        "merger.ln_q.bias": sd["norm.bias"],
    }
    for i in range(cfg.depth):
        for mine, theirs in _VIT_BLOCK:
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{theirs}.{kind}"] = sd[f"blocks.{i}.{mine}.{kind}"]
    return out


def load_qwen2_vl_vision(
    path: str | Path,
    *,
    cfg: ViTConfig | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    allow_activation_mismatch: bool = False,
) -> SeedViT:
    """A SeedViT from a Qwen2-VL checkpoint (full model or standalone vision tower).

    With ``cfg`` (e.g. the VLM's ViT config) the checkpoint must match it field by field; without,
    the config is derived from config.json. Only the vision tensors are read.
    """
    hf_config, ckpt = open_checkpoint(path)
    derived = vit_config_from_qwen2_vl(hf_config, allow_activation_mismatch=allow_activation_mismatch)
    if cfg is not None:
        check_vit_config(derived, cfg)
    with torch.device("meta"):
        vit = SeedViT(cfg or derived)
    _assign(vit, from_qwen2_vl_vision_state_dict(vit, ckpt), dtype, device)
    return vit


def save_qwen2_vl_vision(
    vit: SeedViT, directory: str | Path, *, dtype: torch.dtype | None = None, temporal_patch_size: int = 2
) -> None:
    """Write ``vit`` as a standalone Qwen2-VL vision tower (``Qwen2VisionTransformerPretrainedModel``).

    The merger MLP is not written (SeedViT has none), so transformers initialises it at random;
    the blocks' output (``last_hidden_state``) matches ours on still images.
    """
    dtype = dtype or vit.patch_embed.weight.dtype
    config = qwen2_vl_vision_config(vit.cfg, temporal_patch_size=temporal_patch_size)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    vit_tensors = to_qwen2_vl_vision_state_dict(vit, temporal_patch_size=temporal_patch_size)
    tensors = {k: v.to(dtype) for k, v in vit_tensors.items()}
    write_checkpoint(directory, tensors, config)


__all__ = [
    "SafetensorsCheckpoint",
    "check_vit_config",
    "from_hf_state_dict",
    "from_qwen2_vl_vision_state_dict",
    "llm_config_from_qwen3_moe",
    "load_qwen2_vl_vision",
    "load_qwen3_moe",
    "load_safetensors",
    "open_checkpoint",
    "qwen2_vl_vision_config",
    "qwen3_moe_config",
    "save_qwen2_vl_vision",
    "save_qwen3_moe",
    "save_safetensors",
    "to_hf_state_dict",
    "to_qwen2_vl_vision_state_dict",
    "vit_config_from_qwen2_vl",
]
