"""Vision workload balancing (report §5.1.2): which rank encodes which image, as pure host logic.

Images vary in number and size from sample to sample, so under plain data parallelism one rank's
ViT can do many times another's work, and every rank waits for the slowest at the ViT's FSDP
collectives. Here every image is given to a rank by its cost, inside groups of ranks:

Cost (``rule``). The forward FLOPs of one image of p patches through the ViT and the adapter, from
model.summary's FLOPs model (the same terms as trainer.throughput's MFU count):

    flops(p) = linear * p + quadratic * p^2
    linear    = 2 * (ViT matmul weights) + 2 * (adapter matmul weights) / 4    per patch
    quadratic = 4 * heads * head_dim * depth                                  attention, per patch^2

For seedvit-532m, linear = 1.06 GFLOP and quadratic = 138 kFLOP, so the attention term equals the
linear one at p = 7,700 patches (a 1,230 x 1,230 px image) and is 8.5x it at 65,536 (3,584 px):
neither a patch count (``patches``, linear only) nor its square (``patches2``, VeOmni's default)
orders images the way the device time does. ``flops`` is the default; ``off`` keeps each rank's
own images. Training FLOPs are 3x the forward's, which changes no ratio.

Assignment. Longest processing time first: images sorted by cost, descending (ties by index),
each to the least-loaded rank of its group (ties to the lowest rank); with m images on G ranks the
largest load is at most 4/3 of the optimum. Groups (``group_size`` G) are blocks of G consecutive
ranks, and an image stays in the group of the rank that holds its pixels, so the exchange never
crosses a group: the report balances within 128-256 GPUs to bound the redistribution traffic.
Plain LPT scatters every rank's images over the group (a rank keeps about 1/G of its own), so one
rule is added: an image stays on the rank that holds it while that rank's load stays within the
group's mean; only the rest go to the least-loaded rank. The final loads obey the same greedy
bound (a rank receives an image only while it is the least loaded), and the simulation below moves
about 7x fewer bytes than plain LPT at the same max/mean.

Exchange plan. After the assignment every image's pixels go from the rank that holds them (its
``source``) to the one that encodes it (its ``encoder``), and its visual tokens come back to the
ranks whose placeholders take them (trainer.parallel.vit_balance does both exchanges). The bytes:

    pixels  patches * 588 * 4        (fp32 normalised patches, host side, no gradient)
    tokens  patches / 4 * D * b      (visual tokens, device side, again as gradients in backward)

Simulation (``python -m trainer.balance``): one step's assignment for R ranks on two image
distributions, with the max/mean ViT FLOPs over ranks of each rule and the bytes each moves:

    embedded      the trainer's own data: micro-batches from the embedded spatial stream packed at
                  the tiny recipe's stage-1 budget, costed with the tiny preset (one 112 px image a
                  sample, 2-6 samples a micro-batch)
    long-tailed   each sample 1-16 images, P(k) proportional to 1/k; each image's area log-uniform
                  between 28 x 28 and 3584 x 3584 px with its aspect ratio log-uniform in [1/4, 4],
                  resized as model.preprocess does (multiples of 28 px); 64-1,024 text tokens a
                  sample; samples packed next-fit into one micro-batch of ``--seq-len`` LLM tokens
                  (default 65,536) per rank, longer samples dropped; costed with seedvit-532m and
                  the given VLM preset's adapter. The length matters: a 3584 px image alone is
                  16,384 tokens and 0.66 PFLOP, 0.57 of a rank's mean load at 65,536 tokens but
                  1.3 of it at 32,768, where no assignment can get below max/mean 1.29

    python -m trainer.balance --ranks 256 --group 128 --json
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from dataclasses import dataclass

import numpy as np

from model.config import VLMConfig, get_preset
from model.preprocess import FACTOR, MERGE, PATCH, fit_resolution
from model.summary import count, vit_flops_per_token

RULES = ("off", "patches", "patches2", "flops")
MAX_GROUP = 128  # the default group size is the largest divisor of the world up to this
PATCH_BYTES = PATCH * PATCH * 3 * 4  # one fp32 patch


@dataclass(frozen=True)
class CostModel:
    """Forward FLOPs of one image of p patches: ``linear * p + quadratic * p**2``."""

    linear: float
    quadratic: float

    @classmethod
    def from_config(cls, cfg: VLMConfig) -> CostModel:
        parts = count(cfg)
        vit = vit_flops_per_token(cfg.vit, parts, 0)["matmul"]
        adapter = 2 * parts["adapter"].matmul_active / (MERGE * MERGE)
        return cls(linear=vit + adapter, quadratic=4 * cfg.vit.num_heads * cfg.vit.head_dim * cfg.vit.depth)

    def flops(self, patches: np.ndarray) -> np.ndarray:
        p = np.asarray(patches, dtype=np.float64)
        return self.linear * p + self.quadratic * p * p

    def cost(self, patches: np.ndarray, rule: str) -> np.ndarray:
        """The sort key of ``rule`` for images of ``patches`` patches (float64)."""
        p = np.asarray(patches, dtype=np.float64)
        if rule == "flops":
            return self.flops(p)
        if rule == "patches":
            return p
        if rule == "patches2":
            return p * p
        raise ValueError(f"rule: expected one of {', '.join(RULES[1:])}, got {rule!r}")


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"--vit-balance: expected one of {', '.join(RULES)}, got {rule!r}")
    return rule


def default_group(world: int, multiple: int = 1) -> int:
    """The largest divisor of ``world`` that is at most MAX_GROUP and a multiple of ``multiple``
    (the context-parallel size: a cp group must not straddle two balancing groups)."""
    best = multiple
    for g in range(multiple, min(world, max(MAX_GROUP, multiple)) + 1, multiple):
        if world % g == 0:
            best = g
    return best


def check_group(group: int, world: int, multiple: int = 1) -> int:
    if group < 1 or world % group or group % multiple:
        raise ValueError(
            f"--vit-balance-group: expected a divisor of the {world} ranks that is a multiple of "
            f"cp = {multiple} (a cp group shares its samples), got {group}"
        )
    return group


# ----------------------------------------------------------------------------- assignment


def lpt(costs: np.ndarray, bins: int, source: np.ndarray | None = None) -> np.ndarray:
    """Bin of each item under longest-processing-time-first: items by cost, descending (ties by
    index), each to the least-loaded bin (ties to the lowest bin). With ``source`` (each item's
    bin of origin), an item stays in its source bin while that keeps the bin within the mean load
    (module docstring). Deterministic."""
    costs = np.asarray(costs, dtype=np.float64)
    order = np.lexsort((np.arange(costs.shape[0]), -costs))
    target = costs.sum() / bins
    load = np.zeros(bins, dtype=np.float64)
    heap = [(0.0, b) for b in range(bins)]  # (load, bin), stale entries skipped when popped
    out = np.empty(costs.shape[0], dtype=np.int64)
    for i in order:
        b = -1 if source is None else int(source[i])
        if b < 0 or load[b] + costs[i] > target:
            while True:
                stale, b = heapq.heappop(heap)
                if stale == load[b]:
                    break
        out[i] = b
        load[b] += costs[i]
        heapq.heappush(heap, (float(load[b]), b))
    return out


def assign(
    costs: np.ndarray, source: np.ndarray, world: int, group_size: int, *, local: bool = True
) -> np.ndarray:
    """Encoder rank of each image: LPT by ``costs`` inside each group of ``group_size`` consecutive
    ranks (an image stays in its ``source`` rank's group), each image kept on its source while
    that stays within the group's mean load (``local``). ``source`` and the result are world
    ranks."""
    source = np.asarray(source, dtype=np.int64)
    costs = np.asarray(costs, dtype=np.float64)
    out = np.empty_like(source)
    group_of = source // group_size
    for g in range(world // group_size):
        idx = np.flatnonzero(group_of == g)
        if idx.size:
            local_src = source[idx] - g * group_size if local else None
            out[idx] = lpt(costs[idx], group_size, local_src) + g * group_size
    return out


def loads(values: np.ndarray, rank: np.ndarray, world: int) -> np.ndarray:
    """Per-rank sums of ``values`` (float64, length ``world``)."""
    return np.bincount(rank, weights=np.asarray(values, dtype=np.float64), minlength=world)


def imbalance(per_rank: np.ndarray) -> float:
    """max / mean over ranks (1.0 when nothing is loaded)."""
    mean = float(np.mean(per_rank))
    return float(np.max(per_rank)) / mean if mean > 0 else 1.0


# ----------------------------------------------------------------------------- exchange plan


@dataclass(frozen=True)
class NeedRuns:
    """Which visual tokens of its dp group's micro-batch a rank's placeholders take, in order, as
    runs of consecutive rows: row ``start[k] + t`` fills this rank's placeholder ``pos[k] + t`` for
    t < ``length[k]`` (one run without context parallelism; a few per document with it)."""

    start: np.ndarray
    length: np.ndarray
    pos: np.ndarray

    @classmethod
    def of(cls, rows: np.ndarray) -> NeedRuns:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            z = np.zeros(0, dtype=np.int64)
            return cls(z, z, z)
        pos = np.concatenate([[0], np.flatnonzero(np.diff(rows) != 1) + 1])
        length = np.diff(np.concatenate([pos, [rows.size]]))
        return cls(rows[pos], length, pos)

    @property
    def total(self) -> int:
        return int(self.length.sum())


def locate(rows: np.ndarray, runs: list[NeedRuns]) -> tuple[np.ndarray, np.ndarray]:
    """For visual-token ``rows`` of one dp group whose ranks (in order) need ``runs``: the index of
    the rank that needs each row and its placeholder position there."""
    owner = np.concatenate([np.full(r.start.size, k, dtype=np.int64) for k, r in enumerate(runs)])
    start = np.concatenate([r.start for r in runs])
    length = np.concatenate([r.length for r in runs])
    pos = np.concatenate([r.pos for r in runs])
    order = np.argsort(start, kind="stable")
    owner, start, length, pos = owner[order], start[order], length[order], pos[order]
    k = np.searchsorted(start, rows, side="right") - 1
    if rows.size and (np.any(k < 0) or np.any(rows - start[k] >= length[k])):
        raise ValueError("vision balance: a visual token is needed by no rank of its group")
    return owner[k], pos[k] + rows - start[k]


# ----------------------------------------------------------------------------- simulation


def embedded_step(ranks: int, seed: int = 0) -> tuple[list[np.ndarray], VLMConfig]:
    """Patch counts of each rank's images in one step of the embedded data at the tiny recipe's
    stage-1 budget (one micro-batch per rank), and the tiny preset."""
    from trainer.components import build_model_config
    from trainer.data.chat import SkipLog
    from trainer.data.spatial import SpatialDataset
    from trainer.data.stream import BatchStream, Position
    from trainer.data.tokenizer import load_tokenizer
    from trainer.evaluate import encode_config
    from trainer.recipes import get_recipe, scale_to

    tok = load_tokenizer("bytes")
    cfg = build_model_config("seedvl-tiny", tok)
    stage = next(s for s in scale_to(get_recipe("vlm"), cfg) if s.name == "stage1")
    skips = SkipLog()
    stream = BatchStream(
        SpatialDataset(seed), tok, seed=seed, window=256, encode=encode_config(cfg, None), skips=skips
    )
    it = stream.batches(Position(), stage.seq_len, min_level=stage.min_level)
    out = []
    for _ in range(ranks):
        batch, _ = next(it)
        out.append((batch.grid_hw[:, 0] * batch.grid_hw[:, 1]).numpy().astype(np.int64))
    return out, cfg


def long_tailed_step(ranks: int, seq_len: int = 65_536, seed: int = 0) -> list[np.ndarray]:
    """Patch counts of each rank's images in one step of the long-tailed distribution (module
    docstring)."""
    rng = np.random.default_rng(seed)
    k_values = np.arange(1, 17)
    k_prob = (1.0 / k_values) / np.sum(1.0 / k_values)
    lo, hi = math.log(FACTOR * FACTOR), math.log(3584 * 3584)
    out: list[np.ndarray] = []
    current: list[int] = []
    used = 0
    while len(out) < ranks:
        k = int(rng.choice(k_values, p=k_prob))
        patches, tokens = [], int(rng.integers(64, 1025))
        for _ in range(k):
            area = math.exp(rng.uniform(lo, hi))
            aspect = math.exp(rng.uniform(math.log(0.25), math.log(4.0)))
            h, w = fit_resolution(
                max(1, round(math.sqrt(area * aspect))), max(1, round(math.sqrt(area / aspect))),
                min_pixels=FACTOR * FACTOR, max_pixels=3584 * 3584,
            )  # fmt: skip
            patches.append(h * w // (PATCH * PATCH))
            tokens += h * w // (FACTOR * FACTOR)
        if tokens > seq_len:
            continue
        if used + tokens > seq_len:
            out.append(np.array(current, dtype=np.int64))
            current, used = [], 0
        current += patches
        used += tokens
    return out


def simulate(per_rank: list[np.ndarray], model: CostModel, group: int, token_bytes: int) -> dict:
    """Each rule's max/mean ViT FLOPs over ranks and the bytes it moves, for one step in which rank
    r holds (and without balancing encodes) the images ``per_rank[r]`` (patch counts)."""
    world = len(per_rank)
    patches = np.concatenate(per_rank) if per_rank else np.zeros(0, np.int64)
    source = np.concatenate([np.full(len(p), r, dtype=np.int64) for r, p in enumerate(per_rank)])
    flops = model.flops(patches)
    pixel = patches * PATCH_BYTES
    token = patches // (MERGE * MERGE) * token_bytes
    cases = {
        "none": None,
        "patches": ("patches", world),
        "patches2": ("patches2", world),
        "flops": ("flops", world),
        f"flops_group{group}": ("flops", group),
        f"flops_group{group}_plain_lpt": ("flops", group, False),
    }
    out = {}
    for name, case in cases.items():
        if case is None:
            encoder = source
        else:
            encoder = assign(model.cost(patches, case[0]), source, world, case[1], local=len(case) == 2)
        moved = encoder != source
        per = loads(flops, encoder, world)
        out[name] = {
            "max_over_mean": round(imbalance(per), 4),
            "max_rank_gflops": round(float(per.max()) / 1e9, 3),
            "moved_images": int(moved.sum()),
            "pixel_bytes": int(pixel[moved].sum()),
            "token_bytes": int(token[moved].sum()),
            "max_rank_pixel_bytes_in": int(loads(pixel * moved, encoder, world).max()),
        }
    flops_ratio = out["flops"]["max_over_mean"]
    for name in ("patches", "patches2"):
        out[name]["flops_rule_gain"] = round(out[name]["max_over_mean"] / flops_ratio - 1, 4)
    return {
        "ranks": world,
        "images": int(patches.size),
        "images_per_rank": round(patches.size / max(world, 1), 2),
        "mean_rank_gflops": round(float(flops.sum()) / world / 1e9, 3),
        "largest_image_over_mean_rank": round(float(flops.max()) / (float(flops.sum()) / world), 4),
        "rules": out,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.balance", description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=256, help="ranks R (one micro-batch each; 256)")
    ap.add_argument("--group", type=int, default=128, help="balancing group size G, divides R (128)")
    ap.add_argument("--preset", default="seedvl-qwen3-235b-a22b", help="VLM preset of the long-tailed case")
    ap.add_argument("--seq-len", type=int, default=65_536, help="LLM tokens per micro-batch (long-tailed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-embedded", action="store_true", help="skip the embedded data (renders ~5R scenes)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    a = ap.parse_args(argv)
    if a.ranks < 1 or a.group < 1 or a.ranks % a.group:
        print(f"error: --group {a.group} must divide --ranks {a.ranks}", file=sys.stderr)
        return 2
    result = {"ranks": a.ranks, "group": a.group, "seed": a.seed, "distributions": {}}
    big = get_preset(a.preset)
    if not isinstance(big, VLMConfig):
        print(f"error: --preset {a.preset!r} is not a VLM preset", file=sys.stderr)
        return 2
    cases = {}
    if not a.no_embedded:
        per_rank, tiny = embedded_step(a.ranks, a.seed)
        cases["embedded"] = (per_rank, tiny)
    cases["long_tailed"] = (long_tailed_step(a.ranks, a.seq_len, a.seed), big)
    for name, (per_rank, cfg) in cases.items():
        sim = simulate(per_rank, CostModel.from_config(cfg), a.group, cfg.llm.hidden * 2)
        result["distributions"][name] = sim
    if a.json:
        print(json.dumps(result, indent=1))
        return 0
    for name, sim in result["distributions"].items():
        print(f"{name}: {sim['images']} images on {sim['ranks']} ranks ({sim['images_per_rank']} a rank)")
        for rule, r in sim["rules"].items():
            print(
                f"  {rule:<16} max/mean {r['max_over_mean']:>8.4f}  moved {r['moved_images']:>6} images, "
                f"{r['pixel_bytes'] / 1e9:8.3f} GB pixels + {r['token_bytes'] / 1e9:7.3f} GB tokens"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
