"""Context-parallel LLM: the tiny MoE LLM with ring attention at CP=2 (gloo, two spawned processes)
gives the loss and parameter gradients of the unsharded model at CP=1.

Each rank feeds its zigzag shard of the token ids, position ids (global within each document) and
next-token labels (-100 on padding and document ends); the loss is the sum of per-token cross
entropies over all ranks divided by the global count of labelled tokens, and each rank's parameter
gradients are summed over the group. The MoE balance losses are statistics of the whole token set
(not sums over tokens), so they are not compared.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.config import get_preset
from model.llm import MoELLM
from seedvl_kernels.ring_attention import zigzag_shard
from tests.dist_utils import init_gloo, spawn

LENGTHS = [13, 1, 8, 29]
CP = 2


def _batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab - 1, (sum(LENGTHS),), generator=g)
    pos = torch.cat([torch.arange(n) for n in LENGTHS])
    labels = torch.cat([torch.cat([d[1:], torch.tensor([-100])]) for d in ids.split(LENGTHS)])
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return ids, pos, labels, cu


def _loss_and_grads(llm: MoELLM, ids, pos, labels, cu, max_seqlen: int, count: int):
    llm.zero_grad()
    logits = llm(ids, pos, cu, max_seqlen).logits
    loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / count
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in llm.named_parameters()}


def _worker(rank: int, world_size: int, port: int, outdir: str) -> None:
    init_gloo(rank, world_size, port)
    torch.manual_seed(0)
    cfg = get_preset("llm-tiny")
    llm = MoELLM(cfg).double()
    ids, pos, labels, cu = _batch(cfg.vocab_size)
    count = int((labels != -100).sum())
    loss1, grads1 = _loss_and_grads(llm, ids, pos, labels, cu, max(LENGTHS), count)

    shard = zigzag_shard([ids, pos, labels], cu, world_size, rank, pad_values=[0, 0, -100])
    for layer in llm.layers:
        layer.attn.cp_group = dist.group.WORLD
    loss2, grads2 = _loss_and_grads(llm, *shard.tensors, shard.cu_seqlens, shard.max_seqlen, count)
    dist.all_reduce(loss2)
    for g in grads2.values():
        dist.all_reduce(g)
    errors = {"loss": (loss2 - loss1).abs().item()}
    errors.update({n: (grads2[n] - grads1[n]).abs().max().item() for n in grads1})
    scale = {n: grads1[n].abs().max().item() for n in grads1}
    with open(f"{outdir}/rank{rank}.json", "w") as f:
        json.dump({"errors": errors, "scale": scale, "loss": loss1.item()}, f)
    dist.destroy_process_group()


def _tol(name: str, scale: float) -> float:
    """fp64 model: 1e-10; but the router computes its logits in fp32 whatever the model's dtype
    (MoE.forward), so its weights' gradients carry fp32 rounding (relative 1e-7 differences)."""
    return 1e-5 * scale if "router" in name else 1e-10 * max(1.0, scale)


@pytest.mark.dist
def test_llm_cp2_matches_cp1(tmp_path):
    spawn(_worker, CP, str(tmp_path))
    for rank in range(CP):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["loss"] > 0
        bad = {n: e for n, e in r["errors"].items() if e > _tol(n, r["scale"].get(n, 1.0))}
        assert not bad, f"rank {rank}: CP=2 vs CP=1 max abs differences beyond tolerance: {bad}"
        assert len(r["errors"]) > 10  # the loss and every parameter's gradient were compared
