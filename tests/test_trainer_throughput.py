"""Model FLOPs per micro-batch (the MFU numerator) against an independent count from the model's
own modules, stage throughput as tokens over time, and the host named next to such numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.vlm import SeedVLM
from trainer.components import build_model_config
from trainer.data.chat import LEVEL_PROMPT, encode_conversation
from trainer.data.packer import SamplePool
from trainer.data.spatial import SpatialDataset
from trainer.data.tokenizer import ByteTokenizer
from trainer.logs import stage_summary
from trainer.throughput import FlopCounter, measure_peak


def _matmul_weights_per_token(model: SeedVLM) -> tuple[int, int, int]:
    """(LLM, ViT, adapter) matmul weights one token uses, counted from the modules."""
    llm_cfg = model.cfg.llm
    llm = 0
    for layer in model.llm.layers:
        llm += sum(m.weight.numel() for m in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj))
        llm += layer.attn.o_proj.weight.numel() + layer.ffn.router.weight.numel()
        experts = layer.ffn.experts.w_gate_up.numel() + layer.ffn.experts.w_down.numel()
        llm += experts * llm_cfg.top_k // llm_cfg.num_experts
    llm += model.llm.lm_head.weight.numel()
    vit = sum(m.weight.numel() for m in model.vit.modules() if isinstance(m, torch.nn.Linear))
    adapter = sum(p.numel() for p in model.adapter.parameters() if p.ndim == 2)  # w1, w2 of pool_adapter
    return llm, vit, adapter


def test_flops_of_a_micro_batch():
    tok = ByteTokenizer()
    cfg = build_model_config("seedvl-tiny", tok)
    model = SeedVLM(cfg)
    ds = SpatialDataset(0)
    pool = SamplePool([encode_conversation(ds[i], tok) for i in range(3)])
    batch = pool.collate(np.arange(3), min_level=LEVEL_PROMPT, image_token_id=tok.image_token_id)
    llm_w, vit_w, adapter_w = _matmul_weights_per_token(model)
    docs = batch.cu_seqlens.diff().tolist()
    images = batch.vit_cu_seqlens.diff().tolist()
    patches = sum(images)
    attn_llm = sum(4 * L * (L + 1) // 2 * cfg.llm.num_q_heads * cfg.llm.head_dim for L in docs)
    attn_vit = sum(4 * L * L * cfg.vit.num_heads * cfg.vit.head_dim for L in images)
    forward = (
        2 * llm_w * sum(docs)
        + attn_llm * cfg.llm.num_layers
        + 2 * vit_w * patches
        + attn_vit * cfg.vit.depth
        + 2 * adapter_w * patches // 4
    )
    assert FlopCounter(cfg).batch(batch) == 3 * forward
    assert measure_peak(torch.device("cpu"), torch.float32) is None


def test_stage_rate_is_tokens_over_time():
    records = [
        {"stage": "s", "loss": 1.0, "tokens": 100, "step_s": 1.0, "tok_per_s": 100.0},
        {"stage": "s", "loss": 1.0, "tokens": 100, "step_s": 9.0, "tok_per_s": 100 / 9},
    ]
    assert stage_summary(records)[0]["tok_per_s"] == 200 / 10


def test_host_names_the_cpu_model():
    """summary.json's host and the benchmark records name the CPU by its model, as /proc/cpuinfo
    gives it (platform.processor() is often empty on Linux), and a bench record its thread count."""
    from bench import harness
    from trainer.logs import cpu_model, host_info

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [line.partition(":")[2].strip() for line in lines if line.startswith("model name")]
    name = cpu_model()
    assert name and (not models or name == models[0])
    assert host_info(torch.device("cpu"))["cpu"] == name
    device = harness.environment(torch.device("cpu"))["device"]
    assert device == {"name": name, "driver": None, "threads": torch.get_num_threads()}
