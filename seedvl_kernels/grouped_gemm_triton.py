"""Triton grouped GEMM: the ``triton`` implementation of seedvl::grouped_gemm and grouped_gemm_dw.

Math: see seedvl_kernels.grouped_gemm. Two kernels, both with fp32 accumulators (fp32 inputs use
IEEE fp32 dots, never TF32) rounded once to the output dtype:

* ``_grouped_gemm_fwd_kernel``, grouped over M (the forward and dgrad): out rows of group e =
  a rows of group e @ b[e] (or b[e]^T; trans_b is only a stride swap). Rows past offsets[-1] are a
  padding "group" E whose tiles skip the K loop and store zeros.
* ``_grouped_gemm_dw_kernel``, grouped over K (wgrad): dB[e] = a_e^T @ dC_e, a fixed-order loop
  over the rows of group e. An empty group runs the loop zero times and stores exact zeros; no
  split-K, no atomics, so every output element has one writer and the result is bitwise
  reproducible.

Tile schedule (no host synchronisation). The host knows neither the group sizes nor the number of
M-tiles, only a bound: sum_e cdiv(size_e, BLOCK_M) over the E groups plus the padding group is at
most cdiv(M, BLOCK_M) + E. The grid is that bound times the N-tiles; each program reads offsets
(E+1 int32) on the device, computes the per-group tile counts and their inclusive prefix sum in
registers (one vector of next_pow2(E+1) lanes) and finds its group as the number of groups whose
prefix sum is <= its M-tile index. Programs past the real tile count get an empty row range and
run no K iterations (a masked store of nothing). M-tiles are swizzled in bands of GROUP_M so that
the few M-tiles of one expert run next to each other and share the expert's B tiles in L2.

Persistent variant (``_grouped_gemm_fwd_persistent_kernel``, ``MGroupedConfig.persistent``): a grid
of #SMs x ctas_per_sm programs (capped at the tile bound); each builds the tile table once, takes
the real tile count from it, and loops over tiles pid, pid + #programs, ... in the same swizzled
order, so no program is spent on a surplus tile (up to E x N-tiles of them in the one-program-per-
tile grid) and the table's prefix sum runs once per program instead of once per tile. The tile body
is the same function (``_m_grouped_tile``), so both variants compute every output element the same
way, bit for bit. Which one runs: ``m_grouped_config`` sets ``persistent`` from
$SEEDVL_GROUPED_GEMM_PERSISTENT (default 0: one program per tile; no GPU has timed the two yet), and
a caller can pass its own ``config``.

Tiles: a launcher given no ``config`` takes it from seedvl_kernels.grouped_gemm_tune, the heuristic
of (N, K, dtype) or, under $SEEDVL_AUTOTUNE=search on a GPU, the fastest of a few candidates timed on
the first launch of each (N, K, dtype, layout) key and reused for every later M.

The dW kernel's grid is (K-tiles x N-tiles, E); its axis 1 walks the groups in decreasing size
(a device-side argsort of the group sizes), so under skewed routing the longest programs start
first and the short ones fill in behind them.

Row indirection (used by seedvl_kernels.moe_ffn_triton; all optional, one constexpr each):
``a_rows`` gathers the A operand's rows (a row of permuted row r is a_rows[r], so no permuted copy
of the tokens is materialised), ``out_rows`` scatters output rows (each written exactly once: it is
a permutation), ``row_scale`` multiplies output row r by an fp32 factor in the epilogue, and in the
dW kernel ``c_rows`` gathers the dC operand's rows and ``c_scale`` multiplies row r of the product
by an fp32 factor (applied to the A tile on load: a row factor of the contraction may sit on either
operand, and on A it keeps the wgrad's wgmma pipelined).

No alignment requirements: loads are masked pointer loads with arbitrary strides (any K, N, row
stride and storage offset); Triton specialises on 16-byte divisibility and merely vectorises less
when it is absent.

Cost: the M-grouped kernel reads each A tile once per N-tile and each B tile once per M-tile of its
group (L2 absorbs most of it with the swizzle); padding inside tiles costs sum_e (cdiv(size_e,
BLOCK_M) * BLOCK_M - size_e) wasted rows (bench/bench_moe.py reports the fraction).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import grouped_gemm_tune
from .grouped_gemm_tune import (  # noqa: F401  (the tunables' home; re-exported for callers)
    K_CANDIDATES,
    M_CANDIDATES,
    PERSISTENT_ENV,
    KGroupedConfig,
    MGroupedConfig,
    k_grouped_config,
    m_grouped_config,
    persistent_default,
    search_candidates,
)

# ----------------------------------------------------------------------------- helpers


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use IEEE dots (the reference's accuracy); fp16/bf16 ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def groups_pow2(num_groups: int) -> int:
    """Lanes of the schedule vector: the E groups plus the padding group, a power of two >= 2."""
    return max(2, triton.next_power_of_2(num_groups + 1))


def num_m_tiles_bound(m: int, num_groups: int, block_m: int) -> int:
    """Upper bound of sum_e cdiv(size_e, BLOCK_M) over the groups and the padding group."""
    return triton.cdiv(m, block_m) + num_groups


# Programs "per SM" off a GPU: the interpreter runs them one after another, so a few, each looping
# over several tiles, is what exercises the persistent loop.
_INTERPRET_SMS = 3


@functools.lru_cache(maxsize=16)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the persistent grid's unit); _INTERPRET_SMS off CUDA."""
    if device.type != "cuda":
        return _INTERPRET_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Linear program id -> (pid_m, pid_n), M-tiles in bands of GROUP_M (N fastest across a band)."""
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _m_tile_table(offsets_ptr, M, NUM_GROUPS: tl.constexpr, GROUPS_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """The M-tile table from the device-side offsets, one lane per group: (row starts, row ends,
    tile counts, inclusive prefix sum of the tile counts). Lane NUM_GROUPS is the padding rows
    [offsets[E], M); lanes past it are empty."""
    g = tl.arange(0, GROUPS_POW2)
    start = tl.load(offsets_ptr + g, mask=g <= NUM_GROUPS, other=0)
    end = tl.load(offsets_ptr + g + 1, mask=g < NUM_GROUPS, other=0)
    end = tl.where(g == NUM_GROUPS, M, end)
    tiles = tl.where(g <= NUM_GROUPS, (end - start + BLOCK_M - 1) // BLOCK_M, 0)
    return start, end, tiles, tl.cumsum(tiles, 0)


@triton.jit
def _m_tile_lookup(start, end, tiles, last, pid_m, GROUPS_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """M-tile index -> (group, row_start, row_end) in the table of _m_tile_table; a tile index past
    the real count gets a group > NUM_GROUPS and an empty row range."""
    g = tl.arange(0, GROUPS_POW2)
    group = tl.sum((last <= pid_m).to(tl.int32), 0)
    sel = g == group
    first = tl.sum(tl.where(sel, last - tiles, 0), 0)
    row_start = tl.sum(tl.where(sel, start, 0), 0) + (pid_m - first) * BLOCK_M
    row_end = tl.sum(tl.where(sel, end, 0), 0)
    return group, row_start, row_end


@triton.jit
def _m_tile(
    offsets_ptr, pid_m, M, NUM_GROUPS: tl.constexpr, GROUPS_POW2: tl.constexpr, BLOCK_M: tl.constexpr
):
    """M-tile index -> (group, row_start, row_end), read from the device-side offsets."""
    start, end, tiles, last = _m_tile_table(offsets_ptr, M, NUM_GROUPS, GROUPS_POW2, BLOCK_M)
    return _m_tile_lookup(start, end, tiles, last, pid_m, GROUPS_POW2, BLOCK_M)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _m_grouped_tile(
    a_ptr,
    b_ptr,
    out_ptr,
    a_rows_ptr,
    out_rows_ptr,
    row_scale_ptr,
    group,
    row_start,
    row_end,
    pid_n,
    N,
    K,
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_om,
    stride_on,
    NUM_GROUPS: tl.constexpr,
    GATHER_A: tl.constexpr,
    SCATTER_OUT: tl.constexpr,
    SCALE_OUT: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N output tile of the M-grouped GEMM: rows [row_start, row_end) of
    ``group`` (a group >= NUM_GROUPS runs no K steps and stores zeros, or nothing for an empty
    range), columns from pid_n * BLOCK_N."""
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < row_end
    mask_n = offs_n < N
    if GATHER_A:
        a_rows = tl.load(a_rows_ptr + offs_m, mask=mask_m, other=0)
    else:
        a_rows = offs_m
    a_ptrs = a_ptr + a_rows[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = (
        b_ptr + group.to(tl.int64) * stride_be + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    )

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_k = tl.where(group < NUM_GROUPS, tl.cdiv(K, BLOCK_K), 0)  # padding / surplus tiles: none
    for ki in range(0, num_k):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            k_left = K - ki * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if SCALE_OUT:
        scale = tl.load(row_scale_ptr + offs_m, mask=mask_m, other=0.0)
        acc = acc * tl.where(group < NUM_GROUPS, scale, 0.0)[:, None]  # padding rows stay exactly 0
    if SCATTER_OUT:
        out_rows = tl.load(out_rows_ptr + offs_m, mask=mask_m, other=0)
    else:
        out_rows = offs_m
    out_ptrs = out_ptr + out_rows[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M"])
def _grouped_gemm_fwd_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    offsets_ptr,
    a_rows_ptr,
    out_rows_ptr,
    row_scale_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_om,
    stride_on,
    NUM_GROUPS: tl.constexpr,
    GROUPS_POW2: tl.constexpr,
    GATHER_A: tl.constexpr,
    SCATTER_OUT: tl.constexpr,
    SCALE_OUT: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M) + NUM_GROUPS
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    group, row_start, row_end = _m_tile(offsets_ptr, pid_m, M, NUM_GROUPS, GROUPS_POW2, BLOCK_M)
    _m_grouped_tile(
        a_ptr,
        b_ptr,
        out_ptr,
        a_rows_ptr,
        out_rows_ptr,
        row_scale_ptr,
        group,
        row_start,
        row_end,
        pid_n,
        N,
        K,
        stride_am,
        stride_ak,
        stride_be,
        stride_bk,
        stride_bn,
        stride_om,
        stride_on,
        NUM_GROUPS,
        GATHER_A,
        SCATTER_OUT,
        SCALE_OUT,
        EVEN_K,
        DOT_PRECISION,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )


@triton.jit(do_not_specialize=["M"])
def _grouped_gemm_fwd_persistent_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    offsets_ptr,
    a_rows_ptr,
    out_rows_ptr,
    row_scale_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_om,
    stride_on,
    NUM_GROUPS: tl.constexpr,
    GROUPS_POW2: tl.constexpr,
    GATHER_A: tl.constexpr,
    SCATTER_OUT: tl.constexpr,
    SCALE_OUT: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # The tile table is built once per program; the real tile count (not the host's bound) ends
    # the loop, so no program runs an empty tile. Tiles go round-robin over the programs in the
    # swizzled order, so the programs running at one time share each expert's B tiles in L2.
    start, end, tiles, last = _m_tile_table(offsets_ptr, M, NUM_GROUPS, GROUPS_POW2, BLOCK_M)
    num_pid_m = tl.sum(tiles, 0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0)):
        pid_m, pid_n = _swizzle(tile, num_pid_m, num_pid_n, GROUP_M)
        group, row_start, row_end = _m_tile_lookup(start, end, tiles, last, pid_m, GROUPS_POW2, BLOCK_M)
        _m_grouped_tile(
            a_ptr,
            b_ptr,
            out_ptr,
            a_rows_ptr,
            out_rows_ptr,
            row_scale_ptr,
            group,
            row_start,
            row_end,
            pid_n,
            N,
            K,
            stride_am,
            stride_ak,
            stride_be,
            stride_bk,
            stride_bn,
            stride_om,
            stride_on,
            NUM_GROUPS,
            GATHER_A,
            SCATTER_OUT,
            SCALE_OUT,
            EVEN_K,
            DOT_PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
        )


