"""Pipeline parallelism for the MoE LLM (report §5.1.1), through ``torch.distributed.pipelining``.

The LLM's decoder layers are split into pp x V stages (V virtual stages per pipeline rank, placed
round-robin: stage s on pipeline rank s mod pp); the first stage holds the token embedding, the
last the final norm and the LM head. A step's micro-batches are the trainer's own (``accum / dp``
per dp replica), so a step's loss and gradients equal the single-process ones. The ViT and the
adapter stay outside the pipeline, ZeRO over all ranks, as the report keeps them:

    pp rank:        0                      1                 ...      P-1
                    |                      |                           |
    micro-batches   m0 .. m(M-1): the same on every pp rank of a dp/cp place
    ViT + adapter   encodes the micro-batches LPT assigns it (by ViT FLOPs), in one packed call
                    |                      |                           |
                    +--- visual tokens: one differentiable all-to-all over the pp group ---+
                    v
    stage 0         embed(ids), visual tokens scattered at the placeholders (a leaf per step)
                    -> layers -> send ->  stage 1 -> ... -> last stage: norm, head, CE / targets
    backward        the schedule's backward ends at stage 0 with the visual tokens' gradient;
                    the same all-to-all in reverse takes it to the encoding ranks, whose ViT
                    backward (FSDP over every rank) runs once per step on every rank

Each pp rank encodes a share of the micro-batches' images rather than the first stage encoding
all of them, so the ViT's work is spread over all P ranks of a pp group and no pipeline stage
carries it (the pipeline-level imbalance the report avoids). The visual tokens are detached into
one leaf on the first stage: the pipeline's backward stops there, and the encoding ranks run the
ViT's backward together after the schedule, so FSDP's collectives over all ranks stay in step.

Shapes: ``PipelineStage`` sends fixed-shape activations, so each micro-batch is padded to the
stage's token budget S (the packer bins to ``seq_len``, so S = seq_len without context
parallelism; with it, the longest shard of the step rounded up to 16, grown when a longer one
comes, the pipeline rebuilt then). The padding is one extra document of label IGNORE_INDEX and
token mask False: attention keeps it to itself and the MoE balance statistics skip it.

MoE balance and z-losses: each stage attaches its MoE layers' share of the step's auxiliary loss,
sum over its layers of (aux_coef x balance + z_coef x z) / (MoE layers x accum), to its output
(:class:`_AuxLoss`, Megatron's device): the schedule's backward adds its gradient once per
micro-batch, on the stage that owns the layers; nothing is counted twice, and the logged values
are summed over the stages by the step's all-reduce.

Schedules (``--pp-schedule``): interleaved1f1b (default), 1f1b, gpipe, loopedbfs; 1f1b and gpipe
take V = 1. torch's zero-bubble schedules (interleavedzerobubble, zbvzerobubble) run with these
stages but split backward into input and weight passes that do not yet reproduce the
single-process gradients of the router (the balance loss drifts by a few percent), so they are
not offered; profiles/pipeline.md lists their bubbles from their action lists.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleSingle,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleLoopedBFS,
)
from torch.distributed.tensor import DTensor

from model.llm import MoELLM, rope_cos_sin
from model.vlm import SeedVLM
from seedvl_kernels.moe_ep import exchange_rows

from ..balance import lpt
from ..data.packer import IGNORE_INDEX, PackedBatch
from .dims import LayoutError, Meshes
from .fsdp import sum_gradients

SCHEDULES = {
    "interleaved1f1b": ScheduleInterleaved1F1B,
    "1f1b": Schedule1F1B,
    "gpipe": ScheduleGPipe,
    "loopedbfs": ScheduleLoopedBFS,
}


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
    """Which decoder layers each of the pp x V stages runs, and where each stage lives."""

    pp: int
    virtual: int
    schedule: str
    layers: tuple[tuple[int, int], ...]  # (first, stop) of each stage, in stage order

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual

    def rank_of(self, stage: int) -> int:
        return stage % self.pp

    def stages_of(self, pp_rank: int) -> list[int]:
        return [s for s in range(self.num_stages) if self.rank_of(s) == pp_rank]


def plan_pipeline(num_layers: int, pp: int, virtual: int, schedule: str, layers: str | None) -> PipelinePlan:
    """The stages of ``num_layers`` decoder layers over pp ranks x ``virtual`` stages each.

    ``layers``: the layer count of every stage, comma-separated ("1,2,2,1": uneven first and last
    stages, which also carry the embedding and the head); None: as even as possible, the
    remainder to the middle stages. Raises LayoutError naming the rule a layout breaks."""
    name = schedule.lower()
    if name not in SCHEDULES:
        raise LayoutError(f"--pp-schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    single = issubclass(SCHEDULES[name], PipelineScheduleSingle)
    if single and virtual != 1:
        raise LayoutError(f"--pp-schedule {name} runs one stage per rank: pass --pp-virtual 1, got {virtual}")
    if virtual < 1:
        raise LayoutError(f"--pp-virtual: expected an integer >= 1, got {virtual}")
    n = pp * virtual
    if layers is None:
        if num_layers < n:
            raise LayoutError(
                f"--parallel pp={pp} with --pp-virtual {virtual}: {n} stages need at least {n} decoder "
                f"layers, the model has {num_layers}; lower pp or --pp-virtual, or give --pp-layers"
            )
        counts = [num_layers // n] * n
        middle = list(range(1, n - 1)) or list(range(n))
        for k in range(num_layers % n):
            counts[middle[k % len(middle)]] += 1
    else:
        try:
            counts = [int(c) for c in layers.split(",")]
        except ValueError:
            raise LayoutError(f"--pp-layers {layers!r}: expected comma-separated layer counts") from None
        if len(counts) != n or sum(counts) != num_layers or min(counts) < 0:
            raise LayoutError(
                f"--pp-layers {layers!r}: expected {n} counts (pp x --pp-virtual) >= 0 summing to the "
                f"model's {num_layers} decoder layers"
            )
        if any(c == 0 for c in counts[1:-1]):
            raise LayoutError(f"--pp-layers {layers!r}: only the first and last stage may have no layer")
    bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
    return PipelinePlan(pp, virtual, name, tuple(itertools.pairwise(bounds)))


def check_micro_batches(plan: PipelinePlan, micro: int, where: str) -> None:
    """Refuse a pipeline step of ``micro`` micro-batches (accum / dp) that the schedule cannot run."""
    if micro < plan.pp:
        raise LayoutError(
            f"{where}: {micro} micro-batches per step and pipeline (accum / dp), fewer than pp = {plan.pp}; "
            "raise accum to a multiple of pp x dp (--set '*.accum=N')"
        )
    rounds = max(1, micro // plan.pp)
    if plan.schedule == "interleaved1f1b" and micro % rounds:
        raise LayoutError(
            f"{where}: interleaved1f1b runs {micro} micro-batches per step in {rounds} rounds of pp = "
            f"{plan.pp}; it needs a multiple of {rounds} (e.g. a multiple of pp)"
        )


# ----------------------------------------------------------------------------- stage modules


class _AuxLoss(torch.autograd.Function):
    """Identity on the hidden state whose backward also sends gradient 1 into ``aux``: the
    auxiliary loss joins the backward of whatever the hidden state reaches (the loss on the last
    stage), on the stage that computed it, once. A copy, not a view: the zero-bubble schedules
    detach a stage's output in place."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad.device)


