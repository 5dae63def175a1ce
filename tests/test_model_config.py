"""Config presets: the registry, validation, and the shapes the presets promise."""

from __future__ import annotations

import dataclasses

import pytest

from model.config import LLMConfig, ViTConfig, VLMConfig, get_preset, preset_names


def test_registry_lists_known_names_on_unknown():
    with pytest.raises(KeyError, match=r"known presets: .*seedvit-532m"):
        get_preset("seedvit-999m")


@pytest.mark.parametrize("name", preset_names())
def test_presets_are_frozen_and_typed(name):
    cfg = get_preset(name)
    assert isinstance(cfg, ViTConfig | LLMConfig | VLMConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.__setattr__("image_token_id" if isinstance(cfg, VLMConfig) else "num_layers", 1)


def test_seedvit_532m_matches_paper_table_1():
    cfg = get_preset("seedvit-532m")
    assert (cfg.patch_size, cfg.head_dim, cfg.num_heads, cfg.width, cfg.mlp_ratio, cfg.depth) == (
        14, 64, 20, 1280, 4.0, 27,
    )  # fmt: skip
    assert cfg.mlp_dim == 5120 and cfg.patch_dim == 588


def test_vlm_presets_wire_adapter_from_vit_width_to_llm_hidden():
    for name in preset_names():
        cfg = get_preset(name)
        if isinstance(cfg, VLMConfig):
            assert cfg.adapter.in_dim == cfg.vit.width
            assert cfg.adapter.out_dim == cfg.llm.hidden
            assert cfg.image_token_id < cfg.llm.vocab_size


def test_llm_stand_in_shapes():
    big = get_preset("qwen3-235b-a22b")
    attention = (big.hidden, big.num_layers, big.num_q_heads, big.num_kv_heads, big.head_dim)
    assert attention == (4096, 94, 64, 4, 128)
    assert (big.num_experts, big.moe_ffn_dim, big.top_k, big.vocab_size) == (128, 1536, 8, 151936)
    ds = get_preset("dsv2-lite-gqa")
    assert ds.num_shared_experts == 2 and ds.num_dense_layers == 1
    assert not ds.is_moe_layer(0) and ds.is_moe_layer(1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_q_heads": 6, "num_kv_heads": 4}, "multiple of num_kv_heads"),
        ({"top_k": 9}, "top_k"),
        ({"num_dense_layers": 1}, "dense_ffn_dim"),
        ({"router_score": "relu"}, "router_score"),
        ({"hidden": 0}, "hidden"),
    ],
)
def test_llm_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(get_preset("llm-tiny"), **kwargs)


def test_vit_config_rejects_head_dim_not_multiple_of_4():
    with pytest.raises(ValueError, match="head_dim"):
        dataclasses.replace(get_preset("vit-tiny"), head_dim=18)


def test_vlm_config_rejects_mismatched_adapter():
    cfg = get_preset("seedvl-tiny")
    bad = dataclasses.replace(cfg.adapter, out_dim=cfg.llm.hidden + 1)
    with pytest.raises(ValueError, match="adapter"):
        dataclasses.replace(cfg, adapter=bad)
