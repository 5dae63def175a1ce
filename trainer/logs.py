"""Run logs: a JSONL record per step, TensorBoard scalars, a tqdm progress bar, messages to the
console and ``train.log``, and the loss curve as a PNG at the end.

(Not ``trainer/logging.py``: run as a script, ``trainer/`` would be on sys.path and that name would
shadow the standard library's ``logging``.)

``log.jsonl`` holds one object per line: step records (``step``, ``stage``, ``loss`` = mean
cross-entropy over the step's target tokens, ``lr``, ``grad_norm``, ``tokens``, ``tok_per_s``, the
MoE ``lb_loss``/``z_loss``, ...) and events (``{"event": "stage_end", ...}``). A resumed run appends;
steps it repeats after the checkpoint are logged again, and readers keep the last record per step.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

log = logging.getLogger("trainer")


class _TqdmHandler(logging.StreamHandler):
    """Console messages printed above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never take the run down
            self.handleError(record)


def setup_logging(out_dir: Path, level: int = logging.INFO) -> None:
    """Messages of the ``trainer`` loggers to the console (above the bar) and to out_dir/train.log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("trainer")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    console = _TqdmHandler()
    console.setFormatter(fmt)
    file = logging.FileHandler(out_dir / "train.log")
    file.setFormatter(fmt)
    root.addHandler(console)
    root.addHandler(file)
    root.setLevel(level)


PLAIN_LINES = 30  # lines per run when the console is not a terminal
# What a periodic evaluation keeps of each skill in log.jsonl: enough to draw a learning curve, the
# graded score next to its baseline, and the share of the most frequent answer (1.0: a constant).
_EVAL_FIELDS = ("accuracy", "baseline", "total", "score", "baseline_score", "top_share")


class RunLog:
    def __init__(
        self,
        out_dir: Path,
        total_steps: int,
        start_step: int = 0,
        *,
        progress: bool = True,
        tensorboard: bool = True,
    ) -> None:
        self.out_dir = out_dir
        self.path = out_dir / "log.jsonl"
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                log.warning("tensorboard is not installed; no TensorBoard scalars (pip install tensorboard)")
        # Not a terminal (a log file, CI, a scheduler's capture): plain lines instead of a bar.
        plain = progress and not sys.stderr.isatty()
        self._line_every = max(1, total_steps // PLAIN_LINES) if plain else 0
        self._total = total_steps
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=not progress or plain,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        self._t0 = time.time()

    def step(self, record: dict) -> None:
        record = {"time": round(time.time() - self._t0, 3), **record}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step, stage = record["step"], record["stage"]
            self._tb.add_scalar(f"loss/{stage}", record["loss"], step)
            self._tb.add_scalar("loss/all", record["loss"], step)
            for key in ("lr", "grad_norm", "tok_per_s", "tflops", "mfu", "mem_gb", "lb_loss", "z_loss"):
                if key in record:
                    self._tb.add_scalar(f"train/{key}", record[key], step)
        self._bar.update(1)
        r = record
        brief = f"{r['stage']} loss {r['loss']:.3f} lr {r['lr']:.2e} {r['tok_per_s']:.0f} tok/s"
        if "mfu" in r:
            brief += f" MFU {100 * r['mfu']:.1f}%"
        self._bar.set_postfix_str(brief)
        if self._line_every and (r["step"] % self._line_every == 0 or r["step"] == self._total):
            log.info("step %d/%d %s", r["step"], self._total, brief)

    def event(self, name: str, **data) -> None:
        self._file.write(json.dumps({"event": name, **data}) + "\n")

    def eval(self, step: int, loss: float | None, scores: dict, scalars: dict[str, float]) -> None:
        """A held-out evaluation: an ``eval`` event in log.jsonl, its numbers in TensorBoard."""
        brief = {k: {f: v[f] for f in _EVAL_FIELDS if f in v} for k, v in scores.items()}
        self.event("eval", step=step, loss=loss, scores=brief)
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if "all" in scores:
            log.info(
                "step %d held-out: loss %s, accuracy %.2f (baseline %.2f) over %d questions", step,
                "-" if loss is None else f"{loss:.3f}", scores["all"]["accuracy"], scores["all"]["baseline"],
                scores["all"]["total"],
            )  # fmt: skip

    def close(self) -> None:
        self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()


class NullRunLog:
    """What ranks other than 0 log: nothing (rank 0 writes the run's logs)."""

    def step(self, record: dict) -> None:
        pass

    def event(self, name: str, **data) -> None:
        pass

    def eval(self, step: int, loss: float | None, scores: dict, scalars: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("AMD EPYC 7B13"); where there is none (not Linux),
    what the platform module knows, which is often only the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def host_info(device: torch.device) -> dict:
    """What ran the job, for summary.json: the CPU's model, torch's intra-op threads, torch's version
    and the device (with the GPU's name on CUDA). A CPU run repeats exactly on the same CPU model at
    the same thread count; another CPU or thread count sums floats in another order and ends
    elsewhere."""
    info = {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _records(path: Path) -> list[dict]:
    """Every record of a log.jsonl, in order; a line cut short by a kill is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_steps(path: Path) -> list[dict]:
    """Step records of a log.jsonl, the last one of each step (a resumed run re-logs some), by step."""
    by_step = {r["step"]: r for r in _records(path) if "step" in r and "loss" in r and "event" not in r}
    return [by_step[k] for k in sorted(by_step)]


def stage_summary(records: list[dict], edge: int = 10) -> list[dict]:
    """Per stage, in order: steps, mean loss over its first and last ``edge`` steps, tokens/s."""
    stages: dict[str, list[dict]] = {}
    for r in records:
        stages.setdefault(r["stage"], []).append(r)
    out = []
    for name, recs in stages.items():
        n = min(edge, len(recs))
        mean = lambda rs: sum(r["loss"] for r in rs) / len(rs)
        out.append(
            {
                "stage": name,
                "steps": len(recs),
                "loss_first": mean(recs[:n]),
                "loss_last": mean(recs[-n:]),
                "tok_per_s": _stage_rate(recs),
            }
        )
    return out


def _stage_rate(recs: list[dict]) -> float:
    """Tokens over time of the whole stage (not a mean of per-step rates, which weights slow steps
    too little)."""
    if all("step_s" in r for r in recs):
        return sum(r["tokens"] for r in recs) / max(sum(r["step_s"] for r in recs), 1e-9)
    return sum(r["tok_per_s"] for r in recs) / len(recs)  # logs written before step_s


def read_events(path: Path, name: str) -> list[dict]:
    """The ``name`` events of a log.jsonl (e.g. "eval"), in order."""
    return [e for e in _records(path) if e.get("event") == name]


def plot_losses(records: list[dict], png: Path, evals: list[dict] | None = None) -> Path | None:
    """Loss (raw and smoothed) and LR against the step, one colour per stage; with ``evals`` (eval
    events), the held-out loss on the loss panel and the held-out accuracy against its baseline."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [e for e in evals or [] if "all" in e.get("scores", {})]
    if evals:
        fig, (ax, ax_acc, ax_lr) = plt.subplots(3, 1, figsize=(9, 8), sharex=True, height_ratios=(3, 1.5, 1))
        steps = [e["step"] for e in evals]
        held = [(e["step"], e["loss"]) for e in evals if e.get("loss") is not None]
        if held:
            ax.plot(*zip(*held, strict=True), "k.--", linewidth=0.8, label="held-out (answers)")
        ax_acc.plot(steps, [e["scores"]["all"]["accuracy"] for e in evals], "k.-", label="held-out accuracy")
        ax_acc.plot(steps, [e["scores"]["all"]["baseline"] for e in evals], color="gray", linestyle=":",
                    label="blind baseline")  # fmt: skip
        ax_acc.set_ylabel("accuracy")
        ax_acc.set_ylim(0, 1)
        ax_acc.legend(fontsize=8)
        ax_acc.grid(alpha=0.3)
    else:
        fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=(3, 1))
    stages: dict[str, list[dict]] = {}
    for r in records:
        stages.setdefault(r["stage"], []).append(r)
    for i, (name, recs) in enumerate(stages.items()):
        color = f"C{i}"
        steps = [r["step"] for r in recs]
        losses = [r["loss"] for r in recs]
        ax.plot(steps, losses, color=color, alpha=0.3, linewidth=0.8)
        ax.plot(steps, _ema(losses), color=color, linewidth=1.8, label=name)
        ax_lr.plot(steps, [r["lr"] for r in recs], color=color)
        ax.axvline(steps[0], color="gray", linewidth=0.5, linestyle=":")
    ax.set_ylabel("loss (CE per target token)")
    ax.set_title("training loss by stage (thin: per step; thick: EMA)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.set_ylabel("LR")
    ax_lr.set_xlabel("step")
    ax_lr.set_yscale("log")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _ema(values: list[float], beta: float = 0.9) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None or not math.isfinite(avg) else beta * avg + (1 - beta) * v
        out.append(avg)
    return out
