"""The packer: encoded samples -> packed batches of at most ``budget`` LLM tokens, everything the
model needs computed once per batch on the host.

Planning is first fit (each sample into the first bin with room; the samples that are large next to
the budget first, longest first -- see :func:`plan_bins`) with a segment tree over the bins'
remaining room, O(N log N), in numba. Building a batch is one numba pass
over the chosen samples' tokens, which live in one flat array per pool, writing ids, shifted labels,
position ids and cu_seqlens together; images are concatenated with model.preprocess.pack_images.
``bench/bench_packer.py`` measures both.

A packed batch (shape legend: T tokens, B documents, Tv patches, I images, Nv = Tv/4 placeholders):

    input_ids       (T,) int64      documents back to back, image placeholders included
    labels          (T,) int64      labels[t] = input_ids[t+1] when token t+1 is a target of the same
                                    document, else IGNORE_INDEX (-100): loss = CE(logits[t], labels[t])
    loss_mask       (T,) bool       labels != IGNORE_INDEX
    position_ids    (T,) int64      restart at 0 in each document
    cu_seqlens      (B+1,) int32    document boundaries (per-document causal attention)
    image_positions (Nv,) int64     where the placeholders are, in visual-token order
    patches         (Tv, 588) fp32  all images' patches, 2x2-window order
    pos_hw          (Tv, 2) int32   each patch's (row, col)
    vit_cu_seqlens  (I+1,) int32    image boundaries;  grid_hw (I, 2) int32
    max_seqlen, vit_max_seqlen      host ints: the longest document / image (no device sync later)

A context-parallel shard (trainer.parallel.context_parallel) also carries ``visual_index`` (the
visual tokens its placeholders take) and ``token_mask`` (False on its padding rows).

A token is a target when its loss level (trainer.data.chat) is at least ``min_level``: whole
documents in pre-training (LEVEL_PROMPT), assistant replies only in SFT (LEVEL_RESPONSE).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numba
import numpy as np
import torch

from model.preprocess import PATCH, pack_images

from .chat import EncodedSample

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    image_positions: torch.Tensor
    patches: torch.Tensor
    pos_hw: torch.Tensor
    vit_cu_seqlens: torch.Tensor
    vit_max_seqlen: int
    grid_hw: torch.Tensor
    num_targets: int  # host int: loss tokens, the CE normaliser
    sample_ids: tuple[str, ...] = ()
    visual_index: torch.Tensor | None = None  # (Nv_local,) int64, context-parallel shards only
    token_mask: torch.Tensor | None = None  # (T,) bool, context-parallel shards only

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def num_images(self) -> int:
        return int(self.grid_hw.shape[0])

    def _map(self, fn) -> PackedBatch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return PackedBatch(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})

    def pin_memory(self) -> PackedBatch:
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def vision_inputs(self) -> dict:
        """Keyword arguments of SeedVLM.forward for the images (empty for a text-only batch)."""
        if self.num_images == 0:
            return {}
        return {
            "patches": self.patches,
            "pos_hw": self.pos_hw,
            "vit_cu_seqlens": self.vit_cu_seqlens,
            "vit_max_seqlen": self.vit_max_seqlen,
        }

    def model_inputs(self) -> dict:
        """Every keyword argument of SeedVLM.forward for this batch. The images are passed even when
        there are none, so the ViT runs (on nothing) in every step of every rank."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seqlens": self.cu_seqlens,
            "max_seqlen": self.max_seqlen,
            "patches": self.patches,
            "pos_hw": self.pos_hw,
            "vit_cu_seqlens": self.vit_cu_seqlens,
            "vit_max_seqlen": self.vit_max_seqlen,
            "visual_index": self.visual_index,
            "token_mask": self.token_mask,
        }


# ----------------------------------------------------------------------------- planning


