"""Shared pieces of the varlen_attention Triton kernels: autotune configs, the device-built schedule
(see the design notes in :mod:`seedvl_kernels.varlen_attention_triton`) and device helpers for tiles,
padding and 2D RoPE."""

from __future__ import annotations

import functools
import json
import os

import triton
import triton.language as tl

from . import _backends

# (num_warps, num_stages) tried by the autotuner per kernel. Offline compiles for sm_90 (bf16, head
# dim 64: profiles/triton_aot.py) show dK/dV spilling with 4 warps, so it gets 8 only.
# The backward's deeper pipelines (4-5 stages) are in where registers allow (profiles/varlen_attention.md,
# 2026-12-02): dQ never spills at 4-5 stages; dK/dV at 4 stages takes 230 registers at D=64 and 217
# at D=80 but spills 200 B at D=128, so searched() keeps it to head dims up to 96.
_PAIRS = {
    "fwd": [(4, 2), (4, 3), (8, 2), (8, 3)],
    "dkdv": [(8, 2), (8, 3), (8, 4)],
    "dq": [(4, 2), (8, 2), (8, 3), (4, 4), (8, 4), (4, 5)],
    # The warp-specialized forward (varlen_attention_triton_fwd_ws): num_warps is per partition (the
    # launch runs 3 x 4 warps); Triton 3.9 leaves an 8-warp launch unpartitioned.
    "fwd_ws": [(4, 2), (4, 3)],
}
# The forward's key block is an autotune dimension on a GPU: BLOCK_N 64 with every pair above, and
# 128 (half the softmax row reductions a key) with the pairs that do not spill there (8 warps: 186
# and 178 registers at D=64; every 128-key config spills or fills shared memory at D=128,
# profiles/varlen_attention_pipelining.md), searched at head dims up to 64 only (``searched``).
FWD_BLOCK_N = 64
WIDE_N_PAIRS = [(8, 2), (8, 3)]


def configs(kernel: str) -> list[triton.Config]:
    """A handful of configs for ``kernel``; the interpreter gets exactly one (no tuning runs; the
    forward's BLOCK_N then comes from the launcher, the interpreter's tiles)."""
    if _backends.triton_interpret():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    if kernel == "fwd":
        out = [triton.Config({"BLOCK_N": FWD_BLOCK_N}, num_warps=w, num_stages=s) for w, s in _PAIRS[kernel]]
        return out + [triton.Config({"BLOCK_N": 128}, num_warps=w, num_stages=s) for w, s in WIDE_N_PAIRS]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in _PAIRS[kernel]]


TUNE_KEY = ["HEAD_DIM", "CAUSAL", "ROPE", "BLOCK_M", "BLOCK_N", "DOT_PREC"]
FWD_TUNE_KEY = ["HEAD_DIM", "CAUSAL", "ROPE", "BLOCK_M", "DOT_PREC"]  # BLOCK_N is tuned
WS_TUNE_KEY = ["HEAD_DIM", "CAUSAL", "BLOCK_M", "BLOCK_N", "DOT_PREC"]  # q arrives rotated: no ROPE
TUNE_KEYS = {"fwd": FWD_TUNE_KEY, "dkdv": TUNE_KEY, "dq": TUNE_KEY, "fwd_ws": WS_TUNE_KEY}

# Autotuning, deterministic and cheap. $SEEDVL_AUTOTUNE (read at each new shape class):
#   "search" (default): time every config of _PAIRS once per shape class (the kernel's TUNE_KEYS +
#       dtype), as Triton's autotuner does; the winner can differ from run to run when two are close.
#   "pinned": one config per shape class, no timing: the one $SEEDVL_AUTOTUNE_FILE records for this
#       GPU, else _PINNED's for the kernel and head-dim class. Benchmarks and bitwise-determinism tests
#       run this way, so every run (and every process) of a shape class compiles and runs the same
#       code, reducing in the same order, and only one config is compiled.
# The file is JSON, {gpu name: {kernel: {shape class: [num_warps, num_stages]}}} (a third element,
# the forward's BLOCK_N, when it is not 64), as written by varlen_attention_triton.save_tuning()
# after a search on that GPU.
AUTOTUNE_ENV = "SEEDVL_AUTOTUNE"
AUTOTUNE_FILE_ENV = "SEEDVL_AUTOTUNE_FILE"


