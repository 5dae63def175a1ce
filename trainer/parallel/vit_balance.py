"""Vision workload balancing across ranks (report §5.1.2): each image is encoded by the rank that
trainer.balance assigns it to, and its visual tokens come back to the ranks whose placeholders
take them.

Per step, on the host, before the step's first forward (:meth:`VisionBalancer.balance`):

1. metadata: every rank of a balancing group (G consecutive ranks) all-gathers, over a gloo group,
   what each rank holds for each of the step's micro-batches: the (index, patch grid) of the images
   whose pixels it sends, and which visual tokens its placeholders take (``NeedRuns``: one run
   without context parallelism, a few per document with it). A few hundred bytes a rank; no
   device synchronisation.
2. plan: every rank computes the same assignment (trainer.balance: LPT by FLOPs, kept local while
   within the mean load) and from it its own send and receive orders.
3. pixels: one ``all_to_all_single`` (gloo, host memory, uneven splits) per micro-batch moves each
   image's patches from the rank that holds them to the one that encodes it, so a rank copies to
   its device only the images it encodes. Pixels have no gradient.

In the forward (``SeedVLM.forward``'s ``visual_route`` hook, :class:`VisualRoute`): the rank
encodes its images (ViT + adapter), then one differentiable all-to-all with uneven splits sends
each visual token to the rank that needs it, in the order its placeholders take them:

    send = encoded[send_index]                         rows grouped by destination rank
    recv = all_to_all(send, send_splits, recv_splits)  rows grouped by encoding rank
    out  = recv[recv_index]                            this rank's placeholders' order

Each step is a permutation, so backward is the same exchange with the splits swapped and gathers
through the inverse permutations (seedvl_kernels.moe_ep's pieces: no scatter-add, deterministic).
The ranks' ViT gradients, summed by FSDP's reduce-scatter, are those of the unbalanced step.

Context parallelism: the cp ranks of a dp replica share their micro-batch's images, and without
balancing every one of them encodes all of them (cp x the ViT work). Balanced, each image is
encoded once in the whole group (image j of a micro-batch is sent by its cp rank j mod cp) and its
tokens go straight to the cp rank whose zigzag shard holds each placeholder: the duplication is
gone. Balancing groups are made of whole cp groups (G is a multiple of cp).

A rank may be given no image: it still runs the ViT on an empty pack (FSDP's collectives) and the
all-to-alls with zero rows.
"""

from __future__ import annotations

import dataclasses
import datetime

import numpy as np
import torch
import torch.distributed as dist

from model.preprocess import PATCH, window_positions
from seedvl_kernels.moe_ep import _AllToAll, _RowGather

from ..balance import CostModel, NeedRuns, locate, lpt
from ..data.packer import PackedBatch

PATCH_DIM = PATCH * PATCH * 3


@dataclasses.dataclass(frozen=True)
class VisualRoute:
    """Encoded visual tokens of this rank's images -> the visual tokens its placeholders take."""

    send_index: torch.Tensor  # (Nenc,) int64, encoded rows in send order
    send_inverse: torch.Tensor
    recv_index: torch.Tensor  # (Nneed,) int64, received row of each placeholder
    recv_inverse: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    group: dist.ProcessGroup

    def to(self, device: torch.device | str, non_blocking: bool = False) -> VisualRoute:
        move = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **move)

    def __call__(self, encoded: torch.Tensor) -> torch.Tensor:
        """(Nenc, D) -> (Nneed, D), differentiable; a collective over the balancing group."""
        send = _RowGather.apply(encoded, self.send_index, self.send_inverse)
        recv = _AllToAll.apply(send, self.send_splits, self.recv_splits, self.group)
        return _RowGather.apply(recv, self.recv_index, self.recv_inverse)


