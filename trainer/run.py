"""The main job: train a Seed1.5-VL model through its recipe.

    python trainer/run.py                      # tiny preset, embedded spatial data, stage 0 -> 1 -> 2 -> SFT
    python trainer/run.py --recipe sft --data my_data.jsonl --tokenizer /path/to/hf_tokenizer
    python trainer/run.py --steps 2000 --set stage1.lr_max=2e-3 --set '*.seq_len=2048'
    python trainer/run.py --out runs/x --resume  # continue the last checkpoint of runs/x
    torchrun --nproc-per-node=4 trainer/run.py --parallel dp=2,cp=2,ep=4   # hybrid parallel
    torchrun --nproc-per-node=4 trainer/run.py --parallel pp=2,dp=2,ep=2   # with pipeline stages

Writes <out>/log.jsonl, <out>/train.log, <out>/tensorboard/, <out>/checkpoints/, <out>/loss.png
and <out>/summary.json. See trainer/recipes.py for the stages and trainer/loop.py for the loop.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts trainer/ first on sys.path, where its modules would shadow top-level
# names; the repository root is what the imports below need.
_REPO = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0] or ".").resolve() == _REPO / "trainer":
    sys.path[0] = str(_REPO)
elif str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import argparse  # noqa: E402
import os  # noqa: E402

from trainer.config import RunConfig, SetupError, load_toml  # noqa: E402
from trainer.loop import Preempted, train  # noqa: E402
from trainer.recipes import POST_RECIPES, RECIPES, STAGES  # noqa: E402


def _steps_range(text: str) -> tuple[int, int]:
    a, sep, b = text.partition(":")
    try:
        first, last = int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A:B (first and last step), got {text!r}") from None
    if not sep or not 1 <= first <= last:
        raise argparse.ArgumentTypeError(f"expected A:B with 1 <= A <= B, got {text!r}")
    return first, last


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """The run's configuration: --config FILE.toml first, then the flags given (which win).
    SetupError: the file is unreadable or names an unknown setting."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    config_file = pre.parse_known_args(argv)[0].config
    D = RunConfig()  # the defaults: one place, shared with runs built in code
    # fmt: off
    p = argparse.ArgumentParser(
        description="Train a Seed1.5-VL model through its recipe (stage 0 -> 1 -> 2 -> SFT by default). "
        "With no arguments: the tiny preset on the embedded spatial data, a few minutes on a CPU."
    )
    add = p.add_argument
    add("--config", type=Path, metavar="FILE.toml",
        help="settings under the long flag names (steps = 12, set = [...]); flags given here win; "
        "every run writes its own to <out>/config.toml")
    add("--recipe", default=D.recipe,
        help=f"recipe ({', '.join(RECIPES)}; default vlm), post-training ({', '.join(POST_RECIPES)}; "
        f"see trainer/rl) or stages a,b ({', '.join(STAGES)})")
    add("--preset", default=D.preset, help=f"model preset from model/config.py (default {D.preset})")
    add("--data", default=D.data,
        help="'spatial' (the embedded data, default; 'spatial:questions=4,caption=1' sets how many "
        "questions a scene gets and whether a caption ends it), 'vst:MIX' (the Visual Spatial "
        "Tuning data, e.g. 'vst:think=0,single=1'; trainer.data.vst) or a JSONL manifest")
    add("--tokenizer", default=D.tokenizer,
        help="'words' (default: bytes plus one id per word of the embedded data), 'bytes', or a local "
        "Hugging Face tokenizer directory")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="total optimizer steps, split over stages as the recipe's")
    budget.add_argument("--tokens", type=float, help="or a total token budget, split as the recipe's tokens")
    add("--out", type=Path, help="output directory (default runs/<recipe>-<preset>)")
    add("--resume", action="store_true", help="continue from the last checkpoint in --out")
    add("--overwrite", action="store_true", help="delete a previous run in --out first")
    add("--init", type=Path,
        help="start from the model weights of a checkpoint or run directory, or from a Hugging Face "
        "Qwen3-MoE checkpoint directory (config.json + safetensors: the LLM's weights)")
    add("--teacher", type=Path, metavar="DIR",
        help="vit_mim's teacher: a local Hugging Face CLIP, SigLIP or Qwen2-VL vision tower (default: "
        "HOG and colour targets, no weights needed); see trainer/vit_pretrain")
    add("--vit-init", type=Path, metavar="RUN",
        help="start the ViT from a ViT pre-training run (python trainer/run.py --recipe vit)")
    add("--set", dest="overrides", action="append", default=[], metavar="STAGE.FIELD=VALUE",
        help="override a stage field, e.g. stage1.lr_max=1e-3, '*.seq_len=2048', sft.steps=50")
    add("--seed", type=int, default=D.seed, help=f"model init and data order (default {D.seed})")
    add("--device", default=D.device, help="auto (default), cpu, cuda, cuda:1, ...")
    add("--deterministic", action=argparse.BooleanOptionalAction, default=None,
        help="torch.use_deterministic_algorithms (default: on for CPU, off for GPU)")
    add("--ckpt-every", type=int, default=D.ckpt_every,
        help=f"checkpoint every N steps and at stage ends ({D.ckpt_every})")
    add("--keep", type=int, default=D.keep, help=f"checkpoints to keep ({D.keep})")
    add("--async-save", action="store_true",
        help="write checkpoints in the background (dcp.async_save): training goes on once the state "
        "is copied to host memory; each is committed before the next save or at the end")
    add("--window", type=int, default=D.window, help=f"samples bin-packed together ({D.window})")
    add("--max-pixels", type=int, help="per-image pixel budget (default 224x224 tiny, else 3584x3584)")
    add("--eval-samples", type=int, default=D.eval_samples,
        help="held-out questions per skill (or manifest samples) answered at the end, next to a blind "
        f"baseline, with a gallery PNG ({D.eval_samples}; 0: none)")
    add("--eval-every", type=int, default=D.eval_every, metavar="N",
        help=f"held-out loss and accuracy every N steps, 16 questions per skill ({D.eval_every}; 0: never)")
    add("--profile-steps", type=_steps_range, metavar="A:B", help="profile steps A..B (as in the log)")
    add("--profiler", choices=("torch", "nsys"), default=D.profiler,
        help="torch (default): a trace file; nsys: only cudaProfilerStart/Stop around the steps")
    add("--parallel", metavar="pp=P,dp=D,cp=C,ep=E",
        help="layout under torchrun: pp x dp x cp = number of processes, ep divides dp x cp, a missing "
        "dimension is 1 (default: dp = number of processes); see trainer/parallel")
    add("--pp-schedule", default=D.pp_schedule,
        help="pipeline schedule with pp > 1: interleaved1f1b (default), 1f1b, gpipe, loopedbfs "
        "(torch.distributed.pipelining); see trainer/parallel/pipeline.py")
    add("--pp-virtual", type=int, metavar="V",
        help="pipeline stages per pipeline rank (default: 2 for the looped schedules when the LLM "
        "has 2 x pp layers or more, else 1)")
    add("--pp-layers", metavar="L0,L1,...",
        help="decoder layers of each of the pp x V stages, e.g. 1,2,2,1 for lighter first and last "
        "stages (embedding, head); default as even as possible")
    add("--mixed-precision", choices=("auto", "bf16", "fp32"), default=D.mixed_precision,
        help="bf16 compute with fp32 master weights (a single process: autocast; torchrun: FSDP's "
        "bf16 gathers and fp32 gradient reduction); auto (default): bf16 on GPUs, fp32 on CPUs")
    add("--activation-checkpointing", choices=("none", "selective", "full"),
        default=D.activation_checkpointing,
        help="per ViT block and decoder layer: selective keeps matmul and attention outputs and "
        "recomputes the rest, full recomputes whole blocks (default none)")
    add("--compile", action="store_true", help="torch.compile each ViT block and decoder layer (default off)")
    add("--vit-balance", choices=("auto", "off", "flops", "patches", "patches2"), default=D.vit_balance,
        help="under torchrun, spread each step's images over the ranks by their ViT cost (FLOPs, "
        "patches or patches^2) and send the visual tokens back; auto (default): flops with 2 or "
        "more ranks; see trainer/balance.py")
    add("--vit-balance-group", type=int, metavar="G",
        help="balance within groups of G consecutive ranks (a divisor of the world and a multiple "
        "of cp; default the largest such divisor up to 128)")
    add("--pg-timeout", type=float, default=D.pg_timeout, metavar="S",
        help=f"seconds a collective waits for a peer before the job fails ({D.pg_timeout:g})")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add("--no-tensorboard", dest="tensorboard", action="store_false", help="no TensorBoard scalars")
    # fmt: on
    if config_file is not None:
        values = load_toml(config_file)
        if isinstance(values.get("overrides"), list):
            values["overrides"] = list(values["overrides"])  # --set appends to a copy
        p.set_defaults(**values)
    a = p.parse_args(argv)
    return RunConfig(
        recipe=a.recipe, preset=a.preset, data=a.data, tokenizer=a.tokenizer, out=a.out, steps=a.steps,
        tokens=None if a.tokens is None else int(a.tokens), overrides=a.overrides, seed=a.seed,
        device=a.device, deterministic=a.deterministic, resume=a.resume, init=a.init,
        overwrite=a.overwrite, ckpt_every=a.ckpt_every, keep=a.keep, window=a.window,
        max_pixels=a.max_pixels, eval_samples=a.eval_samples, eval_every=a.eval_every,
        profile_steps=a.profile_steps,
        profiler=a.profiler, progress=a.progress, tensorboard=a.tensorboard, parallel=a.parallel,
        pp_schedule=a.pp_schedule, pp_virtual=a.pp_virtual, pp_layers=a.pp_layers,
        mixed_precision=a.mixed_precision, pg_timeout=a.pg_timeout,
        activation_checkpointing=a.activation_checkpointing, compile=a.compile, async_save=a.async_save,
        vit_balance=a.vit_balance, vit_balance_group=a.vit_balance_group,
        teacher=a.teacher, vit_init=a.vit_init,
    )  # fmt: skip


