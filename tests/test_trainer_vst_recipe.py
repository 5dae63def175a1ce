"""The VST recipe (trainer.rl.vst): data specs for its stages, VST prompts for RL (views and videos
at their task's rate), the VST verifiers as RL rewards, its settings' errors, and the whole recipe
-- VST-P SFT -> VST-R SFT -> RL -- end to end in tiny steps, with held-out scores per skill and per
scenario beside their baselines before, after each SFT stage and after RL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_trainer_evaluate import make_run

from model.preprocess import VIDEO_FPS
from trainer.components import _source
from trainer.config import RunConfig, SetupError
from trainer.data import vst
from trainer.data.chat import EncodeConfig, Media
from trainer.data.tokenizer import END_THINK, THINK, ByteTokenizer
from trainer.logs import read_steps
from trainer.loop import train
from trainer.recipes import STAGES
from trainer.rl.prompts import DESCRIBE, make_prompts
from trainer.rl.rewards import verify
from trainer.rl.run import run
from trainer.rl.vst_prompts import VSTPrompts


def test_data_spec_round_trip_and_errors():
    cfg = vst.parse_spec("vst:think=1,video=0.5,vid_when=2")
    assert cfg.think_prob == 1.0 and dict(cfg.scenarios)["video"] == 0.5 and dict(cfg.skills)["vid_when"] == 2
    assert dict(cfg.scenarios)["single"] == 0.5 and dict(cfg.skills)["count"] == 1.0  # defaults kept
    assert vst.parse_spec(vst.format_spec(cfg)) == cfg
    assert vst.parse_spec("vst") == vst.VSTConfig()
    for stage in ("vst_p", "vst_r"):  # the recipe's stated mixes
        mix = vst.parse_spec(STAGES[stage].data)
        assert dict(mix.scenarios) == {"single": 0.5, "multiview": 0.25, "video": 0.25}
        assert mix.think_prob == (0.0 if stage == "vst_p" else 1.0)
    for bad, says in [("vst:bogus=1", "bogus"), ("vst:think", "KEY=NUMBER"), ("vst:think=2", "think_prob"),
                      ("vst:video=x", "KEY=NUMBER"), ("spatial", "expected 'vst'")]:  # fmt: skip
        with pytest.raises(ValueError, match=says):
            vst.parse_spec(bad)
    assert vst.is_spec("vst:think=1") and not vst.is_spec("vst_data.jsonl")


# two multi-view skills: the held-out set and its baselines take a second to build
TWO_SKILLS = "vst:think=0,single=0,video=0,mv_closer=0,mv_rotation=0,mv_translation=0"


def test_vst_specs_are_data_sources_of_any_recipe(tmp_path):
    ds = _source("vst:think=1,video=0", 0, None)
    assert isinstance(ds, vst.VSTDataset) and ds.cfg == vst.parse_spec("vst:think=1,video=0")
    assert {vst.SKILLS[ds.skill(i)] for i in range(40)} == {"single", "multiview"}
    with pytest.raises(ValueError, match=r"--data / STAGE\.data: VST data spec .*unknown key 'bogus'"):
        _source("vst:bogus=1", 0, None)
    kw = dict(progress=False, tensorboard=False, window=8, eval_every=0, eval_samples=1)
    with pytest.raises(SetupError, match=r"--data / STAGE\.data: .*'think=x' is not KEY=NUMBER"):
        train(RunConfig(data="vst:think=x", out=tmp_path / "bad", **kw))
    tiny = ["*.steps=1", "*.seq_len=1024", "*.accum=1"]
    runs = [  # a VST stage on its own (the recipe's data) and the default recipe on --data vst:...
        RunConfig(
            recipe="vst_p", out=tmp_path / "vst_p", overrides=[f"vst_p.data={TWO_SKILLS}", *tiny], **kw
        ),
        RunConfig(data=TWO_SKILLS, out=tmp_path / "vlm", overrides=tiny, **kw),
    ]
    for cfg in runs:
        summary = train(cfg)
        assert all(st["steps"] == 1 for st in summary["stages"]), summary["stages"]
        scores = summary["eval"]  # held out on the skills it trained on, beside their baselines
        assert set(scores) == {"mv_correspondence", "mv_count", "multiview/all", "all"}
        assert scores["all"]["total"] == 2 and scores["mv_count"]["baseline"] is not None


def test_vst_prompts_mix_scenarios_and_carry_the_video_rate():
    src = VSTPrompts.from_spec("vst:single=0,multiview=1,video=1")
    prompts = make_prompts(0, 11, 0, 24, 0.0, src)
    assert {vst.SKILLS[p.kind] for p in prompts} == {"multiview", "video"}
    again = src(0, 11, 5, 0.0)
    assert (again.kind, again.text, again.truth) == (prompts[5].kind, prompts[5].text, prompts[5].truth)
    assert all(p.kind == DESCRIBE for p in make_prompts(0, 11, 0, 4, 1.0, src))
    tok, enc = ByteTokenizer(), EncodeConfig(max_pixels=64 * 28 * 28)
    video = next(p for p in prompts if vst.SKILLS[p.kind] == "video")
    (media,) = [m for m in video.user_parts if isinstance(m, Media)]
    assert media.task == vst.TASKS[video.kind] and media.fps == VIDEO_FPS[media.task]
    sampled = video.encode(tok, enc)
    assert len(sampled.images) == len(media.source), "every frame, rendered at the task's rate, is kept"
    views = next(p for p in prompts if vst.SKILLS[p.kind] == "multiview")
    n_views = sum(isinstance(m, Media) for m in views.user_parts)
    assert 2 <= n_views <= 4 and len(views.encode(tok, enc).images) == n_views
    assert views.user_parts[-1] == views.text


def test_vst_verifiers_reward_the_truth_and_not_a_near_miss():
    src = VSTPrompts()
    for k, skill in enumerate(vst.SKILLS):
        s = vst.generate(skill, np.random.default_rng([3, k]))
        right = verify(skill, f"{THINK}{s.rationale}{END_THINK}{s.answer}", s.answer)
        assert right.correct and right.reward == 1.0 and right.format_ok, (skill, right)
        wrong = verify(skill, "7" if s.answer != "7" else "8", s.answer)
        assert not wrong.correct and wrong.reward < 1.0, (skill, wrong)
    assert src(0, 11, 0, 0.0).kind in vst.SKILLS


def _cfg(init, out, *sets: str, **kw) -> RunConfig:
    return RunConfig(recipe="vst", init=init, out=out, progress=False, tensorboard=False, window=8,
                     overrides=list(sets), **kw)  # fmt: skip


def test_settings_errors_name_the_setting(tmp_path):
    init = make_run(tmp_path / "init")
    cases = [
        (["vst.bogus=1"], "vst.FIELD"),
        (["vst.rl_data=vst:wat=1"], "wat"),
        (["vst_p.data=vst:think=3"], "think_prob"),
        (["stage1.lr_max=1e-3"], "--set stage1.lr_max"),
        (["vst.baseline_per_skill=0"], "baseline_per_skill"),
    ]
    for i, (sets, says) in enumerate(cases):
        with pytest.raises(SetupError, match=says):
            run(_cfg(init, tmp_path / f"out{i}", *sets))


TINY = ["vst_p.steps=1", "vst_r.steps=1", "*.seq_len=1024", "*.accum=1", "vst.eval_per_skill=1",
        "vst.baseline_per_skill=2", "vst.eval_think_tokens=0", "rl.episodes=1", "rl.critic_warmup_steps=0",
        "rl.prompts_per_episode=2", "rl.samples_verifiable=2", "rl.mini_batches=1", "rl.ppo_epochs=1",
        "rl.max_new_tokens=6", "rl.curate_k=0", "rl.curate_candidates=3",
        "vst.rl_data=vst:single=0,multiview=1,video=1"]  # fmt: skip


def test_recipe_end_to_end_with_scores_per_scenario(tmp_path):
    torch.manual_seed(0)
    init = make_run(tmp_path / "init")
    out = tmp_path / "vst"
    summary = run(_cfg(init, out, *TINY))
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["eval"] == summary["eval"] and summary["recipe"] == "vst"
    scopes = ("single/all", "multiview/all", "video/all", "all")
    stages = summary["sft"]
    assert list(stages) == ["vst_p", "vst_r"]
    for name, st in stages.items():
        assert st["steps"] == 1 and st["data"] == STAGES[name].data
        sub = json.loads((out / name / "summary.json").read_text())
        assert sub["stages"][0]["stage"] == name and (out / name / "checkpoints").is_dir()
    for scores in (summary["eval_before"], stages["vst_p"]["eval"], stages["vst_r"]["eval"], summary["eval"]):
        assert set(vst.SKILLS) | set(scopes) == set(scores)
        for scope in scopes:
            entry = scores[scope]
            assert 0 <= entry["accuracy"] <= 1 and entry["baseline"] is not None
        assert scores["all"]["total"] == len(vst.SKILLS)
        assert scores["video/all"]["total"] == sum(s == "video" for s in vst.SKILLS.values())
    assert set(summary["eval_delta"]) == set(summary["eval"])
    episodes = read_steps(out / "log.jsonl")
    assert [e["stage"] for e in episodes] == ["rl"]
    kinds = {k for e in episodes for k in e["reward_by_kind"]}
    assert kinds and {vst.SKILLS[k] for k in kinds} <= {"multiview", "video"}  # vst.rl_data's mix
    assert summary["reward_model"]["steps"] == 0  # verifiable prompts only: no RM training
    # --resume with another RL prompt mix is refused, naming the setting
    other = [*TINY[:-1], "vst.rl_data=vst:single=1,multiview=0,video=0"]
    with pytest.raises(
        SetupError, match=r"vst\.rl_data 'vst:single=0,multiview=1,video=1' -> 'vst:single=1,"
    ):
        run(_cfg(init, out, *other, resume=True))