@triton.jit
def _grouped_gemm_dw_kernel(
    a_ptr,
    c_ptr,
    out_ptr,
    offsets_ptr,
    order_ptr,
    a_rows_ptr,
    c_rows_ptr,
    c_scale_ptr,
    K,
    N,
    stride_am,
    stride_ak,
    stride_cm,
    stride_cn,
    stride_oe,
    stride_ok,
    stride_on,
    GATHER_A: tl.constexpr,
    GATHER_C: tl.constexpr,
    SCALE_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_K: tl.constexpr,
):
    pid_k, pid_n = _swizzle(tl.program_id(0), tl.cdiv(K, BLOCK_K), tl.cdiv(N, BLOCK_N), GROUP_K)
    group = tl.load(order_ptr + tl.program_id(1))
    start = tl.load(offsets_ptr + group)
    end = tl.load(offsets_ptr + group + 1)

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):  # fixed order over the group's rows; empty group: no steps
        rows = r0 + offs_r
        mask_r = rows < end
        if GATHER_A:
            a_rows = tl.load(a_rows_ptr + rows, mask=mask_r, other=0)
        else:
            a_rows = rows
        if GATHER_C:
            c_rows = tl.load(c_rows_ptr + rows, mask=mask_r, other=0)
        else:
            c_rows = rows
        a = tl.load(
            a_ptr + a_rows[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak,
            mask=mask_r[:, None] & mask_k[None, :],
            other=0.0,
        )
        c = tl.load(
            c_ptr + c_rows[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn,
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )
        if SCALE_C:
            # sum_r a[r]^T (s[r] c[r]) = sum_r (s[r] a[r])^T c[r]: the row factor goes on A, the
            # operand wgmma takes from registers, so c's tiles go from the pipelined shared-memory
            # buffers straight to the tensor cores (scaling c in registers forced a shared-memory
            # round trip and wait_group 0 every step). Rounded to the operand dtype, as an unfused
            # scale-then-GEMM would be.
            scale = tl.load(c_scale_ptr + rows, mask=mask_r, other=0.0)
            a = (a.to(tl.float32) * scale[:, None]).to(a_ptr.dtype.element_ty)
        acc = tl.dot(tl.trans(a), c, acc, input_precision=DOT_PRECISION)

    out_ptrs = (
        out_ptr + group.to(tl.int64) * stride_oe + offs_k[:, None] * stride_ok + offs_n[None, :] * stride_on
    )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------- launchers


def launch_m_grouped(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    out: torch.Tensor,
    trans_b: bool,
    *,
    a_rows: torch.Tensor | None = None,
    out_rows: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    config: MGroupedConfig | None = None,
) -> None:
    """out[row r] = a[row r] @ b[group of r] (b[e]^T with trans_b) for the M rows of the offsets
    space (M = a_rows.numel() with a gather, else a.shape[0]), with the optional row indirections of
    the module docstring; rows past offsets[-1] become zeros. Writes every row of ``out`` that the
    M rows map to."""
    num_groups = offsets.shape[0] - 1
    m = a_rows.numel() if a_rows is not None else a.shape[0]
    k = a.shape[1]
    if trans_b:
        n, stride_bk, stride_bn = b.shape[1], b.stride(2), b.stride(1)
    else:
        n, stride_bk, stride_bn = b.shape[2], b.stride(1), b.stride(2)
    if config is None:
        flags = (trans_b, a_rows is not None, out_rows is not None, row_scale is not None)
        key = ("m_grouped", n, k, a.dtype, *flags)  # never M: see grouped_gemm_tune
        candidates = search_candidates(m_grouped_config(n, k, a.dtype, a.device), a.dtype)

        def run(c: MGroupedConfig) -> None:
            launch_m_grouped(
                a, b, offsets, out, trans_b, a_rows=a_rows, out_rows=out_rows, row_scale=row_scale, config=c
            )

        config = grouped_gemm_tune.choose(key, candidates, run, a.device, has_rows=m > 0 and n > 0 and k > 0)
    cfg = config
    tiles = num_m_tiles_bound(m, num_groups, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    if tiles == 0:
        return
    if cfg.persistent:
        kernel, grid = _grouped_gemm_fwd_persistent_kernel, (min(tiles, num_sms(a.device) * cfg.ctas_per_sm),)
    else:
        kernel, grid = _grouped_gemm_fwd_kernel, (tiles,)
    kernel[grid](
        a,
        b,
        out,
        offsets,
        a_rows if a_rows is not None else offsets,
        out_rows if out_rows is not None else offsets,
        row_scale if row_scale is not None else offsets,
        m,
        n,
        k,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        stride_bk,
        stride_bn,
        out.stride(0),
        out.stride(1),
        NUM_GROUPS=num_groups,
        GROUPS_POW2=groups_pow2(num_groups),
        GATHER_A=a_rows is not None,
        SCATTER_OUT=out_rows is not None,
        SCALE_OUT=row_scale is not None,
        EVEN_K=k % cfg.block_k == 0,
        DOT_PRECISION=dot_precision(a.dtype),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def group_order(offsets: torch.Tensor) -> torch.Tensor:
    """Groups by decreasing size (ties by index), int32 on the device: the dW kernel's launch order."""
    sizes = offsets[1:] - offsets[:-1]
    return torch.argsort(sizes, descending=True, stable=True).to(torch.int32)


def launch_k_grouped(
    a: torch.Tensor,
    c: torch.Tensor,
    offsets: torch.Tensor,
    out: torch.Tensor,
    trans_b: bool,
    *,
    a_rows: torch.Tensor | None = None,
    c_rows: torch.Tensor | None = None,
    c_scale: torch.Tensor | None = None,
    config: KGroupedConfig | None = None,
) -> None:
    """out[e] = a_e^T @ c_e (K, N), stored transposed (N, K) with trans_b, where rows r of group e
    read a[a_rows[r]] and c[c_rows[r]], their product scaled by c_scale[r], when given. Writes all of
    ``out``."""
    num_groups = offsets.shape[0] - 1
    k, n = a.shape[1], c.shape[1]
    if trans_b:
        stride_ok, stride_on = out.stride(2), out.stride(1)
    else:
        stride_ok, stride_on = out.stride(1), out.stride(2)
    if config is None:
        flags = (trans_b, a_rows is not None, c_rows is not None, c_scale is not None)
        key = ("k_grouped", n, k, a.dtype, *flags)  # never the rows: see grouped_gemm_tune
        candidates = search_candidates(k_grouped_config(n, k, a.dtype, a.device), a.dtype)
        rows = a_rows.numel() if a_rows is not None else a.shape[0]

        def run(cfg: KGroupedConfig) -> None:
            launch_k_grouped(
                a, c, offsets, out, trans_b, a_rows=a_rows, c_rows=c_rows, c_scale=c_scale, config=cfg
            )

        has_rows = rows > 0 and n > 0 and k > 0 and num_groups > 0
        config = grouped_gemm_tune.choose(key, candidates, run, a.device, has_rows=has_rows)
    cfg = config
    grid = (triton.cdiv(k, cfg.block_k) * triton.cdiv(n, cfg.block_n), num_groups)
    if grid[0] * grid[1] == 0:
        return
    _grouped_gemm_dw_kernel[grid](
        a,
        c,
        out,
        offsets,
        group_order(offsets),
        a_rows if a_rows is not None else offsets,
        c_rows if c_rows is not None else offsets,
        c_scale if c_scale is not None else offsets,
        k,
        n,
        a.stride(0),
        a.stride(1),
        c.stride(0),
        c.stride(1),
        out.stride(0),
        stride_ok,
        stride_on,
        GATHER_A=a_rows is not None,
        GATHER_C=c_rows is not None,
        SCALE_C=c_scale is not None,
        DOT_PRECISION=dot_precision(a.dtype),
        BLOCK_K=cfg.block_k,
        BLOCK_N=cfg.block_n,
        BLOCK_R=cfg.block_r,
        GROUP_K=cfg.group_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def launch_grouped_gemm(
    a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor, trans_b: bool
) -> None:
    """The ``triton`` entry of grouped_gemm's _LAUNCH (forward and dgrad)."""
    launch_m_grouped(a, b, offsets, out, trans_b)


def launch_grouped_gemm_dw(
    a: torch.Tensor, grad_out: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor, trans_b: bool
) -> None:
    """The ``triton`` entry of grouped_gemm's _LAUNCH_DW (wgrad)."""
    launch_k_grouped(a, grad_out, offsets, out, trans_b)
