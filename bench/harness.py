"""Benchmark machinery behind bench/conftest.py: timers, measured peaks, rows, result files.

Timing. On a GPU every number is the median of ``triton.testing.do_bench`` (CUDA events around each
call, the L2 cache flushed before each, ~25 ms warmup, ~100 ms of repeats) after one untimed call
(compilation, autotuning, allocator warmup). On a CPU, torch ops are synchronous, so a host timer
around the call is correct (single-threaded, see quiet_cpu); there the numbers only prove that the
harness runs.

A row is one (op, case, dtype, impl): its median time, TFLOP/s and/or GB/s from the FLOPs and bytes
the benchmark declares, the percentage of the device's measured peaks, and peer_time / time for
each peer of the same case (above 1: faster than the peer).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import torch

from seedvl_kernels import _dispatch

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(os.environ.get("SEEDVL_BENCH_RESULTS", REPO / "bench" / "results"))
# Rows are also appended here, one JSON object a line, the moment each is measured: a run killed at
# a time limit (scripts/gpu_pass.sh) still returns every row it finished. Unset: no such file.
JSONL_ENV = "SEEDVL_BENCH_JSONL"
# Comma-separated peer names to time; others are left out of the rows (with a note). Unset: all.
# The GPU pass's curated stage uses it to skip torch.compile'd peers, whose compiles cost minutes.
PEERS_ENV = "SEEDVL_BENCH_PEERS"

# Peak measurements: a dense bf16 GEMM for compute, a large device-to-device copy for memory.
GPU_MATMUL = (8192, torch.bfloat16)
GPU_COPY_BYTES = 1 << 30
CPU_MATMUL = (512, torch.float32)
CPU_COPY_BYTES = 1 << 26
GPU_PEDANTIC_ROUNDS = 10  # pytest-benchmark's own (host, synchronised) rounds next to do_bench


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of one call of ``fn``, measured correctly for ``device``."""
    fn()  # untimed: compilation, autotuning, first allocations
    if device.type == "cuda":
        import triton.testing

        torch.cuda.synchronize(device)
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return host_median_ms(fn)


def host_median_ms(fn: Callable[[], object], min_rounds: int = 10, min_time_s: float = 0.1) -> float:
    """Median of host-timed calls; valid only for synchronous (CPU) work."""
    times: list[float] = []
    while len(times) < min_rounds or (sum(times) < min_time_s and len(times) < 1000):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@contextlib.contextmanager
def quiet_cpu(device: torch.device) -> Iterator[None]:
    """On a CPU, time single-threaded: at tiny shapes, an OpenMP region waiting for a core that
    other processes hold costs milliseconds and swamps the work. GPU runs are left alone."""
    if device.type == "cuda":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def synchronised(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a device synchronisation, so that a host timer sees the GPU work."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


@dataclass(frozen=True)
class Peaks:
    """The device's measured peaks, taken once per session in the same process as every row."""

    matmul_tflops: float
    matmul: str
    copy_gbps: float
    copy: str


def _matmul_ms(n: int, dtype: torch.dtype, device: torch.device) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return time_ms(lambda: torch.matmul(a, b), device)


def _copy_ms(nbytes: int, device: torch.device) -> float:
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), device)


def measure_peaks(device: torch.device) -> Peaks:
    n, dtype = GPU_MATMUL if device.type == "cuda" else CPU_MATMUL
    nbytes = GPU_COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES
    with quiet_cpu(device):
        mm_ms = _matmul_ms(n, dtype, device)
        copy_ms = _copy_ms(nbytes, device)
    return Peaks(
        matmul_tflops=2 * n**3 / (mm_ms * 1e-3) / 1e12,
        matmul=f"torch.matmul {str(dtype).removeprefix('torch.')} {n}x{n}x{n}",
        copy_gbps=2 * nbytes / (copy_ms * 1e-3) / 1e9,
        copy=f"copy_ of {nbytes >> 20} MiB (read + write counted)",
    )


@dataclass
class Row:
    op: str
    impl: str
    case: dict
    dtype: str
    time_ms: float
    timer: str
    tflops: float | None = None
    gbps: float | None = None
    pct_of_matmul_peak: float | None = None
    pct_of_copy_bw: float | None = None
    ratio_to_peer: dict[str, float | None] = field(default_factory=dict)
    peer_time_ms: dict[str, float | None] = field(default_factory=dict)
    peer_errors: dict[str, str] = field(default_factory=dict)
    notes: str = ""


def make_row(
    op: str,
    impl: str,
    case: dict,
    dtype: torch.dtype,
    ms: float,
    timer: str,
    peaks: Peaks,
    *,
    flops: float | None,
    nbytes: float | None,
    notes: str = "",
) -> Row:
    row = Row(op, impl, dict(case), str(dtype).removeprefix("torch."), ms, timer, notes=notes)
    seconds = ms * 1e-3
    if flops is not None and seconds > 0:
        row.tflops = flops / seconds / 1e12
        row.pct_of_matmul_peak = 100 * row.tflops / peaks.matmul_tflops
    if nbytes is not None and seconds > 0:
        row.gbps = nbytes / seconds / 1e9
        row.pct_of_copy_bw = 100 * row.gbps / peaks.copy_gbps
    return row