def _report(summary: dict) -> str:
    lines = [f"done in {summary['wall_s']:.0f} s: {summary['steps']} steps, {summary['tokens']:,} tokens"]
    for s in summary["stages"]:
        lines.append(
            f"  {s['stage']:<7} {s['steps']:>5} steps  loss {s['loss_first']:.3f} -> {s['loss_last']:.3f}"
            f"  ({s['tok_per_s']:.0f} tok/s)"
        )
    if summary.get("eval"):
        lines.append("  held-out accuracy (blind baseline), per skill:")
        for kind, v in summary["eval"].items():
            top = f"  most often {v['top_answer']!r} ({v['top_share']:.2f})" if "top_share" in v else ""
            lines.append(f"    {kind:<12} {v['accuracy']:.2f} ({v['baseline']:.2f})  n={v['total']}{top}")
        lines.append(f"  gallery {summary['gallery']}")
    if summary["skipped"]:
        lines.append(f"  skipped samples: {summary['skipped']}")
    lines.append(f"  loss plot {summary['loss_plot']}; checkpoint {summary['checkpoint']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for the job
    try:
        cfg = parse_args(argv)
        if cfg.recipe in POST_RECIPES:  # post-training, a single process (trainer/rl)
            from trainer.rl.run import report, run

            summary, describe = run(cfg), report
        else:
            summary, describe = train(cfg), _report
    except SetupError as err:
        if rank0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    except Preempted as stop:
        if rank0:
            print(f"preempted by {stop}")
        return 0
    if rank0:
        print(describe(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
