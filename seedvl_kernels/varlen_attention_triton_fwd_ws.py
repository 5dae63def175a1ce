"""Warp-specialized forward kernel of varlen_attention's Triton implementation, for Hopper (sm_90+).

The plain forward (``varlen_attention_triton_fwd``) issues each Q·Kᵀ and P·V and waits for it
(``wgmma.wait_group 0``) before the softmax that needs it: one warpgroup alternates between the
tensor cores and the softmax, and neither overlaps the other. Triton's loop pipeliner cannot change
that (profiles/varlen_attention_pipelining.md). This kernel is FlashAttention-3's producer/consumer
layout as Triton 3.9's Hopper warp specialization builds it from ``tl.range(...,
warp_specialize=True)``: K and V come in through TMA (device-side tensor descriptors over each
sequence's rows of one KV head), a producer warpgroup issues the copies into a ring of shared-memory
stages, and the query tile is split between two consumer warpgroups (64 rows each, 232 registers
each after ``setmaxnreg``) that run the online softmax independently. So while one consumer runs
its softmax, the other's MMAs keep the tensor cores busy: two MMA groups in flight per CTA where the
plain kernel has one (FlashAttention-3's inter-warpgroup overlap; its intra-warpgroup overlap, the
next Q·Kᵀ issued before the current softmax, is not what Triton builds).

What the warp-specialization pass accepts (Triton 3.9, sm_90a; profiles/varlen_attention_pipelining.md):
one warp-specialized loop per kernel (two in sequence abort the pass), no early ``return`` (if/else
instead), tensor-descriptor loads, 4 warps a partition. Hence one key loop that applies the
visibility mask on every block (the plain kernel runs unmasked blocks without it), and q rotated by
rope_2d's kernel before the launch (the plain kernel rotates it in its prologue).

Sequences are addressed through descriptors whose shape is the sequence's rows: TMA zero-fills
the rows past its end and the columns past the head dim, so loads need no masks. Descriptors need
16-byte aligned base addresses and row strides (``tma_compatible``); the launcher keeps the plain
kernel otherwise.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .varlen_attention_triton_common import (
    WS_TUNE_KEY,
    _fill_lse,
    _padding_range,
    _tile,
    _zero_rows,
    configs,
    prune_by_mode,
)
from .varlen_attention_triton_fwd import _visible_keys


@triton.jit(do_not_specialize=["num_seqs", "total_q", "stride_lse_h"])
def _varlen_attention_fwd_pad_kernel(
    out_ptr, lse_ptr, q_rot_ptr, cu_q_ptr, num_seqs, total_q, num_heads,
    stride_o_t, stride_o_h, stride_lse_h, stride_qr_t, stride_qr_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr, PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Rows past cu_seqlens_q[-1] (padding), PAD of them a program: out 0, lse -inf, rotated q 0."""
    lo, hi = _padding_range(cu_q_ptr, num_seqs, total_q, tl.program_id(0), PAD)
    _zero_rows(out_ptr, stride_o_t, stride_o_h, lo, hi, num_heads, HEAD_DIM, BLOCK_D, BLOCK_R)
    _fill_lse(lse_ptr, stride_lse_h, lo, hi, num_heads, BLOCK_R)
    if ROPE:
        _zero_rows(q_rot_ptr, stride_qr_t, stride_qr_h, lo, hi, num_heads, HEAD_DIM, BLOCK_D, BLOCK_R)


@triton.jit
def _rows(base, rows, stride_t, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, WIDTH: tl.constexpr):
    """A TMA descriptor over ``rows`` x HEAD_DIM elements at ``base`` (row stride ``stride_t``) that
    loads BLOCK_R x WIDTH blocks."""
    return tl.make_tensor_descriptor(base, [rows, HEAD_DIM], [stride_t, 1], [BLOCK_R, WIDTH])


@triton.autotune(configs=configs("fwd_ws"), key=WS_TUNE_KEY, prune_configs_by=prune_by_mode("fwd_ws"))
@triton.jit(do_not_specialize=["num_seqs", "num_table", "stride_lse_h"])
def _varlen_attention_fwd_ws_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, rec_ptr, table_ptr,
    num_seqs, num_table, num_heads, group, qk_scale,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_o_t, stride_o_h,
    stride_lse_h,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, SPLIT_D: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):  # fmt: skip
    """One program per (query tile, head) of the forward schedule, as the plain kernel (whose padding
    programs are _varlen_attention_fwd_pad_kernel here: a loop outside the key loop, even in the
    other branch of an if, stops the pass from partitioning); q is the rotated q with RoPE."""
    pid = tl.program_id(0)
    if pid < num_table * num_heads:
        i = tl.load(table_ptr + pid // num_heads)
        if i < num_seqs:
            tile0, ntiles, q0, lq, k0, lk = _tile(rec_ptr, i, num_seqs)
            local = pid - tile0 * num_heads
            head = local // ntiles
            start_m = (local - head * ntiles) * BLOCK_M
            kv_head = head // group
            # Each descriptor spans one sequence of one head: rows past lq / lk and columns past
            # HEAD_DIM read as zeros. A sequence without keys gets a 1-row K/V descriptor (a
            # tensor map's dims must be nonzero) that the loop never reads (n_end = 0).
            rows_k = tl.maximum(lk, 1)
            q_base = q_ptr + q0.to(tl.int64) * stride_q_t + head * stride_q_h
            k_base = k_ptr + k0.to(tl.int64) * stride_k_t + kv_head * stride_k_h
            v_base = v_ptr + k0.to(tl.int64) * stride_v_t + kv_head * stride_v_h
            q_desc = _rows(q_base, lq, stride_q_t, HEAD_DIM, BLOCK_M, BLOCK_DA)
            k_desc = _rows(k_base, rows_k, stride_k_t, HEAD_DIM, BLOCK_N, BLOCK_DA)
            v_desc = _rows(v_base, rows_k, stride_v_t, HEAD_DIM, BLOCK_N, BLOCK_DA)
            q = q_desc.load([start_m, 0])
            acc = tl.zeros([BLOCK_M, BLOCK_DA], dtype=tl.float32)
            q_b = 0.0  # the second column piece of a split head dim (none without SPLIT_D)
            acc_b = 0.0
            k_desc_b = k_desc
            v_desc_b = v_desc
            if SPLIT_D:
                q_desc_b = _rows(q_base, lq, stride_q_t, HEAD_DIM, BLOCK_M, BLOCK_DB)
                k_desc_b = _rows(k_base, rows_k, stride_k_t, HEAD_DIM, BLOCK_N, BLOCK_DB)
                v_desc_b = _rows(v_base, rows_k, stride_v_t, HEAD_DIM, BLOCK_N, BLOCK_DB)
                q_b = q_desc_b.load([start_m, BLOCK_DA])
                acc_b = tl.zeros([BLOCK_M, BLOCK_DB], dtype=tl.float32)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            shift = lk - lq  # causal masks are bottom-right aligned
            _, n_end = _visible_keys(start_m, lq, lk, CAUSAL, BLOCK_M, BLOCK_N)  # every block is masked here
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            for start_n in tl.range(0, n_end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
                k = k_desc.load([start_n, 0])
                qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
                if SPLIT_D:
                    k_b = k_desc_b.load([start_n, BLOCK_DA])
                    qk = tl.dot(q_b, tl.trans(k_b), qk, input_precision=DOT_PREC)
                offs_n = start_n + tl.arange(0, BLOCK_N)
                visible = (offs_n < n_end)[None, :]
                if CAUSAL:
                    visible = visible & (offs_n[None, :] <= offs_m[:, None] + shift)
                s = tl.where(visible, qk * qk_scale, float("-inf"))  # qk_scale >= 0 (the launcher checks)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
                p = tl.exp2(s - m_use[:, None])
                alpha = tl.exp2(m_i - m_use)
                l_i = l_i * alpha + tl.sum(p, 1)
                v = v_desc.load([start_n, 0])
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
                if SPLIT_D:
                    v_b = v_desc_b.load([start_n, BLOCK_DA])
                    acc_b = acc_b * alpha[:, None] + tl.dot(p.to(v.dtype), v_b, input_precision=DOT_PREC)
                m_i = m_new
            # As the plain kernel: l_i 0 (no key seen) gives out 0 and lse -inf; NaN stays NaN.
            empty = l_i == 0.0
            l_safe = tl.where(empty, 1.0, l_i)
            lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
            m_valid = offs_m < lq
            rows = (q0 + offs_m).to(tl.int64)[:, None]
            o_rows = out_ptr + rows * stride_o_t + head * stride_o_h
            d = tl.arange(0, BLOCK_DA)
            out = (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty)
            tl.store(o_rows + d[None, :], out, mask=m_valid[:, None] & (d < HEAD_DIM)[None, :])
            if SPLIT_D:
                d_b = BLOCK_DA + tl.arange(0, BLOCK_DB)
                out_b = (acc_b / l_safe[:, None]).to(out_ptr.dtype.element_ty)
                tl.store(o_rows + d_b[None, :], out_b, mask=m_valid[:, None] & (d_b < HEAD_DIM)[None, :])
            tl.store(lse_ptr + head * stride_lse_h + q0 + offs_m, lse, mask=m_valid)
