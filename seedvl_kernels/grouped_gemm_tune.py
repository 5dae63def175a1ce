"""Tunables of the Triton grouped GEMM (seedvl_kernels.grouped_gemm_triton): its tile configs, the
heuristics that pick one from (N, K, dtype), the persistent-kernel switch, and a tile search keyed
on (N, K, dtype), never on M.

M, the rows routed to the experts, changes every batch; N and K are the expert weights' shape and
stay fixed for a model. So the search runs once per process for each (kernel, N, K, dtype, device,
layout flags) key, on the first launch of that key that has rows, and every later launch of the key
reuses its winner whatever its M: no new batch re-tunes or recompiles (the kernels also mark M
``do_not_specialize``).

$SEEDVL_AUTOTUNE (the switch varlen_attention reads too):

* ``search`` (default): on a CUDA device the first launch of a key times each candidate config
  (``triton.testing.do_bench`` on that launch's own inputs: the kernels overwrite their outputs, so
  running them again is harmless) and keeps the fastest; ties go to the heuristic's config, which is
  listed first. During CUDA-graph capture nothing is timed: the heuristic's config runs and nothing
  is recorded.
* ``pinned``: the heuristic's config (``m_grouped_config`` / ``k_grouped_config``), never timed. The
  GPU pass's curated rows and bitwise-determinism runs use it, so every process runs the same code.

Off CUDA (the Triton interpreter) the heuristic's config always runs. The winner of a search can
differ between processes when two candidates are close, and with it the accumulation order: runs
that compare bits across processes set ``pinned``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import torch

# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class MGroupedConfig:
    """Tiles of the M-grouped kernel (forward, dgrad, and the MoE GEMMs)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int  # M-tiles per swizzle band
    num_warps: int
    num_stages: int
    # launch_m_grouped runs _grouped_gemm_fwd_persistent_kernel instead of one program per tile:
    # ctas_per_sm programs per SM (that kernel's occupancy at these tiles), each looping over tiles.
    # moe_ffn's fused gate-up and down-dgrad kernels have no persistent variant and ignore both.
    persistent: bool = False
    ctas_per_sm: int = 1


@dataclass(frozen=True)
class KGroupedConfig:
    """Tiles of the K-grouped (wgrad) kernel: a BLOCK_K x BLOCK_N tile of dB, BLOCK_R rows a step."""

    block_k: int
    block_n: int
    block_r: int
    group_k: int
    num_warps: int
    num_stages: int


# The interpreter runs each program in numpy: few, mid-sized tiles are fastest there, and 32 keeps
# odd test sizes (16..48) exercising partial tiles and multi-step K loops.
_INTERPRET_M = MGroupedConfig(32, 32, 32, 4, 4, 1)
_INTERPRET_K = KGroupedConfig(32, 32, 32, 4, 4, 1)


# $SEEDVL_GROUPED_GEMM_PERSISTENT=1 makes m_grouped_config pick the persistent kernel (read at each
# launch). The default is 0, one program per tile, until a GPU run shows which is faster
# (profiles/grouped_gemm_persistent.md, scripts/gpu_pass.sh).
PERSISTENT_ENV = "SEEDVL_GROUPED_GEMM_PERSISTENT"


def persistent_default() -> bool:
    """Whether m_grouped_config picks the persistent kernel: $SEEDVL_GROUPED_GEMM_PERSISTENT, else no."""
    value = os.environ.get(PERSISTENT_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"${PERSISTENT_ENV}: expected 0 or 1, got {value!r}")
    return value == "1"


def m_grouped_config(n: int, k: int, dtype: torch.dtype, device: torch.device) -> MGroupedConfig:
    """Tiles for the M-grouped kernel, keyed on (N, K, dtype), never on M (rows change every batch).
    GPU values are starting points for tuning (profiles/moe.md). ctas_per_sm is the persistent
    kernel's occupancy in the offline sm_90a compile (profiles/grouped_gemm.md): it keeps 50-70
    more registers than the one-program-per-tile kernel, 165-254 at these tiles."""
    persistent = persistent_default()
    if device.type != "cuda":
        return replace(_INTERPRET_M, persistent=persistent)
    if dtype == torch.float32:  # IEEE fp32 dots run on FMA units: smaller tiles (persistent: 168 regs)
        return MGroupedConfig(64, 64, 32, 8, 4, 3, persistent, 3)
    block_n = 256 if n >= 2048 else 128  # persistent: 248-254 / 165 registers x 8 warps, 1 CTA per SM
    return MGroupedConfig(128, block_n, 64, 8, 8, 3, persistent, 1)


