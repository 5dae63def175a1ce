"""Triton implementation of varlen_attention: tiles, schedule and launchers (the op, its math and its
contract live in :mod:`seedvl_kernels.varlen_attention`; kernels in ``varlen_attention_triton_fwd``,
``_bwd`` and ``_common``; profiles/varlen_attention.md has the design notes and what to measure).

Schedule (no host sync, no idle grid). A pack holds sequences of very different lengths, so a grid
of max_seqlen/BLOCK x B x H programs would be mostly idle. Instead one tiny kernel builds, on the
device, a work table over the packed rows: sequences are sorted by the length of the *other* side
(keys for forward/dQ programs, queries for dK/dV programs: the work of one tile), longest first;
their tile counts are summed (cumsum) and every tile index t gets the sorted sequence whose tiles
cover it (a vectorised binary search). The number of tiles is bounded on the host without reading
the device: sum_b cdiv(L_b, BLOCK) <= min(B * cdiv(max_seqlen, BLOCK), (T + B * (BLOCK - 1)) // BLOCK),
so the launch has that many tiles x heads programs (program p: tile p // H); programs past the real
count load one table entry and return. Programs are ordered (sequence, head, block) so that, longest
sequence first, the programs in flight share one head's keys and values in L2. Rows past
cu_seqlens[-1] (padding) are zeroed by cdiv(T, PAD_ROWS) extra programs at the end of each launch,
each covering PAD_ROWS rows of all heads; with no padding they return at once. The backward builds
its two schedules (key tiles, query tiles) in one launch of two programs.

Forward (FlashAttention-2 online softmax, exp2 with softmax_scale * log2(e) folded into one FMA).
One program per (query tile, head); it walks the keys its rows can see: non-causal all Lk, causal up
to the bottom-right diagonal. Key blocks seen by every row of the tile run without masks; only the
last partial block (and, causal, the blocks crossing the diagonal) pay for masking. Query head h
reads KV head h // (Hq / Hkv). With $SEEDVL_ATTENTION_WS=1 on sm_90+ (``warp_specialized``) the same
schedule runs the warp-specialized kernel of ``varlen_attention_triton_fwd_ws`` instead: K and V
through TMA descriptors, a producer warpgroup and two consumer warpgroups, one masked key loop, q
rotated before the launch.

Backward (deterministic: no atomics, fixed reduction order).
1. preprocess: delta = rowsum(dO * O) - dlse and lse2 = lse * log2(e) (+inf where lse is -inf, so
   that P = exp2(S - lse2) is exactly 0 on rows that see no key), both (Hq, T) fp32.
2. dK/dV: one program per (key tile, KV head) holds K, V, dK, dV and walks the query blocks that
   see its keys (causal: from the diagonal on) of every query head of its group, so dK, dV of a
   GQA group are summed in registers. When few key tiles x KV heads would leave SMs idle, each
   group is split into parts, one program per (key tile, KV head, part) writing fp32 partials
   that one torch sum over the part axis reduces (dkdv_splits).
3. dQ: one program per (query tile, head) recomputes P and dS over its visible keys.
The out and lse given are used as they are (ring attention passes the global ones).

Fused 2D RoPE. k is rotated once by rope_2d's Triton kernel before the attention kernel (a program
cannot rotate keys that other programs are reading at the same time). q is rotated by the forward
program that owns it (each query row belongs to exactly one program per head): it loads q and, from
cache, each column's rotation partner, rotates in fp32 32 rows at a time (few live registers, so the
main loop keeps its occupancy), rounds to the input dtype as rope_2d would, writes the rotated q out
and reads its tile back (L2-hot) for the dot products. The autograd saves the rotated q and k, so the
backward never rotates on load; dQ and dK are rotated back (the adjoint) in registers by the programs
that store them. No attention program evaluates sin or cos: the launch that rotates k also writes
each token's cos/sin, (T, 2, D/2) fp32 (rope_2d.cos_sin_table: D/2 angles, shared by the two halves
of a head and by every head), and the programs read their rows of it (the backward rebuilds the table
in one small launch rather than keeping it alive between the passes). Evaluated per (tile, head)
program instead, the accurate sin/cos ran Hq times per token (20 for SeedViT) over the full tile
width, with a local-memory argument reduction (profiles/varlen_attention_rope_table.md). With
RoPE the head dim sits in a "halves" column order: columns [0, BH) hold dims [0, D/2) and [BH, 2BH)
dims [D/2, D) (BH = next power of 2 of D/2; the natural order when D/2 is a power of 2), so that a
rotation pairs column c with c +- BH (a register split/join); dot products do not care about order.

Head dims that are not a power of 2 (72: SigLIP's ViT, 80: Qwen2-VL's) are not padded to the next
power of 2: every kernel splits the head dim into two column pieces (split_d: 64 + 16 for 72 and 80,
a 128-wide block before), each a dot of its own (S = Q_a K_a^T + Q_b K_b^T, O_a = P V_a, O_b = P V_b,
and likewise in the backward), so the tensor cores run 80 columns, not 128: 37.5% less MMA work
(profiles/varlen_attention_head_dim_split.md). With RoPE each piece is itself two halves, so that
the backward's inverse rotation pairs stay inside a piece.

Memory traffic of RoPE, per layer (E = itemsize, N_q = T*Hq*D, N_k = Tk*Hkv*D):
  unfused (rope_2d on q and k, attention, autograd through rope_2d):
    forward  2*(N_q + N_k)*E in two extra kernels (read + write q and k)
    backward 2*(N_q + N_k)*E in two extra kernels (rotate dq and dk back)
  fused here:
    forward  2*N_k*E in one extra kernel (rotate k, which also writes the 4*T*D-byte cos/sin table)
             + N_q*E written (and re-read from L2) inside the attention kernel, where it overlaps
             with compute
    backward 4*T*D bytes (the table, rebuilt); the inverse rotation happens in the dQ/dK kernels'
             registers
The rotated q and k are saved instead of the inputs (the same size); if q, k, v are views of one
fused qkv tensor, that tensor stays alive through v.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from . import _backends
from .rope_2d import cos_sin_table
from .varlen_attention_triton_bwd import (
    _varlen_attention_bwd_dkdv_kernel,
    _varlen_attention_bwd_dq_kernel,
    _varlen_attention_bwd_preprocess_kernel,
)
from .varlen_attention_triton_common import (
    TUNE_KEYS,
    WS_TUNE_KEY,
    _varlen_attention_schedule_kernel,
    config_tuple,
    shape_class,
)
from .varlen_attention_triton_fwd import _varlen_attention_fwd_kernel
from .varlen_attention_triton_fwd_ws import _varlen_attention_fwd_pad_kernel, _varlen_attention_fwd_ws_kernel

LOG2E = math.log2(math.e)
WS_ENV = "SEEDVL_ATTENTION_WS"
PAD_ROWS = 256  # rows of padding zeroed by one padding program (all heads)
MAX_HEAD_DIM = 256
SCHEDULE_CHUNK = 1024  # tiles resolved per step of the schedule kernel's binary search

# ----------------------------------------------------------------------------- tiles (heuristics)


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of the three attention kernels; num_warps/num_stages are autotuned per kernel.

    fwd_m x fwd_n: query rows per forward program x keys per step. dq_m x dq_n: the same for dQ.
    dkdv_n x dkdv_m: key rows per dK/dV program x query rows per step. rope_rows: query rows the
    forward rotates at a time (fewer live registers than rotating the whole tile).
    """

    fwd_m: int
    fwd_n: int
    dq_m: int
    dq_n: int
    dkdv_m: int
    dkdv_n: int
    rope_rows: int = 32


