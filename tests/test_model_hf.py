"""Hugging Face interop: Qwen3-MoE <-> MoELLM and Qwen2-VL vision tower <-> SeedViT.

The parity tests build tiny random transformers models in fp32 (no downloads), save them with
``save_pretrained``, load them with model.hf / model.hf_vision and compare hidden states and
logits; and the other way, save ours and load it with ``from_pretrained``. Weights are re-drawn
larger than HF's 0.02 init (norm gains too), so that attention is peaked and routing spread: a
wrong RoPE, mask, head split or q/k-norm would show. Tolerances: fp32 rounding of values of the
size compared (``_close``); the measured errors are about 1e-6 of the largest value.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import seedvl_kernels
from model.config import QWEN3_30B_A3B, SEEDVIT_532M, get_preset
from model.hf import (
    from_hf_state_dict,
    llm_config_from_qwen3_moe,
    load_qwen3_moe,
    load_safetensors,
    save_qwen3_moe,
    save_safetensors,
    to_hf_state_dict,
)
from model.hf_vision import (
    check_vit_config,
    from_qwen2_vl_vision_state_dict,
    load_qwen2_vl_vision,
    save_qwen2_vl_vision,
    vit_config_from_qwen2_vl,
)
from model.llm import MoELLM
from model.preprocess import pack_images, patchify
from model.vit import SeedViT
from tests.utils import assert_close, tol

pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import (  # noqa: E402
    Qwen2VisionTransformerPretrainedModel,
)
from transformers.vision_utils import get_vision_position_ids  # noqa: E402

EAGER = {"attn_implementation": "eager"}  # HF's plainest attention as the reference


def _close(actual: torch.Tensor, expected: torch.Tensor, name: str, scale: float = 4.0) -> None:
    """fp32 tolerance relative to the largest value compared (sums of a few hundred products)."""
    t = tol(torch.float32, scale)
    big = expected.abs().max().item()
    assert_close(actual, expected, name, atol=t["atol"] * max(big, 1.0), rtol=t["rtol"])


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int, std: float = 0.15) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1 and ("norm" in name or "ln_q" in name) and name.endswith("weight"):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # gains in [0.5, 1.5)
        elif name == "patch_embed.bias":  # Qwen2-VL's patch embedding has none
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _packed(lengths: list[int], vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])
    return docs, pos, cu


@torch.no_grad()
def _our_llm_states(llm: MoELLM, docs, pos, cu) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(per-layer outputs, final normed hidden, logits) of our model on the packed documents."""
    outs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(o[0])) for layer in llm.layers]
    ids = torch.cat(docs)
    max_len = max(len(d) for d in docs)
    hidden = llm.forward_hidden(llm.embed(ids), pos, cu, max_len).logits
    for h in hooks:
        h.remove()
    return outs[: llm.cfg.num_layers], hidden, llm.lm_head(hidden)


# ----------------------------------------------------------------------------- name mapping


@pytest.mark.parametrize("preset", ["llm-tiny", "llm-tiny-shared"])
def test_round_trip_is_exact(preset):
    cfg = get_preset(preset)
    src, dst = MoELLM(cfg), MoELLM(cfg)
    dst.load_state_dict(from_hf_state_dict(dst, to_hf_state_dict(src)), strict=True)
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_qwen3_moe_names_and_shapes():
    cfg = get_preset("llm-tiny")
    hf = to_hf_state_dict(MoELLM(cfg))
    D, F_, E = cfg.hidden, cfg.moe_ffn_dim, cfg.num_experts
    assert hf["model.embed_tokens.weight"].shape == (cfg.vocab_size, D)
    assert hf["model.layers.1.self_attn.k_proj.weight"].shape == (cfg.num_kv_heads * cfg.head_dim, D)
    assert hf["model.layers.1.self_attn.q_norm.weight"].shape == (cfg.head_dim,)
    assert hf["model.layers.0.mlp.gate.weight"].shape == (E, D)
    assert hf[f"model.layers.0.mlp.experts.{E - 1}.gate_proj.weight"].shape == (F_, D)
    assert hf["model.layers.0.mlp.experts.0.down_proj.weight"].shape == (D, F_)
    assert {
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.1.post_attention_layernorm.weight",
    } <= hf.keys()
    assert len(hf) == 3 + cfg.num_layers * (2 + 6 + 1 + 3 * E)


def test_missing_hf_key_is_named():
    llm = MoELLM(get_preset("llm-tiny"))
    hf = to_hf_state_dict(llm)
    del hf["model.layers.1.mlp.experts.2.up_proj.weight"]
    with pytest.raises(KeyError, match=r"layers\.1\.mlp\.experts\.2\.up_proj"):
        from_hf_state_dict(llm, hf)