@dataclasses.dataclass
class VisualTokens:
    """One micro-batch's visual tokens for the first stage, in a wrapper the pipeline does not
    flatten: its backward would otherwise clear their gradient (they are a slice of a leaf)."""

    tokens: torch.Tensor  # (Nv, D)


class _Elsewhere(nn.Module):
    """Stands in the layer list for a decoder layer another pipeline rank runs (no parameters)."""


class LLMStage(nn.Module):
    """Decoder layers [first, stop) of the LLM; the first stage embeds, the last norms and projects.

    forward(x, position_ids, cu_seqlens, max_seqlen, token_mask, visual): x is (S,) int64 token
    ids on the first stage, else (S, D) hidden states; returns (S, D), or logits (S, V) on the last.
    """

    def __init__(self, llm: MoELLM, first: int, stop: int, *, is_first: bool, is_last: bool,
                 image_token_id: int, moe_layers: int) -> None:  # fmt: skip
        super().__init__()
        self.cfg, self.image_token_id = llm.cfg, image_token_id
        self.embed = llm.embed if is_first else None
        self.layers = nn.ModuleDict({str(i): llm.layers[i] for i in range(first, stop)})
        self.norm = llm.norm if is_last else None
        self.lm_head = llm.lm_head if is_last else None
        self.moe_layers = max(1, moe_layers)
        self.accum = 1  # the step's micro-batches (the auxiliary losses' normaliser)
        self.aux_sums: torch.Tensor | None = None  # this step's (balance, z) shares, on the device

    def forward(self, x: torch.Tensor, *, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int, token_mask: torch.Tensor | None = None,
                visual: VisualTokens | None = None) -> torch.Tensor:  # fmt: skip
        if self.embed is not None:
            ids = x
            x = self.embed(ids)
            if visual is not None:
                x = x.masked_scatter((ids == self.image_token_id).unsqueeze(-1), visual.tokens.to(x.dtype))
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        lbs, zs = [], []
        for layer in self.layers.values():
            x, lb, z = layer(x, cos, sin, cu_seqlens, max_seqlen, None, token_mask)
            if lb is not None:
                lbs.append(lb.float())
                zs.append(z.float())
        if lbs:  # this stage's share of the micro-batch's auxiliary loss, attached to its output
            lb, z = torch.stack(lbs).sum(), torch.stack(zs).sum()
            aux = (self.cfg.aux_loss_coef * lb + self.cfg.z_loss_coef * z) / (self.moe_layers * self.accum)
            x = _AuxLoss.apply(x, aux)
            shares = torch.stack([lb, z]).detach().double() / self.moe_layers
            self.aux_sums = shares if self.aux_sums is None else self.aux_sums + shares
        if self.lm_head is not None:
            x = self.lm_head(self.norm(x))
        return x