def tiles_for(device: torch.device, head_dim: int, max_seqlen_q: int, max_seqlen_k: int) -> Tiles:
    """The one heuristic for tile sizes. GPU: FlashAttention-2/Triton-tutorial shapes (wide query
    tiles forward and for dQ, wide key tiles for dK/dV), shrunk to 64 when every sequence fits in
    64 rows (64-token windows: one tile per window, no half-empty 128-row tiles) and for head dims
    above 64 where the backward's accumulators would not fit in registers. Interpreter: 16 (32 once
    a sequence reaches 64 rows: it runs programs one by one, so fewer programs run faster), small
    enough that test sequences span several blocks and partial ones."""
    if device.type != "cuda":
        t = 16 if max(max_seqlen_q, max_seqlen_k) < 64 else 32
        return Tiles(t, t, t, t, t, t, rope_rows=16)
    short_q, short_k = max_seqlen_q <= 64, max_seqlen_k <= 64
    big_m = 64 if short_q else 128
    big_n = 64 if short_k or head_dim > 64 else 128
    return Tiles(
        fwd_m=big_m,
        fwd_n=64,
        dq_m=64 if head_dim > 64 else big_m,
        dq_n=32,
        dkdv_m=32,
        dkdv_n=big_n,
        rope_rows=32,
    )


def dkdv_splits(num_tiles: int, num_kv_heads: int, group: int, num_sms: int) -> int:
    """Into how many parts the dK/dV kernel splits each KV head's group of query heads (1: none).

    One dK/dV program per (key tile, KV head) sums its whole GQA group, so a pack of few key tiles
    with few KV heads (2k tokens, 4 KV heads, 64-row tiles: 128 programs, one per SM of an H100)
    lasts as long as its longest program (causal: the first key tile, all query rows of 8 heads).
    Rule: double the split while the grid holds fewer than two programs per SM and the split still
    divides the group; each split then costs one more read of
    the tile's K and V and an fp32 partial of dK and dV (written, then summed by the launcher in a
    fixed order: deterministic). ``num_sms`` 0 (the interpreter, which runs programs one by one):
    no split. profiles/varlen_attention_gqa_bwd.md has the program counts."""
    splits = 1
    while num_sms > 0 and num_tiles * num_kv_heads * splits < 2 * num_sms and group % (2 * splits) == 0:
        splits *= 2
    return splits


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` for dkdv_splits, 0 off CUDA."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


# ----------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class _Schedule:
    records: torch.Tensor  # (7, B) int32, see _build_schedule
    table: torch.Tensor  # (max(num_table, 1),) int32: sorted sequence of each tile
    num_table: int  # host bound on the number of tiles (the grid is num_table x heads + padding)


def max_tiles(total_rows: int, num_seqs: int, max_seqlen: int, block: int) -> int:
    """Host bound on sum_b cdiv(L_b, block), from sum_b L_b <= total_rows and L_b <= max_seqlen."""
    if num_seqs == 0 or total_rows == 0 or max_seqlen == 0:
        return 0
    return min(num_seqs * triton.cdiv(max_seqlen, block), (total_rows + num_seqs * (block - 1)) // block)


def _schedules(specs: list[tuple[torch.Tensor, torch.Tensor, int, int, int]]) -> list[_Schedule]:
    """One schedule per (cu, cu_other, total_rows, max_seqlen, block), built in one launch (<= 2)."""
    cu0 = specs[0][0]
    num_seqs = cu0.numel() - 1
    out = []
    for _, _, total, max_len, block in specs:
        n = max_tiles(total, num_seqs, max_len, block)
        records = torch.empty((7, max(num_seqs, 1)), dtype=torch.int32, device=cu0.device)
        out.append(_Schedule(records, torch.empty(max(n, 1), dtype=torch.int32, device=cu0.device), n))
    if all(s.num_table == 0 for s in out):
        return out
    a, b = (specs[0], specs[-1])
    sa, sb = out[0], out[-1]
    _varlen_attention_schedule_kernel[(len(specs),)](
        a[0], a[1], sa.records, sa.table, a[4], sa.num_table,
        b[0], b[1], sb.records, sb.table, b[4], sb.num_table,
        num_seqs,
        BLOCK_SEQ=max(16, triton.next_power_of_2(num_seqs)),
        CHUNK=SCHEDULE_CHUNK,
        SEARCH_STEPS=num_seqs.bit_length(),
        num_warps=4,
    )  # fmt: skip
    return out


def _block_d(head_dim: int, rope: bool) -> int:
    if rope:  # two halves, each padded to a power of 2 (see the module docstring)
        return 2 * max(8, triton.next_power_of_2(head_dim // 2))
    return max(16, triton.next_power_of_2(head_dim))


def _check(head_dim: int, softmax_scale: float) -> None:
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"q: the Triton kernels handle head dims up to {MAX_HEAD_DIM}, got {head_dim}")
    if softmax_scale < 0:
        raise ValueError(f"softmax_scale: the Triton kernels need a scale >= 0, got {softmax_scale}")


def split_d(head_dim: int, rope: bool) -> tuple[int, int]:
    """(BLOCK_DA, BLOCK_DB): the widths of the two column pieces the kernels split the head dim into,
    or (BLOCK_D, 0) where one power-of-2 block is as narrow. Each piece is two halves (its rotation
    pairs stay inside it with RoPE): halves of the largest power of 2 <= ceil(D/2), then halves of
    the rest rounded up to a power of 2 >= 8 (a dot's K >= 16). D=72 and 80 run 64 + 16 = 80 columns
    instead of 128, D=96 64 + 32, D=40 32 + 16 instead of 64."""
    block_d = _block_d(head_dim, rope)
    half = (head_dim + 1) // 2
    if half < 8:
        return block_d, 0
    ha = 1 << (half.bit_length() - 1)
    if ha == half:
        return block_d, 0
    hb = max(8, triton.next_power_of_2(half - ha))
    if 2 * (ha + hb) >= block_d:
        return block_d, 0
    return 2 * ha, 2 * hb


def _kernel_args(d: int, rope: bool, causal: bool, block_m: int, block_n: int, dtype: torch.dtype) -> dict:
    block_d = _block_d(d, rope)
    block_da, block_db = split_d(d, rope)
    return dict(
        HEAD_DIM=d,
        BLOCK_D=block_d,
        EVEN_D=block_d == d,
        BLOCK_DA=block_da,
        BLOCK_DB=max(block_db, 16),  # a placeholder without a split (no tile of it is built)
        SPLIT_D=block_db > 0,
        EVEN_DB=block_da + block_db == d,
        ROPE=rope,
        CAUSAL=causal,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PAD=PAD_ROWS,
        DOT_PREC="ieee" if dtype == torch.float32 else "tf32",  # fp32 inputs: exact products
    )


def warp_specialized(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether launch_fwd runs the warp-specialized forward (varlen_attention_triton_fwd_ws):
    $SEEDVL_ATTENTION_WS=1 (default 0: no GPU has timed it against the plain kernel yet), on an
    sm_90+ GPU with fp16/bf16 inputs (or under the interpreter, any dtype), and q, k, v laid out as
    TMA needs (``tma_compatible``). Any other case runs the plain forward."""
    value = os.environ.get(WS_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"${WS_ENV}: expected 0 or 1, got {value!r}")
    if value == "0":
        return False
    if not _backends.triton_interpret():
        if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] < 9:
            return False
        if q.dtype not in (torch.float16, torch.bfloat16):
            return False
    return all(tma_compatible(t) for t in (q, k, v))


def tma_compatible(x: torch.Tensor) -> bool:
    """A (T, H, D) tensor whose per-(sequence, head) row blocks a TMA descriptor can address: unit
    stride along D, 16-byte aligned base, token and head strides, and D of at least 16 bytes."""
    e = x.element_size()
    return (
        x.stride(-1) == 1
        and x.data_ptr() % 16 == 0
        and (x.stride(0) * e) % 16 == 0
        and (x.stride(1) * e) % 16 == 0
        and x.shape[-1] * e >= 16
    )


_TMA_ALLOCATOR_SET = False


def _tma_allocator() -> None:
    """Device-side tensor descriptors need global scratch (128 B each) from Triton's allocator."""
    global _TMA_ALLOCATOR_SET
    if not _TMA_ALLOCATOR_SET:
        triton.set_allocator(
            lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda")
        )
        _TMA_ALLOCATOR_SET = True


def launch_fwd(
    q, k, v, p, out: torch.Tensor, lse: torch.Tensor, q_rot: torch.Tensor, k_rot: torch.Tensor
) -> None:
    """out, lse and (with p.pos_hw) the rotated q and k, written in place. ``p``: varlen_attention._Params."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    _check(D, p.softmax_scale)
    if T == 0:
        return
    rope = p.pos_hw is not None
    tiles = tiles_for(q.device, D, p.max_seqlen_q, p.max_seqlen_k)
    cs = q  # a dummy without RoPE (never read)
    ws = warp_specialized(q_rot if rope else q, k_rot if rope else k, v)  # the tensors it would read
    if rope:  # k rotated and the per-token sin/cos table written, in one launch
        cs = cos_sin_table(p.pos_hw, D, p.rope_theta, x=k, out=k_rot)
        k = k_rot
        if ws:  # the warp-specialized kernel reads q rotated (rope_2d's rounding, as the plain kernel's)
            cos_sin_table(p.pos_hw, D, p.rope_theta, x=q, out=q_rot)
    (sched,) = _schedules([(p.cu_seqlens_q, p.cu_seqlens_k, T, p.max_seqlen_q, tiles.fwd_m)])
    q_rot_ = q_rot if rope else out
    num_seqs = p.cu_seqlens_q.numel() - 1
    if ws:
        _launch_fwd_ws(q_rot if rope else q, k, v, p, out, lse, q_rot_, rope, tiles, sched, num_seqs)
        return
    grid = (sched.num_table * Hq + triton.cdiv(T, PAD_ROWS),)
    args = _kernel_args(D, rope, p.causal, tiles.fwd_m, tiles.fwd_n, q.dtype)
    if not _backends.triton_interpret():
        del args["BLOCK_N"]  # an autotune dimension on a GPU (varlen_attention_triton_common.configs)
    _varlen_attention_fwd_kernel[grid](
        q, k, v, out, lse, q_rot_, sched.records, sched.table, p.cu_seqlens_q, cs,
        num_seqs, sched.num_table, T, Hq, Hq // Hkv, p.softmax_scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), q_rot_.stride(0), q_rot_.stride(1),
        ROPE_ROWS=min(tiles.rope_rows, tiles.fwd_m), **args,
    )  # fmt: skip


def _launch_fwd_ws(q, k, v, p, out, lse, q_rot_, rope: bool, tiles: Tiles, sched: _Schedule, num_seqs: int):
    """The warp-specialized forward (q and k already rotated with RoPE), then its padding rows."""
    T, Hq, D = q.shape
    if sched.num_table > 0:
        if q.device.type == "cuda":
            _tma_allocator()
        args = _kernel_args(D, False, p.causal, tiles.fwd_m, tiles.fwd_n, q.dtype)  # q, k in natural order
        _varlen_attention_fwd_ws_kernel[(sched.num_table * Hq,)](
            q, k, v, out, lse, sched.records, sched.table,
            num_seqs, sched.num_table, Hq, Hq // k.shape[1], p.softmax_scale * LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            WARP_SPECIALIZE=not _backends.triton_interpret(),
            **{name: args[name] for name in (*WS_TUNE_KEY, "BLOCK_DA", "BLOCK_DB", "SPLIT_D")},
        )  # fmt: skip
    _varlen_attention_fwd_pad_kernel[(triton.cdiv(T, PAD_ROWS),)](
        out, lse, q_rot_, p.cu_seqlens_q, num_seqs, T, Hq,
        out.stride(0), out.stride(1), lse.stride(0), q_rot_.stride(0), q_rot_.stride(1),
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), ROPE=rope, PAD=PAD_ROWS,
        BLOCK_R=16 if _backends.triton_interpret() else 64,
    )  # fmt: skip


def launch_bwd(
    dout, dlse, q, k, v, out, lse, p, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor
) -> None:
    """dq, dk, dv written in place; q and k are the rotated ones when p.pos_hw is given."""
    T, Hq, D = q.shape
    Tk, Hkv = k.shape[:2]
    _check(D, p.softmax_scale)
    if T == 0 and Tk == 0:
        return
    rope = p.pos_hw is not None
    tiles = tiles_for(q.device, D, p.max_seqlen_q, p.max_seqlen_k)
    lse = lse if lse.stride(-1) == 1 else lse.contiguous()
    delta = torch.empty((Hq, T), dtype=torch.float32, device=q.device)
    lse2 = torch.empty((Hq, T), dtype=torch.float32, device=q.device)
    if T > 0:
        block_t = 16 if _backends.triton_interpret() else 64
        dlse_ = lse if dlse is None else dlse
        _varlen_attention_bwd_preprocess_kernel[(triton.cdiv(T, block_t), Hq)](
            out, dout, lse, dlse_, delta, lse2, T,
            out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), lse.stride(0), dlse_.stride(0),
            HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_T=block_t,
            HAS_DLSE=dlse is not None,
        )  # fmt: skip
    cs = cos_sin_table(p.pos_hw, D, p.rope_theta) if rope else q  # q: a dummy, never read
    cu_q, cu_k = p.cu_seqlens_q, p.cu_seqlens_k
    s_kv, s_q = _schedules(
        [(cu_k, cu_q, Tk, p.max_seqlen_k, tiles.dkdv_n), (cu_q, cu_k, T, p.max_seqlen_q, tiles.dq_m)]
    )
    num_seqs, scale = cu_q.numel() - 1, p.softmax_scale
    if Tk > 0:
        group = Hq // Hkv
        splits = dkdv_splits(s_kv.num_table, Hkv, group, _num_sms(q.device))
        dk_, dv_ = dk, dv
        if splits > 1:  # fp32 partials, (Tk, Hkv, splits, D): one per part of each KV head's group
            dk_ = torch.empty((Tk, Hkv * splits, D), dtype=torch.float32, device=q.device)
            dv_ = torch.empty_like(dk_)
        _varlen_attention_bwd_dkdv_kernel[(s_kv.num_table * Hkv * splits + triton.cdiv(Tk, PAD_ROWS),)](
            q, k, v, dout, lse2, delta, dk_, dv_, s_kv.records, s_kv.table, cu_k, cs,
            num_seqs, s_kv.num_table, T, Tk, Hkv, group, splits, scale * LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dk_.stride(0), dk_.stride(1), dv_.stride(0), dv_.stride(1),
            **_kernel_args(D, rope, p.causal, tiles.dkdv_m, tiles.dkdv_n, q.dtype),
        )  # fmt: skip
        if splits > 1:  # the reduction over the split axis: a plain sum (no atomics), same order each run
            dk.copy_(dk_.view(Tk, Hkv, splits, D).sum(2))
            dv.copy_(dv_.view(Tk, Hkv, splits, D).sum(2))
    if T > 0:
        _varlen_attention_bwd_dq_kernel[(s_q.num_table * Hq + triton.cdiv(T, PAD_ROWS),)](
            q, k, v, dout, lse2, delta, dq, s_q.records, s_q.table, cu_q, cs,
            num_seqs, s_q.num_table, T, Hq, Hq // Hkv, scale * LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
            **_kernel_args(D, rope, p.causal, tiles.dq_m, tiles.dq_n, q.dtype),
        )  # fmt: skip


def save_tuning(path: str | Path) -> dict:
    """Add the configs this process's autotuner chose (SEEDVL_AUTOTUNE=search) to the JSON at ``path``
    under this GPU's name, for later runs to pin (see varlen_attention_triton_common). Returns the table."""
    path = Path(path)
    table = json.loads(path.read_text()) if path.exists() else {}
    gpu = table.setdefault(torch.cuda.get_device_name(), {})
    kernels = {
        "fwd": _varlen_attention_fwd_kernel,
        "dkdv": _varlen_attention_bwd_dkdv_kernel,
        "dq": _varlen_attention_bwd_dq_kernel,
        "fwd_ws": _varlen_attention_fwd_ws_kernel,
    }
    for name, kernel in kernels.items():
        tune_key = TUNE_KEYS[name]
        for key, cfg in getattr(kernel, "cache", {}).items():  # key: the tune key's values, then dtypes
            shape = shape_class(dict(zip(tune_key, key, strict=False)), key[len(tune_key)], tune_key)
            gpu.setdefault(name, {})[shape] = list(config_tuple(cfg))
    path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    return table