# What $SEEDVL_AUTOTUNE=search times on a GPU (seedvl_kernels.grouped_gemm_tune), fp16/bf16 only,
# after the heuristic's config. None spills in the offline sm_90a compile at the Qwen3 expert shapes
# (registers 112-192 M-grouped, 96-212 K-grouped; profiles/grouped_gemm.md).
M_CANDIDATES = (
    MGroupedConfig(128, 128, 64, 8, 8, 3),
    MGroupedConfig(128, 256, 64, 8, 8, 3),
    MGroupedConfig(128, 128, 64, 8, 8, 4),
    MGroupedConfig(64, 128, 64, 8, 4, 4),
)
K_CANDIDATES = (
    KGroupedConfig(128, 128, 64, 8, 8, 3),
    KGroupedConfig(128, 256, 64, 8, 8, 3),
    KGroupedConfig(64, 128, 64, 8, 4, 4),
)


def search_candidates(heuristic, dtype: torch.dtype) -> list:
    """The configs a search times: the heuristic's first, then the other candidates of its kind.
    fp32 (FMA dots, not a training dtype here) and the persistent kernel are not searched."""
    if dtype == torch.float32 or getattr(heuristic, "persistent", False):
        return [heuristic]
    pool = M_CANDIDATES if isinstance(heuristic, MGroupedConfig) else K_CANDIDATES
    return [heuristic, *(c for c in pool if c != heuristic)]


def k_grouped_config(n: int, k: int, dtype: torch.dtype, device: torch.device) -> KGroupedConfig:
    """Tiles for the K-grouped (wgrad) kernel."""
    if device.type != "cuda":
        return _INTERPRET_K
    if dtype == torch.float32:  # 4 warps spill here on sm_90 (FMA dots of the transposed A tile)
        return KGroupedConfig(64, 64, 32, 8, 8, 3)
    return KGroupedConfig(128, 128, 64, 8, 8, 3)


# ----------------------------------------------------------------------------- search

AUTOTUNE_ENV = "SEEDVL_AUTOTUNE"
Config = TypeVar("Config")

_chosen: dict[Hashable, object] = {}


def mode() -> str:
    """$SEEDVL_AUTOTUNE: "search" (default) or "pinned"."""
    value = os.environ.get(AUTOTUNE_ENV, "search")
    if value not in ("search", "pinned"):
        raise ValueError(f"${AUTOTUNE_ENV}: expected 'search' or 'pinned', got {value!r}")
    return value


def _time_ms(fn: Callable[[], None]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20)


def _searchable(device: torch.device) -> bool:
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def search(key: Hashable, candidates: Sequence[Config], run: Callable[[Config], None]) -> Config:
    """The fastest of ``candidates`` for ``key``: on the first call for the key each one is timed
    with ``run(config)``; later calls return the remembered winner without running anything."""
    if key not in _chosen:
        times = [_time_ms(lambda c=c: run(c)) for c in candidates]
        _chosen[key] = candidates[times.index(min(times))]
    return _chosen[key]


def choose(
    key: tuple,
    candidates: Sequence[Config],
    run: Callable[[Config], None],
    device: torch.device,
    has_rows: bool,
) -> Config:
    """The config of one launch. ``candidates[0]`` is the heuristic's: it runs under "pinned", off
    CUDA, during graph capture, with a single candidate, and when a not yet searched key comes with
    no rows (an empty launch would time nothing)."""
    searching = mode() == "search" and len(candidates) > 1 and _searchable(device)
    full_key = (device.type, device.index, *key)
    if not searching or (full_key not in _chosen and not has_rows):
        return candidates[0]
    return search(full_key, candidates, run)


def chosen() -> dict[Hashable, object]:
    """The winners so far, by key (device type, device index, kernel, N, K, dtype, layout flags)."""
    return dict(_chosen)


def forget() -> None:
    """Drop every winner (the next launch of each key searches again)."""
    _chosen.clear()