def shape_class(args: dict, dtype: object, key: list[str] = TUNE_KEY) -> str:
    """The autotune key of one launch as text: the values of ``key`` (the kernel's TUNE_KEYS entry)
    and the inputs' dtype."""
    return " ".join(f"{k}={args[k]}" for k in key) + f" dtype={str(dtype).removeprefix('torch.')}"


@functools.lru_cache(maxsize=8)
def _tuning_file(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# The pinned config when the tuning file has none for this GPU, per kernel and head-dim class (64: head
# dims up to 64, the ViT's; 128: above, the LLM's): one that does not spill in the offline sm_90a
# compile of profiles/kernel_report.md (bf16 inputs, Triton 3.9; registers a thread in brackets).
# - fwd, 8 warps / 2 stages: at D=128, 4 warps hold the 128 x 128 fp32 accumulator at the 255-register
#   cap and spill 508-556 B (172-252 B with fp32 outputs); 8 warps do not (198; 167 with fp32 outputs).
#   At D=64, 4 warps / 2 stages (243) sits 12 registers under the cap; 8 warps take 127 and run 16
#   warps/SM instead of 8. 2 stages: 96 KiB of shared memory at D=128 where 3 take 128 KiB.
# - dkdv, 8 warps / 2 stages: at D=128, 3 stages reach the cap and spill 112 B (48 B with fp32
#   outputs); 2 stages take 236. At D=64: 170 against 204. (With both 2D RoPE and a causal mask above
#   D=64 every dK/dV config spills, profiles/varlen_attention.md; the ViT is not causal.)
# - dq, 4 warps / 2 stages: no dQ config spills; at D=128 this one runs 3 CTAs/SM (165).
# - fwd_ws, 4 warps a partition / 2 stages: no config spills (consumers at 232 after setmaxnreg); 2
#   stages of K and V keep D=128 at 112 KiB where 3 take 145 KiB.
# tests/test_gpu_pass_plan.py holds these to the report's baseline (profiles/kernel_report.json).
_PINNED = {
    "fwd": {64: (8, 2), 128: (8, 2)},
    "dkdv": {64: (8, 2), 128: (8, 2)},
    "dq": {64: (4, 2), 128: (4, 2)},
    "fwd_ws": {64: (4, 2), 128: (4, 2)},
}


def head_dim_class(head_dim: int) -> int:
    """The head-dim class of _PINNED: 64 up to 64, 128 above."""
    return 64 if head_dim <= 64 else 128


def pinned_pair(kernel: str, gpu: str, shape: str, head_dim: int) -> tuple[int, ...]:
    """(num_warps, num_stages) of ``kernel`` for a shape class under SEEDVL_AUTOTUNE=pinned (and the
    forward's BLOCK_N third where a tuning file records one other than 64): the tuning file's for
    ``gpu``, else the default of ``head_dim``'s class."""
    path = os.environ.get(AUTOTUNE_FILE_ENV)
    recorded = _tuning_file(path).get(gpu, {}).get(kernel, {}).get(shape) if path else None
    return tuple(recorded) if recorded else _PINNED[kernel][head_dim_class(head_dim)]


def config_tuple(cfg: triton.Config) -> tuple[int, ...]:
    """(num_warps, num_stages), then BLOCK_N where a config sets one other than 64: how the tuning
    file and pinned_pair name a config."""
    block_n = cfg.kwargs.get("BLOCK_N", FWD_BLOCK_N)
    return (cfg.num_warps, cfg.num_stages) + (() if block_n == FWD_BLOCK_N else (block_n,))


def searched(kernel: str, cfg: triton.Config, head_dim: int, block_m: int = 128) -> bool:
    """Whether search mode times ``cfg`` of ``kernel``: all but dK/dV's 4-stage ones above D=96
    (they spill) and the forward's 128-key ones above D=64 (they spill) or with 64-row query tiles
    (every sequence within 64 tokens: a 128-key block would be half padding)."""
    if kernel == "dkdv" and cfg.num_stages >= 4:
        return head_dim <= 96
    if kernel == "fwd" and cfg.kwargs.get("BLOCK_N", FWD_BLOCK_N) > FWD_BLOCK_N:
        return head_dim <= 64 and block_m >= 128
    return True


def prune_by_mode(kernel: str):
    """Triton's early_config_prune hook: the searched configs when searching, the pinned one otherwise."""
    key = TUNE_KEYS[kernel]

    def prune(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
        mode = os.environ.get(AUTOTUNE_ENV, "search")
        if mode == "search":
            args = {**nargs, **kwargs}
            return [c for c in configs if searched(kernel, c, args["HEAD_DIM"], args["BLOCK_M"])]
        if mode != "pinned":
            raise ValueError(f"${AUTOTUNE_ENV}: expected 'search' or 'pinned', got {mode!r}")
        import torch

        q = nargs["q_ptr"]
        gpu = torch.cuda.get_device_name(q.device) if q.device.type == "cuda" else q.device.type
        args = {**nargs, **kwargs}
        want = pinned_pair(kernel, gpu, shape_class(args, q.dtype, key), args["HEAD_DIM"])
        return [c for c in configs if config_tuple(c) == tuple(want)] or configs[:1]

    return {"early_config_prune": prune}


# ----------------------------------------------------------------------------- schedule kernel


@triton.jit
def _build_schedule(
    cu_ptr,
    cu_other_ptr,
    rec_ptr,
    table_ptr,
    num_seqs,
    block,
    num_table,
    BLOCK_SEQ: tl.constexpr,
    CHUNK: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):
    # Records (struct of arrays, field f of sorted sequence i at rec_ptr + f * num_seqs + i):
    # 0 first tile, 1 tile count, 2 row start, 3 rows, 4 other-side start, 5 other-side rows, 6 end tile.
    r = tl.arange(0, BLOCK_SEQ)
    is_seq = r < num_seqs
    o_start = tl.load(cu_other_ptr + r, mask=is_seq, other=0)
    o_len = tl.load(cu_other_ptr + r + 1, mask=is_seq, other=0) - o_start
    # Sort by work per tile (other-side length), descending; ties keep sequence order (stable).
    key = tl.where(is_seq, (o_len.to(tl.int64) << 32) | (0x7FFFFFFF - r).to(tl.int64), -1)
    key = tl.sort(key, descending=True)
    order = tl.where(is_seq, 0x7FFFFFFF - (key - ((key >> 32) << 32)).to(tl.int32), 0)
    start = tl.load(cu_ptr + order, mask=is_seq, other=0)
    length = tl.load(cu_ptr + order + 1, mask=is_seq, other=0) - start
    o_start = tl.load(cu_other_ptr + order, mask=is_seq, other=0)
    o_len = tl.load(cu_other_ptr + order + 1, mask=is_seq, other=0) - o_start
    ntiles = (length + block - 1) // block
    ends = tl.cumsum(ntiles, 0)
    tl.store(rec_ptr + r, ends - ntiles, mask=is_seq)
    tl.store(rec_ptr + num_seqs + r, ntiles, mask=is_seq)
    tl.store(rec_ptr + 2 * num_seqs + r, start, mask=is_seq)
    tl.store(rec_ptr + 3 * num_seqs + r, length, mask=is_seq)
    tl.store(rec_ptr + 4 * num_seqs + r, o_start, mask=is_seq)
    tl.store(rec_ptr + 5 * num_seqs + r, o_len, mask=is_seq)
    tl.store(rec_ptr + 6 * num_seqs + r, ends, mask=is_seq)
    tl.debug_barrier()  # the end tiles just written are read back by other threads of this program
    # table[t] = the first sorted sequence whose end tile is > t (num_seqs: no tile t).
    for c in range(0, num_table, CHUNK):
        t = c + tl.arange(0, CHUNK)
        lo = tl.zeros([CHUNK], dtype=tl.int32)
        hi = lo + num_seqs
        for _ in tl.static_range(SEARCH_STEPS):
            active = lo < hi
            mid = (lo + hi) // 2
            go_right = tl.load(rec_ptr + 6 * num_seqs + mid, mask=active, other=0) <= t
            lo = tl.where(active & go_right, mid + 1, lo)
            hi = tl.where(active & ~go_right, mid, hi)
        tl.store(table_ptr + t, lo, mask=t < num_table)


@triton.jit(do_not_specialize=["num_table_a", "num_table_b", "num_seqs"])
def _varlen_attention_schedule_kernel(
    cu_a_ptr,
    cu_other_a_ptr,
    rec_a_ptr,
    table_a_ptr,
    block_a,
    num_table_a,
    cu_b_ptr,
    cu_other_b_ptr,
    rec_b_ptr,
    table_b_ptr,
    block_b,
    num_table_b,
    num_seqs,
    BLOCK_SEQ: tl.constexpr,
    CHUNK: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):
    # Program 0 builds schedule a, program 1 (if launched) schedule b: the backward's two in one launch.
    if tl.program_id(0) == 0:
        _build_schedule(
            cu_a_ptr, cu_other_a_ptr, rec_a_ptr, table_a_ptr, num_seqs, block_a, num_table_a,
            BLOCK_SEQ, CHUNK, SEARCH_STEPS,
        )  # fmt: skip
    else:
        _build_schedule(
            cu_b_ptr, cu_other_b_ptr, rec_b_ptr, table_b_ptr, num_seqs, block_b, num_table_b,
            BLOCK_SEQ, CHUNK, SEARCH_STEPS,
        )  # fmt: skip


# ----------------------------------------------------------------------------- shared device helpers


@triton.jit
def _dims(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr):
    """Head-dim index and mask of each tile column ("halves" order with RoPE, see module doc)."""
    c = tl.arange(0, BLOCK_D)
    # When BLOCK_D == HEAD_DIM the halves order is the natural one: keep d a plain arange, so that the
    # compiler sees contiguous columns and issues vector loads.
    if ROPE and BLOCK_D != HEAD_DIM:
        d = tl.where(c < BLOCK_D // 2, c, c - BLOCK_D // 2 + HEAD_DIM // 2)
        dmask = (c % (BLOCK_D // 2)) < HEAD_DIM // 2
    else:
        d = c
        dmask = c < HEAD_DIM
    return d, dmask


@triton.jit
def _piece_dims(HEAD_DIM: tl.constexpr, OFF: tl.constexpr, WIDTH: tl.constexpr, HALVES: tl.constexpr):
    """Head-dim index and mask of one piece of a split head dim (see _kernel_args' BLOCK_DA/DB): the
    dims [OFF, OFF + WIDTH) in natural order, or in halves order (HALVES) its first WIDTH/2 columns
    the dims OFF/2 + c of the first half of the head, the rest the same dims of the second half, so
    that a rotation pairs column c with c +- WIDTH/2 inside the piece."""
    c = tl.arange(0, WIDTH)
    if HALVES:
        i = OFF // 2 + c % (WIDTH // 2)
        d = tl.where(c < WIDTH // 2, i, i + HEAD_DIM // 2)
        dmask = i < HEAD_DIM // 2
    else:
        d = OFF + c
        dmask = d < HEAD_DIM
    return d, dmask


@triton.jit
def _partner_dims(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Head-dim index of each column's rotation partner (column c pairs with c +- BLOCK_D / 2)."""
    c = (tl.arange(0, BLOCK_D) + BLOCK_D // 2) % BLOCK_D
    if BLOCK_D != HEAD_DIM:
        c = tl.where(c < BLOCK_D // 2, c, c - BLOCK_D // 2 + HEAD_DIM // 2)
    return c


@triton.jit
def _load(ptrs, row_mask, dmask, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A (rows, BLOCK_D) tile, masked only where it can run out of bounds (zeros there)."""
    if MASK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_mask[:, None] & dmask[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=dmask[None, :], other=0.0)
    return x


@triton.jit
def _cos_sin(cs_ptr, rows, row_mask, HEAD_DIM: tl.constexpr, BH: tl.constexpr, WIDTH: tl.constexpr,
             OFF: tl.constexpr):  # fmt: skip
    """cos and sin (rows, WIDTH) fp32 of the angles of ``rows``, read from the per-token table
    cs (T, 2, D/2) (rope_2d.cos_sin_table: computed once per call, shared by every head), column c
    holding angle OFF + c % BH (WIDTH = BH: one half; 2 * BH: a whole tile in halves order)."""
    i = OFF + tl.arange(0, WIDTH) % BH
    mask = row_mask[:, None] & (i < HEAD_DIM // 2)[None, :]
    ptrs = cs_ptr + rows.to(tl.int64)[:, None] * HEAD_DIM + i[None, :]
    return tl.load(ptrs, mask=mask, other=1.0), tl.load(ptrs + HEAD_DIM // 2, mask=mask, other=0.0)


@triton.jit
def _rotate_on_load(
    row_ptrs, d, dmask, row_mask, cs_ptr, rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr
):
    """rope_2d of a (rows, BLOCK_D) tile (halves order) loaded from memory, each column's rotation
    partner loaded a second time (from cache) rather than swapped in registers, and each column's
    cos/sin read from the table: elementwise math in the loaded layout, so the tile goes to the
    tensor cores without a layout conversion."""
    cos, sin = _cos_sin(cs_ptr, rows, row_mask, HEAD_DIM, BLOCK_D // 2, BLOCK_D, 0)
    first = (tl.arange(0, BLOCK_D) < BLOCK_D // 2)[None, :]
    mask = row_mask[:, None] & dmask[None, :]
    x = tl.load(row_ptrs + d[None, :], mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(row_ptrs + _partner_dims(HEAD_DIM, BLOCK_D)[None, :], mask=mask, other=0.0)
    return x * cos + partner.to(tl.float32) * tl.where(first, -sin, sin)


@triton.jit
def _rotate(x, cos, sin, ROWS: tl.constexpr, BH: tl.constexpr):
    """rope_2d of a (ROWS, 2*BH) fp32 tile in halves order: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
    x1, x2 = tl.split(tl.permute(tl.reshape(x, (ROWS, 2, BH)), (0, 2, 1)))
    y = tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin)
    return tl.reshape(tl.permute(y, (0, 2, 1)), (ROWS, 2 * BH))


@triton.jit
def _zero_rows(
    ptr,
    stride_t,
    stride_h,
    lo,
    hi,
    num_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Write zeros into rows [lo, hi) of every head of a (T, H, HEAD_DIM) tensor."""
    d = tl.arange(0, BLOCK_D)
    zeros = tl.zeros([BLOCK_R, BLOCK_D], dtype=ptr.dtype.element_ty)
    for r0 in range(lo, hi, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < hi)[:, None] & (d < HEAD_DIM)[None, :]
        base = ptr + rows.to(tl.int64)[:, None] * stride_t + d[None, :]
        for h in range(num_heads):
            tl.store(base + h * stride_h, zeros, mask=mask)


@triton.jit
def _padding_range(cu_ptr, num_seqs, total, p, PAD: tl.constexpr):
    """Rows of padding program p: [p * PAD, (p + 1) * PAD) within [cu[num_seqs], total)."""
    lo = tl.maximum(p * PAD, tl.load(cu_ptr + num_seqs))
    hi = tl.minimum((p + 1) * PAD, total)
    return lo, hi


@triton.jit
def _tile(rec_ptr, i, num_seqs):
    """(first tile, tile count, row start, rows, other-side start, other-side rows) of record i."""
    return (
        tl.load(rec_ptr + i),
        tl.load(rec_ptr + num_seqs + i),
        tl.load(rec_ptr + 2 * num_seqs + i),
        tl.load(rec_ptr + 3 * num_seqs + i),
        tl.load(rec_ptr + 4 * num_seqs + i),
        tl.load(rec_ptr + 5 * num_seqs + i),
    )


@triton.jit
def _fill_lse(lse_ptr, stride_lse_h, lo, hi, num_heads, BLOCK_R: tl.constexpr):
    """Write -inf into columns [lo, hi) of every head of an (H, T) lse."""
    for r0 in range(lo, hi, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        for h in range(num_heads):
            tl.store(
                lse_ptr + h * stride_lse_h + rows,
                tl.full([BLOCK_R], float("-inf"), tl.float32),
                mask=rows < hi,
            )