class Recorder:
    """Rows of this session per op, and times already measured (so that a peer is timed once per case)."""

    def __init__(self) -> None:
        self.rows: dict[str, list[Row]] = {}
        self.times: dict[tuple, float] = {}
        self.peer_errors: dict[tuple, str] = {}
        self.device: torch.device | None = None
        self.peaks: Peaks | None = None
        self.written: list[Path] = []

    def add(self, row: Row) -> None:
        self.rows.setdefault(row.op, []).append(row)

    def write(self, results_dir: Path = RESULTS_DIR) -> list[Path]:
        """One JSON per op: environment, peaks and every row. GPU runs only."""
        if self.device is None or self.device.type != "cuda" or not self.rows:
            return []
        env = environment(self.device)
        results_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for op, rows in self.rows.items():
            path = results_dir / f"{op}_{slug(env['device']['name'])}_{env['date']}.json"
            record = {"op": op, **env, "peaks": asdict(self.peaks), "rows": [asdict(r) for r in rows]}
            path.write_text(json.dumps(record, indent=2) + "\n")
            written.append(path)
        return written


def append_jsonl(row: Row, peaks: Peaks, device: torch.device, path: str | None = None) -> None:
    """Append ``row`` (with the peaks and the device it was measured against) to $SEEDVL_BENCH_JSONL."""
    path = path if path is not None else os.environ.get(JSONL_ENV)
    if not path:
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    record = {**asdict(row), "device": name, "peaks": asdict(peaks), "time": time.time()}
    with open(path, "a") as f:  # one write per line: lines of concurrent writers do not interleave
        f.write(json.dumps(record) + "\n")


def peers_wanted(peers: dict[str, Callable[[], object]]) -> tuple[dict[str, Callable[[], object]], list[str]]:
    """(the peers to time, the names left out) under $SEEDVL_BENCH_PEERS."""
    wanted = os.environ.get(PEERS_ENV)
    if wanted is None:
        return peers, []
    names = {n.strip() for n in wanted.split(",") if n.strip()}
    return {n: f for n, f in peers.items() if n in names}, [n for n in peers if n not in names]


def skip_unless_runnable(op: str, impl: str, device: torch.device, dtype: torch.dtype) -> None:
    """Skip (with the reason) an op implementation this machine cannot time meaningfully."""
    if device.type != "cuda" and impl != "ref":
        pytest.skip(
            f"{op} impl={impl}: CPU runs time the reference only (they prove the harness); "
            "kernels are timed on a GPU"
        )
    reason = _dispatch.unavailable_reason(op, impl, device, dtype)
    if reason is not None:
        pytest.skip(f"{op} impl={impl}: {reason}")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _driver_api_version() -> str | None:
    """Fallback when nvidia-smi is missing: the CUDA driver API version the driver reports."""
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    return f"CUDA driver API {get()}" if get is not None else None


def environment(device: torch.device) -> dict:
    """Device, driver, library versions, git revision and date of this run."""
    now = _dt.datetime.now().astimezone()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        query = [
            "nvidia-smi",
            "--query-gpu=driver_version",
            "--format=csv,noheader",
            f"--id={device.index or 0}",
        ]
        smi = _run(query)
        dev = {
            "name": torch.cuda.get_device_name(device),
            "driver": smi or _driver_api_version(),
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "sm_count": props.multi_processor_count,
        }
    else:
        from trainer.logs import cpu_model  # here: the GPU pass's environment need not hold tqdm

        dev = {"name": cpu_model(), "driver": None, "threads": torch.get_num_threads()}
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "device": dev,
        "versions": {
            "torch": torch.__version__,
            "triton": triton_version,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "git": {"revision": _run(["git", "rev-parse", "HEAD"]), "dirty": bool(status)},
        "date": now.strftime("%Y%m%d"),
        "timestamp": now.isoformat(timespec="seconds"),
        "command": " ".join(["pytest", *sys.argv[1:]]),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_lines(recorder: Recorder) -> list[str]:
    """A plain table of every row, in run order, for the terminal."""
    if not recorder.rows:
        return []
    lines = []
    if recorder.peaks is not None:
        p = recorder.peaks
        lines.append(f"peaks: {p.matmul_tflops:.1f} TFLOP/s ({p.matmul}); {p.copy_gbps:.0f} GB/s ({p.copy})")
    table = [("op", "case", "dtype", "impl", "ms", "TFLOP/s", "GB/s", "%peak", "ratio to peer")]
    for r in (r for rows in recorder.rows.values() for r in rows):
        pct = r.pct_of_copy_bw if r.gbps is not None else r.pct_of_matmul_peak
        table.append(
            (
                r.op,
                " ".join(f"{k}={v}" for k, v in r.case.items()),
                r.dtype,
                r.impl,
                f"{r.time_ms:.4f}",
                _fmt(r.tflops, ".2f"),
                _fmt(r.gbps, ".0f"),
                _fmt(pct, ".1f"),
                " ".join(f"{k}={_fmt(v, '.2f')}" for k, v in r.ratio_to_peer.items()),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        cells = [
            c.ljust(w) if i < 4 or i == 8 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines
