"""How many optimizer steps the tiny preset needs to learn a skill, outside the trainer (issue 13).

The main job's skills that need an object's image column (relation, 2D and 3D grounding) never
learned in its budget (profiles/20261201_main_job_learning.md). This probe asks why in about a
minute a run instead of six: the tiny preset's own modules (SeedViT frozen at its random init, the
adapter and the MoE LLM trained from scratch, as SFT from scratch), one question form per run,
bare token sequences (the visual tokens, a few question ids, the answer id), the loss on the
answer only, AdamW with the SFT stage's LR, betas and weight decay. Where it differs from the
trainer's SFT: weight decay on every parameter (the trainer spares norms and biases), a cosine to
0 after a 5% warm-up (the trainer's ends at a floor), and a load-balancing weight of 0.01 (the
preset's aux_loss_coef is 1e-3). The recorded runs (profiles/20261201_main_job_learning.md, ninth
session) used exactly this.

Tasks (the answer is one colour, or a number for count):
    closer     "closer A or B": the nearer of the two (the main job's closer)
    relchoice  "left|right A or B": the one farther to that side (relation as a choice)
    leftmost   "leftmost|rightmost": the object farthest to that side
    count      "how many objects" or "how many <shape>s", as the main job asks them
    relcot     relchoice answered with a thought first: the grid column of A, then of B, then the
               colour (the loss on all three; held-out accuracy scores the colour of a greedy answer)
    locate     "where A": the grid column of the named object (binding without a comparison)

What the visual tokens are (--features):
    vit        the adapter's outputs, as in the model
    vit+pos    those plus a fixed 2D sin/cos of each token's grid row and column (the model has no
               such code: its visual tokens carry no absolute position)
    oracle     a fixed random projection of per-token facts (the colour of the object covering the
               cell, whether one does, the cell's row and column one-hot): perfect features
    oracle-nocol  the same without row and column

--size sets the image side (a multiple of 28; the main job's is 112, a 4 x 4 grid of visual
tokens; 224 gives 8 x 8, where an object covers about four times as many tokens).

--vit-init RUN starts the ViT from a ViT pre-training run (python trainer/run.py --recipe vit)
instead of its random init; it stays frozen either way.

    python profiles/column_probe.py --task relchoice --features oracle --steps 1500
    python profiles/column_probe.py --task leftmost --vit-init runs/vit-seedvl-tiny
    python profiles/column_probe.py --task locate --features vit+pos --size 224
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import get_preset
from model.preprocess import ImagePatches, pack_images, patchify
from model.vlm import SeedVLM
from trainer.data.render import COLORS, SHAPES
from trainer.data.spatial import DEPTH_GAP, LATERAL_GAP, Scene, SpatialConfig, sample_scene
from trainer.vit_pretrain.export import load_pretrained_vit

GRID = 4  # the image's grid of visual tokens: side / 28 (--size)
COLOUR_IDS = {c: i + 1 for i, c in enumerate(COLORS)}  # id 0 is the image placeholder
WORD_IDS = {"where": 19, "closer": 20, "left": 21, "right": 22, "leftmost": 23, "rightmost": 24}
WORD_IDS |= {"or": 25, "end": 26}
WORD_IDS |= {"objects": 27} | {shape: 28 + k for k, shape in enumerate(SHAPES)}
NUMBER_IDS = range(40, 46)  # 0-5
COLUMN_IDS = range(46, 54)  # an object's grid column (relcot's thought, locate's answer), up to 8
MIN_VOCAB = 52  # ids up to 51, whatever the grid (so that 112 px runs keep their initialisation)
LOAD_BALANCE_WEIGHT, Z_LOSS_WEIGHT = 0.01, 1e-3  # the MoE auxiliary losses' weights (module docstring)


def cell_facts(scene: Scene) -> torch.Tensor:
    """(G*G, 9 + 2G) per visual-token cell of the G x G grid: colour one-hot of the object covering
    >= 15% of it, column one-hot, row one-hot, and whether an object covers it."""
    ids = scene.ids
    side = ids.shape[0] // GRID
    facts = np.zeros((GRID * GRID, 9 + 2 * GRID), np.float32)
    for r in range(GRID):
        for c in range(GRID):
            block = ids[r * side : (r + 1) * side, c * side : (c + 1) * side]
            objs, counts = np.unique(block[block >= 0], return_counts=True)
            t = r * GRID + c
            facts[t, 8 + c] = facts[t, 8 + GRID + r] = 1
            if len(objs) and counts.max() > 0.15 * block.size:
                facts[t, list(COLORS).index(scene.objects[int(objs[counts.argmax()])].color)] = 1
                facts[t, -1] = 1
    return torch.from_numpy(facts)


def grid_column(scene: Scene, k: int) -> int:
    """The visual-token column holding the middle of object k's visible pixels."""
    cols = np.nonzero(scene.ids == k)[1]
    return int(cols.mean() * GRID // scene.ids.shape[1])


def question(task: str, scene: Scene, rng: np.random.Generator) -> tuple[list[int], list[int]] | None:
    """(question ids, answer ids) of ``task`` about ``scene``; None if the scene has no such pair."""
    objs = scene.objects
    xs = [float(scene.camera.to_camera(o.center)[0]) for o in objs]
    pairs = [(i, j) for i in range(len(objs)) for j in range(len(objs)) if i != j]
    colour = [COLOUR_IDS[o.color] for o in objs]
    if task == "closer":
        pairs = [p for p in pairs if max(map(scene.depth, p)) >= DEPTH_GAP * min(map(scene.depth, p))]
        if not pairs:
            return None
        i, j = pairs[int(rng.integers(len(pairs)))]
        near = i if scene.depth(i) < scene.depth(j) else j
        return [WORD_IDS["closer"], colour[i], WORD_IDS["or"], colour[j]], [colour[near]]
    side = "left" if rng.random() < 0.5 else "right"
    pick = min if side == "left" else max
    if task in ("relchoice", "relcot"):
        pairs = [(i, j) for i, j in pairs if abs(xs[i] - xs[j]) >= LATERAL_GAP]
        if not pairs:
            return None
        i, j = pairs[int(rng.integers(len(pairs)))]
        answer = [colour[pick((i, j), key=xs.__getitem__)]]
        if task == "relcot":
            answer = [COLUMN_IDS[grid_column(scene, i)], COLUMN_IDS[grid_column(scene, j)], *answer]
        return [WORD_IDS[side], colour[i], WORD_IDS["or"], colour[j]], answer
    if task == "locate":  # the grid column of a named object
        k = int(rng.integers(len(objs)))
        return [WORD_IDS["where"], colour[k]], [COLUMN_IDS[grid_column(scene, k)]]
    if task == "leftmost":
        return [WORD_IDS[side + "most"]], [colour[pick(range(len(objs)), key=xs.__getitem__)]]
    if task == "count":  # the main job's mix: a third "how many objects", else one shape
        if rng.random() < 1 / 3:
            return [WORD_IDS["objects"]], [NUMBER_IDS[len(objs)]]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        return [WORD_IDS[shape]], [NUMBER_IDS[sum(o.shape == shape for o in objs)]]
    raise ValueError(f"--task: unknown {task!r}")


def make_set(task: str, n: int, seed: int) -> list[tuple[ImagePatches, torch.Tensor, list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        scene = sample_scene(rng, SpatialConfig(sizes=(GRID * 28,)))
        qa = question(task, scene, rng)
        if qa is not None:
            out.append((patchify(scene.image), cell_facts(scene), *qa))
    return out


def grid_code(pos_hw: torch.Tensor, dim: int) -> torch.Tensor:
    """(N/4, dim) sin/cos of each pooled token's grid row and column (patches in 2x2-window order,
    so every 4th patch opens a token's window)."""
    rc = pos_hw[0::4].float() // 2
    freqs = torch.tensor([1.0, 0.5, 0.25, 0.125])
    row, col = rc[:, :1] * freqs, rc[:, 1:] * freqs
    return F.pad(torch.cat([row.sin(), row.cos(), col.sin(), col.cos()], 1), (0, dim - 16))


class Probe:
    def __init__(self, features: str, seed: int, lr: float, vit_init: str | None = None) -> None:
        torch.manual_seed(seed)
        cfg = get_preset("seedvl-tiny")
        vocab = max(MIN_VOCAB, COLUMN_IDS.start + GRID)
        cfg = replace(cfg, llm=replace(cfg.llm, vocab_size=vocab), image_token_id=0)
        self.model, self.features = SeedVLM(cfg), features
        if vit_init:
            load_pretrained_vit(vit_init, self.model.vit)
        self.model.vit.requires_grad_(False)
        self.oracle = torch.randn(9 + 2 * GRID, cfg.llm.hidden) * 0.5
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)

    def visual_tokens(self, items) -> torch.Tensor:
        """(G*G B, D): what fills the image placeholders."""
        if self.features.startswith("oracle"):
            facts = torch.cat([it[1] for it in items])
            if self.features == "oracle-nocol":
                facts = facts.clone()
                facts[:, 8:-1] = 0
            return facts @ self.oracle
        images = pack_images([it[0] for it in items])
        with torch.no_grad():
            feats = self.model.vit(images.patches, images.pos_hw, images.cu_seqlens, images.max_seqlen)
        visual = self.model.adapter(feats)
        if self.features == "vit+pos":
            return visual + grid_code(images.pos_hw, visual.shape[1]) * 3 * visual.detach().std()
        if self.features != "vit":
            raise ValueError(f"--features: unknown {self.features!r}")
        return visual

    def forward(self, items, tails: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (T, V) of the sequences visual tokens + question + end + tail, their document
        ends (B+1,), and the MoE auxiliary loss."""
        seqs = [
            [0] * GRID * GRID + it[2] + [WORD_IDS["end"]] + tail
            for it, tail in zip(items, tails, strict=True)
        ]
        lens = torch.tensor([len(s) for s in seqs])
        ids = torch.tensor([t for s in seqs for t in s])
        embeds = self.model.llm.embed(ids).masked_scatter((ids == 0).unsqueeze(-1), self.visual_tokens(items))
        cu = F.pad(lens.cumsum(0), (1, 0))
        positions = torch.cat([torch.arange(int(n)) for n in lens])
        out = self.model.llm(None, positions, cu.to(torch.int32), int(lens.max()), inputs_embeds=embeds)
        aux = LOAD_BALANCE_WEIGHT * out.load_balancing_loss + Z_LOSS_WEIGHT * out.router_z_loss
        return out.logits, cu, aux

    def loss(self, items) -> torch.Tensor:
        """Cross-entropy of every answer id, teacher-forced, plus the MoE auxiliary loss."""
        logits, cu, aux = self.forward(items, [it[3][:-1] for it in items])
        rows = [int(cu[b + 1]) - len(it[3]) + k for b, it in enumerate(items) for k in range(len(it[3]))]
        answers = torch.tensor([a for it in items for a in it[3]])
        return F.cross_entropy(logits[rows].float(), answers) + aux

    @torch.no_grad()
    def accuracy(self, items) -> float:
        """Share of greedy answers whose last id (the colour or number) is right."""
        hits = 0
        for k in range(0, len(items), 100):
            batch = items[k : k + 100]
            tails: list[list[int]] = [[] for _ in batch]
            for _ in range(len(batch[0][3])):
                logits, cu, _ = self.forward(batch, tails)
                for tail, row in zip(tails, logits[cu[1:] - 1].argmax(-1).tolist(), strict=True):
                    tail.append(row)
            hits += sum(tail[-1] == it[3][-1] for tail, it in zip(tails, batch, strict=True))
        return hits / len(items)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    tasks = ("closer", "relchoice", "leftmost", "count", "relcot", "locate")
    p.add_argument("--task", default="relchoice", choices=tasks)
    p.add_argument("--features", default="vit", choices=("vit", "vit+pos", "oracle", "oracle-nocol"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64, help="questions a step")
    p.add_argument("--lr", type=float, default=4e-3, help="peak (the main job's SFT LR)")
    p.add_argument("--train", type=int, default=6000, help="training questions (drawn with replacement)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vit-init", help="a ViT pre-training run to start the ViT from (default: random init)")
    p.add_argument("--every", type=int, default=100, help="held-out accuracy (300 questions) every N steps")
    p.add_argument("--size", type=int, default=112, help="image side in px, a multiple of 28")
    args = p.parse_args()
    torch.set_num_threads(1)
    global GRID
    GRID = args.size // 28

    t0 = time.time()
    train, test = make_set(args.task, args.train, 1000 + args.seed), make_set(args.task, 300, 99)
    probe = Probe(args.features, args.seed, args.lr, args.vit_init)
    rng = np.random.default_rng(args.seed)
    warmup = max(1, args.steps // 20)
    for step in range(1, args.steps + 1):
        frac = (step - warmup) / max(1, args.steps - warmup)
        lr = args.lr * (step / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * frac)))
        for g in probe.opt.param_groups:
            g["lr"] = lr
        loss = probe.loss([train[i] for i in rng.integers(len(train), size=args.batch)])
        probe.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(probe.params, 1.0)
        probe.opt.step()
        if step % args.every == 0 or step == args.steps:
            acc, took = probe.accuracy(test), time.time() - t0
            run = f"{args.task} {args.features}" + (" (pre-trained ViT)" if args.vit_init else "")
            print(f"{run} step {step}: loss {loss.item():.3f}, held-out {acc:.3f}, {took:.0f} s")


if __name__ == "__main__":
    main()
