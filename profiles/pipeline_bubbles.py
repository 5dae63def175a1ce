"""Bubble fraction of torch.distributed.pipelining's schedules, from their own action lists.

    python profiles/pipeline_bubbles.py                       # seedvl-qwen3-235b-a22b, pp=8, V=4, 32 mb
    python profiles/pipeline_bubbles.py --pp 4 --micro 16 --virtual 2

Each schedule is built as torch builds it (``_schedule_visualizer.get_schedule_ops``: the schedule
class's ``pipeline_order`` over mock stages, one action list per pipeline rank). A list-order
simulation then runs every rank's actions in order, each as soon as the rank is free and its
inputs exist: F(s, m) after F(s-1, m); a backward (full B, or input-gradient I) of (s, m) after the
backward of (s+1, m); a weight-gradient W in list order after its I. Costs per action, in units of
one stage's forward time: F = f_s, B = 2 f_s, I = W = f_s; communication is free. The bubble is
the idle share of pp x makespan:

    bubble = 1 - sum of busy time over ranks / (pp x makespan)

Two cost models: ``equal`` (every stage the same: the schedule's own bubble) and ``flops`` (f_s
proportional to the stage's forward FLOPs per token: its decoder layers under
``trainer.parallel.plan_pipeline``'s default split, the LM head on the last stage, causal
attention over documents of ``--doc-len`` tokens). The ViT and the adapter run outside the
pipeline and are not in it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B, _ComputationType
from torch.distributed.pipelining.stage import PipelineStage

from model.config import LLMConfig, get_preset
from trainer.parallel.pipeline import plan_pipeline

FWD, BWD, BWD_I, BWD_W = (_ComputationType.FORWARD, _ComputationType.FULL_BACKWARD,
                         _ComputationType.BACKWARD_INPUT, _ComputationType.BACKWARD_WEIGHT)  # fmt: skip
OVERLAP = getattr(_ComputationType, "OVERLAP_F_B", None)
SCHEDULES = [  # (torch's name, stages per rank or None for --virtual)
    ("GPipe", 1), ("1F1B", 1), ("Interleaved1F1B", None), ("LoopedBFS", None),
    ("InterleavedZeroBubble", None), ("ZBVZeroBubble", 2), ("DualPipeV", 2),
]  # fmt: skip
WEIGHT = {FWD: 1.0, BWD: 2.0, BWD_I: 1.0, BWD_W: 1.0}


def schedule_actions(name: str, pp: int, micro: int, per_rank: int) -> list[list]:
    """Each pipeline rank's action list, as the schedule class builds it.

    1F1B is the exception: torch 2.13's ``Schedule1F1B.pipeline_order`` is descriptive only and
    inconsistent (a rank r > 0 never lists F0), so its row uses ``ScheduleInterleaved1F1B`` with
    one stage per rank, whose runtime executes exactly 1F1B from its own lists."""
    if name != "1F1B":
        return get_schedule_ops(name, pp, micro, num_stages_per_rank=per_rank)
    stage = mock.create_autospec(PipelineStage, instance=True)
    stage.group_rank, stage.group_size, stage.submod, stage.num_stages = 0, pp, None, pp
    schedule = ScheduleInterleaved1F1B([stage], micro)
    return [schedule.pipeline_order[r] for r in range(pp)]


def layer_flops(llm: LLMConfig, doc_len: int) -> float:
    """Forward FLOPs per token of one MoE decoder layer (projections, router, k active experts,
    shared experts, causal attention over a document of ``doc_len`` tokens)."""
    d, hd = llm.hidden, llm.head_dim
    proj = d * hd * (2 * llm.num_q_heads + 2 * llm.num_kv_heads)
    experts = (llm.top_k + llm.num_shared_experts) * 3 * d * llm.moe_ffn_dim + d * llm.num_experts
    attention = 2 * llm.num_q_heads * hd * doc_len  # QK^T and AV, half of the keys on average (causal)
    return 2 * (proj + experts) + attention


def simulate(actions: list[list], cost: dict[int, float]) -> float:
    """Bubble fraction of per-rank action lists with forward cost ``cost[stage]``."""
    compute = (*WEIGHT, OVERLAP)  # the schedules' other actions (gradient reduction) take no time here
    ranks = [[a for a in rank if a is not None and a.computation_type in compute] for rank in actions]
    done: dict[tuple, float] = {}
    free = [0.0] * len(ranks)
    busy = [0.0] * len(ranks)
    pos = [0] * len(ranks)
    last = max(cost)

    def deps(a) -> list[tuple]:
        s, m, kind = a.stage_index, a.microbatch_index, a.computation_type
        if kind == FWD:
            return [(s - 1, m, "F")] if s > 0 else []
        if kind in (BWD, BWD_I):
            return [(s, m, "F")] + ([(s + 1, m, "B")] if s < last else [])
        return [(s, m, "B")]  # W after its I

    def key(a) -> tuple:
        kind = {FWD: "F", BWD: "B", BWD_I: "B", BWD_W: "W"}[a.computation_type]
        return (a.stage_index, a.microbatch_index, kind)

    def leaves(a) -> list:
        if OVERLAP is not None and a.computation_type == OVERLAP:
            return list(a.sub_actions)
        return [a]

    while any(pos[r] < len(ranks[r]) for r in range(len(ranks))):
        progressed = False
        for r, rank in enumerate(ranks):
            while pos[r] < len(rank):
                subs = leaves(rank[pos[r]])
                needed = [d for a in subs for d in deps(a) if d not in {key(x) for x in subs}]
                if any(d not in done for d in needed):
                    break
                start = max([free[r]] + [done[d] for d in needed])
                length = sum(WEIGHT[a.computation_type] * cost[a.stage_index] for a in subs)
                free[r] = start + length
                busy[r] += length
                for a in subs:
                    done[key(a)] = free[r]
                pos[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError("the action lists deadlock under the simulation's dependencies")
    return 1.0 - sum(busy) / (len(ranks) * max(free))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="seedvl-qwen3-235b-a22b")
    p.add_argument("--pp", type=int, default=8)
    p.add_argument("--virtual", type=int, default=4, help="stages per rank of the looped schedules")
    p.add_argument("--micro", type=int, default=32, help="micro-batches per step and pipeline")
    p.add_argument("--doc-len", type=int, default=32768, help="document length for attention FLOPs")
    a = p.parse_args(argv)
    llm = get_preset(a.preset).llm
    layer = layer_flops(llm, a.doc_len)
    head = 2 * llm.hidden * llm.vocab_size
    print(f"{a.preset}: {llm.num_layers} layers, pp={a.pp}, {a.micro} micro-batches; "
          f"per token: layer {layer / 1e9:.3f} GFLOP, head {head / 1e9:.3f} GFLOP")  # fmt: skip
    print("| schedule | V | stages | layers per stage | bubble, equal stages | bubble, stage FLOPs |")
    print("|---|---|---|---|---|---|")
    for name, per_rank in SCHEDULES:
        v = per_rank or a.virtual
        try:
            actions = schedule_actions(name, a.pp, a.micro, v)
        except (ValueError, AssertionError, RuntimeError) as err:
            print(f"| {name} | {v} | - | - | not built: {str(err).splitlines()[0][:80]} | |")
            continue
        n = a.pp * v
        layers = [b - s for s, b in plan_pipeline(llm.num_layers, a.pp, v, "loopedbfs", None).layers]
        flops = {s: layers[s] * layer + (head if s == n - 1 else 0.0) for s in range(n)}
        mean = sum(flops.values()) / n
        equal = simulate(actions, dict.fromkeys(range(n), 1.0))
        weighted = simulate(actions, {s: f / mean for s, f in flops.items()})
        spread = f"{min(layers)}-{max(layers)}" if min(layers) != max(layers) else str(layers[0])
        print(f"| {name} | {v} | {n} | {spread} | {equal:.3f} | {weighted:.3f} |")


if __name__ == "__main__":
    main()
