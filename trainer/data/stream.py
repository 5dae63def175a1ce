"""The batch stream: a data source -> encoded samples -> packed batches, resumable by position.

The stream visits the source in a fixed order: an infinite source (the spatial generator) by index,
a finite one (a manifest) by a fresh seeded permutation each epoch. It takes ``window`` samples at a
time, encodes them (bad and over-long samples are reported and dropped), plans them into bins of at
most ``budget`` tokens (first fit, trainer.data.packer) and emits the bins in a seeded shuffled
order, one packed batch per step.

Every batch comes with the :class:`Position` of the next one, (window, bin). Everything is a pure
function of (seed, position, budget), so a checkpoint stores the position and a resumed run
rebuilds the same window and continues with the same batches. A new stage starts at the next whole
window (its budget, and so its bins, differ).

Data parallel: with ``rank``/``ranks``, the stream is cut into groups of ``ranks`` consecutive
batches and a rank builds only the ``rank``-th of each group, paired with the position after the
whole group. Every rank therefore agrees on the position, which is the same as the single-process
stream's after the same batches, and a run resumes under any number of ranks that divides the
micro-batches of its steps.

Parallelism-aware loading (report §5.1.3), with a :class:`Loading` of ``size`` > 1: the ranks of a
loading group (the vision balancing group: whole cp groups, ``replicas`` dp ranks) share the work
of reading and decoding. Rank ``index`` of the group decodes only the samples at window offsets
``o`` with ``o % size == index``; the group then all-gathers the samples' metadata (token ids, loss
levels, image grids, skips: a few bytes a token) and every rank plans the same bins from it. The
pixels stay where they were decoded: each batch comes as a :class:`PartialBatch` whose ``held``
carries the pixels this rank decoded of the images in the matching micro-batches of all the group's
replicas. trainer.parallel.vit_balance then moves each image once, from the rank that decoded it
straight to the rank that encodes it (balanced) or to the ranks whose micro-batch it is in
(``VisionBalancer.fill``). Every rank of the group decodes 1/size of a window instead of all of it.

The metadata all-gather is a collective, so it never runs in a background thread (a rank that stops
early would leave its peers waiting in it): the stream yields a :class:`Gather` request just before
the first batch of a window, and whoever consumes the stream in the main thread runs it
(:class:`Prefetcher` does; :func:`resolve` for a plain loop). Every rank consumes the same number of
items in the same order, so every rank runs the same gathers, and none that a consumer never reaches.

:class:`Prefetcher` builds batches in a background thread (image decoding and packing overlap the
model's step) and pins them for an asynchronous copy when the device is a GPU. Besides, the stream
encodes one window ahead in a thread of its own: a window's samples (decoded or rendered images,
tokens) do not depend on the budget, so while window w is being packed and trained on, window w+1
is already being encoded, and a stage that starts at w+1 (``Position.next_window``) finds its
first window ready instead of stalling for it.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from model.preprocess import PATCH

from . import tokenizer as T
from .chat import Conversation, EncodeConfig, EncodedSample, SampleError, SkipLog, encode_conversation
from .packer import PackedBatch, SamplePool

PATCH_DIM = PATCH * PATCH * 3


class Source(Protocol):
    name: str
    num_samples: int | None  # None: unbounded

    def __getitem__(self, index: int) -> Conversation: ...


@dataclass(frozen=True)
class Position:
    window: int = 0
    bin: int = 0  # next bin to emit within the window

    def next_window(self) -> Position:
        """Where a new stage starts: this window if untouched, else the next one."""
        return self if self.bin == 0 else Position(self.window + 1, 0)


@dataclass(frozen=True)
class Loading:
    """This rank's place in its loading group: ``size`` consecutive ranks (whole cp groups, so
    ``replicas`` = size / cp dp ranks) that decode each window once between them."""

    index: int = 0
    size: int = 1
    replicas: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.size or self.replicas < 1 or self.size % self.replicas:
            raise ValueError(f"Loading: expected 0 <= index < size, replicas dividing size, got {self}")


@dataclass
class Held:
    """Pixels this rank decoded of the images in one step's micro-batches of its loading group:
    image ``index[k]`` of replica ``replica[k]``'s micro-batch (replicas numbered within the group),
    patch grid ``grid[k]``, its patches back to back in ``patches`` (fp32, (sum gh*gw, 588))."""

    replica: np.ndarray  # (K,) int64
    index: np.ndarray  # (K,) int64
    grid: np.ndarray  # (K, 2) int64
    patches: torch.Tensor

    @property
    def nbytes(self) -> int:
        return int(self.patches.nbytes)


@dataclass
class PartialBatch(PackedBatch):
    """A packed batch whose pixels are spread over the loading group: every field describes the
    whole micro-batch (tokens, ``grid_hw`` and ``vit_cu_seqlens`` of all its images) except
    ``patches`` and ``pos_hw``, which are empty; ``image_source`` is the loading-group rank that
    holds each image's pixels and ``held`` what this rank holds. Not a model input:
    trainer.parallel.vit_balance turns it into one."""

    held: Held | None = None
    image_source: np.ndarray | None = None  # (I,) int64

    def _map(self, fn) -> PartialBatch:
        tensors = {
            f.name: fn(getattr(self, f.name))
            for f in dataclasses.fields(PackedBatch)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(
            self, **tensors, held=dataclasses.replace(self.held, patches=fn(self.held.patches))
        )

    def complete(self, patches: torch.Tensor, pos_hw: torch.Tensor) -> PackedBatch:
        """The plain packed batch with all of its images' ``patches`` and ``pos_hw``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(PackedBatch)}
        return PackedBatch(**{**values, "patches": patches, "pos_hw": pos_hw})

    def model_inputs(self) -> dict:
        raise RuntimeError(
            "PartialBatch: its pixels are spread over the loading group; pass it through "
            "VisionBalancer.balance or .fill first"
        )


