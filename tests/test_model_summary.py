"""Parameter counts on the meta device (no memory, no kernel op) and the summary CLI."""

from __future__ import annotations

import json

import pytest

from model.config import get_preset
from model.summary import count, main, summarize


def test_seedvit_532m_count_matches_paper():
    s = summarize("seedvit-532m")
    assert s["total_params"] == 532_047_360
    assert abs(s["total_params"] - 532e6) / 532e6 < 0.005


@pytest.mark.parametrize(
    ("preset", "total", "active"),
    [
        # Hugging Face model cards: 235B total / 22B active, 30.5B / 3.3B.
        ("qwen3-235b-a22b", 235.1e9, 22.2e9),
        ("qwen3-30b-a3b", 30.5e9, 3.35e9),
    ],
)
def test_qwen3_stand_ins_match_public_counts(preset, total, active):
    s = summarize(preset)
    assert abs(s["total_params"] - total) / total < 0.01
    assert abs(s["active_params"] - active) / active < 0.01


def test_vlm_is_sum_of_its_parts():
    vlm = count(get_preset("seedvl-tiny"))
    vit = count(get_preset("vit-tiny"))
    llm = count(get_preset("llm-tiny"))
    cfg = get_preset("seedvl-tiny").adapter
    adapter = cfg.in_dim * cfg.hidden_dim + cfg.hidden_dim + cfg.hidden_dim * cfg.out_dim + cfg.out_dim
    total = lambda parts: sum(p.params for p in parts.values())
    assert total(vlm) == total(vit) + total(llm) + adapter


def test_active_counts_top_k_share_of_routed_experts():
    cfg = get_preset("llm-tiny-shared")
    parts = count(cfg)
    routed = parts["llm.routed_experts"]
    assert routed.active * cfg.num_experts == routed.params * cfg.top_k
    assert parts["llm.shared_experts"].active == parts["llm.shared_experts"].params
    assert "llm.dense_mlp" in parts


def test_tiny_presets_are_small():
    for name in ("vit-tiny", "llm-tiny", "llm-tiny-shared", "seedvl-tiny", "seedvl-tiny-shared"):
        assert summarize(name)["total_params"] < 2_000_000, name


def test_flops_per_token_formula():
    s = summarize("llm-tiny", seq_len=9)
    cfg = get_preset("llm-tiny")
    f = s["flops_forward"]["llm_per_token"]
    embed = cfg.vocab_size * cfg.hidden
    assert f["matmul"] == 2 * (s["active_params"] - embed - s["components"]["llm.norms"]["active"])
    assert f["attention"] == 4 * 5 * cfg.num_q_heads * cfg.head_dim * cfg.num_layers


def test_cli_json_and_unknown(capsys):
    assert main(["seedvit-532m", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_params"] == 532_047_360
    assert main(["no-such-model"]) == 2
    assert "known presets" in capsys.readouterr().err