def split_model(model: SeedVLM, plan: PipelinePlan, pp_rank: int, image_token_id: int) -> list[LLMStage]:
    """This rank's stage modules; the model keeps only what they hold (other ranks' layers, the
    embedding and the head where another rank has them are dropped), so its state dict, the
    optimizer and the checkpoint cover exactly this rank's part under the single-device names."""
    llm = model.llm
    moe = sum(1 for layer in llm.layers if _unwrap(layer).is_moe)
    mine = plan.stages_of(pp_rank)
    stages = [
        LLMStage(
            llm,
            *plan.layers[s],
            is_first=s == 0,
            is_last=s == plan.num_stages - 1,
            image_token_id=image_token_id,
            moe_layers=moe,
        )
        for s in mine
    ]
    keep = {i for s in mine for i in range(*plan.layers[s])}
    for i in range(len(llm.layers)):
        if i not in keep:
            llm.layers[i] = _Elsewhere()
    if 0 not in mine:
        llm.embed = None
    if plan.num_stages - 1 not in mine:
        llm.norm = None
        llm.lm_head = None
    return stages


def _unwrap(layer: nn.Module) -> nn.Module:
    """The decoder layer inside an activation-checkpointing or compile wrapper."""
    while hasattr(layer, "_checkpoint_wrapped_module") or hasattr(layer, "_orig_mod"):
        layer = getattr(layer, "_checkpoint_wrapped_module", None) or layer._orig_mod
    return layer


def apply_fsdp(
    model: SeedVLM, stages: list[LLMStage], meshes: Meshes, mp_policy: MixedPrecisionPolicy
) -> None:
    """ZeRO-3 under a pipeline: the ViT and the adapter over all ranks (each its own root, called
    outside the pipeline), each stage's layers and the stage itself over this pipeline rank's
    dp x cp ranks (the stage is the root the schedule syncs gradients through), the routed experts
    over "edp"."""
    for block in model.vit.blocks:
        fully_shard(block, mesh=meshes.world, mp_policy=mp_policy)
    fully_shard(model.vit, mesh=meshes.world, mp_policy=mp_policy)
    fully_shard(model.adapter, mesh=meshes.world, mp_policy=mp_policy)
    for stage in stages:
        for layer in stage.layers.values():
            if meshes.experts is not None and _unwrap(layer).is_moe:
                fully_shard(_unwrap(layer).ffn.experts, mesh=meshes.experts["edp"], mp_policy=mp_policy)
            fully_shard(layer, mesh=meshes.stage, mp_policy=mp_policy)
        fully_shard(stage, mesh=meshes.stage, mp_policy=mp_policy)
    for module in (model, *stages):
        sum_gradients(module)


# ----------------------------------------------------------------------------- one step


