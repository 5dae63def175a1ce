"""Post-training parts and the ``rl``/``post`` recipes end to end (trainer.rl): the reward model's
preference lists and list-wise loss, the critic's initialisation from the reward model, prompt
curation, rejection sampling's selection, and exact resume of the RL state after a SIGTERM."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model.vlm import SeedVLM
from trainer.checkpoint import Checkpointer
from trainer.components import build_model_config
from trainer.config import RunConfig, SetupError
from trainer.data.tokenizer import load_tokenizer
from trainer.evaluate import encode_config
from trainer.logs import read_steps
from trainer.rl import reward_model as RM
from trainer.rl.prompts import DESCRIBE, VERIFIABLE, Prompt, curate, make_prompt, make_prompts
from trainer.rl.rejection import select
from trainer.rl.rewards import verify
from trainer.rl.rollout import Critic, Rollout, hidden_states, pack_rollouts
from trainer.rl.run import report, run
from trainer.rl.workers import Scored

REPO = Path(__file__).resolve().parent.parent


def test_preference_lists_rank_as_the_verifiers_do():
    kinds = set()
    for i in range(60):
        p = make_prompt(0, 99, i, 0.2)
        pl = RM.preference_list(p, np.random.default_rng(i))
        kinds.add(p.kind)
        assert pl.ranks == (0, 1, 2)
        right, wrong, broken = pl.responses
        assert right != wrong and broken.strip() != right
        if p.kind != DESCRIBE:
            assert verify(p.kind, right, p.truth).correct, (p.kind, right, p.truth)
            v = verify(p.kind, wrong, p.truth)
            assert not v.correct and v.format_ok, (p.kind, wrong, p.truth)
            assert (
                not verify(p.kind, broken, p.truth).correct or not verify(p.kind, broken, p.truth).format_ok
            )
    assert DESCRIBE in kinds and len(kinds) >= 6


def test_listwise_loss_and_pairwise_accuracy():
    ranks = torch.tensor([0, 1, 2])
    s = torch.log(torch.tensor([0.8, 0.4, 0.1]))
    # Plackett-Luce: -log(e^s0 / (e^s0+e^s1+e^s2)) - log(e^s1 / (e^s1+e^s2)), averaged over 2 terms;
    # anchors: -log 0.8 - log(1 - 0.1)
    pl = (-math.log(0.8 / 1.3) - math.log(0.4 / 0.5)) / 2
    expected = pl - math.log(0.8) - math.log(0.9)
    assert abs(float(RM.listwise_loss(s, ranks)) - expected) < 1e-5
    p = make_prompt(0, 99, 0, 0.0)
    lists = [RM.PreferenceList(p, ("a", "b", "c"), (0, 1, 2))] * 2
    acc = RM.pairwise_accuracy([[0.9, 0.5, 0.1], [0.2, 0.5, 0.5]], lists)
    assert acc["right>wrong"] == 0.5 and acc["wrong>broken"] == 0.75 and acc["right>broken"] == 0.5
    assert acc["all"] == (0.5 + 0.75 + 0.5) / 3


def _tiny():
    tok = load_tokenizer("bytes")
    torch.manual_seed(0)
    return tok, SeedVLM(build_model_config("seedvl-tiny", tok)).eval()


def test_critic_starts_as_the_reward_models_log_odds():
    tok, rm = _tiny()
    yes, no = RM.yes_no_ids(tok)
    critic = Critic.from_reward_model(rm, yes, no)
    p = make_prompt(0, 99, 3, 0.0)
    enc = p.encode(tok, encode_config(rm.cfg))
    r = Rollout(
        p, torch.from_numpy(enc.ids).long(), enc.images, torch.tensor([50, 51, 52]), torch.zeros(3), ""
    )
    packed = pack_rollouts([r], torch.device("cpu"))
    with torch.no_grad():
        values = critic.values(packed)
        logits = rm.llm.lm_head(hidden_states(rm, packed)[packed.rows])
    torch.testing.assert_close(values, logits[..., yes] - logits[..., no], rtol=1e-5, atol=1e-5)


def test_curation_keeps_prompts_worth_training_on():
    prompts = [Prompt("count", "q", "2", None, (0, 0, i)) for i in range(4)]
    prompts.append(Prompt(DESCRIBE, "d", "red cube", None, (0, 0, 4)))
    prompts.append(Prompt(DESCRIBE, "d", "red cube", None, (0, 0, 5)))
    correct = [[False] * 4, [True] * 4, [True, True, True, False], [True, False, False, False], [], []]
    rewards = [[0.0] * 4] * 4 + [[0.5, 0.52, 0.5, 0.5], [0.1, 0.9, 0.2, 0.2]]
    c = curate(prompts, rewards, correct, max_solved=0.75, min_spread=0.05)
    assert [p.key[2] for p in c.kept] == [2, 3, 5]
    assert c.stats["dropped"] == {"never solved": 1, "mostly solved": 1, "low RM spread": 1}
    mixed = make_prompts(0, 11, 0, 40, 0.25)
    assert {p.ptype for p in mixed} == {VERIFIABLE, "general"}


def test_rejection_sampling_keeps_verified_distinct_unrepetitive_replies():
    p = Prompt("count", "q", "2", None, (0, 15, 0))
    texts = ["2", "3", "2", "2 2 2 2 2 2", "\\boxed{2}", "<think>a"]
    rolls = [Rollout(p, torch.zeros(1), [], torch.zeros(1), torch.zeros(1), t) for t in texts]
    verdicts = [Scored(*verify_info(t)) for t in texts]
    kept, dropped = select(rolls, verdicts)
    assert [r.text for r in kept] == ["2", "\\boxed{2}"]
    assert dropped == {"wrong": 3, "format": 0, "repetitive": 0, "duplicate": 1}


def verify_info(text):
    v = verify("count", text, "2")
    return v.reward, {"correct": v.correct, "format_ok": v.format_ok, "reason": v.reason}


# ----------------------------------------------------------------------------- the recipe, killed and resumed

# min_spread 0: curation keeps every general prompt, so an untrained model has prompts to train on
SMALL = ["rl.episodes=5", "rl.prompts_per_episode=2", "rl.samples_verifiable=2", "rl.mini_batches=2",
         "rl.ppo_epochs=1", "rl.critic_warmup_steps=2", "rl.max_new_tokens=6", "rl.curate_k=2",
         "rl.curate_candidates=6", "rl.rm_steps=2", "rl.rm_lists_per_step=2", "rl.rm_heldout_lists=3",
         "rl.rs_prompts=2", "rl.rs_k=2", "rl.rs_steps=1", "rl.general_frac=0.5",
         "rl.min_spread=0"]  # fmt: skip


def _cmd(init: Path, out: Path) -> list[str]:
    sets = [x for s in SMALL for x in ("--set", s)]
    return [sys.executable, str(REPO / "trainer" / "run.py"), "--recipe", "post", "--init", str(init),
            "--out", str(out), "--no-progress", "--eval-samples", "0", *sets]  # fmt: skip


def _episodes(out: Path) -> dict[int, dict]:
    drop = ("time", "tok_per_s", "step_s")
    return {r["step"]: {k: v for k, v in r.items() if k not in drop} for r in read_steps(out / "log.jsonl")}


def _init(root: Path) -> Path:
    """A checkpoint of a fresh tiny model to post-train from (--init)."""
    _, model = _tiny()
    opt = torch.optim.AdamW(model.parameters())
    signature = {"preset": "seedvl-tiny", "tokenizer": "bytes", "vocab_size": model.cfg.llm.vocab_size}
    Checkpointer(root / "init").save(0, model, opt, {"run": signature, "global_step": 0, "stage": "init"})
    return root / "init"


def _rl_cfg(init: Path, out: Path, *sets: str, **kw) -> RunConfig:
    return RunConfig(recipe="rl", init=init, out=out, progress=False, tensorboard=False, overrides=list(sets),
                     **kw)  # fmt: skip


# No reward model, no general prompts, one verifier worker, short replies.
QUICK = ["rl.general_frac=0", "rl.rm_steps=0", "rl.rm_heldout_lists=0", "rl.verifier_workers=1",
         "rl.max_new_tokens=4"]  # fmt: skip


def test_no_rl_when_curation_keeps_no_prompt(tmp_path):
    out = tmp_path / "rl"
    # one reply per candidate: each is solved 0% or 100% of the time, never in (0, 75%]
    sets = [*QUICK, "rl.curate_k=1", "rl.curate_candidates=3"]
    summary = run(_rl_cfg(_init(tmp_path), out, *sets, eval_samples=1))
    assert summary["curation"]["kept"] == 0 and sum(summary["curation"]["dropped"].values()) == 3
    reason = summary["rl"]["skipped_reason"]
    assert reason.startswith("curation kept 0 of 3 prompts: ") and "for lack of prompts" in reason
    said = [line for line in (out / "train.log").read_text().splitlines() if "curation kept" in line]
    assert len(said) == 1 and said[0].endswith(reason)
    assert summary["episodes"] == 0 and summary["checkpoint"] is None and not read_steps(out / "log.jsonl")
    assert summary["eval"] and summary["eval"] == summary["eval_before"], "the model is evaluated as it came"
    assert json.loads((out / "summary.json").read_text())["rl"] == summary["rl"]
    assert f"  RL skipped: {reason}" in report(summary).splitlines()


def test_resume_refuses_other_rl_settings(tmp_path):
    init, out = _init(tmp_path), tmp_path / "rl"
    sets = [*QUICK, "rl.curate_k=0", "rl.curate_candidates=2", "rl.episodes=1", "rl.critic_warmup_steps=0",
            "rl.prompts_per_episode=1", "rl.samples_verifiable=2", "rl.mini_batches=1",
            "rl.ppo_epochs=1"]  # fmt: skip
    first = run(_rl_cfg(init, out, *sets, eval_samples=0))
    assert first["episodes"] == 1 and first["rl"]["skipped_reason"] is None
    differs = r"^--resume: this run differs from the one that wrote .*step_00000001: "
    with pytest.raises(SetupError, match=differs + r"rl\.clip 0\.2 -> 0\.3; rl\.lam 0\.95 -> 0\.9\. Resume"):
        run(_rl_cfg(init, out, *sets, "rl.clip=0.3", "rl.lam=0.9", eval_samples=0, resume=True))
    with pytest.raises(SetupError, match=differs + r"seed 0 -> 1\. Resume"):
        run(_rl_cfg(init, out, *sets, eval_samples=0, resume=True, seed=1))
    # the same settings resume (after a JSON round trip), and how verifiers are deployed may change
    again = run(_rl_cfg(init, out, *sets, "rl.verifier_timeout_s=9", eval_samples=0, resume=True))
    assert again["episodes"] == 1 and again["checkpoint"] == first["checkpoint"]


def test_rl_state_resumes_exactly_after_sigterm(tmp_path):
    init = _init(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    reference = tmp_path / "reference"
    done = subprocess.run(
        _cmd(init, reference), cwd=REPO, capture_output=True, text=True, env=env, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["episodes"] == 6 and len(summary["rejection_sampling"]) == 1
    assert "all" in summary["reward_model"]["pairwise_accuracy"]
    assert summary["host"]["device"] == "cpu" and summary["host"]["threads"] >= 1

    out = tmp_path / "preempted"
    proc = subprocess.Popen(_cmd(init, out), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip
    deadline = time.time() + 180
    while not (out / "log.jsonl").exists() or len(read_steps(out / "log.jsonl")) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    stopped = max(_episodes(out))
    assert 2 <= stopped < 6, "stopped at an episode boundary before the end"
    assert stdout.strip().startswith(f"preempted by SIGTERM: saved step {stopped} to ")

    resumed = subprocess.run(
        [*_cmd(init, out), "--resume"], cwd=REPO, capture_output=True, text=True, env=env, timeout=240
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _episodes(out) == _episodes(reference), "the resumed run repeats the uninterrupted one exactly"
    tb = list((out / "tensorboard").glob("events*"))
    assert tb and (out / "rl.png").exists() and (out / "loss.png").exists()
