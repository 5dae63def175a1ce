"""Verifiers in worker processes with a timeout, as the report deploys them (§4.5): a verifier that
raises, hangs or returns something other than a number in [0, 1] gives that rollout reward 0 and a
logged reason, and training goes on.

:class:`VerifierPool` keeps ``workers`` processes (forked where the platform allows, so they start
in milliseconds and inherit the verifier function), each serving jobs over a pipe one at a time.
The parent hands each idle worker the next job and waits for answers with ``timeout_s`` per job; a
worker past its deadline is killed and replaced, its job scored 0 ("timeout"). A worker that dies
(a crash in native code) is replaced the same way ("worker died").
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

log = logging.getLogger("trainer.rl")


@dataclass(frozen=True)
class Scored:
    reward: float  # in [0, 1]; 0 when the verifier failed
    info: object = None  # what the verifier returned beside the reward
    reason: str = ""  # why the verifier failed ("" when it did not)


def _serve(fn: Callable, conn: Connection) -> None:
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        try:
            out = fn(job)
            conn.send(("ok", out))
        except Exception as err:  # the verifier's failure is the parent's data, never the worker's end
            last = traceback.format_exception_only(type(err), err)[-1].strip()
            conn.send(("error", last[:300]))


def _check(out: object) -> Scored:
    """A verifier returns a reward or (reward, info); anything else, or a reward outside [0, 1],
    scores 0 with the reason."""
    reward, info = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
    try:
        value = float(reward)
    except (TypeError, ValueError):
        return Scored(0.0, info, f"verifier returned {type(reward).__name__}, not a number")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        return Scored(0.0, info, f"verifier returned {value!r}, outside [0, 1]")
    return Scored(value, info)


class _Worker:
    def __init__(self, ctx, fn: Callable) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(fn, child), daemon=True)
        self.proc.start()
        child.close()
        self.job: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class VerifierPool:
    """``fn(job)`` -> reward (or (reward, info)) on ``workers`` processes, ``timeout_s`` per job."""

    def __init__(self, fn: Callable, *, workers: int = 2, timeout_s: float = 5.0) -> None:
        if workers < 1:
            raise ValueError(f"workers: expected >= 1, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s}")
        self.fn, self.timeout_s = fn, timeout_s
        self._ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self._workers = [_Worker(self._ctx, fn) for _ in range(workers)]
        self.failures: dict[str, int] = {}

    def map(self, jobs: Sequence[object]) -> list[Scored]:
        """Every job's score, in order."""
        out: list[Scored | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))[::-1]
        busy: list[_Worker] = []
        idle = list(self._workers)
        while pending or busy:
            while pending and idle:
                w = idle.pop()
                w.job = pending.pop()
                w.deadline = time.monotonic() + self.timeout_s
                w.conn.send(jobs[w.job])
                busy.append(w)
            timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = wait([w.conn for w in busy], timeout=timeout)
            now = time.monotonic()
            for w in list(busy):
                if w.conn in ready:
                    try:
                        status, value = w.conn.recv()
                    except (EOFError, OSError):
                        out[w.job] = self._fail(w.job, "worker died")
                        busy.remove(w)
                        idle.append(self._replace(w))
                        continue
                    if status == "ok":
                        out[w.job] = _check(value)
                        if out[w.job].reason:
                            self._note(w.job, out[w.job].reason)
                    else:
                        out[w.job] = self._fail(w.job, value)
                    busy.remove(w)
                    idle.append(w)
                elif now >= w.deadline:
                    out[w.job] = self._fail(w.job, f"timeout after {self.timeout_s:g} s")
                    busy.remove(w)
                    idle.append(self._replace(w))
        return out  # type: ignore[return-value]

    def _fail(self, job: int, reason: str) -> Scored:
        self._note(job, reason)
        return Scored(0.0, None, reason)

    def _note(self, job: int, reason: str) -> None:
        """Count the failure by its kind (the reason up to a colon or "after") and log it."""
        kind = reason.split(":")[0].split(" after")[0]
        self.failures[kind] = self.failures.get(kind, 0) + 1
        log.warning("verifier failed on job %d: %s; its reward is 0", job, reason)

    def _replace(self, w: _Worker) -> _Worker:
        w.kill()
        fresh = _Worker(self._ctx, self.fn)
        self._workers[self._workers.index(w)] = fresh
        return fresh

    def close(self) -> None:
        for w in self._workers:
            w.kill()
        self._workers = []

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