@dataclasses.dataclass
class BalancedBatch:
    """A micro-batch whose images are replaced by those this rank encodes, with the route of their
    visual tokens and what the exchange moved."""

    batch: PackedBatch
    route: VisualRoute
    num_images: int  # images of the micro-batch itself (the step's image count)
    pixel_bytes: int  # pixel bytes this rank sent to other ranks
    token_rows: int  # visual tokens this rank sends to other ranks (forward; as many back in backward)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> BalancedBatch:
        return dataclasses.replace(
            self, batch=self.batch.to(device, non_blocking), route=self.route.to(device, non_blocking)
        )

    def pin_memory(self) -> BalancedBatch:
        return dataclasses.replace(self, batch=self.batch.pin_memory())

    def model_inputs(self) -> dict:
        return {**self.batch.model_inputs(), "visual_index": None, "visual_route": self.route}


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size, dtype=perm.dtype)
    return inv


def _splits(dest: np.ndarray, weight: np.ndarray, size: int) -> list[int]:
    return np.bincount(dest, weights=weight, minlength=size).astype(np.int64).tolist()


class VisionBalancer:
    """Assigns the images of each micro-batch to the ranks of its balancing group and moves them.

    Built on every rank (its process groups are created collectively). ``rule`` is one of
    trainer.balance's cost rules; ``group_size`` divides the world and is a multiple of ``cp``.
    """

    def __init__(self, rule: str, group_size: int, cost: CostModel, *, cp: int, timeout_s: float) -> None:
        self.rule, self.group_size, self.cost, self.cp = rule, group_size, cost, cp
        timeout = datetime.timedelta(seconds=timeout_s)
        self.host_group, _ = dist.new_subgroups(group_size, backend="gloo", timeout=timeout)
        if dist.get_backend() == "gloo":
            self.device_group = self.host_group
        else:
            self.device_group, _ = dist.new_subgroups(group_size, timeout=timeout)
        self.me = dist.get_rank() % group_size  # this rank's index in its group
        self._positions: dict[tuple[int, int], torch.Tensor] = {}

    def _held(self, batch: PackedBatch) -> np.ndarray:
        """Indices of the images whose pixels this rank sends: every cp-th, starting at its cp rank."""
        return np.arange(self.me % self.cp, batch.num_images, self.cp, dtype=np.int64)

    def balance(self, micro: list[PackedBatch]) -> list[BalancedBatch]:
        """This rank's micro-batches of one step, balanced (a collective over the group)."""
        mine = []
        for b in micro:
            held = self._held(b)
            grids = b.grid_hw.numpy().astype(np.int64)[held]
            if b.visual_index is None:
                rows = np.arange(int(b.grid_hw.prod(1).sum()) // 4 if b.num_images else 0)
            else:
                rows = b.visual_index.numpy()
            mine.append((held, grids, NeedRuns.of(rows)))
        gathered: list = [None] * self.group_size
        dist.all_gather_object(gathered, mine, group=self.host_group)
        return [self._one(b, [g[m] for g in gathered]) for m, b in enumerate(micro)]

    def _one(self, batch: PackedBatch, meta: list[tuple[np.ndarray, np.ndarray, NeedRuns]]) -> BalancedBatch:
        G, cp, me = self.group_size, self.cp, self.me
        # The group's images: (dp replica, index) order; each one's source rank and token offset.
        dgrp, index, grid, source, offset = [], [], [], [], []
        for d in range(G // cp):
            ranks = range(d * cp, (d + 1) * cp)
            held = sorted((j, tuple(hw), q) for q in ranks for j, hw in zip(*meta[q][:2], strict=True))
            if [h[0] for h in held] != list(range(len(held))):
                raise RuntimeError(f"vision balance: replica {d}'s ranks do not hold each image once")
            tokens = np.array([hw[0] * hw[1] // 4 for _, hw, _ in held], dtype=np.int64)
            dgrp += [d] * len(held)
            index += [h[0] for h in held]
            grid += [h[1] for h in held]
            source += [h[2] for h in held]
            offset.append(np.cumsum(tokens) - tokens)
        dgrp, index, source = (np.array(x, dtype=np.int64) for x in (dgrp, index, source))
        grid = np.array(grid, dtype=np.int64).reshape(-1, 2)
        offset = np.concatenate(offset) if offset else np.zeros(0, np.int64)
        patches = grid[:, 0] * grid[:, 1]
        encoder = lpt(self.cost.cost(patches, self.rule), G, source)

        # Pixels: my held images to their encoders, in (encoder, index) order; my pack in
        # (source, dp replica, index) order, which is each sender's order too.
        sent = np.flatnonzero(source == me)
        sent = sent[np.lexsort((index[sent], encoder[sent]))]
        cu = batch.vit_cu_seqlens.numpy().astype(np.int64)
        rows = [np.arange(cu[index[i]], cu[index[i] + 1]) for i in sent]
        send_px = batch.patches[torch.from_numpy(np.concatenate(rows))] if rows else batch.patches[:0]
        pack = np.flatnonzero(encoder == me)
        pack = pack[np.lexsort((index[pack], dgrp[pack], source[pack]))]
        recv_px = send_px.new_empty((int(patches[pack].sum()), PATCH_DIM))
        dist.all_to_all_single(
            recv_px, send_px.contiguous(), _splits(source[pack], patches[pack], G),
            _splits(encoder[sent], patches[sent], G), group=self.host_group,
        )  # fmt: skip

        # Tokens back: every encoded row to the cp rank of its replica that needs it.
        tokens = patches // 4
        v_img = np.repeat(pack, tokens[pack])
        v_row = np.concatenate([offset[i] + np.arange(tokens[i]) for i in pack] + [np.zeros(0, np.int64)])
        dest = np.zeros(v_row.size, dtype=np.int64)
        pos = np.zeros(v_row.size, dtype=np.int64)
        for d in np.unique(dgrp[pack]):
            sel = np.flatnonzero(dgrp[v_img] == d)
            owner, at = locate(v_row[sel], [meta[q][2] for q in range(d * cp, (d + 1) * cp)])
            dest[sel], pos[sel] = d * cp + owner, at
        send_order = np.lexsort((pos, dest))
        need = meta[me][2]
        runs = zip(need.start, need.length, strict=True)
        my_rows = np.concatenate([s + np.arange(n) for s, n in runs] + [np.zeros(0, np.int64)])
        my_d = me // cp
        mine = np.flatnonzero(dgrp == my_d)
        img_of = mine[np.searchsorted(offset[mine], my_rows, side="right") - 1] if my_rows.size else mine[:0]
        from_rank = encoder[img_of]
        recv_order = np.lexsort((np.arange(my_rows.size), from_rank))
        recv_index = _inverse(recv_order)
        route = VisualRoute(
            send_index=torch.from_numpy(send_order),
            send_inverse=torch.from_numpy(_inverse(send_order)),
            recv_index=torch.from_numpy(recv_index),
            recv_inverse=torch.from_numpy(recv_order),
            send_splits=np.bincount(dest, minlength=G).tolist(),
            recv_splits=np.bincount(from_rank, minlength=G).tolist(),
            group=self.device_group,
        )

        grids = grid[pack]
        pos_hw = [self._window_positions(int(h), int(w)) for h, w in grids]
        cu_pack = np.concatenate([[0], np.cumsum(patches[pack])]).astype(np.int32)
        encoded = dataclasses.replace(
            batch,
            patches=recv_px,
            pos_hw=torch.cat(pos_hw) if pos_hw else batch.pos_hw[:0],
            vit_cu_seqlens=torch.from_numpy(cu_pack),
            vit_max_seqlen=int(patches[pack].max()) if pack.size else 0,
            grid_hw=torch.from_numpy(grids.astype(np.int32)).reshape(-1, 2),
            visual_index=None,
        )
        moved = sent[encoder[sent] != me]
        return BalancedBatch(
            batch=encoded,
            route=route,
            num_images=batch.num_images,
            pixel_bytes=int(patches[moved].sum()) * PATCH_DIM * 4,
            token_rows=int((dest != me).sum()),
        )

    def _window_positions(self, gh: int, gw: int) -> torch.Tensor:
        key = (gh, gw)
        if key not in self._positions:
            self._positions[key] = window_positions(gh, gw)
        return self._positions[key]


def unwrap(item: PackedBatch | BalancedBatch) -> PackedBatch:
    """The packed batch (with the images this rank encodes) of a plain or balanced micro-batch."""
    return item.batch if isinstance(item, BalancedBatch) else item