def test_hf_expert_semantics_match_our_moe_layer():
    """Qwen3-MoE's per-expert forward on the exported weights equals our fused MoE layer."""
    if not all(callable(getattr(seedvl_kernels, op, None)) for op in ("route", "moe_ffn")):
        pytest.skip("seedvl_kernels does not export route and moe_ffn yet")
    cfg = get_preset("llm-tiny")
    llm = MoELLM(cfg).eval()
    hf = to_hf_state_dict(llm)
    x = torch.randn(13, cfg.hidden)
    p = lambda name: hf[f"model.layers.0.mlp.{name}.weight"]
    probs = F.linear(x, p("gate")).softmax(-1)
    w, ids = probs.topk(cfg.top_k, dim=-1)
    w = w / w.sum(-1, keepdim=True)  # Qwen3-MoE norm_topk_prob
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(cfg.top_k):
            e = f"experts.{ids[t, j]}"
            h = F.silu(x[t] @ p(f"{e}.gate_proj").t()) * (x[t] @ p(f"{e}.up_proj").t())
            expected[t] += w[t, j] * (h @ p(f"{e}.down_proj").t())
    with torch.no_grad():
        actual, _, _ = llm.layers[0].ffn(x)
    assert_close(actual, expected, "MoE layer vs HF per-expert loop", atol=1e-5, rtol=1e-5)


def test_safetensors_file_round_trip(tmp_path):
    cfg = get_preset("llm-tiny")
    src, dst = MoELLM(cfg), MoELLM(cfg)
    save_safetensors(src, tmp_path / "model.safetensors")
    load_safetensors(dst, tmp_path / "model.safetensors")
    for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- Qwen3-MoE parity

_TINY_QWEN3 = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96,
    norm_topk_prob=True, rope_theta=5000.0, rms_norm_eps=1e-6,
)  # fmt: skip
_QWEN3_VARIANTS = {
    "one-file": ({}, None),
    "sharded": ({}, "40KB"),
    # dense first layer, tied embeddings, no top-k renormalisation
    "dense-tied": (dict(num_hidden_layers=3, mlp_only_layers=[0], tie_word_embeddings=True,
                        norm_topk_prob=False), None),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(_QWEN3_VARIANTS))
def hf_qwen3(request, tmp_path_factory):
    """(HF model, checkpoint directory) of a tiny random Qwen3-MoE, saved with save_pretrained."""
    changes, shard = _QWEN3_VARIANTS[request.param]
    config = transformers.Qwen3MoeConfig(**{**_TINY_QWEN3, **changes}, **EAGER)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).float().eval()
    _randomize(model, seed=1)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    assert (path / "model.safetensors.index.json").exists() == bool(shard)
    return model, path


def test_load_qwen3_moe_matches_transformers(hf_qwen3):
    """A packed batch of three documents (one of 1 token) vs HF run on each document alone."""
    hf, path = hf_qwen3
    llm = load_qwen3_moe(path).eval()
    assert llm.cfg.rope_theta == 5000.0 and llm.cfg.num_layers == hf.config.num_hidden_layers
    assert llm.cfg.tie_embeddings == (llm.lm_head.weight is llm.embed.weight)
    docs, pos, cu = _packed([11, 1, 19], 256, seed=2)
    layers, hidden, logits = _our_llm_states(llm, docs, pos, cu)
    with torch.no_grad():
        ref = [hf(input_ids=d[None], output_hidden_states=True) for d in docs]
    # transformers 5: hidden_states = (embeddings, layer 0, ..., layer L-2, final-normed layer L-1)
    cat = lambda i: torch.cat([r.hidden_states[i][0] for r in ref])
    for i, ours in enumerate(layers[:-1]):
        _close(ours, cat(i + 1), f"layer {i} output")
    _close(hidden, cat(-1), "final normed hidden")
    _close(logits, torch.cat([r.logits[0] for r in ref]), "logits")


def test_transformers_in_memory_expert_layout_loads(hf_qwen3):
    """transformers 5 holds experts fused, (E, 2F, D) and (E, D, F); that state dict loads too."""
    hf, path = hf_qwen3
    llm = load_qwen3_moe(path)
    assert "model.layers.1.mlp.experts.gate_up_proj" in hf.state_dict()
    fused = from_hf_state_dict(llm, hf.state_dict())
    for name, p in llm.state_dict().items():
        assert torch.equal(fused[name], p), name


