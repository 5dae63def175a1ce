"""The Visual Spatial Tuning recipe, ``python trainer/run.py --recipe vst [--init RUN]``: from a VLM
(``--init``'s, or the default vlm recipe trained first), SFT on spatial perception, then SFT on
spatial reasoning, then RL on the same skills (the VST follow-up's progressive pipeline):

    vst_p  SFT on VST-P: every VST skill, answers only              (trainer.recipes.STAGES)
    vst_r  SFT on VST-R: the same skills, <think>rationale</think> before each answer
    rl     PPO (trainer.rl) on verifiable VST prompts, rewards from the VST verifiers

Mixing ratios, all stated as data and all changeable:

- SFT stages: their ``data`` spec (trainer.data.vst.parse_spec), by default
  ``vst:think=0,single=0.5,multiview=0.25,video=0.25`` for VST-P and ``think=1`` for VST-R (the
  share of answers given with a thought), the skills equal within a scenario. Change them, or any
  other stage field, with ``--set vst_p.data=vst:think=0,video=0.5`` or ``--set vst_r.steps=80``
  (``*.FIELD`` for both); ``--steps``/``--tokens`` budget the two stages in their proportions.
- RL: the prompts' mix ``vst.rl_data`` (the same spec; its ``think`` is unused) and every PPO
  setting as ``--set rl.FIELD=VALUE``; the recipe's own PPO defaults are
  trainer.rl.config.RECIPE_DEFAULTS["vst"] (verifiable prompts only, so the reward model is not
  trained; longer replies, for the thought).

Evaluation: held-out questions of every VST skill (``vst.eval_per_skill`` per skill, scenes no
training stream draws) scored per skill, per scenario (single, multiview, video) and in all, beside
the blind baselines (trainer.vst_eval), before (the --init model), after each SFT stage
(``vst.stage_evals``) and after RL. The answer budget leaves ``vst.eval_think_tokens`` tokens for
a thought. ``--eval-samples 0`` turns the evaluations off.

Output (``--out``, default runs/vst-<preset>): ``vst_p/`` and ``vst_r/`` (each a training run of
its own: checkpoints, log, loss plot, summary.json with its held-out scores), then what the ``rl``
recipe writes (trainer.rl.run), and ``summary.json`` with ``eval_before``, ``sft`` (per stage:
steps, loss, held-out scores), ``eval`` (after RL) and ``eval_delta``. ``--resume`` skips the
finished phases and continues the one that was stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .. import logs
from ..config import RunConfig, SetupError
from ..data import vst
from ..evaluate import find_checkpoint
from ..loop import Run
from ..recipes import apply_overrides as apply_stage_overrides
from ..recipes import get_recipe, scale_to, with_steps
from ..vst_eval import VSTHeldOut
from .config import apply_overrides
from .run import PostTraining, _NoEval
from .vst_prompts import VSTPrompts

log = logging.getLogger("trainer.rl")
SFT_STAGES = ("vst_p", "vst_r")


@dataclass(frozen=True)
class VSTSettings:
    """The recipe's own settings, ``--set vst.FIELD=VALUE``."""

    rl_data: str = "vst:single=0.5,multiview=0.25,video=0.25"  # RL prompts' mix
    eval_per_skill: int = 10  # held-out questions per skill (21 skills) in each evaluation
    baseline_per_skill: int = 30  # training-stream questions per skill the blind baselines fit
    eval_think_tokens: int = 192  # answer budget for a thought, beyond the truth's length + 8
    stage_evals: bool = True  # also evaluate after each SFT stage

    def __post_init__(self) -> None:
        vst.parse_spec(self.rl_data)  # a bad spec says what is wrong
        for name, low in (("eval_per_skill", 0), ("baseline_per_skill", 1), ("eval_think_tokens", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"vst.{name}: expected >= {low}, got {getattr(self, name)}")


class VSTRun(Run):
    """trainer.loop.Run whose held-out evaluation is the recipe's VST one (``heldout(per_skill)``,
    every skill, built once for all phases). A single process."""

    def __init__(self, cfg: RunConfig, heldout) -> None:
        self._vst_heldout = heldout
        super().__init__(cfg)

    def _heldout(self, per_skill: int) -> VSTHeldOut:
        return self._vst_heldout(per_skill)


class VSTTraining(PostTraining):
    """The recipe (module docstring): the phases of trainer.rl.run.PostTraining with the VST SFT
    stages before RL, VST prompts and the VST evaluation."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        try:
            self.v, rest = apply_overrides(VSTSettings(), cfg.overrides, prefix="vst")
        except ValueError as err:
            raise SetupError(str(err)) from err
        stage_targets = tuple(f"{n}." for n in (*SFT_STAGES, "*"))
        self.stage_sets = [o for o in rest if o.startswith(stage_targets)]
        self.vlm_sets = [o for o in rest if not o.startswith(("rl.", *stage_targets))]
        if self.vlm_sets and cfg.init is not None:
            raise SetupError(
                f"--set {self.vlm_sets[0]}: --recipe vst with --init takes vst.*, rl.*, vst_p.*, "
                "vst_r.* and *.* settings (see trainer/rl/vst.py)"
            )
        try:  # bad stage settings fail now, not after the vlm run
            apply_stage_overrides(get_recipe(",".join(SFT_STAGES)), self.stage_sets)
        except ValueError as err:
            raise SetupError(str(err)) from err
        if cfg.overwrite:
            for name in SFT_STAGES:
                shutil.rmtree(self.out / name, ignore_errors=True)
        self.source = VSTPrompts.from_spec(self.v.rl_data)
        self._heldouts: dict[int, VSTHeldOut] = {}

    # ----------------------------------------------------------------------------- phases

    def run(self) -> dict:
        t0 = time.time()
        cfg = self.cfg
        init = cfg.init if cfg.init is not None else self._sft()
        first = self._load(init)
        self.vlm_run = first.meta.get("run", {})
        self.s = self._settings([o for o in cfg.overrides if o.startswith("rl.")])
        stages = self._stages()
        summary: dict = {"out": str(self.out), "recipe": cfg.recipe, "init": str(first.path)}
        summary["settings_vst"] = dataclasses.asdict(self.v)
        summary["eval_before"] = self._eval_before(first.model)
        del first
        at, summary["sft"] = init, {}
        for stage in stages:
            at, summary["sft"][stage.name] = self._sft_stage(stage, at)
        return self._post(self._load(at), summary, t0)

    def _sft(self) -> Path:
        """The default vlm run first (without --init): its own steps, the --set items of its stages."""
        saved = self.cfg
        self.cfg = replace(saved, steps=None, tokens=None, overrides=self.vlm_sets)
        try:
            return super()._sft()
        finally:
            self.cfg = saved

    def _stages(self):
        """VST-P and VST-R as trained: scaled to the model, --steps/--tokens split between them,
        then the --set items."""
        try:
            stages = scale_to(get_recipe(",".join(SFT_STAGES)), self.model_cfg)
            stages = with_steps(stages, self.cfg.steps, self.cfg.tokens)
            stages = apply_stage_overrides(stages, self.stage_sets)
            for stage in stages:
                vst.parse_spec(stage.data or "")
        except (KeyError, ValueError) as err:
            raise SetupError(str(err)) from err
        return stages

    def _sft_stage(self, stage, init: Path) -> tuple[Path, dict]:
        """Train (or resume, or reuse) the run of one SFT stage from ``init``; its checkpoint and
        what it did (steps, loss, held-out scores)."""
        sub_out = self.out / stage.name
        done = (sub_out / "summary.json").exists()
        if not done:
            mine = [o for o in self.stage_sets if o.startswith((f"{stage.name}.", "*."))]
            sub = replace(
                self.cfg,
                recipe=stage.name,
                out=sub_out,
                init=Path(init),
                data=stage.data,
                preset=self.vlm_run.get("preset", self.cfg.preset),
                tokenizer=self.vlm_run.get("tokenizer", self.cfg.tokenizer),
                max_pixels=self.cfg.max_pixels or self.vlm_run.get("max_pixels"),
                steps=None,
                tokens=None,
                overrides=[f"{stage.name}.steps={stage.steps}", *mine],
                overwrite=False,
                resume=(sub_out / "log.jsonl").exists(),
                eval_samples=self.v.eval_per_skill if self._evaluating() and self.v.stage_evals else 0,
                eval_every=0,
            )
            run = VSTRun(sub, self._vst_heldout)
            try:
                run.train()
            finally:
                run.close()
                logs.setup_logging(self.out)  # the stage's run pointed the log at its own directory
        result = json.loads((sub_out / "summary.json").read_text())
        (trained,) = result["stages"]
        record = {
            "steps": trained["steps"],
            "data": stage.data,
            "loss_first": trained["loss_first"],
            "loss_last": trained["loss_last"],
            "wall_s": result["wall_s"],
        }
        if "eval" in result:
            record["eval"] = result["eval"]
        return find_checkpoint(sub_out), record

    def _signature(self) -> dict:
        return {**super()._signature(), "vst.rl_data": self.v.rl_data}  # the RL prompts' mix

    # ----------------------------------------------------------------------------- evaluation

    def _evaluating(self) -> bool:
        return self.cfg.eval_samples > 0 and self.v.eval_per_skill > 0

    def _vst_heldout(self, per_skill: int) -> VSTHeldOut:
        if per_skill not in self._heldouts:
            self._heldouts[per_skill] = VSTHeldOut.vst(
                self.tok, self.encode, seed=self.cfg.seed, per_skill=per_skill,
                fit_per_skill=self.v.baseline_per_skill, think_tokens=self.v.eval_think_tokens,
            )  # fmt: skip
        return self._heldouts[per_skill]

    def _heldout(self) -> VSTHeldOut:
        return self._vst_heldout(self.v.eval_per_skill)

    def _evaluate(self, model):
        return super()._evaluate(model) if self._evaluating() else _NoEval()


def report(summary: dict) -> str:
    """What trainer/run.py prints at the end of --recipe vst: the phases and the held-out accuracy
    per scenario and skill after each, beside the blind baseline."""
    lines = [f"done in {summary['wall_s']:.0f} s: {summary['recipe']} from {summary['init']}"]
    for name, st in summary["sft"].items():
        lines.append(
            f"  {name}: {st['steps']} SFT steps on {st['data']}, loss {st['loss_first']:.3f} -> "
            f"{st['loss_last']:.3f} ({st['wall_s']:.0f} s)"
        )
    lines.append(
        f"  RL: {summary['episodes']} episodes on {summary['settings_vst']['rl_data']}; curation kept "
        f"{summary['curation']['kept']} of {summary['curation']['candidates']} prompts"
    )
    if summary["rl"]["skipped_reason"]:
        lines.append(f"  RL skipped: {summary['rl']['skipped_reason']}")
    if summary.get("eval"):
        columns = [("before", summary["eval_before"])]
        columns += [(n, st["eval"]) for n, st in summary["sft"].items() if "eval" in st]
        columns.append(("rl", summary["eval"]))
        head = "".join(f"{c:>8}" for c, _ in columns)
        lines.append(f"  held-out accuracy{'':<13}{head}  baseline    n")
        order = [k for k in summary["eval"] if "/" in k or k == "all"]
        order += [k for k in summary["eval"] if k not in order]
        for kind in order:
            v = summary["eval"][kind]
            accs = "".join(f"{col.get(kind, {}).get('accuracy', float('nan')):8.2f}" for _, col in columns)
            base = v["baseline"] if v["baseline"] is not None else float("nan")
            lines.append(f"    {kind:<26}{accs}  {base:8.2f} {v['total']:4d}")
    lines.append(f"  plots {summary['loss_plot']}, {summary['rl_plot']}; checkpoint {summary['checkpoint']}")
    return "\n".join(lines)
