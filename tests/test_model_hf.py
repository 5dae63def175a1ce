"""Hugging Face (Qwen3-MoE) state-dict interop: names, layouts, round trip, and expert semantics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import seedvl_kernels
from model.config import get_preset
from model.hf import from_hf_state_dict, load_safetensors, save_safetensors, to_hf_state_dict
from model.llm import MoELLM
from tests.utils import assert_close


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
    pytest.importorskip("safetensors")
    cfg = get_preset("llm-tiny")
    src, dst = MoELLM(cfg), MoELLM(cfg)
    save_safetensors(src, tmp_path / "model.safetensors")
    load_safetensors(dst, tmp_path / "model.safetensors")
    for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b)