@pytest.mark.parametrize("variant", ["llm-tiny", "dense-tied"])
def test_save_qwen3_moe_loads_in_transformers(variant, tmp_path):
    cfg = replace(get_preset("llm-tiny"), rope_theta=5000.0)
    if variant == "dense-tied":
        cfg = replace(cfg, num_layers=3, num_dense_layers=1, dense_ffn_dim=96, tie_embeddings=True,
                      router_renormalize=False)  # fmt: skip
    ours = MoELLM(cfg).eval()
    _randomize(ours, seed=3)
    save_qwen3_moe(ours, tmp_path, max_shard_size=40_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path, **EAGER).eval()
    assert hf.config.num_experts == cfg.num_experts and hf.config.norm_topk_prob == cfg.router_renormalize
    docs, pos, cu = _packed([9, 14], cfg.vocab_size, seed=4)
    _, _, logits = _our_llm_states(ours, docs, pos, cu)
    with torch.no_grad():
        ref = torch.cat([hf(input_ids=d[None]).logits[0] for d in docs])
    _close(logits, ref, "our logits vs transformers on our checkpoint")
    back = load_qwen3_moe(tmp_path)
    assert back.cfg == replace(cfg, z_loss_coef=back.cfg.z_loss_coef)
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_save_rejects_what_qwen3_moe_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="num_shared_experts"):
        save_qwen3_moe(MoELLM(get_preset("llm-tiny-shared")), tmp_path)


# ----------------------------------------------------------------------------- Qwen3-MoE config

# config.json of Qwen/Qwen3-30B-A3B (transformers 4 spelling).
_QWEN3_30B_A3B_JSON = """{"architectures": ["Qwen3MoeForCausalLM"], "attention_bias": false,
 "attention_dropout": 0.0, "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645,
 "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
 "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48,
 "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
 "norm_topk_prob": true, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
 "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": false,
 "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
 "sliding_window": null, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
 "transformers_version": "4.51.0", "use_cache": true, "use_sliding_window": false,
 "vocab_size": 151936}"""


def test_public_config_gives_our_preset():
    assert llm_config_from_qwen3_moe(json.loads(_QWEN3_30B_A3B_JSON)) == QWEN3_30B_A3B


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"decoder_sparse_step": 2}, r"dense layers \[0, 2, 4"),
        ({"mlp_only_layers": [3]}, r"dense layers \[3\]"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"model_type": "qwen2_moe"}, "model_type"),
    ],
)
def test_unsupported_qwen3_configs_raise(change, match):
    with pytest.raises(ValueError, match=match):
        llm_config_from_qwen3_moe({**json.loads(_QWEN3_30B_A3B_JSON), **change})


# ----------------------------------------------------------------------------- Qwen2-VL vision

_TINY_VISION = dict(depth=2, embed_dim=64, num_heads=4, mlp_ratio=4, hidden_size=96, hidden_act="gelu")


@pytest.fixture(scope="module")
def hf_vision(tmp_path_factory):
    """(HF Qwen2-VL vision tower, checkpoint directory), tiny and random, exact-GELU MLP."""
    torch.manual_seed(0)
    model = Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(**_TINY_VISION, **EAGER)).eval()
    _randomize(model, seed=5, std=0.1)
    path = tmp_path_factory.mktemp("qwen2_vl_vision")
    model.save_pretrained(path)
    return model, path


def _images(sizes: list[tuple[int, int]], seed: int):
    """Our packed patches and the same pixels in Qwen2-VL's layout (C, 2 frames, 14, 14) per row."""
    g = torch.Generator().manual_seed(seed)
    ims = [
        patchify(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g), size=(h, w))
        for h, w in sizes
    ]
    packed = pack_images(ims)
    T = packed.patches.shape[0]
    pixels = packed.patches.view(T, 14, 14, 3).permute(0, 3, 1, 2)[:, :, None].expand(T, 3, 2, 14, 14)
    grid_thw = torch.tensor([[1, h, w] for h, w in packed.grid_hw.tolist()])
    return packed, pixels.reshape(T, -1), grid_thw


def test_qwen2_vl_block_matches_ours(hf_vision):
    """One block on one image: our varlen attention with 2D RoPE vs HF's block and rotary embedding."""
    hf, path = hf_vision
    ours = load_qwen2_vl_vision(path).eval()
    packed, _, grid_thw = _images([(84, 140)], seed=6)  # 6 x 10 patches
    x = torch.randn(packed.patches.shape[0], ours.cfg.width)
    # HF's own (row, col) ids in 2x2-window order: the same as our preprocessing's
    pos = get_vision_position_ids(grid_thw, 2)
    assert torch.equal(pos.to(torch.int32), packed.pos_hw)
    with torch.no_grad():
        ref = hf.blocks[1](x, cu_seqlens=packed.cu_seqlens, position_embeddings=hf.rotary_pos_emb(x, pos))
        out = ours.blocks[1](x, packed.pos_hw, packed.cu_seqlens, packed.max_seqlen)
    _close(out, ref, "vision block")