def _pad(batch: PackedBatch, length: int, image_token_id: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """(input ids, stage keyword arguments, labels) of a micro-batch padded to ``length`` tokens by
    one padding document (label IGNORE_INDEX, token mask False)."""
    pad = length - batch.num_tokens
    mask = batch.token_mask
    if pad == 0:
        kwargs = {"position_ids": batch.position_ids, "cu_seqlens": batch.cu_seqlens,
                  "max_seqlen": batch.max_seqlen, "token_mask": mask}  # fmt: skip
        return batch.input_ids, kwargs, batch.labels
    ids = batch.input_ids
    pad_id = 0 if image_token_id != 0 else 1
    if mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    cu = batch.cu_seqlens
    kwargs = {
        "position_ids": torch.cat([batch.position_ids, batch.position_ids.new_zeros(pad)]),
        "cu_seqlens": torch.cat([cu, cu.new_full((1,), length)]),
        "max_seqlen": max(batch.max_seqlen, pad),
        "token_mask": torch.cat([mask, mask.new_zeros(pad)]),
    }
    return (
        torch.cat([ids, ids.new_full((pad,), pad_id)]),
        kwargs,
        torch.cat([batch.labels, batch.labels.new_full((pad,), IGNORE_INDEX)]),
    )


def _pack_images(batches: list[PackedBatch], template: PackedBatch) -> tuple:
    """The images of ``batches`` as one packed ViT input (ViT attention stays within each image);
    an empty pack (the ViT still runs, for FSDP's collectives) when there is none."""
    batches = [b for b in batches if b.num_images > 0]
    if not batches:
        t = template
        return t.patches[:0], t.pos_hw[:0], t.vit_cu_seqlens.new_zeros(1), 0
    lengths = torch.cat([b.vit_cu_seqlens.diff() for b in batches])
    cu = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]).to(torch.int32)
    return (
        torch.cat([b.patches for b in batches]),
        torch.cat([b.pos_hw for b in batches]),
        cu,
        max(b.vit_max_seqlen for b in batches),
    )


