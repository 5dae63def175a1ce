"""The post-training recipes, ``python trainer/run.py --recipe rl --init <run or checkpoint>`` and
``--recipe post``:

    rl    RM stage -> critic warm-up -> PPO episodes                      (from --init's model)
    post  SFT (the vlm recipe, unless --init) -> RM stage -> [PPO -> rejection-sampling SFT] x rounds
    vst   the VST SFT stages, then RL on VST prompts (trainer.rl.vst, a subclass of PostTraining)

Output (``--out``, default runs/<recipe>-<preset>): ``rm/`` (the reward model's checkpoint and its
held-out ranking accuracy), ``curation.json`` (the curated prompts), ``checkpoints/`` (actor,
critic and both optimizers), ``log.jsonl`` (one record per episode: reward by prompt type and by
skill, KL, value and policy loss, clip fraction, entropy, response length), ``tensorboard/``,
``loss.png`` and ``rl.png``, and ``summary.json`` with the held-out accuracy per skill before and
after (``eval_before``, ``eval``) and ``rl.skipped_reason``: null, or why no PPO episode ran (curation
kept none of the candidate prompts; the model is then evaluated as it came).

Resume (``--resume``): the RM and the curation are reused when done; RL continues from its last
checkpoint (actor, critic, optimizers, RNG, the episode and so the prompt position: episode e's
prompts, draws and mini-batch order are functions of (seed, e)), so a resumed run logs the same
episodes as an uninterrupted one. SIGTERM/SIGINT save at the next episode boundary and stop
(trainer.loop.Preempted). The reference policy for the KL is the --init model, reloaded.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from model.vlm import SeedVLM

from .. import logs
from ..checkpoint import Checkpointer
from ..components import _device, param_groups, prepare_out_dir
from ..config import RunConfig, SetupError, as_dict, check_resume, validate
from ..evaluate import CheckpointError, HeldOut, find_checkpoint, load_checkpoint
from ..loop import Preempted
from ..recipes import POST_RECIPES as RECIPES
from . import reward_model as RM
from .config import RECIPE_DEFAULTS, PostConfig, apply_overrides, scale
from .episode import ppo_update, score_rollouts
from .prompts import (
    CURATE_STREAM,
    RM_HELDOUT_STREAM,
    RM_STREAM,
    PromptSource,
    curate,
    make_prompt,
    make_prompts,
)
from .rejection import rejection_round
from .rewards import verify_job
from .rollout import Critic, sample_rollouts, suppressed
from .workers import VerifierPool

log = logging.getLogger("trainer.rl")
_OWN = ("rm", "sft", "curation.json", "eval_before.json", "rl.png")  # removed by --overwrite
_RESUMABLE = ("verifier_workers", "verifier_timeout_s")  # how verifiers are deployed: may change on --resume


def _generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


class PostTraining:
    def __init__(self, cfg: RunConfig) -> None:
        validate(cfg)
        if cfg.recipe not in RECIPES:
            raise SetupError(f"--recipe {cfg.recipe}: not a post-training recipe ({', '.join(RECIPES)})")
        if cfg.recipe == "rl" and cfg.init is None:
            raise SetupError("--recipe rl: starts from a trained model; pass --init <run or checkpoint>")
        self.cfg = cfg
        self.source: PromptSource = make_prompt  # RL prompts: the seven spatial skills
        self.out = prepare_out_dir(cfg)
        if cfg.overwrite:
            for name in _OWN:
                p = self.out / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        logs.setup_logging(self.out)
        self.device = _device(cfg.device)
        if cfg.deterministic is not False and self.device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        self._stop: str | None = None

    # ----------------------------------------------------------------------------- phases

    def run(self) -> dict:
        t0 = time.time()
        cfg = self.cfg
        rl_sets = self._rl_overrides()
        init = cfg.init
        if init is None:  # post without --init: the SFT model first (the whole vlm recipe)
            init = self._sft()
        loaded = self._load(init)
        self.s = self._settings(rl_sets)
        summary: dict = {"out": str(self.out), "recipe": cfg.recipe, "init": str(loaded.path)}
        summary["host"] = logs.host_info(self.device)
        summary["eval_before"] = self._eval_before(loaded.model)
        return self._post(loaded, summary, t0)

    def _load(self, init: Path):
        """The model of run or checkpoint ``init`` (trainer.evaluate.Loaded); its tokenizer and image
        budget become the run's."""
        try:
            loaded = load_checkpoint(init, self.device, max_pixels=self.cfg.max_pixels)
        except CheckpointError as err:
            raise SetupError(f"--init {init}: {err}") from err
        self.tok, self.encode = loaded.tok, loaded.encode
        self.model_cfg = loaded.model.cfg
        return loaded

    def _rl_overrides(self) -> list[str]:
        """The --set items for PostConfig; any other is an error once --init skips the SFT run."""
        rest = [o for o in self.cfg.overrides if not o.startswith("rl.")]
        if rest and self.cfg.init is not None:
            raise SetupError(
                f"--set {rest[0]}: post-training takes rl.FIELD=VALUE (see trainer/rl/config.py)"
            )
        return [o for o in self.cfg.overrides if o.startswith("rl.")]

    def _settings(self, overrides: list[str]) -> PostConfig:
        """PostConfig scaled to the model, with the recipe's defaults (config.RECIPE_DEFAULTS), then
        the ``rl.FIELD=VALUE`` overrides."""
        defaults = RECIPE_DEFAULTS.get(self.cfg.recipe, {})
        try:
            s = replace(scale(PostConfig(), self.model_cfg.llm.hidden), **defaults)
            s, _ = apply_overrides(s, overrides)
        except ValueError as err:
            raise SetupError(str(err)) from err
        return s

    def _post(self, loaded, summary: dict, t0: float) -> dict:
        """RM stage, curation, RL (and rejection-sampling rounds) from ``loaded``'s model, the final
        evaluation, plots and summary.json (``summary`` holds what came before)."""
        cfg, s = self.cfg, self.s
        self.init_ckpt = loaded.path
        self.resume_from = self._resume_point()
        log.info("post-training %s from %s: %s", cfg.recipe, self.init_ckpt, s)
        rm, summary["reward_model"] = self._reward_model(loaded.model)
        summary["curation"] = self._curate(loaded.model, rm)
        if self.pool_keys:
            summary.update(self._rl(loaded.model, rm))
        else:
            summary.update(self._no_rl(loaded.model, summary["curation"]))
        final = self._evaluate(self.actor)
        summary["eval"] = final.scores
        summary["eval_delta"] = {
            k: round(v["accuracy"] - summary["eval_before"][k]["accuracy"], 4)
            for k, v in final.scores.items()
            if k in summary["eval_before"]
        }
        summary["wall_s"] = round(time.time() - t0, 1)
        records = logs.read_steps(self.out / "log.jsonl")
        png = logs.plot_losses(records, self.out / "loss.png")
        summary["loss_plot"] = str(png) if png else None
        rl_png = plot_rl(records, self.out / "rl.png")
        summary["rl_plot"] = str(rl_png) if rl_png else None
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def _sft(self) -> Path:
        from ..loop import train

        sub = replace(
            self.cfg,
            recipe="vlm",
            out=self.out / "sft",
            init=None,
            overwrite=False,
            overrides=[o for o in self.cfg.overrides if not o.startswith("rl.")],
        )
        try:
            find_checkpoint(sub.out)
            done = (sub.out / "summary.json").exists()
        except CheckpointError:
            done = False
        if not done:
            train(replace(sub, resume=(sub.out / "log.jsonl").exists()))
            logs.setup_logging(self.out)  # the SFT run pointed the log at its own directory
        return sub.out

    def _evaluate(self, model: SeedVLM):
        if self.cfg.eval_samples == 0:
            return _NoEval()
        if not hasattr(self, "heldout"):
            self.heldout = self._heldout()
        return self.heldout.evaluate(model, self.device)

    def _heldout(self) -> HeldOut:
        """The held-out questions before and after: ``--eval-samples`` per spatial skill."""
        return HeldOut.spatial(self.tok, self.encode, seed=self.cfg.seed, per_skill=self.cfg.eval_samples)

    def _eval_before(self, model: SeedVLM) -> dict:
        path = self.out / "eval_before.json"
        if path.exists():
            return json.loads(path.read_text())
        scores = self._evaluate(model).scores
        path.write_text(json.dumps(scores, indent=1) + "\n")
        return scores

    def _reward_model(self, sft: SeedVLM) -> tuple[SeedVLM, dict]:
        """Train (or reload) the RM: a copy of the SFT model on list-wise preferences."""
        s, root = self.s, self.out / "rm"
        rm = _copy(sft)
        done = root / "summary.json"
        heldout = [
            RM.preference_list(
                make_prompt(self.cfg.seed, RM_HELDOUT_STREAM, i, 0.25),
                np.random.default_rng([self.cfg.seed, RM_HELDOUT_STREAM, i, 1]),
            )
            for i in range(s.rm_heldout_lists)
        ]
        if done.exists():
            Checkpointer.load_model(Checkpointer(root).latest(), rm)
            return rm.eval(), json.loads(done.read_text())
        before = self._rm_accuracy(rm, heldout)
        rm.train()
        rm.vit.requires_grad_(False)
        opt = torch.optim.AdamW(param_groups(rm, 0.1), lr=s.rm_lr, betas=(0.9, 0.95))
        yes, _ = RM.yes_no_ids(self.tok)
        losses = []
        for step in range(s.rm_steps):
            lists = [
                RM.preference_list(
                    make_prompt(self.cfg.seed, RM_STREAM, i, 0.25),
                    np.random.default_rng([self.cfg.seed, RM_STREAM, i, 1]),
                )
                for i in range(step * s.rm_lists_per_step, (step + 1) * s.rm_lists_per_step)
            ]
            seqs = [
                RM.judge_ids(self.tok, pl.prompt.text, pl.prompt.truth, r)
                for pl in lists
                for r in pl.responses
            ]
            lp = RM.log_p_yes(rm, seqs, yes)
            loss, at = lp.new_zeros(()), 0
            for pl in lists:
                k = len(pl.responses)
                loss = loss + RM.listwise_loss(lp[at : at + k], torch.tensor(pl.ranks, device=lp.device))
                at += k
            loss = loss / len(lists)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if (step + 1) % max(1, s.rm_steps // 5) == 0:
                log.info("RM step %d/%d: list-wise loss %.3f", step + 1, s.rm_steps, np.mean(losses[-10:]))
        rm.eval()
        after = self._rm_accuracy(rm, heldout)
        result = {
            "steps": s.rm_steps,
            "loss_first": float(np.mean(losses[:10] or [0])),
            "loss_last": float(np.mean(losses[-10:] or [0])),
            "heldout_lists": len(heldout),
            "pairwise_accuracy_before": before,
            "pairwise_accuracy": after,
        }
        if heldout:
            log.info(
                "RM held-out pairwise ranking accuracy %.3f (before training %.3f): %s",
                after["all"],
                before["all"],
                after,
            )
        Checkpointer(root, keep=1).save(s.rm_steps, rm, opt, {"run": {"preset": "rm"}})
        done.write_text(json.dumps(result, indent=1) + "\n")
        return rm, result

    def _rm_accuracy(self, rm: SeedVLM, lists: list[RM.PreferenceList]) -> dict:
        items = [(pl.prompt.text, pl.prompt.truth, r) for pl in lists for r in pl.responses]
        flat = RM.score(rm, self.tok, items)
        scores, at = [], 0
        for pl in lists:
            scores.append(flat[at : at + len(pl.responses)])
            at += len(pl.responses)
        return RM.pairwise_accuracy(scores, lists)

    def _curate(self, sft: SeedVLM, rm: SeedVLM) -> dict:
        """The RL prompt pool: curated candidates (prompts.curate), saved as their keys."""
        s, path = self.s, self.out / "curation.json"
        if path.exists():
            saved = json.loads(path.read_text())
        else:
            cands = make_prompts(
                self.cfg.seed, CURATE_STREAM, 0, s.curate_candidates, s.general_frac, self.source
            )
            if s.curate_k == 0:
                saved = {
                    "keys": [p.key for p in cands],
                    "stats": {"candidates": len(cands), "kept": len(cands)},
                }
            else:
                with VerifierPool(
                    verify_job, workers=s.verifier_workers, timeout_s=s.verifier_timeout_s
                ) as pool:
                    rolls = sample_rollouts(
                        sft,
                        cands,
                        s.curate_k,
                        tok=self.tok,
                        encode=self.encode,
                        max_new_tokens=s.max_new_tokens,
                        temperature=s.temperature,
                        top_p=s.top_p,
                        generator=_generator(self.cfg.seed, CURATE_STREAM),
                    )
                    score_rollouts(rolls, pool, rm, self.tok, require_think=s.require_think)
                k = s.curate_k
                rewards = [[r.reward for r in rolls[i * k : (i + 1) * k]] for i in range(len(cands))]
                correct = [[r.correct for r in rolls[i * k : (i + 1) * k]] for i in range(len(cands))]
                c = curate(cands, rewards, correct, max_solved=s.max_solved, min_spread=s.min_spread)
                saved = {"keys": [p.key for p in c.kept], "stats": c.stats}
            path.write_text(json.dumps(saved) + "\n")
            log.info("prompt curation: %s", saved["stats"])
        self.pool_keys = [tuple(k) for k in saved["keys"]]
        return saved["stats"]

    # ----------------------------------------------------------------------------- RL

    def _rl(self, sft: SeedVLM, rm: SeedVLM) -> dict:
        s, cfg = self.s, self.cfg
        yes, no = RM.yes_no_ids(self.tok)
        self.actor = _copy(sft).train()
        self.actor.vit.requires_grad_(False)  # as SFT: the ViT stays
        ref = _copy(sft).eval().requires_grad_(False)
        critic = Critic.from_reward_model(rm, yes, no).train()
        critic.body.vit.requires_grad_(False)
        critic.body.llm.lm_head.requires_grad_(False)  # the head replaces it
        opt_a = torch.optim.AdamW(param_groups(self.actor, s.weight_decay), lr=s.actor_lr, betas=(0.9, 0.95))
        opt_c = torch.optim.AdamW(param_groups(critic, s.weight_decay), lr=s.critic_lr, betas=(0.9, 0.95))
        both = torch.nn.ModuleDict({"actor": self.actor, "critic": critic})
        ckpt = Checkpointer(self.out / "checkpoints", cfg.keep)
        state = {"episode": 0, "rs_done": 0}
        resume = self.resume_from
        if resume is not None:
            meta = Checkpointer.load(resume, both, (opt_a, opt_c))
            state = {k: meta[k] for k in state}
            log.info("resumed RL from %s: episode %d", resume, state["episode"])
        per_round = s.warmup_episodes + s.episodes
        total = per_round * max(1, s.rs_rounds)
        runlog = RLRunLog(
            self.out, total, state["episode"], progress=cfg.progress, tensorboard=cfg.tensorboard
        )
        restore = self._catch_signals()
        rs_results = []
        try:
            with VerifierPool(verify_job, workers=s.verifier_workers, timeout_s=s.verifier_timeout_s) as pool:
                while state["episode"] < total:
                    e = state["episode"]
                    record = self._episode(
                        e, e % per_round < s.warmup_episodes, pool, rm, ref, critic, opt_a, opt_c
                    )
                    state["episode"] = e + 1
                    runlog.step(record)
                    round_end = state["episode"] % per_round == 0 and state["rs_done"] < s.rs_rounds
                    if round_end:
                        r = state["rs_done"]
                        rs_results.append(
                            rejection_round(
                                self.actor,
                                self.tok,
                                self.encode,
                                s,
                                pool,
                                seed=cfg.seed,
                                round_index=r,
                                device=self.device,
                                source=self.source,
                            )
                        )
                        runlog.event("rejection_sampling", episode=state["episode"], **rs_results[-1])
                        state["rs_done"] = r + 1
                    end = state["episode"] == total
                    if end or round_end or state["episode"] % cfg.ckpt_every == 0 or self._stop:
                        path = ckpt.save(
                            state["episode"],
                            both,
                            (opt_a, opt_c),
                            {**state, "run": self._signature(), "config": as_dict(cfg)},
                        )
                        if self._stop and not end:
                            raise Preempted(self._stop, state["episode"], path)
        finally:
            restore()
            runlog.close()
        return {
            "episodes": state["episode"],
            "rejection_sampling": rs_results,
            "checkpoint": str(ckpt.latest()),
            "settings": as_dict_post(s),
            "rl": {"skipped_reason": None},
        }

    def _signature(self) -> dict:
        """What a resumed RL run must share with the run that wrote its checkpoint: the recipe, the
        seed, the model it started from (the KL's reference) and every RL setting but how the
        verifiers are deployed. The --init checkpoint is recorded relative to --out when it lies
        inside (post without --init, vst), so a moved output directory still resumes."""
        init, out = Path(self.init_ckpt).resolve(), self.out.resolve()
        sig = {
            "recipe": self.cfg.recipe,
            "seed": self.cfg.seed,
            "init": str(init.relative_to(out)) if init.is_relative_to(out) else str(init),
            "max_pixels": self.encode.max_pixels,
        }
        sig.update({f"rl.{k}": v for k, v in as_dict_post(self.s).items() if k not in _RESUMABLE})
        return sig

    def _resume_point(self) -> Path | None:
        """With --resume, the RL checkpoint to continue from, once its run's settings are checked
        against this run's (trainer.config.check_resume, as an SFT or pre-training resume): a
        mismatch is a SetupError naming each differing field, before the RM, curation and RL."""
        path = Checkpointer(self.out / "checkpoints").latest_good() if self.cfg.resume else None
        if path is None:
            return None
        saved = Checkpointer.read_meta(path).get("run", {})
        if not any(k.startswith("rl.") for k in saved):
            log.warning("--resume: %s does not record its RL settings (an older run); not checked", path)
        else:
            check_resume(saved, self._signature(), path)
        return path

    def _no_rl(self, sft: SeedVLM, stats: dict) -> dict:
        """No prompt survived curation: no PPO episode, and so no rejection-sampling round after one.
        The report (§4.3) discards prompts solved 0% or more than 75% of the time and names no
        fallback; training on them would give PPO nothing to learn from (all-zero rewards when none
        is ever solved), so the run says so and goes on to its final evaluation of ``sft``.
        ``stats`` are the curation's (``_curate``)."""
        why = ", ".join(f"{n} {reason}" for reason, n in stats.get("dropped", {}).items() if n)
        reason = (
            f"curation kept 0 of {stats['candidates']} prompts: {why or 'none to curate'}; "
            "no PPO episodes (nor rejection-sampling rounds) for lack of prompts"
        )
        log.warning(reason)
        self.actor = sft
        return {
            "episodes": 0,
            "rejection_sampling": [],
            "checkpoint": None,
            "settings": as_dict_post(self.s),
            "rl": {"skipped_reason": reason},
        }

    def _episode(self, e, warmup, pool, rm, ref, critic, opt_a, opt_c) -> dict:
        s, t0 = self.s, time.time()
        n = s.prompts_per_episode
        keys = [self.pool_keys[(e * n + j) % len(self.pool_keys)] for j in range(n)]
        prompts = [self.source(*k[:3], s.general_frac) for k in keys]
        counts = [s.samples_general if p.ptype == "general" else s.samples_verifiable for p in prompts]
        gen = _generator(self.cfg.seed, 1000 + e)
        rolls = sample_rollouts(
            self.actor,
            prompts,
            counts,
            tok=self.tok,
            encode=self.encode,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            generator=gen,
        )
        score_rollouts(rolls, pool, rm, self.tok, require_think=s.require_think)
        m = ppo_update(
            self.actor,
            critic,
            ref,
            rolls,
            s,
            opt_a,
            opt_c,
            generator=gen,
            update_actor=not warmup,
            device=self.device,
            suppress=suppressed(self.tok),
        )
        dt = time.time() - t0
        tokens = sum(int(r.prompt_ids.numel() + r.response.numel()) for r in rolls)
        failures = [r.reason for r in rolls if r.reason.startswith(("timeout", "worker", "verifier"))]
        return {
            "step": e + 1,
            "stage": "rl-warmup" if warmup else "rl",
            "loss": m.get("policy_loss", 0.0) + m["value_loss"],
            "lr": s.critic_lr if warmup else s.actor_lr,
            "tokens": tokens,
            "tok_per_s": tokens / max(dt, 1e-9),
            "step_s": dt,
            "verifier_failures": len(failures),
            **m,
        }

    def _catch_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def request(signum, frame):
            self._stop = signal.Signals(signum).name
            log.warning("%s: saving a checkpoint after this episode, then stopping", self._stop)

        old = {sig: signal.signal(sig, request) for sig in (signal.SIGTERM, signal.SIGINT)}
        return lambda: [signal.signal(sig, h) for sig, h in old.items()]


class _NoEval:
    def __init__(self) -> None:
        self.scores: dict = {}


def _copy(model: SeedVLM) -> SeedVLM:
    twin = SeedVLM(model.cfg).to(model.llm.embed.weight.device)
    twin.load_state_dict(model.state_dict())
    return twin


def as_dict_post(s: PostConfig) -> dict:
    from dataclasses import asdict

    return asdict(s)


class RLRunLog(logs.RunLog):
    """trainer.logs.RunLog, plus every episode's RL numbers as TensorBoard scalars under rl/."""

    def step(self, record: dict) -> None:
        super().step(record)
        if self._tb is None:
            return
        for key, value in record.items():
            if isinstance(value, float) and key not in ("loss", "lr") and np.isfinite(value):
                self._tb.add_scalar(f"rl/{key}", value, record["step"])
        for kind, value in record.get("reward_by_kind", {}).items():
            self._tb.add_scalar(f"rl/reward_by_kind/{kind}", value, record["step"])


def plot_rl(records: list[dict], png: Path) -> Path | None:
    """Reward by prompt type, KL, value loss, clip fraction, entropy and response length per episode."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("reward", ("reward_verifiable", "reward_general", "correct_verifiable")),
        ("KL", ("kl",)),
        ("value loss", ("value_loss",)),
        ("clip fraction", ("clip_fraction",)),
        ("entropy", ("entropy",)),
        ("response length", ("response_length",)),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 11), sharex=True)
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if key in r and np.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts, strict=True), ".-", label=key)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    warm = [r["step"] for r in records if r.get("stage") == "rl-warmup"]
    if warm:
        for ax in axes:
            ax.axvspan(min(warm) - 0.5, max(warm) + 0.5, color="gray", alpha=0.15)
    axes[0].set_title("RL episodes (shaded: critic warm-up)")
    axes[-1].set_xlabel("episode")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def run(cfg: RunConfig) -> dict:
    """Run the post-training recipe ``cfg.recipe``; returns the summary (also <out>/summary.json)."""
    if cfg.recipe == "vst":
        from .vst import VSTTraining

        return VSTTraining(cfg).run()
    return PostTraining(cfg).run()


def report(summary: dict) -> str:
    """What trainer/run.py prints at the end: the RM's accuracy, curation, and accuracy per skill."""
    if summary["recipe"] == "vst":
        from .vst import report as vst_report

        return vst_report(summary)
    lines = [f"done in {summary['wall_s']:.0f} s: {summary['recipe']} from {summary['init']}"]
    rm = summary["reward_model"]
    lines.append(
        f"  reward model: held-out pairwise accuracy {rm['pairwise_accuracy']['all']:.3f} "
        f"(before its training {rm['pairwise_accuracy_before']['all']:.3f})"
    )
    lines.append(
        f"  curation: kept {summary['curation']['kept']} of {summary['curation']['candidates']} prompts"
    )
    lines.append(f"  RL: {summary['episodes']} episodes")
    if summary["rl"]["skipped_reason"]:
        lines.append(f"  RL skipped: {summary['rl']['skipped_reason']}")
    for r in summary.get("rejection_sampling", []):
        lines.append(
            f"  rejection sampling: {r['kept']} of {r['sampled']} responses kept, {r['steps']} SFT steps"
        )
    if summary.get("eval"):
        lines.append("  held-out accuracy per skill: before -> after (blind baseline)")
        for kind, v in summary["eval"].items():
            b = summary["eval_before"].get(kind, {}).get("accuracy", float("nan"))
            base = v["baseline"] if v["baseline"] is not None else float("nan")
            lines.append(f"    {kind:<12} {b:.2f} -> {v['accuracy']:.2f} ({base:.2f})  n={v['total']}")
    lines.append(f"  plots {summary['loss_plot']}, {summary['rl_plot']}; checkpoint {summary['checkpoint']}")
    return "\n".join(lines)
