"""Training recipes as data: the Seed1.5-VL stages with the paper's hyperparameters, and the rule
that scales them to a preset.

Paper values (Seed1.5-VL Table 4 and §3.2 for pre-training; §4.1.2 for SFT):

| stage | trainable | tokens | seq len | batch (tokens) | warmup | max LR | min LR | schedule |
|---|---|---|---|---|---|---|---|---|
| stage0 | MLP adapter | 16B | 32,768 | 8.4M | 100 steps | 2.52e-4 | 4.50e-5 | warmup + cosine |
| stage1 | all | 3T | 32,768 | 71M | 500 steps | 5.22e-5 | 5.22e-6 | warmup + cosine |
| stage2 | all | 240B | 131,072 | 71M | 0 | 5.22e-6 | 5.22e-6 | constant (stage 1's final LR) |
| sft | all but the ViT | ~2 epochs | 131,072 | 16 x seq len | 10% | 2e-5 | 2e-6 | warmup + cosine |

All stages: AdamW, beta = (0.9, 0.95), weight decay 0.1 with biases and norm weights excluded.
Stage 2 keeps stage 1's optimizer states ("we load the optimizer states from stage 1, so no
learning rate warmup is used"); the other stages start a fresh optimizer. Warmups are kept as the
paper's fraction of each stage (100 of ~1.9k steps, 500 of ~42k steps). Gradient clipping (norm 1.0)
is our choice; the paper does not state one.

Scaling to a preset (:func:`scale_to`):
- learning rates x (4096 / LLM hidden): the 1/width rule for Adam (muP-style). The reference width
  4096 is Qwen3-235B-A22B's, our stand-in for Seed's 20B-active LLM, so the big presets get the
  paper's values, the 2048-wide ones twice them, and the 64-wide tiny preset 64x;
- on top of that, the CPU-scale presets (narrower than 2048) take each stage's ``small_lr_scale``,
  set where the rule's LR measurably fails the default run (profiles/20261201_main_job_learning.md):
  stage 0 x 1/16 (1e-3 at width 64: the rule's 1.6e-2 blows the adapter's outputs up ~500x in 20
  steps and the visual tokens never recover), stages 1-2 x 0.1 (3.3e-4: at 3.3e-3 the prompt loss
  collapses the visual pathway and SFT learns later), SFT x 3.125 (4e-3: the curriculum's skills
  learn in fewer steps than at 1.28e-3);
- sequence budgets x min(1, hidden / 2048): the paper's 32k/131k for real models, 1,024/4,096
  tokens per step for the tiny preset on a CPU, where that budget is split into 2 micro-batches of
  512/2,048 (``accum`` = 2), so that the default run also runs data-parallel over 2 ranks;
- ``steps`` are the tiny preset's defaults (the whole recipe in under 10 minutes on a 2-core CPU);
  real runs set ``--steps`` or ``--tokens``. SFT gets nearly all of them: its loss counts only the
  answers, which the picture predicts and the held-out score is on, while the pre-training stages'
  also counts the prompt, whose gradient at this scale asks the visual tokens for a constant. The
  embedded data's skill curriculum (trainer.data.spatial.CURRICULUM) is sized for these steps.
  Stage 2 keeps 5% of stage 1's steps so that a short ``--steps 16`` run of stage 1 and 2 still
  gives stage 2 one step of its 16.
One step is ``accum`` packed micro-batches of at most ``seq_len`` tokens each: the global batch,
whatever the layout. Under data parallelism each of the dp ranks takes accum / dp of them, so
``accum`` must be a multiple of dp (``--set '*.accum=N'``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace

from model.config import VLMConfig

from .data.chat import LEVEL_PROMPT, LEVEL_RESPONSE

MODULES = ("vit", "adapter", "llm")
REFERENCE_HIDDEN = 4096  # LLM width at which the paper's learning rates apply unchanged
REFERENCE_SEQ_HIDDEN = 2048  # below this width, sequence budgets shrink in proportion
SMALL_ACCUM = 2  # micro-batches per step of the presets below that width (the CPU-scale ones)


@dataclass(frozen=True)
class Stage:
    name: str
    trainable: tuple[str, ...]  # of MODULES
    lr_max: float
    lr_min: float
    schedule: str  # "cosine": linear warmup to lr_max, cosine to lr_min; "constant": lr_max throughout
    warmup: float  # fraction of the stage's steps
    seq_len: int  # LLM tokens per packed micro-batch
    steps: int
    min_level: int  # a token is a target from this loss level on (trainer.data.chat)
    reset_optimizer: bool = True
    accum: int = 1  # micro-batches per optimizer step, over all data-parallel ranks
    grad_clip: float = 1.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    data: str | None = None  # this stage's data source; None: the run's --data
    # Extra LR factor for the CPU-scale presets (LLM narrower than REFERENCE_SEQ_HIDDEN), on top of
    # the width rule: where the rule's LR measurably fails the default run (module docstring).
    small_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        bad = [m for m in self.trainable if m not in MODULES]
        if bad or not self.trainable:
            raise ValueError(
                f"Stage {self.name}.trainable: expected a non-empty subset of {MODULES}, got {self.trainable}"
            )
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(
                f"Stage {self.name}.schedule: expected 'cosine' or 'constant', got {self.schedule!r}"
            )
        if not 0 <= self.warmup < 1:
            raise ValueError(f"Stage {self.name}.warmup: expected a fraction in [0, 1), got {self.warmup}")
        if self.seq_len <= 0 or self.steps < 0 or self.accum <= 0:
            raise ValueError(f"Stage {self.name}: seq_len and accum must be > 0 and steps >= 0")
        if not 0 < self.lr_min <= self.lr_max:
            raise ValueError(
                f"Stage {self.name}: expected 0 < lr_min <= lr_max, got {self.lr_min}, {self.lr_max}"
            )

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup * self.steps)

    def lr_factor(self, step: int) -> float:
        """LR at optimizer step ``step`` (0-based) of this stage, as a fraction of lr_max."""
        if self.schedule == "constant":
            return 1.0
        w = self.warmup_steps
        if step < w:
            return (step + 1) / w
        progress = min(1.0, (step - w) / max(1, self.steps - w - 1))
        floor = self.lr_min / self.lr_max
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# The paper's stages; `steps` are the tiny preset's CPU-scale defaults.
STAGES: dict[str, Stage] = {
    "stage0": Stage(
        "stage0", ("adapter",), lr_max=2.52e-4, lr_min=4.50e-5, schedule="cosine", warmup=100 / 1905,
        seq_len=32_768, steps=20, min_level=LEVEL_PROMPT, small_lr_scale=1 / 16,
    ),
    "stage1": Stage(
        "stage1", MODULES, lr_max=5.22e-5, lr_min=5.22e-6, schedule="cosine", warmup=500 / 42_254,
        seq_len=32_768, steps=40, min_level=LEVEL_PROMPT, small_lr_scale=0.1,
    ),
    "stage2": Stage(
        "stage2", MODULES, lr_max=5.22e-6, lr_min=5.22e-6, schedule="constant", warmup=0.0,
        seq_len=131_072, steps=2, min_level=LEVEL_PROMPT, reset_optimizer=False, small_lr_scale=0.1,
    ),
    "sft": Stage(
        "sft", ("adapter", "llm"), lr_max=2e-5, lr_min=2e-6, schedule="cosine", warmup=0.1,
        seq_len=131_072, steps=600, min_level=LEVEL_RESPONSE, small_lr_scale=3.125,
    ),
    # Visual Spatial Tuning (--recipe vst, trainer.rl.vst): SFT on perception (VST-P: answers only),
    # then on reasoning (VST-R: a chain of thought before every answer), each with SFT's settings.
    # `data` states the mix (trainer.data.vst.parse_spec): the share of reasoning answers, then the
    # scenarios' weights; the skills weigh equally within a scenario.
    "vst_p": Stage(
        "vst_p", ("adapter", "llm"), lr_max=2e-5, lr_min=2e-6, schedule="cosine", warmup=0.1,
        seq_len=131_072, steps=80, min_level=LEVEL_RESPONSE,
        data="vst:think=0,single=0.5,multiview=0.25,video=0.25",
    ),
    "vst_r": Stage(
        "vst_r", ("adapter", "llm"), lr_max=2e-5, lr_min=2e-6, schedule="cosine", warmup=0.1,
        seq_len=131_072, steps=30, min_level=LEVEL_RESPONSE,
        data="vst:think=1,single=0.5,multiview=0.25,video=0.25",
    ),
    # ViT pre-training (Table 2), run by trainer.vit_pretrain: the ViT and its pre-training heads
    # train; seq_len is a step's ViT patches (CPU-scale, like steps); LRs are the paper's at
    # SeedViT's width (trainer.vit_pretrain.scale_vit_stages); warmups the paper's fractions of
    # 2.2B/55,296, 4.8B/32,768 and 65M/1,024 steps.
    "vit_mim": Stage(
        "vit_mim", ("vit",), lr_max=7.06e-3, lr_min=1.05e-5, schedule="cosine", warmup=1692 / 39_785,
        seq_len=1536, steps=60, min_level=LEVEL_PROMPT,
    ),
    "vit_contrastive": Stage(
        "vit_contrastive", ("vit",), lr_max=1.0e-4, lr_min=1.2e-6, schedule="cosine",
        warmup=2000 / 146_484, seq_len=1536, steps=1500, min_level=LEVEL_PROMPT,
    ),
    "vit_video": Stage(
        "vit_video", ("vit",), lr_max=5.0e-5, lr_min=2.02e-7, schedule="cosine", warmup=12_800 / 63_477,
        seq_len=3072, steps=40, min_level=LEVEL_PROMPT,
    ),
}  # fmt: skip

RECIPES: dict[str, tuple[str, ...]] = {
    "vlm": ("stage0", "stage1", "stage2", "sft"),  # the whole Seed1.5-VL recipe (the default)
    "pretrain": ("stage0", "stage1", "stage2"),
    "sft": ("sft",),
    "vit": ("vit_mim", "vit_contrastive", "vit_video"),  # SeedViT pre-training (trainer.vit_pretrain)
    "full": ("vit_mim", "vit_contrastive", "vit_video", "stage0", "stage1", "stage2", "sft"),
}


# Post-training recipes (trainer/rl): phases rather than stage lists; trainer/run.py hands them to
# trainer.rl.run, whose PostConfig holds their settings (--set rl.FIELD=VALUE).
POST_RECIPES: dict[str, str] = {
    "rl": "reward model -> critic warm-up -> PPO, from --init's model",
    "post": "SFT (the vlm recipe, unless --init) -> reward model -> PPO -> rejection-sampling SFT",
    "vst": "the vlm recipe (unless --init) -> SFT on VST-P -> SFT on VST-R -> PPO on VST prompts",
}


def get_recipe(name: str) -> tuple[Stage, ...]:
    """A named recipe, or a comma-separated list of stage names (``stage1,sft``)."""
    names = RECIPES.get(name, tuple(n.strip() for n in name.split(",")))
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise KeyError(
            f"unknown recipe or stage {', '.join(unknown)!s}; recipes: {', '.join(RECIPES)}; "
            f"stages: {', '.join(STAGES)}"
        )
    return tuple(STAGES[n] for n in names)


def scale_to(stages: tuple[Stage, ...], cfg: VLMConfig) -> tuple[Stage, ...]:
    """The stages with learning rates and sequence budgets scaled to ``cfg`` (module docstring).

    Stage 2 starts where stage 1 ended: its constant LR is stage 1's (scaled) final LR.
    """
    lr_mult = REFERENCE_HIDDEN / cfg.llm.hidden
    seq_mult = min(1.0, cfg.llm.hidden / REFERENCE_SEQ_HIDDEN)
    small = seq_mult < 1
    accum = SMALL_ACCUM if small else 1
    out = []
    for s in stages:
        lr = lr_mult * (s.small_lr_scale if small else 1.0)
        out.append(
            replace(
                s,
                lr_max=s.lr_max * lr,
                lr_min=s.lr_min * lr,
                seq_len=max(256, round(s.seq_len * seq_mult / accum)),
                accum=s.accum * accum,
            )
        )
    return tuple(out)


def with_steps(
    stages: tuple[Stage, ...], steps: int | None = None, tokens: int | None = None
) -> tuple[Stage, ...]:
    """Rescale the stages' steps to ``steps`` in all, or to ``tokens`` (budget) in all, keeping their
    proportions (by steps, or by tokens = steps x seq_len x accum)."""
    if steps is not None and tokens is not None:
        raise ValueError("pass --steps or --tokens, not both")
    if steps is None and tokens is None:
        return stages
    if steps is not None:
        total = sum(s.steps for s in stages)
        return tuple(replace(s, steps=max(1, round(steps * s.steps / total))) for s in stages)
    weights = [s.steps * s.seq_len * s.accum for s in stages]
    total = sum(weights)
    return tuple(
        replace(s, steps=max(1, round(tokens * w / total / (s.seq_len * s.accum))))
        for s, w in zip(stages, weights, strict=True)
    )


def apply_overrides(stages: tuple[Stage, ...], overrides: list[str]) -> tuple[Stage, ...]:
    """``stage.field=value`` (or ``*.field=value`` for every stage), e.g. ``stage1.lr_max=1e-3``,
    ``*.seq_len=2048``, ``sft.trainable=adapter,llm``."""
    stages = list(stages)
    types = {f.name: f.type for f in dataclasses.fields(Stage)}
    changes: list[dict[str, object]] = [{} for _ in stages]
    for item in overrides:
        key, sep, value = item.partition("=")
        target, dot, field = key.partition(".")
        if not sep or not dot or field not in types or field == "name":
            raise ValueError(
                f"override {item!r}: expected STAGE.FIELD=VALUE with FIELD one of {sorted(types)}"
            )
        hits = [i for i, s in enumerate(stages) if target in ("*", s.name)]
        if not hits:
            raise ValueError(
                f"override {item!r}: no stage {target!r} in this recipe ({[s.name for s in stages]})"
            )
        try:
            parsed = _parse(field, types[field], value)
        except ValueError as err:
            kind = {"int": "an integer", "float": "a number", "bool": "true or false"}.get(
                str(types[field]), f"a {types[field]}"
            )
            raise ValueError(f"override {item!r}: {field} expects {kind}, got {value!r}") from err
        for i in hits:
            changes[i][field] = parsed
    # One replace per stage, so that related fields (lr_min and lr_max) are checked together.
    return tuple(replace(s, **changes[i]) if changes[i] else s for i, s in enumerate(stages))


def _parse(field: str, typ: object, value: str) -> object:
    typ = str(typ)
    if typ.startswith("tuple[str"):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if typ.startswith("tuple[float"):
        return tuple(float(v) for v in value.split(","))
    if typ == "bool":
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"override {field}: expected true or false, got {value!r}")
        return value.lower() in ("true", "1")
    if typ == "int":
        return int(float(value))
    if typ == "float":
        return float(value)
    if typ.startswith("str | None"):
        return None if value.lower() in ("", "none") else value
    return value
