"""Recipes: the paper's hyperparameters as data, the LR schedules, the scaling rule to a preset,
CLI-style overrides, AdamW groups (no decay on biases and norms) and what each stage freezes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from model.config import get_preset
from model.vlm import SeedVLM
from trainer.components import (
    build_model_config,
    build_optimizer,
    param_groups,
    set_trainable,
    stage_scheduler,
)
from trainer.data.chat import LEVEL_PROMPT, LEVEL_RESPONSE
from trainer.data.tokenizer import ByteTokenizer
from trainer.recipes import MODULES, STAGES, apply_overrides, get_recipe, scale_to, with_steps


def test_paper_values():
    s0, s1, s2, sft = get_recipe("vlm")
    assert [s.name for s in (s0, s1, s2, sft)] == ["stage0", "stage1", "stage2", "sft"]
    assert (s0.trainable, s0.lr_max, s0.lr_min, s0.seq_len) == (("adapter",), 2.52e-4, 4.50e-5, 32_768)
    assert (s1.trainable, s1.lr_max, s1.lr_min, s1.seq_len) == (MODULES, 5.22e-5, 5.22e-6, 32_768)
    assert (s2.schedule, s2.lr_max, s2.seq_len, s2.warmup, s2.reset_optimizer) == (
        "constant",
        5.22e-6,
        131_072,
        0,
        False,
    )
    assert s2.lr_max == s1.lr_min, "stage 2 continues at stage 1's final LR"
    assert "vit" not in sft.trainable and (sft.lr_max, sft.lr_min, sft.warmup) == (2e-5, 2e-6, 0.1)
    assert [s.min_level for s in (s0, s1, s2, sft)] == [LEVEL_PROMPT] * 3 + [LEVEL_RESPONSE]
    for s in (s0, s1, s2, sft):
        assert s.betas == (0.9, 0.95) and s.weight_decay == 0.1
    assert math.isclose(s0.warmup, 100 / 1905) and math.isclose(s1.warmup, 500 / 42_254)
    assert get_recipe("stage1,sft") == (s1, sft)
    with pytest.raises(KeyError, match="unknown recipe or stage"):
        get_recipe("stage9")


def test_lr_schedules():
    s1 = with_steps((STAGES["stage1"],), steps=200)[0]
    lrs = [s1.lr_factor(k) for k in range(s1.steps)]
    w = s1.warmup_steps
    assert w == round(200 * 500 / 42_254) >= 1
    assert lrs[:w] == pytest.approx([(k + 1) / w for k in range(w)])
    assert max(lrs) == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(s1.lr_min / s1.lr_max)
    assert all(a >= b for a, b in zip(lrs[w:], lrs[w + 1 :], strict=False)), "cosine decays monotonically"
    s2 = STAGES["stage2"]
    assert {s2.lr_factor(k) for k in range(10)} == {1.0}
    sft = with_steps((STAGES["sft"],), steps=50)[0]
    assert sft.warmup_steps == 5


def test_scaling_to_presets():
    tok = ByteTokenizer()
    tiny = scale_to(get_recipe("vlm"), build_model_config("seedvl-tiny", tok))
    # the CPU-scale budget of 1,024/4,096 tokens per step, as 2 micro-batches (dp=2 runs it too)
    assert [(s.accum, s.seq_len) for s in tiny] == [(2, 512), (2, 512), (2, 2048), (2, 2048)]
    # the width rule (x 64), then the CPU-scale presets' own factors: stage 0 / 16, stages 1-2 x 0.1
    # (stage 2 still continues at stage 1's final LR), SFT x 3.125
    lrs = [lr for s in tiny for lr in (s.lr_max, s.lr_min)]
    want = [2.52e-4 * 4, 4.5e-5 * 4, 5.22e-5 * 6.4, 5.22e-6 * 6.4, 5.22e-6 * 6.4, 5.22e-6 * 6.4, 4e-3, 4e-4]
    assert lrs == pytest.approx(want)
    assert tiny[2].lr_max == pytest.approx(tiny[1].lr_min)
    big = scale_to(get_recipe("vlm"), get_preset("seedvl-qwen3-235b-a22b"))
    assert big == get_recipe("vlm"), "the reference width gets the paper's values"
    mid = scale_to(get_recipe("vlm"), get_preset("seedvl-qwen3-30b-a3b"))
    assert mid[1].lr_max == pytest.approx(2 * 5.22e-5) and mid[2].seq_len == 131_072


def test_steps_tokens_and_overrides():
    stages = get_recipe("vlm")
    assert [s.steps for s in with_steps(stages, steps=33)] == [1, 2, 1, 30]
    by_tokens = with_steps(stages, tokens=10_000_000)
    assert sum(s.steps * s.seq_len for s in by_tokens) == pytest.approx(10_000_000, rel=0.01)
    with pytest.raises(ValueError, match="not both"):
        with_steps(stages, steps=1, tokens=1)
    out = apply_overrides(
        stages, ["stage1.lr_max=1e-3", "*.seq_len=2048", "sft.trainable=llm", "stage2.accum=2"]
    )
    assert out[1].lr_max == 1e-3 and {s.seq_len for s in out} == {2048}
    assert out[3].trainable == ("llm",) and out[2].accum == 2
    assert out[0] == dataclasses.replace(stages[0], seq_len=2048)
    for bad, msg in [
        ("stage1.lr=1", "FIELD one of"),
        ("stage7.steps=3", "no stage"),
        ("stage1.trainable=eyes", "subset of"),
        ("stage1.reset_optimizer=maybe", "true or false"),
        ("lr_max=3", "STAGE.FIELD=VALUE"),
    ]:
        with pytest.raises(ValueError, match=msg):
            apply_overrides(stages, [bad])
    # Related fields are checked together, whatever their order: a new range below the old one.
    low = ["stage0.lr_max=1e-6", "stage0.lr_min=1e-7"]
    for order in (low, low[::-1]):
        assert (apply_overrides(stages, order)[0].lr_min, apply_overrides(stages, order)[0].lr_max) == (
            1e-7,
            1e-6,
        )
    with pytest.raises(ValueError, match="lr_min <= lr_max"):
        apply_overrides(stages, ["stage0.lr_max=1e-7", "stage0.lr_min=1e-6"])


def test_param_groups_exclude_biases_and_norms():
    model = SeedVLM(get_preset("seedvl-tiny-shared"))
    groups = param_groups(model, 0.1)
    decay = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    for name, p in model.named_parameters():
        no_decay = name.endswith("bias") or "norm" in name or name.endswith(("adapter.b1", "adapter.b2"))
        assert (id(p) not in decay) == no_decay, f"{name}: decay {id(p) in decay}"
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["stage0", "stage1", "stage2", "sft"])
def test_stage_freezes_and_optimizer(name):
    stage = STAGES[name]
    model = SeedVLM(get_preset("seedvl-tiny"))
    set_trainable(model, stage.trainable)
    for module in MODULES:
        flags = {p.requires_grad for p in getattr(model, module).parameters()}
        assert flags == {module in stage.trainable}, f"{name}: {module}"
    opt = build_optimizer(model, stage)
    assert isinstance(opt, torch.optim.AdamW)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(g["betas"] == (0.9, 0.95) and g["lr"] == stage.lr_max for g in opt.param_groups)


def test_kept_optimizer_restarts_its_schedule():
    model = SeedVLM(get_preset("seedvl-tiny"))
    s1, s2 = STAGES["stage1"], STAGES["stage2"]
    opt = build_optimizer(model, s1)
    stage_scheduler(opt, s1)
    sched2 = stage_scheduler(opt, s2)
    assert sched2.base_lrs == [s2.lr_max, s2.lr_max]
    assert all(g["lr"] == s2.lr_max for g in opt.param_groups)
