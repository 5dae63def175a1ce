"""Checkpoints: a DCP round trip restores model, optimizer, RNG and trainer state; a crash in the
middle of a save leaves the previous checkpoint intact and current; only the newest N are kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.config import get_preset
from model.vlm import SeedVLM
from trainer import checkpoint as ckpt_mod
from trainer.checkpoint import Checkpointer
from trainer.components import build_optimizer, set_trainable
from trainer.recipes import STAGES


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    model = SeedVLM(get_preset("seedvl-tiny"))
    set_trainable(model, STAGES["stage1"].trainable)
    opt = build_optimizer(model, STAGES["stage1"])
    for _ in range(2):
        loss = sum((p.float() ** 2).sum() for p in model.parameters())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _fresh():
    torch.manual_seed(123)
    model = SeedVLM(get_preset("seedvl-tiny"))
    set_trainable(model, STAGES["stage1"].trainable)
    return model, build_optimizer(model, STAGES["stage1"])


def _assert_same(model_a, opt_a, model_b, opt_b):
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["state"][k][key], sb["state"][k][key]), (k, key)


def test_round_trip(tmp_path):
    model, opt = _trained()
    ck = Checkpointer(tmp_path)
    rng = torch.get_rng_state()
    path = ck.save(7, model, opt, {"global_step": 7, "positions": {"spatial": [3, 2]}})
    assert path.name == "step_00000007" and ck.latest() == path
    assert json.loads((path / "meta.json").read_text())["positions"] == {"spatial": [3, 2]}
    torch.rand(10)  # move the generator on; loading must bring it back
    model2, opt2 = _fresh()
    meta = Checkpointer.load(path, model2, opt2)
    assert meta == {"global_step": 7, "positions": {"spatial": [3, 2]}}
    assert torch.equal(torch.get_rng_state(), rng)
    _assert_same(model, opt, model2, opt2)


def test_crash_mid_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model, opt = _trained()
    ck = Checkpointer(tmp_path, keep=2)
    good = ck.save(1, model, opt, {"global_step": 1})
    real_save = ckpt_mod.dcp.save

    def crash(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # the files are written ...
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"torn")  # ... one is torn ...
        raise OSError("disk full")  # ... and the process dies before the rename

    monkeypatch.setattr(ckpt_mod.dcp, "save", crash)
    model_b, opt_b = _trained(seed=1)
    with pytest.raises(OSError, match="disk full"):
        ck.save(2, model_b, opt_b, {"global_step": 2})
    monkeypatch.setattr(ckpt_mod.dcp, "save", real_save)

    assert (tmp_path / ".tmp-step_00000002").is_dir(), "the torn save stays in its temporary directory"
    assert ck.latest() == good and ck.complete() == [good]
    model2, opt2 = _fresh()
    assert Checkpointer.load(ck.latest(), model2, opt2) == {"global_step": 1}
    _assert_same(model, opt, model2, opt2)

    # The next save clears the leftover and prunes to the newest two.
    for step in (3, 4, 5):
        ck.save(step, model, opt, {"global_step": step})
    assert not list(tmp_path.glob(".tmp-*"))
    assert [p.name for p in ck.complete()] == ["step_00000004", "step_00000005"]
    assert ck.latest().name == "step_00000005"


def test_latest_falls_back_to_scanning(tmp_path):
    model, opt = _trained()
    ck = Checkpointer(tmp_path, keep=3)
    ck.save(1, model, opt, {})
    second = ck.save(2, model, opt, {})
    (tmp_path / "latest").write_text("step_00000099\n")  # names something that is not there
    assert ck.latest() == second
    (tmp_path / "step_00000050").mkdir()  # a directory without meta.json is not a checkpoint
    assert ck.latest() == second
    assert Checkpointer(tmp_path / "empty").latest() is None


def test_model_only_load_for_init(tmp_path):
    model, opt = _trained()
    path = Checkpointer(tmp_path).save(3, model, opt, {"global_step": 3})
    fresh, _ = _fresh()
    set_trainable(fresh, STAGES["sft"].trainable)  # another stage's trainable set does not matter
    Checkpointer.load_model(path, fresh)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
