"""Profiling hooks of the training loop: NVTX ranges around the phases of a step, and the step
profiler behind ``--profile-steps A:B`` (see profiles/README.md)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

log = logging.getLogger("trainer")


@contextlib.contextmanager
def nvtx_range(name: str):
    """An NVTX range (for nsys, on a GPU) and a torch profiler range of the same name."""
    with torch.profiler.record_function(name):
        if torch.cuda.is_available():
            torch.cuda.nvtx.range_push(name)
            try:
                yield
            finally:
                torch.cuda.nvtx.range_pop()
        else:
            yield


class StepProfiler:
    """Profiles global steps a..b (inclusive, numbered as in the log, from 1).

    ``mode="torch"``: the torch profiler records CPU (and CUDA) activity, the NVTX/record_function
    ranges included, and writes <out>/profile/trace_steps_a-b.json (Perfetto) and a table of the
    top ops. ``mode="nsys"``: the steps are bracketed by cudaProfilerStart/Stop only, for
    ``nsys profile --capture-range=cudaProfilerApi`` (the torch profiler stays off: both would
    claim CUPTI).
    """

    def __init__(self, steps: tuple[int, int] | None, out_dir: Path, mode: str = "torch") -> None:
        if mode not in ("torch", "nsys"):
            raise ValueError(f"profiler: expected 'torch' or 'nsys', got {mode!r}")
        self.steps, self.out_dir, self.mode = steps, out_dir, mode
        self._cuda = torch.cuda.is_available()
        self._prof = None
        self._active = False

    def begin(self, step: int) -> None:
        if self.steps is None or step != self.steps[0]:
            return
        self._active = True
        log.info("profiling steps %d..%d (%s)", *self.steps, self.mode)
        if self.mode == "nsys":
            if self._cuda:
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStart()
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self._cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self._prof.__enter__()

    def end(self, step: int, force: bool = False) -> None:
        if not self._active or (step < self.steps[1] and not force):
            return
        self._active = False
        if self._cuda:
            torch.cuda.synchronize()
        if self.mode == "nsys":
            if self._cuda:
                torch.cuda.cudart().cudaProfilerStop()
            return
        self._prof.__exit__(None, None, None)
        out = self.out_dir / "profile"
        out.mkdir(parents=True, exist_ok=True)
        trace = out / f"trace_steps_{self.steps[0]}-{step}.json"
        self._prof.export_chrome_trace(str(trace))
        sort = "cuda_time_total" if self._cuda else "cpu_time_total"
        table = self._prof.key_averages().table(sort_by=sort, row_limit=40)
        (out / f"ops_steps_{self.steps[0]}-{step}.txt").write_text(table)
        log.info("profile of steps %d..%d written to %s", self.steps[0], step, trace)
        self._prof = None
