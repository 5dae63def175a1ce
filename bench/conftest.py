"""Benchmark fixtures: ``gpu_bench`` times one implementation of one case and records a row.

On a GPU: do_bench medians (see bench/harness.py), percentages of the matmul peak and copy bandwidth
measured once in this session, ratios to peers measured in the same process, and one JSON per bench
module in bench/results/ (or $SEEDVL_BENCH_RESULTS) at the end; with $SEEDVL_BENCH_JSONL set, each row
is also appended to that file as soon as it is measured. pytest-benchmark's table holds its
own host-timed, synchronised rounds of the same callable; its ``extra_info`` holds the row.
On a CPU: tiny shapes, the reference and the peers only, a host timer (CPU work is synchronous);
nothing is written.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from bench import harness

_RECORDER = pytest.StashKey[harness.Recorder]()

# Each (case, dtype) of a torch.compile'd peer is its own static graph; keep dynamo from giving up
# on a function after its default number of recompilations (and silently running it eagerly).
for _name in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 256)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RECORDER] = harness.Recorder()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    recorder = session.config.stash.get(_RECORDER, None)
    if recorder is not None:
        recorder.written = recorder.write()
    # $SEEDVL_AUTOTUNE_SAVE: the attention configs this session's autotuner chose, for later runs to
    # pin (SEEDVL_AUTOTUNE=pinned with SEEDVL_AUTOTUNE_FILE; see varlen_attention_triton_common).
    save = os.environ.get("SEEDVL_AUTOTUNE_SAVE")
    if save and torch.cuda.is_available():
        from seedvl_kernels.varlen_attention_triton import save_tuning

        save_tuning(save)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    recorder = config.stash.get(_RECORDER, None)
    if recorder is None or not recorder.rows:
        return
    terminalreporter.section("seedvl benchmark rows (median ms; ratio = peer time / time)")
    for line in harness.summary_lines(recorder):
        terminalreporter.write_line(line)
    for path in recorder.written:
        terminalreporter.write_line(f"results written: {path}")
    if recorder.device is not None and recorder.device.type != "cuda":
        terminalreporter.write_line(
            "CPU run: tiny shapes, reference and peers only; results files are written on GPU runs only"
        )


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


@pytest.fixture(scope="session")
def peaks(bench_device: torch.device, pytestconfig: pytest.Config) -> harness.Peaks:
    """Dense matmul peak and device-to-device copy bandwidth, measured once per session."""
    measured = harness.measure_peaks(bench_device)
    recorder = pytestconfig.stash[_RECORDER]
    recorder.device, recorder.peaks = bench_device, measured
    return measured


class GpuBench:
    """``gpu_bench(fn, impl=..., case=..., dtype=..., flops=..., nbytes=..., peers=...)`` -> row dict.

    ``fn`` takes no arguments and runs the work once; build its inputs before the call so that
    nothing but the work is timed. ``peers`` maps a name to a callable doing the same work another
    way (same case); each is timed once per case and session, and the row's ratio_to_peer[name] is
    peer time / this time.
    """

    def __init__(self, request: pytest.FixtureRequest, benchmark, device: torch.device, peaks: harness.Peaks):
        self.op = Path(request.node.fspath).stem.removeprefix("bench_")
        self.recorder: harness.Recorder = request.config.stash[_RECORDER]
        self.benchmark = benchmark
        self.device = device
        self.peaks = peaks
        self.used = False

    def _key(self, case: dict, dtype: torch.dtype, name: str) -> tuple:
        return (self.op, tuple(case.items()), dtype, name)

    def _time(self, name: str, fn: Callable[[], object], case: dict, dtype: torch.dtype) -> float:
        key = self._key(case, dtype, name)
        if key not in self.recorder.times:
            self.recorder.times[key] = harness.time_ms(fn, self.device)
        return self.recorder.times[key]

    def _peer_ms(self, name, impl, ms, fn, case, dtype) -> float | str:
        """The peer's time, or the error it raised."""
        if name == impl:
            return ms
        key = self._key(case, dtype, name)
        if key not in self.recorder.peer_errors:
            try:
                return self._time(name, fn, case, dtype)
            except Exception as err:  # remembered, so a failing compile is not retried for every row
                self.recorder.peer_errors[key] = f"{type(err).__name__}: {err}"[:300]
        return self.recorder.peer_errors[key]

    def __call__(
        self,
        fn: Callable[[], object],
        *,
        impl: str,
        case: dict,
        dtype: torch.dtype,
        flops: float | None = None,
        nbytes: float | None = None,
        peers: dict[str, Callable[[], object]] | None = None,
        notes: str = "",
    ) -> dict:
        if self.used:
            raise RuntimeError("gpu_bench: one measurement per test (pytest-benchmark allows one)")
        self.used = True
        self.benchmark.group = f"{self.op} " + " ".join(f"{k}={v}" for k, v in case.items()) + f" {dtype}"
        # The row's number and its ratios come from one timer (cached per case, so a peer measured for
        # an earlier row is not timed again); pytest-benchmark's table holds its own rounds beside it.
        with harness.quiet_cpu(self.device):
            ms = self._time(impl, fn, case, dtype)
            if self.device.type == "cuda":
                timer = "triton.testing.do_bench median (CUDA events, L2 flushed)"
                self.benchmark.pedantic(
                    harness.synchronised(fn, self.device), rounds=harness.GPU_PEDANTIC_ROUNDS, warmup_rounds=1
                )
            else:
                timer = "host perf_counter median, one thread (CPU work is synchronous)"
                self.benchmark(fn)
            timed_peers, left_out = harness.peers_wanted(peers or {})
            peer_ms = {
                name: self._peer_ms(name, impl, ms, peer_fn, case, dtype)
                for name, peer_fn in timed_peers.items()
            }
        row = harness.make_row(
            self.op, impl, case, dtype, ms, timer, self.peaks, flops=flops, nbytes=nbytes, notes=notes
        )
        for name, value in peer_ms.items():
            if isinstance(value, str):  # a broken peer must not hide this row; its own test fails loudly
                row.peer_errors[name] = value
                row.ratio_to_peer[name] = row.peer_time_ms[name] = None
            else:
                row.peer_time_ms[name] = value
                row.ratio_to_peer[name] = value / ms if ms > 0 else None
        if left_out:
            row.notes = "; ".join(
                filter(None, [row.notes, f"peers not timed ({harness.PEERS_ENV}): {', '.join(left_out)}"])
            )
        self.recorder.add(row)
        harness.append_jsonl(row, self.peaks, self.device)
        info = asdict(row)
        info.update(matmul_peak_tflops=self.peaks.matmul_tflops, copy_peak_gbps=self.peaks.copy_gbps)
        self.benchmark.extra_info.update(info)
        return info


@pytest.fixture
def gpu_bench(
    request: pytest.FixtureRequest, benchmark, bench_device: torch.device, peaks: harness.Peaks
) -> GpuBench:
    return GpuBench(request, benchmark, bench_device, peaks)
