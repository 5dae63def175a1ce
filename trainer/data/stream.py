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

:class:`Prefetcher` builds batches in a background thread (image decoding and packing overlap the
model's step) and pins them for an asynchronous copy when the device is a GPU. Besides, the stream
encodes one window ahead in a thread of its own: a window's samples (decoded or rendered images,
tokens) do not depend on the budget, so while window w is being packed and trained on, window w+1
is already being encoded, and a stage that starts at w+1 (``Position.next_window``) finds its
first window ready instead of stalling for it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from . import tokenizer as T
from .chat import Conversation, EncodeConfig, EncodedSample, SampleError, SkipLog, encode_conversation
from .packer import PackedBatch, SamplePool


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
    ) -> None:
        if window <= 0:
            raise ValueError(f"window: expected > 0, got {window}")
        self.source, self.tok, self.seed, self.window = source, tokenizer, seed, window
        self.encode = encode if encode is not None else EncodeConfig()
        self.skips = skips if skips is not None else SkipLog()
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
        """The usable samples of ``window``, encoded; the others are reported and dropped. Starts
        encoding window + 1 in the background."""
        with self._lock:
            future = self._encoded.get(window) or self._ahead.submit(self._encode, window)
            ahead = self._encoded.get(window + 1) or self._ahead.submit(self._encode, window + 1)
            self._encoded = {window: future, window + 1: ahead}
        out = []
        for index, sample in future.result():
            if sample.length > budget:
                self.skips.skip(
                    "too long",
                    f"{self.source.name}[{index}] ({sample.sample_id}): {sample.length} tokens exceed "
                    f"the step's token budget of {budget}",
                )
                continue
            out.append(sample)
        return out

    def warm(self, window: int) -> None:
        """Start encoding ``window`` in the background (the first window of a run, while the model
        is being built)."""
        with self._lock:
            if window not in self._encoded:
                self._encoded[window] = self._ahead.submit(self._encode, window)

    def _encode(self, window: int) -> list[tuple[int, EncodedSample]]:
        """(source index, encoded sample) of the samples of ``window`` that encode."""
        out = []
        for p in range(window * self.window, (window + 1) * self.window):
            index = self.sample_index(p)
            try:
                out.append((index, encode_conversation(self.source[index], self.tok, self.encode)))
            except SampleError as err:
                self.skips.skip(err.cause, f"{self.source.name}[{index}]: {err}")
        return out

    def batches(
        self, start: Position, budget: int, *, min_level: int, rank: int = 0, ranks: int = 1
    ) -> Iterator[tuple[PackedBatch, Position]]:
        """Packed batches from ``start`` on, each with the position of the batch after it; with
        ``ranks`` > 1, this rank's share (module docstring)."""
        if not 0 <= rank < ranks:
            raise ValueError(f"rank: expected 0 <= rank < ranks = {ranks}, got {rank}")
        group = []
        for item in self._bins(start, budget):
            group.append(item)
            if len(group) == ranks:
                pool, members, _ = group[rank]
                batch = pool.collate(members, min_level=min_level, image_token_id=self.tok.image_token_id)
                yield batch, group[-1][2]
                group = []

    def _bins(self, start: Position, budget: int) -> Iterator[tuple[SamplePool, np.ndarray, Position]]:
        """(pool, sample indices, position after it) of every bin from ``start`` on."""
        window, first_bin, empty = start.window, start.bin, 0
        while True:
            pool = SamplePool(self.encode_window(window, budget))
            bins = pool.plan(budget)
            order = np.random.default_rng([self.seed, window, 1]).permutation(len(bins))
            for k in range(first_bin, len(bins)):
                yield pool, bins[order[k]], Position(window, k + 1)
            empty = 0 if bins else empty + 1
            n = self.source.num_samples
            if empty * self.window >= (n if n is not None else 10 * self.window):
                raise RuntimeError(
                    f"{self.source.name}: no usable sample in {empty * self.window} consecutive samples "
                    f"({self.skips.total} skipped: {dict(self.skips.counts)})"
                )
            window, first_bin = window + 1, 0


class Prefetcher:
    """Runs an iterator in a daemon thread, ``depth`` items ahead; re-raises its errors."""

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
                if self._pin:
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
        except BaseException as err:  # handed to the consumer, which raises it in the main thread
            self._queue.put(err)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
