"""Vision workload balancing across ranks (report §5.1.2): each image is encoded by the rank that
trainer.balance assigns it to, and its visual tokens come back to the ranks whose placeholders
take them.

Per step, on the host, before the step's first forward (:meth:`VisionBalancer.balance`):

1. metadata: every rank of a balancing group (G consecutive ranks) all-gathers, over a gloo group,
   what each rank holds for each of the step's micro-batches: the (dp replica, index, patch grid)
   of the images whose pixels it sends, and which visual tokens its placeholders take
   (``NeedRuns``: one run without context parallelism, a few per document with it). A few hundred
   bytes a rank; no device synchronisation.
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
encoded once in the whole group and its tokens go straight to the cp rank whose zigzag shard holds
each placeholder: the duplication is gone. Balancing groups are made of whole cp groups (G is a
multiple of cp).

Loading (report §5.1.3): the balancing group is also the loading group of trainer.data.stream,
which decodes each image once in the group and leaves its pixels with the rank that decoded it
(a ``PartialBatch``). The images a rank sends are those it holds (:meth:`VisionBalancer._held`):
the ones it decoded, of any replica of the group; of a whole batch, every cp-th of its own. So a
pixel goes from the rank that decoded it straight to the rank that encodes it. Without balancing,
:meth:`VisionBalancer.fill` sends each image from the rank that decoded it to every rank whose
micro-batch holds it, which then encodes the whole batch as before.

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
from seedvl_kernels.moe_ep import exchange_rows, gather_rows

from ..balance import CostModel, NeedRuns, locate, lpt
from ..data.packer import PackedBatch
from ..data.stream import Held, PartialBatch

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
        send = gather_rows(encoded, self.send_index, self.send_inverse)
        recv = exchange_rows(send, self.send_splits, self.recv_splits, self.group)
        return gather_rows(recv, self.recv_index, self.recv_inverse)


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


@dataclasses.dataclass(frozen=True)
class LoadStats:
    """Pixel bytes (fp32 patches) of one step on this rank: decoded here, and sent to other ranks."""

    decoded_bytes: int
    sent_bytes: int


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
        self.last = LoadStats(0, 0)  # what the latest balance or fill decoded and sent

    def _held(self, batch: PackedBatch) -> Held:
        """The images whose pixels this rank sends: those it decoded (a :class:`PartialBatch` of a
        loading group); of a whole batch, every cp-th image of its own, from its cp rank on."""
        if isinstance(batch, PartialBatch):
            return batch.held
        index = np.arange(self.me % self.cp, batch.num_images, self.cp, dtype=np.int64)
        cu = batch.vit_cu_seqlens.numpy().astype(np.int64)
        rows = np.concatenate([np.arange(cu[j], cu[j + 1]) for j in index] + [np.zeros(0, np.int64)])
        return Held(
            replica=np.full(index.size, self.me // self.cp, dtype=np.int64),
            index=index,
            grid=batch.grid_hw.numpy().astype(np.int64)[index].reshape(-1, 2),
            patches=batch.patches[torch.from_numpy(rows)],
        )

    def balance(self, micro: list[PackedBatch]) -> list[BalancedBatch]:
        """This rank's micro-batches of one step, balanced (a collective over the group)."""
        held, mine = [], []
        for b in micro:
            h = self._held(b)
            if b.visual_index is None:
                rows = np.arange(int(b.grid_hw.prod(1).sum()) // 4 if b.num_images else 0)
            else:
                rows = b.visual_index.numpy()
            held.append(h)
            mine.append((h.replica, h.index, h.grid, NeedRuns.of(rows)))
        gathered: list = [None] * self.group_size
        dist.all_gather_object(gathered, mine, group=self.host_group)
        out = [
            self._one(b, h, [g[m] for g in gathered])
            for m, (b, h) in enumerate(zip(micro, held, strict=True))
        ]
        self.last = LoadStats(sum(h.nbytes for h in held), sum(b.pixel_bytes for b in out))
        return out

    def fill(self, micro: list[PackedBatch]) -> list[PackedBatch]:
        """Without balancing: every rank gets all the pixels of its micro-batches (under cp, each
        rank of the replica all of them) straight from the ranks that decoded them, one
        ``all_to_all_single`` per micro-batch over the group (a collective). Whole batches pass."""
        out, decoded, sent = [], 0, 0
        for b in micro:
            if not isinstance(b, PartialBatch):
                out.append(b)
                continue
            filled, moved = self._fill_one(b)
            out.append(filled)
            decoded, sent = decoded + b.held.nbytes, sent + moved
        self.last = LoadStats(decoded, sent)
        return out

    def _fill_one(self, batch: PartialBatch) -> tuple[PackedBatch, int]:
        G, cp, me = self.group_size, self.cp, self.me
        held = batch.held
        patches = held.grid[:, 0] * held.grid[:, 1]
        start = np.concatenate([[0], np.cumsum(patches)])
        # Send: to each rank of the group, the held images of its replica, in image order.
        send_rows, send_splits = [], []
        for r in range(G):
            sel = np.flatnonzero(held.replica == r // cp)
            sel = sel[np.argsort(held.index[sel], kind="stable")]
            send_rows += [np.arange(start[k], start[k + 1]) for k in sel]
            send_splits.append(int(patches[sel].sum()))
        rows = np.concatenate([*send_rows, np.zeros(0, np.int64)])
        send_px = held.patches[torch.from_numpy(rows)]
        # Receive: this batch's images grouped by the rank that holds them, each group in image order.
        grid = batch.grid_hw.numpy().astype(np.int64).reshape(-1, 2)
        sizes = grid[:, 0] * grid[:, 1]
        source = batch.image_source
        order = np.lexsort((np.arange(sizes.size), source))
        recv_px = send_px.new_empty((int(sizes.sum()), PATCH_DIM))
        dist.all_to_all_single(
            recv_px, send_px.contiguous(), _splits(source, sizes, G), send_splits, group=self.host_group
        )
        at = np.empty(sizes.size, dtype=np.int64)
        at[order] = np.concatenate([[0], np.cumsum(sizes[order])])[:-1]
        gather = np.concatenate(
            [a + np.arange(n) for a, n in zip(at, sizes, strict=True)] + [np.zeros(0, np.int64)]
        )
        pos_hw = [self._window_positions(int(h), int(w)) for h, w in grid]
        filled = batch.complete(
            recv_px[torch.from_numpy(gather)],
            torch.cat(pos_hw) if pos_hw else torch.zeros(0, 2, dtype=torch.int32),
        )
        moved = sum(n for r, n in enumerate(send_splits) if r != me) * PATCH_DIM * 4
        return filled, moved

    def _one(self, batch: PackedBatch, held: Held, meta: list[tuple]) -> BalancedBatch:
        G, cp, me = self.group_size, self.cp, self.me
        # The group's images: (dp replica, index) order; each one's source rank and token offset.
        dgrp, index, grid, source, offset = [], [], [], [], []
        for d in range(G // cp):
            entries = sorted(
                (int(j), tuple(int(x) for x in hw), q)
                for q in range(G)
                for r, j, hw in zip(*meta[q][:3], strict=True)
                if r == d
            )
            if [e[0] for e in entries] != list(range(len(entries))):
                raise RuntimeError(f"vision balance: the group does not hold each image of replica {d} once")
            tokens = np.array([hw[0] * hw[1] // 4 for _, hw, _ in entries], dtype=np.int64)
            dgrp += [d] * len(entries)
            index += [e[0] for e in entries]
            grid += [e[1] for e in entries]
            source += [e[2] for e in entries]
            offset.append(np.cumsum(tokens) - tokens)
        dgrp, index, source = (np.array(x, dtype=np.int64) for x in (dgrp, index, source))
        grid = np.array(grid, dtype=np.int64).reshape(-1, 2)
        offset = np.concatenate(offset) if offset else np.zeros(0, np.int64)
        patches = grid[:, 0] * grid[:, 1]
        encoder = lpt(self.cost.cost(patches, self.rule), G, source)

        # Pixels: my held images to their encoders, in (encoder, dp replica, index) order; my pack
        # in (source, dp replica, index) order, which is each sender's order too.
        sent = np.flatnonzero(source == me)
        sent = sent[np.lexsort((index[sent], dgrp[sent], encoder[sent]))]
        held_patches = held.grid[:, 0] * held.grid[:, 1]
        held_start = np.concatenate([[0], np.cumsum(held_patches)])
        held_at = {(int(r), int(j)): k for k, (r, j) in enumerate(zip(held.replica, held.index, strict=True))}
        rows = [
            np.arange(held_start[k], held_start[k + 1]) for k in (held_at[(dgrp[i], index[i])] for i in sent)
        ]
        send_px = held.patches[torch.from_numpy(np.concatenate(rows))] if rows else held.patches[:0]
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
            owner, at = locate(v_row[sel], [meta[q][3] for q in range(d * cp, (d + 1) * cp)])
            dest[sel], pos[sel] = d * cp + owner, at
        send_order = np.lexsort((pos, dest))
        need = meta[me][3]
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
        plain = batch.complete(batch.patches, batch.pos_hw) if isinstance(batch, PartialBatch) else batch
        encoded = dataclasses.replace(
            plain,
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