class Pipeline:
    """Runs one step's micro-batches through the ViT (outside) and the LLM's pipeline stages,
    accumulating gradients; built on every rank after ``split_model`` and ``apply_fsdp``."""

    def __init__(self, model: SeedVLM, stages: list[LLMStage], plan: PipelinePlan, meshes: Meshes, *,
                 device: torch.device, compute_dtype: torch.dtype | None) -> None:  # fmt: skip
        self.model, self.stages, self.plan, self.meshes = model, stages, plan, meshes
        self.device, self.dtype = device, compute_dtype or torch.float32
        self.pp_rank, self.group = meshes.pp_rank, meshes.pp_group
        self.stage_ids = plan.stages_of(self.pp_rank)
        self.cfg = model.cfg
        self._schedules: dict[tuple[int, int], object] = {}
        self._length: dict[int, int] = {}  # token budget -> padded length in use
        self._targets = 1
        self._ce: torch.Tensor | None = None

    # --- the schedule, per padded length and micro-batch count

    def _schedule(self, length: int, micro: int):
        key = (length, micro)
        if key not in self._schedules:
            n, hidden, vocab = self.plan.num_stages, self.cfg.llm.hidden, self.cfg.llm.vocab_size
            built = []
            for s, module in zip(self.stage_ids, self.stages, strict=True):
                # requires_grad: the schedule sizes the gradient buffers from these
                meta = {"device": "meta", "dtype": self.dtype, "requires_grad": True}
                inp = (
                    torch.empty(length, dtype=torch.int64, device="meta")
                    if s == 0
                    else torch.empty(length, hidden, **meta)
                )
                out = torch.empty(length, vocab if s == n - 1 else hidden, **meta)
                built.append(
                    PipelineStage(
                        module, s, n, self.device, input_args=inp, output_args=out, group=self.group
                    )
                )
            cls = SCHEDULES[self.plan.schedule]
            stages = built[0] if issubclass(cls, PipelineScheduleSingle) else built
            self._schedules[key] = (cls(stages, micro, loss_fn=self._loss, scale_grads=False), built)
        return self._schedules[key]

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        self._ce = ce.detach() if self._ce is None else self._ce + ce.detach()
        return ce / self._targets

    def _padded_length(self, micro: list[PackedBatch], budget: int) -> int:
        """The step's padded length: the token budget without context parallelism (the packer bins
        to it); with it, the longest shard rounded up to 16, kept while no longer one comes."""
        longest = max(b.num_tokens for b in micro)
        if self.meshes.dims.cp == 1:
            return max(budget, longest)
        length = max(self._length.get(budget, 0), -(-longest // 16) * 16)
        self._length[budget] = length
        return length

    # --- the visual tokens

    def _visual(self, micro: list[PackedBatch], costs: list[float]) -> tuple[torch.Tensor, list]:
        """Encode this rank's share of the step's images and send every visual token to the first
        stage's rank. Returns (what the all-to-all returned here, for the ViT's backward; the first
        stage's per-micro-batch VisualTokens, None elsewhere)."""
        P, me = self.plan.pp, self.pp_rank
        owner = lpt(np.asarray(costs, dtype=np.float64), P)
        order = [[m for m in range(len(micro)) if owner[m] == r] for r in range(P)]
        mine = [micro[m] for m in order[me]]
        vision = [*self.model.vit.parameters(), *self.model.adapter.parameters()]
        trains = any(p.requires_grad for p in vision)
        with torch.set_grad_enabled(trains):
            encoded = self.model.encode_images(*_pack_images(mine, micro[0]))
        pieces, row = [], 0
        for b in mine:
            n = b.patches.shape[0] // 4
            part = encoded[row : row + n]
            row += n
            pieces.append(part if b.visual_index is None else part.index_select(0, b.visual_index))
        send = torch.cat(pieces) if pieces else encoded[:0]
        counts = [int(b.image_positions.shape[0]) for b in micro]  # the placeholders' visual tokens
        totals = [sum(counts[m] for m in order[r]) for r in range(P)]
        recv_splits = totals if me == 0 else [0] * P
        recv = exchange_rows(send, [send.shape[0]] + [0] * (P - 1), recv_splits, self.group)
        if me != 0:
            return recv, [None] * len(micro)
        leaf = recv.detach().requires_grad_(trains)
        visual: list = [None] * len(micro)
        row = 0
        for r in range(P):
            for m in order[r]:
                visual[m] = VisualTokens(leaf[row : row + counts[m]])
                row += counts[m]
        self._leaf = leaf
        return recv, visual

    # --- the step

    def step(self, micro: list[PackedBatch], *, targets: int, accum: int, budget: int,
             costs: list[float]) -> torch.Tensor:  # fmt: skip
        """Forward and backward of this rank's micro-batches (on the device) of one step; the
        gradients accumulate. Returns this rank's (CE sum, balance, z) shares (float64, (3,))."""
        self._targets, self._ce, self._leaf = targets, None, None
        for stage in self.stages:
            stage.accum, stage.aux_sums = accum, None
        recv, visual = self._visual(micro, costs)
        length = self._padded_length(micro, budget)
        schedule, built = self._schedule(length, len(micro))
        args, kwargs, labels = [], [], []
        for b, v in zip(micro, visual, strict=True):
            ids, kw, lab = _pad(b, length, self.cfg.image_token_id)
            args.append((ids,))
            kwargs.append({**kw, "visual": v})
            labels.append(lab)
        for stage in built:  # what ``step`` does before it splits one batch into micro-batches
            stage.has_backward = True
            stage.clear_runtime_states()
        # The micro-batches are formed already (varlen, with host ints), so they go in as they are.
        schedule._step_microbatches(args, kwargs, labels, None, return_outputs=False)
        if recv.requires_grad:  # the ViT's backward on every rank of the pp group, together
            grad = self._leaf.grad if self.pp_rank == 0 and self._leaf.grad is not None else None
            torch.autograd.backward(recv, grad if grad is not None else torch.zeros_like(recv))
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        if self._ce is not None:
            sums[0] = self._ce.double()
        for stage in self.stages:
            if stage.aux_sums is not None:
                sums[1:] += stage.aux_sums
        return sums


# ----------------------------------------------------------------------------- after the step


def clip_grad_norm_(params, max_norm: float, meshes: Meshes) -> torch.Tensor:
    """``trainer.parallel.clip_grad_norm_`` under a pipeline: the squared norms of each mesh's
    gradients, those of the LLM's stages summed over the pp group (each rank holds other layers),
    the ViT's and the adapter's (on every rank) once."""
    groups: dict[object, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    shared = torch.zeros((), dtype=torch.float32)
    staged = torch.zeros((), dtype=torch.float32)
    for mesh, group in groups.items():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norm = (norm.full_tensor() if isinstance(norm, DTensor) else norm).float().cpu()
        if mesh == meshes.world:
            shared = shared + norm**2
        else:
            staged = staged + norm**2
    device = next(iter(groups.values()))[0].device if groups else torch.device("cpu")
    staged = staged.to(device)
    dist.all_reduce(staged, group=meshes.pp_group)
    total = (shared.to(device) + staged).sqrt()
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def full_state_dict(model: SeedVLM, meshes: Meshes) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (CPU), gathered from every pipeline rank's part; None
    on the other ranks. A collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    part = {k: v.detach().cpu() for k, v in get_model_state_dict(model, options=options).items()}
    first_of_stage = meshes.stage.get_local_rank() == 0
    parts: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(part if first_of_stage else None, parts, dst=0)
    if parts is None:
        return None
    full: dict[str, torch.Tensor] = {}
    for p in parts:
        full.update(p or {})
    return full