@numba.njit(cache=True, nogil=True)
def _first_fit(lengths: np.ndarray, budget: int) -> tuple[np.ndarray, int]:
    """Bin of each item (taken in the given order) under first fit; every length <= budget.

    Leaves of the tree are bins (all start empty, with ``budget`` room); an inner node holds the
    largest room below it, so the leftmost bin with enough room is one root-to-leaf descent.
    """
    n = lengths.shape[0]
    size = 1
    while size < n:
        size *= 2
    tree = np.full(2 * size, budget, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    num_bins = 0
    for k in range(n):
        need = lengths[k]
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        out[k] = node - size
        num_bins = max(num_bins, node - size + 1)
        tree[node] -= need
        node //= 2
        while node >= 1:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return out, num_bins


def plan_bins(lengths: np.ndarray, budget: int, *, large: float = 0.25) -> list[np.ndarray]:
    """Bins of item indices (each bin in increasing index order) by first fit, where items longer
    than ``large * budget`` go first, longest first, and the rest follow in index order.

    Pure first-fit decreasing would fill each bin with samples of similar length -- in practice of
    the same kind (all grounding answers in one step, all counts in another), which makes the loss
    jump from step to step. Items that are small next to the budget pack nearly perfectly in any
    order, so only the large ones, where order matters, are sorted; the others keep the stream's
    (shuffled) order and mix. Deterministic: ties keep index order. Raises ValueError for an item
    over the budget (the stream drops those first, with a message).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if budget <= 0:
        raise ValueError(f"budget: expected > 0, got {budget}")
    if lengths.size and (lengths.max() > budget or lengths.min() <= 0):
        raise ValueError(f"lengths: expected 1..{budget} (the budget), got {lengths.min()}..{lengths.max()}")
    big = lengths > large * budget
    big_first = np.flatnonzero(big)[np.argsort(-lengths[big], kind="stable")]
    order = np.concatenate([big_first, np.flatnonzero(~big)])
    bins_sorted, num_bins = _first_fit(lengths[order], budget)
    bin_of = np.empty_like(bins_sorted)
    bin_of[order] = bins_sorted
    by_bin = np.argsort(bin_of, kind="stable")
    counts = np.bincount(bin_of, minlength=num_bins)
    return np.split(by_bin, np.cumsum(counts)[:-1]) if num_bins else []


# ----------------------------------------------------------------------------- building


@numba.njit(cache=True, nogil=True)
def _collate_tokens(ids, levels, offsets, lengths, members, min_level, out_ids, out_labels, out_pos, cu):
    """One pass over the members' tokens: ids, shifted labels, positions, cu_seqlens.
    Returns (number of targets, longest document)."""
    total, targets, longest = 0, 0, 0
    cu[0] = 0
    for b in range(members.shape[0]):
        s = members[b]
        start, n = offsets[s], lengths[s]
        for t in range(n):
            out_ids[total + t] = ids[start + t]
            out_pos[total + t] = t
            if t + 1 < n and levels[start + t + 1] >= min_level:
                out_labels[total + t] = ids[start + t + 1]
                targets += 1
            else:
                out_labels[total + t] = -100
        total += n
        cu[b + 1] = total
        longest = max(longest, n)
    return targets, longest


class SamplePool:
    """Encoded samples in flat arrays (one concatenation), from which bins are planned and built."""

    def __init__(self, samples: list[EncodedSample]) -> None:
        self.samples = samples
        self.lengths = np.fromiter((s.length for s in samples), dtype=np.int64, count=len(samples))
        self.offsets = np.zeros(len(samples), dtype=np.int64)
        if samples:
            np.cumsum(self.lengths[:-1], out=self.offsets[1:])
            self.ids = np.concatenate([s.ids for s in samples])
            self.levels = np.concatenate([s.levels for s in samples])
        else:
            self.ids, self.levels = np.zeros(0, np.int32), np.zeros(0, np.int8)

    def __len__(self) -> int:
        return len(self.samples)

    def plan(self, budget: int) -> list[np.ndarray]:
        return plan_bins(self.lengths, budget)

    def collate(self, members: np.ndarray, *, min_level: int, image_token_id: int) -> PackedBatch:
        """The packed batch of samples ``members`` (pool indices), in that order."""
        members = np.asarray(members, dtype=np.int64)
        total = int(self.lengths[members].sum())
        ids = np.empty(total, dtype=np.int64)
        labels = np.empty(total, dtype=np.int64)
        pos = np.empty(total, dtype=np.int64)
        cu = np.empty(len(members) + 1, dtype=np.int32)
        targets, longest = _collate_tokens(
            self.ids, self.levels, self.offsets, self.lengths, members, min_level, ids, labels, pos, cu
        )
        images = pack_images([im for m in members for im in self.samples[m].images])
        image_positions = np.flatnonzero(ids == image_token_id)
        if image_positions.shape[0] * 4 != images.patches.shape[0]:
            raise ValueError(
                f"packer: {image_positions.shape[0]} placeholders but {images.patches.shape[0]} patches "
                "(expected 4 patches per placeholder); was the sample encoded with this tokenizer?"
            )
        labels_t = torch.from_numpy(labels)
        return PackedBatch(
            input_ids=torch.from_numpy(ids),
            labels=labels_t,
            loss_mask=labels_t != IGNORE_INDEX,
            position_ids=torch.from_numpy(pos),
            cu_seqlens=torch.from_numpy(cu),
            max_seqlen=int(longest),
            image_positions=torch.from_numpy(image_positions),
            patches=images.patches.reshape(-1, PATCH * PATCH * 3),
            pos_hw=images.pos_hw,
            vit_cu_seqlens=images.cu_seqlens,
            vit_max_seqlen=images.max_seqlen,
            grid_hw=images.grid_hw,
            num_targets=int(targets),
            sample_ids=tuple(self.samples[m].sample_id for m in members),
        )


def pack(
    samples: list[EncodedSample], budget: int, *, min_level: int, image_token_id: int
) -> list[PackedBatch]:
    """All of ``samples`` packed into batches of at most ``budget`` tokens (see :func:`plan_bins`)."""
    pool = SamplePool(samples)
    return [pool.collate(b, min_level=min_level, image_token_id=image_token_id) for b in pool.plan(budget)]
