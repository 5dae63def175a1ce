"""Answer accuracy on held-out spatial questions: greedy generation, checked by the generator's own
verifier (trainer.data.spatial.check_answer). Scenes come from a seed the training stream never
uses, so this measures generalisation to new scenes, not memorisation."""

from __future__ import annotations

from collections import defaultdict

import torch

from model.generate import generate
from model.preprocess import PackedImages, pack_images
from model.vlm import SeedVLM

from .data import tokenizer as T
from .data.chat import Conversation, EncodeConfig, encode_conversation
from .data.spatial import SpatialDataset, check_answer

HELD_OUT_SEED_OFFSET = 1_000_003


@torch.no_grad()
def evaluate_spatial(
    model: SeedVLM,
    tok: T.Tokenizer,
    *,
    seed: int,
    num: int,
    encode: EncodeConfig,
    device: torch.device,
    batch: int = 32,
    max_new_tokens: int = 24,
) -> dict[str, dict[str, float]]:
    """{kind: {"correct", "total", "accuracy"}} plus "all", over ``num`` held-out samples."""
    ds = SpatialDataset(seed + HELD_OUT_SEED_OFFSET)
    eos = tok.special_id(T.IM_END)
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    was_training = model.training
    model.eval()
    try:
        for start in range(0, num, batch):
            convs = [ds[i] for i in range(start, min(num, start + batch))]
            prompts = [
                encode_conversation(
                    Conversation(c.turns[:1], c.sample_id), tok, encode, add_generation_prompt=True
                )
                for c in convs
            ]
            images = pack_images([im for p in prompts for im in p.images])
            images = PackedImages(
                images.patches.to(device), images.pos_hw.to(device), images.cu_seqlens.to(device),
                images.max_seqlen, images.grid_hw,
            )  # fmt: skip
            ids = [torch.from_numpy(p.ids).long() for p in prompts]
            outs = generate(model, ids, max_new_tokens, eos_id=eos, images=images)
            for conv, out in zip(convs, outs, strict=True):
                tokens = out.tolist()
                if tokens and tokens[-1] == eos:
                    tokens = tokens[:-1]
                ok = check_answer(conv.meta["kind"], tok.decode(tokens), conv.meta["answer"])
                for key in (conv.meta["kind"], "all"):
                    tally[key][0] += int(ok)
                    tally[key][1] += 1
    finally:
        model.train(was_training)
    return {k: {"correct": c, "total": n, "accuracy": c / n} for k, (c, n) in sorted(tally.items())}