class Gather:
    """A window's metadata all-gather over the loading group, to be run by the main thread: the
    stream yields it and waits for :meth:`result`; the consumer calls :meth:`run` (or
    :meth:`cancel`, when it stops before reaching it)."""

    def __init__(self, payload: list, group: dist.ProcessGroup) -> None:
        self.payload, self.group = payload, group
        self._future: Future = Future()

    def run(self) -> None:
        out: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(out, self.payload, group=self.group)
        self._future.set_result(out)

    def cancel(self) -> None:
        self._future.cancel()

    def result(self) -> list:
        return self._future.result()


def resolve(it: Iterator) -> Iterator:
    """The items of a stream consumed in this (the main) thread, running its gathers on the way."""
    for item in it:
        if isinstance(item, Gather):
            item.run()
        else:
            yield item


@dataclass
class _Window:
    """A window's usable samples for planning, and per sample the decoding rank, image grids and
    (where this rank decoded it) the sample with its pixels."""

    pool: SamplePool
    source: np.ndarray  # (N,) int64 loading-group rank that decoded each sample
    grids: list[list[tuple[int, int]]]
    local: dict[int, EncodedSample]


class BatchStream:
    def __init__(
        self,
        source: Source,
        tokenizer: T.Tokenizer,
        *,
        seed: int = 0,
        window: int = 256,
        encode: EncodeConfig | None = None,
        skips: SkipLog | None = None,
        loading: Loading | None = None,
    ) -> None:
        if window <= 0:
            raise ValueError(f"window: expected > 0, got {window}")
        self.source, self.tok, self.seed, self.window = source, tokenizer, seed, window
        self.encode = encode if encode is not None else EncodeConfig()
        self.skips = skips if skips is not None else SkipLog()
        self.loading = loading if loading is not None else Loading()
        self._perm: tuple[int, np.ndarray] | None = None
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="encode-ahead")
        self._encoded: dict[int, Future] = {}  # window -> its encoded samples: the current and the next
        self._lock = threading.Lock()

    def sample_index(self, position: int) -> int:
        """Source index of the ``position``-th sample of the stream."""
        n = self.source.num_samples
        if n is None:
            return position
        epoch, offset = divmod(position, n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
        return int(self._perm[1][offset])

    def encode_window(self, window: int, budget: int) -> list[EncodedSample]:
        """The usable samples of ``window`` that this rank decodes (all of them unless it shares a
        loading group), encoded; the others are reported and dropped. Starts encoding window + 1 in
        the background."""
        out = []
        for _, index, sample in self._encoded_window(window):
            if not isinstance(sample, EncodedSample):
                continue  # reported when it was decoded
            if sample.length > budget:
                self._skip_too_long(index, sample.sample_id, sample.length, budget)
                continue
            out.append(sample)
        return out

    def warm(self, window: int) -> None:
        """Start encoding ``window`` in the background (the first window of a run, while the model
        is being built)."""
        with self._lock:
            if window not in self._encoded:
                self._encoded[window] = self._ahead.submit(self._encode, window)

    def _encoded_window(self, window: int) -> list[tuple[int, int, EncodedSample | tuple[str, str]]]:
        """This rank's samples of ``window`` (:meth:`_encode`); starts encoding window + 1."""
        with self._lock:
            future = self._encoded.get(window) or self._ahead.submit(self._encode, window)
            ahead = self._encoded.get(window + 1) or self._ahead.submit(self._encode, window + 1)
            self._encoded = {window: future, window + 1: ahead}
        return future.result()

    def _encode(self, window: int) -> list[tuple[int, int, EncodedSample | tuple[str, str]]]:
        """(window offset, source index, encoded sample or the (cause, message) of its skip) of
        the samples of ``window`` this rank decodes; the skips are reported here."""
        out = []
        for o in range(self.loading.index, self.window, self.loading.size):
            index = self.sample_index(window * self.window + o)
            try:
                sample = encode_conversation(self.source[index], self.tok, self.encode)
            except SampleError as err:
                skip = (err.cause, f"{self.source.name}[{index}]: {err}")
                self.skips.skip(*skip)
                out.append((o, index, skip))
                continue
            out.append((o, index, sample))
        return out

    def _skip_too_long(self, index: int, sample_id: str, length: int, budget: int) -> None:
        self.skips.skip(
            "too long",
            f"{self.source.name}[{index}] ({sample_id}): {length} tokens exceed the step's token "
            f"budget of {budget}",
        )

    def batches(
        self,
        start: Position,
        budget: int,
        *,
        min_level: int,
        rank: int = 0,
        ranks: int = 1,
        group: dist.ProcessGroup | None = None,
    ) -> Iterator[tuple[PackedBatch, Position] | Gather]:
        """Packed batches from ``start`` on, each with the position of the batch after it; with
        ``ranks`` > 1, this rank's share (module docstring). Sharing a loading group (over the
        process group ``group``), the batches are :class:`PartialBatch` es and the stream yields a
        :class:`Gather` before each window's first batch, for the consumer to run."""
        if not 0 <= rank < ranks:
            raise ValueError(f"rank: expected 0 <= rank < ranks = {ranks}, got {rank}")
        if self.loading.size > 1 and (group is None or ranks % self.loading.replicas):
            raise ValueError(
                f"batches: a loading group of {self.loading.size} ranks needs its process group and "
                f"a multiple of its {self.loading.replicas} replicas as ranks, got {group} and {ranks}"
            )
        items = []
        for item in self._bins(start, budget, group):
            if isinstance(item, Gather):
                yield item
                continue
            items.append(item)
            if len(items) == ranks:
                yield self._collate(items, rank, min_level), items[-1][2]
                items = []

    def _bins(
        self, start: Position, budget: int, group: dist.ProcessGroup | None
    ) -> Iterator[tuple[_Window, np.ndarray, Position] | Gather]:
        """(window, sample indices, position after it) of every bin from ``start`` on, preceded in
        a loading group by each window's metadata gather."""
        window, first_bin, empty = start.window, start.bin, 0
        while True:
            if self.loading.size == 1:
                win = _Window(SamplePool(self.encode_window(window, budget)), None, None, None)
            else:
                request = Gather(self._metadata(window), group)
                yield request
                win = self._merge(window, budget, request.result())
            bins = win.pool.plan(budget)
            order = np.random.default_rng([self.seed, window, 1]).permutation(len(bins))
            for k in range(first_bin, len(bins)):
                yield win, bins[order[k]], Position(window, k + 1)
            empty = 0 if bins else empty + 1
            n = self.source.num_samples
            if empty * self.window >= (n if n is not None else 10 * self.window):
                raise RuntimeError(
                    f"{self.source.name}: no usable sample in {empty * self.window} consecutive samples "
                    f"({self.skips.total} skipped: {dict(self.skips.counts)})"
                )
            window, first_bin = window + 1, 0

    def _metadata(self, window: int) -> list[tuple]:
        """What the group needs of this rank's samples of ``window``, by window offset: the token
        ids, loss levels, image grids and sample id (no pixels), or the skip's (cause, message)."""
        out = []
        for o, index, s in self._encoded_window(window):
            if isinstance(s, EncodedSample):
                out.append((o, index, (s.ids, s.levels, [im.grid_hw for im in s.images], s.sample_id)))
            else:
                out.append((o, index, s))
        return out

    def _merge(self, window: int, budget: int, parts: list[list[tuple]]) -> _Window:
        """The window's usable samples in stream order, from every rank's metadata. The other
        ranks' skips are reported here too, so every rank counts the same skips as before."""
        me = self.loading.index
        local = {o: s for o, _, s in self._encoded_window(window)}
        records = sorted((o, q, index, meta) for q, part in enumerate(parts) for o, index, meta in part)
        samples, source, grids, mine = [], [], [], {}
        for o, q, index, meta in records:
            if len(meta) == 2:
                if q != me:
                    self.skips.skip(*meta)
                continue
            ids, levels, hw, sample_id = meta
            if ids.shape[0] > budget:
                self._skip_too_long(index, sample_id, int(ids.shape[0]), budget)
                continue
            if q == me:
                mine[len(samples)] = local[o]
            samples.append(EncodedSample(ids, levels, [], sample_id))
            source.append(q)
            grids.append(hw)
        return _Window(SamplePool(samples), np.array(source, dtype=np.int64), grids, mine)

    def _collate(
        self, items: list[tuple[_Window, np.ndarray, Position]], rank: int, min_level: int
    ) -> PackedBatch:
        """The batch of bin ``items[rank]``; in a loading group a :class:`PartialBatch` holding
        this rank's pixels of the bins of all the group's replicas (``items`` is a dp group)."""
        win, members, _ = items[rank]
        image_id = self.tok.image_token_id
        if self.loading.size == 1:
            return win.pool.collate(members, min_level=min_level, image_token_id=image_id)
        me, replicas = self.loading.index, self.loading.replicas
        base = win.pool.collate(members, min_level=min_level, image_token_id=-1)  # tokens only
        grids = [hw for m in members for hw in win.grids[m]]
        lengths = np.array([h * w for h, w in grids], dtype=np.int64)
        image_positions = np.flatnonzero(base.input_ids.numpy() == image_id)
        if image_positions.shape[0] * 4 != lengths.sum():
            raise ValueError(
                f"stream: {image_positions.shape[0]} placeholders but {lengths.sum()} patches "
                "(expected 4 patches per placeholder); was the sample encoded with this tokenizer?"
            )
        held = ([], [], [], [])  # replica, index, grid, patches
        first = rank - rank % replicas
        for k in range(replicas):
            w, ms, _ = items[first + k]
            j = 0
            for m in ms:
                for t, hw in enumerate(w.grids[m]):
                    if w.source[m] == me:
                        for part, value in zip(held, (k, j, hw, w.local[m].images[t].patches), strict=True):
                            part.append(value)
                    j += 1
        cu = np.zeros(len(grids) + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu[1:])
        values = {f.name: getattr(base, f.name) for f in dataclasses.fields(PackedBatch)}
        return PartialBatch(
            **{
                **values,
                "image_positions": torch.from_numpy(image_positions),
                "patches": torch.zeros(0, PATCH_DIM),
                "pos_hw": torch.zeros(0, 2, dtype=torch.int32),
                "vit_cu_seqlens": torch.from_numpy(cu),
                "vit_max_seqlen": int(lengths.max(initial=0)),
                "grid_hw": torch.tensor(grids, dtype=torch.int32).reshape(-1, 2),
            },
            held=Held(
                replica=np.array(held[0], dtype=np.int64),
                index=np.array(held[1], dtype=np.int64),
                grid=np.array(held[2], dtype=np.int64).reshape(-1, 2),
                patches=torch.cat(held[3]) if held[3] else torch.zeros(0, PATCH_DIM),
            ),
            image_source=np.array([win.source[m] for m in members for _ in win.grids[m]], dtype=np.int64),
        )


class Prefetcher:
    """Runs an iterator in a daemon thread, ``depth`` items ahead; re-raises its errors. A
    :class:`Gather` the iterator yields runs in the consumer's thread when it is reached."""

    _DONE = object()

    def __init__(self, it: Iterator, depth: int = 2, pin: bool = False) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._pin = pin
        self._thread = threading.Thread(target=self._run, args=(it,), daemon=True, name="batch-prefetch")
        self._thread.start()

    def _run(self, it: Iterator) -> None:
        try:
            for item in it:
                if self._pin and not isinstance(item, Gather):
                    item = (item[0].pin_memory(), *item[1:])
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(self._DONE)
        except CancelledError:  # close() cancelled the gather the iterator waited for
            return
        except BaseException as err:  # handed to the consumer, which raises it in the main thread
            self._queue.put(err)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self):
        while True:
            item = self._queue.get()
            if not isinstance(item, Gather):
                break
            item.run()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if isinstance(item, Gather):
                item.cancel()
        self._thread.join()