def test_load_qwen2_vl_vision_matches_tower(hf_vision):
    """Two packed still images through the whole tower: patch embedding, every block, ln_q."""
    hf, path = hf_vision
    ours = load_qwen2_vl_vision(
        path, cfg=vit_config_from_qwen2_vl(json.loads((path / "config.json").read_text()))
    )
    packed, pixels, grid_thw = _images([(112, 168), (28, 56)], seed=7)
    blocks: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, o: blocks.append(o)) for b in ours.blocks]
    with torch.no_grad():
        out = ours(packed.patches, packed.pos_hw, packed.cu_seqlens, packed.max_seqlen)
        ref = hf(pixels, grid_thw=grid_thw, output_hidden_states=True)
        ref_norm = hf.merger.ln_q(ref.last_hidden_state)
    for h in hooks:
        h.remove()
    _close(ours.patch_embed(packed.patches), ref.hidden_states[0], "patch embedding")
    for i, b in enumerate(blocks):
        _close(b, ref.hidden_states[i + 1], f"block {i} output")
    _close(out, ref_norm, "final norm (merger.ln_q)")


def test_qwen2_vl_vision_prefixed_checkpoint(hf_vision):
    """A full Qwen2-VL checkpoint keeps the tower under ``visual.`` next to the LLM's tensors."""
    hf, _ = hf_vision
    vit = SeedViT(vit_config_from_qwen2_vl(_TINY_VISION))
    plain = from_qwen2_vl_vision_state_dict(vit, hf.state_dict())
    full = {f"model.visual.{k}": v for k, v in hf.state_dict().items()} | {"lm_head.weight": torch.zeros(1)}
    prefixed = from_qwen2_vl_vision_state_dict(vit, full)
    assert plain.keys() == prefixed.keys() == vit.state_dict().keys()
    assert all(torch.equal(plain[k], prefixed[k]) for k in plain)


def test_qwen2_vl_vision_mismatches_raise(hf_vision):
    hf, path = hf_vision
    derived = vit_config_from_qwen2_vl(_TINY_VISION)
    # Same qkv tensor shape (width 64), different head split: caught by the config, not the shapes.
    with pytest.raises(ValueError, match=r"num_heads 4 \(expected 2\), head_dim 16 \(expected 32\)"):
        load_qwen2_vl_vision(path, cfg=replace(derived, num_heads=2, head_dim=32))
    with pytest.raises(ValueError, match="depth 2 \\(expected 3\\)"):
        check_vit_config(derived, replace(derived, depth=3))
    with pytest.raises(ValueError, match=r"fc1\.weight: shape \(256, 64\), SeedViT expects \(128, 64\)"):
        from_qwen2_vl_vision_state_dict(SeedViT(replace(derived, mlp_ratio=2.0)), hf.state_dict())
    quick = {**_TINY_VISION, "hidden_act": "quick_gelu"}
    with pytest.raises(ValueError, match="quick_gelu"):
        vit_config_from_qwen2_vl(quick)
    assert vit_config_from_qwen2_vl(quick, allow_activation_mismatch=True) == derived
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        vit_config_from_qwen2_vl({"model_type": "qwen2_5_vl", "vision_config": _TINY_VISION})


def test_public_qwen2_vl_tower_vs_seedvit_532m():
    """Qwen2-VL-7B's tower (config.json) is not SeedViT-532M: the error names every difference."""
    public = {
        "model_type": "qwen2_vl",
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                          "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                          "spatial_patch_size": 14, "temporal_patch_size": 2},
    }  # fmt: skip
    with pytest.raises(ValueError, match="'quick_gelu'"):  # the checkpoint's default activation
        vit_config_from_qwen2_vl(public)
    cfg = vit_config_from_qwen2_vl(public, allow_activation_mismatch=True)
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.head_dim, cfg.mlp_dim) == (1280, 32, 16, 80, 5120)
    with pytest.raises(
        ValueError, match=r"depth 32 \(expected 27\), num_heads 16 \(expected 20\), head_dim 80"
    ):
        check_vit_config(cfg, SEEDVIT_532M)


def test_save_qwen2_vl_vision_loads_in_transformers(tmp_path):
    ours = SeedViT(get_preset("vit-tiny")).eval()
    _randomize(ours, seed=8, std=0.1)
    save_qwen2_vl_vision(ours, tmp_path)
    hf = Qwen2VisionTransformerPretrainedModel.from_pretrained(tmp_path, **EAGER).eval()
    packed, pixels, grid_thw = _images([(56, 84)], seed=9)
    with torch.no_grad():
        out = ours(packed.patches, packed.pos_hw, packed.cu_seqlens, packed.max_seqlen)
        ref = hf.merger.ln_q(hf(pixels, grid_thw=grid_thw).last_hidden_state)
    _close(out, ref, "ours vs transformers on our checkpoint")
    back = load_qwen2_vl_vision(tmp_path, cfg=ours.cfg)
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
