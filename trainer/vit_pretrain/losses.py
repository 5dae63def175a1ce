"""Losses of the ViT pre-training stages, masking under packing, and HOG targets.

MIM (stage ``vit_mim``):
    keep, masked = mask_packed(cu_seqlens, 0.75)  per image, round(25%) of its patches kept (>= 1)
    loss = mean over masked patches p of 1 - cos(prediction_p, target_p)
  The targets are a frozen teacher's patch features or, without a teacher, :func:`hog_colour`:
  MaskFeat's histograms of oriented gradients (:func:`hog`), here per 14x14 patch: 2x2 cells of
  7x7 px, 9 unsigned orientation bins weighted by gradient magnitude, per colour channel (108
  values), the patch's vector L2-normalised; followed by the patch's mean colour (3 values, L2-
  normalised, weight COLOUR_WEIGHT). HOG alone is blind to flat colour, which the paper's teacher
  (EVA02-CLIP) features carry; a ViT pre-trained on HOG alone made the VLM read colour-named
  objects worse than a random ViT (profiles/vit_pretrain.md). MaskFeat regresses HOG with an L2
  loss; on L2-normalised targets the cosine loss used for the teacher differs from it only by the
  prediction's scale.

SigLIP (Zhai et al. 2023), image embeddings x_i and text embeddings y_j L2-normalised:
    logits_ij = exp(t) x_i . y_j + b   (model.vit_heads.SigLIPHead),   z_ij = +1 for a matching pair, else -1
    loss = -(1/N) sum_ij log sigmoid(z_ij logits_ij)          (N images in the global batch)
  The matching pairs are the diagonal and every pair whose captions are the same text (short
  captions such as "a cube" repeat within a batch; they are not negatives of each other).

SuperClass (Huang et al. 2024): the image embedding classifies its caption's bag of subwords:
    w_c = idf_c * bag_ic / sum_c' (idf_c' * bag_ic'),   loss_i = -sum_c w_c log softmax(logits_i)_c
  averaged over images; idf_c = log(D / (1 + df_c)) from the caption bank's document frequencies.

Batch and negatives under data parallelism (``torchrun ... --recipe vit``): a step's global batch
is the one a single process draws; each rank embeds a contiguous share of its images and their
captions (trainer.vit_pretrain.data.shard_bounds), and :func:`gather_embeddings` all-gathers both
towers' rows before their batch normalisation (with gradients flowing back to the rank that made
each row). Every image is thus scored against every caption of the global batch, N^2 pairs for N
images over all ranks, whatever the layout; each rank sums the loss terms of its own images (its
rows against all captions; SuperClass and MIM likewise over its own images) divided by the global
counts, so the ranks' gradients, summed by FSDP2's reduce-scatter, are the single process's. In one
process :func:`gather_embeddings` is the identity.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

HOG_BINS = 9
HOG_CELL = 7
# The mean colour's weight in a HOG target (hog_colour): its share of the target's squared norm is
# 0.25 / 1.25 = 20% wherever the patch has edges, all of it where the patch is flat.
COLOUR_WEIGHT = 0.5


def mask_packed(
    cu_seqlens: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Random masking of each image of a packed batch.

    Args:
        cu_seqlens: (B+1,) int32 image boundaries of the packed patches (CPU).
        ratio: fraction of each image's patches to mask, in [0, 1).
    Returns:
        keep_idx (Tk,) int64 and mask_idx (Tm,) int64, rows of the packed batch in increasing order
        (so the kept patches of an image stay together, in their order); the kept patches'
        cu_seqlens (B+1,) int32 and their longest image (host int). Image i keeps
        max(1, round((1 - ratio) * n_i)) of its n_i patches (none of an empty image).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio: expected a fraction in [0, 1), got {ratio}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"cu_seqlens: expected (B+1,) int32, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    lengths = cu_seqlens.diff().long()
    total = int(cu_seqlens[-1])
    n_keep = torch.where(lengths > 0, ((1.0 - ratio) * lengths.double()).round().long().clamp(min=1), 0)
    image = torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=total)
    # Sorting by image id + a uniform draw shuffles each image's patches without leaving it.
    order = torch.argsort(image.double() + torch.rand(total, generator=generator, dtype=torch.float64))
    rank = torch.empty(total, dtype=torch.long)
    rank[order] = torch.arange(total) - cu_seqlens.long()[image[order]]
    keep = rank < n_keep[image]
    cu_keep = torch.zeros_like(cu_seqlens)
    cu_keep[1:] = n_keep.cumsum(0).to(torch.int32)
    return (
        keep.nonzero().squeeze(1),
        (~keep).nonzero().squeeze(1),
        cu_keep,
        int(n_keep.max()) if n_keep.numel() else 0,
    )


def mim_loss(
    pred: torch.Tensor, target: torch.Tensor, mask_idx: torch.Tensor, total: int | None = None
) -> torch.Tensor:
    """Sum of 1 - cos(pred, target) over the rows ``mask_idx``, / ``total`` (default: their number,
    the mean; a rank of a data-parallel batch passes the batch's masked count); 0 when nothing is
    masked."""
    if mask_idx.numel() == 0:
        return pred.sum() * 0.0
    cos = F.cosine_similarity(pred[mask_idx].float(), target[mask_idx].float(), dim=-1, eps=1e-6)
    return (1.0 - cos).sum() / max(mask_idx.numel() if total is None else total, 1)


def hog(patches: torch.Tensor, patch: int = 14, channels: int = 3) -> torch.Tensor:
    """(T, patch*patch*channels) patches in (row, col, channel) order -> (T, 108) L2-normalised HOG.

    Gradients are central differences inside each patch (edges replicated), so a patch's target
    depends on its own pixels only and packing order does not matter.
    """
    if patches.ndim != 2 or patches.shape[1] != patch * patch * channels:
        raise ValueError(f"patches: expected (T, {patch * patch * channels}), got {tuple(patches.shape)}")
    if patch % HOG_CELL:
        raise ValueError(f"patch: expected a multiple of the {HOG_CELL}-px cell, got {patch}")
    T = patches.shape[0]
    x = patches.float().view(T, patch, patch, channels).permute(0, 3, 1, 2)  # (T, c, p, p)
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = (x[..., 1:-1, 2:] - x[..., 1:-1, :-2]) / 2
    gy = (x[..., 2:, 1:-1] - x[..., :-2, 1:-1]) / 2
    mag = torch.sqrt(gx * gx + gy * gy)
    angle = torch.atan2(gy, gx) % math.pi  # unsigned orientation in [0, pi)
    pos = angle / math.pi * HOG_BINS - 0.5  # soft binning between the two nearest bin centres
    lo = torch.floor(pos)
    frac = pos - lo
    cells = patch // HOG_CELL
    hist = torch.zeros(T, channels, cells, cells, HOG_BINS)
    cell_r = (torch.arange(patch) // HOG_CELL).view(1, 1, patch, 1).expand_as(mag)
    cell_c = (torch.arange(patch) // HOG_CELL).view(1, 1, 1, patch).expand_as(mag)
    flat = hist.view(-1)
    base = (
        torch.arange(T).view(T, 1, 1, 1) * channels + torch.arange(channels).view(1, channels, 1, 1)
    ) * cells * cells + cell_r * cells + cell_c  # fmt: skip
    for b, w in ((lo % HOG_BINS, 1.0 - frac), ((lo + 1) % HOG_BINS, frac)):
        flat.index_add_(0, (base * HOG_BINS + b.long()).reshape(-1), (mag * w).reshape(-1))
    out = hist.view(T, -1)
    return out / out.norm(dim=1, keepdim=True).clamp(min=1e-6)


def patch_colour(patches: torch.Tensor, patch: int = 14, channels: int = 3) -> torch.Tensor:
    """(T, patch*patch*channels) patches -> (T, channels): each patch's mean (normalised) pixel
    value, L2-normalised (zero for a patch whose mean is zero)."""
    if patches.ndim != 2 or patches.shape[1] != patch * patch * channels:
        raise ValueError(f"patches: expected (T, {patch * patch * channels}), got {tuple(patches.shape)}")
    return F.normalize(patches.float().view(-1, patch * patch, channels).mean(1), dim=-1, eps=1e-6)


def hog_colour(patches: torch.Tensor, patch: int = 14, channels: int = 3) -> torch.Tensor:
    """The teacher-free MIM target: (T, 108 + 3) = [HOG (:func:`hog`), COLOUR_WEIGHT x
    :func:`patch_colour`]. Both parts depend on the patch's own pixels only."""
    return torch.cat(
        [hog(patches, patch, channels), COLOUR_WEIGHT * patch_colour(patches, patch, channels)], dim=1
    )


def siglip_loss(
    logits: torch.Tensor, positives: torch.Tensor | None = None, n: int | None = None
) -> torch.Tensor:
    """Sigmoid loss of (R, M) pair logits (model.vit_heads.SigLIPHead: rows are images, columns
    captions); ``positives`` (R, M) bool marks the matching pairs (default: the diagonal, R = M).
    Sum over the pairs / ``n``, the images of the whole batch (default R): a rank that scores only
    its own rows against every caption passes the global count, and the ranks' losses sum to the
    batch's."""
    if logits.ndim != 2:
        raise ValueError(f"logits: expected (R, M), got {tuple(logits.shape)}")
    if positives is None:
        if logits.shape[0] != logits.shape[1]:
            raise ValueError(f"positives: needed for non-square logits {tuple(logits.shape)}")
        positives = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    if positives.shape != logits.shape:
        raise ValueError(f"positives: expected {tuple(logits.shape)}, got {tuple(positives.shape)}")
    z = positives.float() * 2 - 1
    return -F.logsigmoid(z * logits.float()).sum() / max(logits.shape[0] if n is None else n, 1)


def same_caption(captions: list[str]) -> torch.Tensor:
    """(N, N) bool: captions i and j are the same text (the diagonal included)."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    key = torch.tensor([ids[c] for c in captions])
    return key[:, None] == key[None, :]


def superclass_loss(
    logits: torch.Tensor, bags: torch.Tensor, idf: torch.Tensor, n: int | None = None
) -> torch.Tensor:
    """(N, V) logits against (N, V) multi-hot caption bags weighted by idf (V,): the sum over
    captions of the cross-entropy to the normalised weighted bag, / ``n`` (default N: the mean;
    a rank of a data-parallel batch passes the global count). A caption whose ids all have zero
    weight contributes nothing."""
    if logits.shape != bags.shape or idf.shape != logits.shape[1:]:
        raise ValueError(
            f"logits, bags, idf: expected (N, V), (N, V), (V,), got {tuple(logits.shape)}, "
            f"{tuple(bags.shape)}, {tuple(idf.shape)}"
        )
    w = bags.float() * idf.float()
    total = w.sum(1, keepdim=True)
    w = torch.where(total > 0, w / total.clamp(min=1e-12), 0.0)
    return -(w * F.log_softmax(logits.float(), dim=-1)).sum() / max(logits.shape[0] if n is None else n, 1)


def idf_weights(bags: torch.Tensor) -> torch.Tensor:
    """(D, V) multi-hot bags of D captions -> (V,) idf_c = max(0, log(D / (1 + df_c)))."""
    df = bags.float().sum(0)
    return torch.log(bags.shape[0] / (1.0 + df)).clamp(min=0.0)


def gather_embeddings(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All ranks' rows of ``x`` (N_r, E), rank by rank, with gradients back to their rank; the
    identity in one process. ``sizes``: every rank's row count, in rank order (the batch's split is
    known to every rank, so no collective is spent on it). Every rank must call it, with the same E."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    rank = dist.get_rank()
    if len(sizes) != dist.get_world_size() or sizes[rank] != x.shape[0]:
        raise ValueError(
            f"sizes: expected {dist.get_world_size()} row counts with {x.shape[0]} at rank {rank}, "
            f"got {sizes}"
        )
    padded = F.pad(x, (0, 0, 0, max(sizes) - x.shape[0]))
    with warnings.catch_warnings():
        # torch 2.13 points to a private module instead; this public, differentiable all-gather
        # (its backward sums each rank's gradients of the rows back to their rank) is the one we want.
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*", category=FutureWarning)
        parts = all_gather(padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


__all__ = [
    "gather_embeddings",
    "hog",
    "hog_colour",
    "idf_weights",
    "mask_packed",
    "mim_loss",
    "patch_colour",
    "same_caption",
    "siglip_loss",
    "superclass_loss",
]
