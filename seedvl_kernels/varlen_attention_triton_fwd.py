"""Forward kernel of varlen_attention's Triton implementation (design: varlen_attention_triton.py).

One program per (query tile, head) from the device-built schedule: FlashAttention-2 online softmax
in exp2, RoPE applied to q as it is loaded (cos/sin from the per-token table; the rotated q written
out for the backward).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .varlen_attention_triton_common import (
    FWD_TUNE_KEY,
    _dims,
    _fill_lse,
    _load,
    _padding_range,
    _piece_dims,
    _rotate_on_load,
    _tile,
    _zero_rows,
    configs,
    prune_by_mode,
)


@triton.jit
def _fwd_blocks(
    acc, acc_b, l_i, m_i, q, q_b, k_base, v_base, stride_k_t, stride_v_t, d, dmask, d_b, dmask_b, offs_m,
    lo, hi, shift, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, SPLIT_D: tl.constexpr,
    EVEN_DB: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Online softmax over key blocks [lo, hi) (hi is the last visible key + 1 of the tile). With
    SPLIT_D the head dim is two column pieces (q, acc: the first; q_b, acc_b: the second): two
    dots accumulate S, and P·V fills each piece's accumulator."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        rows_n = offs_n.to(tl.int64)[:, None]
        k = _load(k_base + rows_n * stride_k_t + d[None, :], offs_n < hi, dmask, MASKED, EVEN_D)
        v = _load(v_base + rows_n * stride_v_t + d[None, :], offs_n < hi, dmask, MASKED, EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if SPLIT_D:
            k_b = _load(k_base + rows_n * stride_k_t + d_b[None, :], offs_n < hi, dmask_b, MASKED, EVEN_DB)
            v_b = _load(v_base + rows_n * stride_v_t + d_b[None, :], offs_n < hi, dmask_b, MASKED, EVEN_DB)
            qk = tl.dot(q_b, tl.trans(k_b), qk, input_precision=DOT_PREC)
        if MASKED:
            visible = (offs_n < hi)[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + shift)
            s = tl.where(visible, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
            p = tl.exp2(s - m_use[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # qk_scale > 0 (checked by the launcher)
            # Scores can still be -inf here (fp32 overflow of huge inputs): such keys weigh 0, not NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        if SPLIT_D:
            acc_b = acc_b * alpha[:, None] + tl.dot(p.to(v.dtype), v_b, input_precision=DOT_PREC)
        m_i = m_new
    return acc, acc_b, l_i, m_i


@triton.jit
def _visible_keys(start_m, lq, lk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(n_full, n_end) of a query tile: keys [0, n_full) are seen by all its rows (no mask), keys
    [n_full, n_end) by some (masked); causal masks are bottom-right aligned (shift = lk - lq)."""
    if CAUSAL:
        n_end = tl.minimum(lk, tl.minimum(start_m + BLOCK_M, lq) + lk - lq)
        n_full = tl.maximum(tl.minimum(lk, start_m + lk - lq + 1), 0) // BLOCK_N * BLOCK_N
    else:
        n_end = lk
        n_full = lk // BLOCK_N * BLOCK_N
    return n_full, n_end


@triton.autotune(configs=configs("fwd"), key=FWD_TUNE_KEY, prune_configs_by=prune_by_mode("fwd"))
@triton.jit(do_not_specialize=["num_seqs", "num_table", "total_q", "stride_lse_h"])
def _varlen_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, q_rot_ptr, rec_ptr, table_ptr, cu_q_ptr, cs_ptr,
    num_seqs, num_table, total_q, num_heads, group, qk_scale,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_o_t, stride_o_h,
    stride_lse_h, stride_qr_t, stride_qr_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, ROPE: tl.constexpr,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAD: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, SPLIT_D: tl.constexpr,
    EVEN_DB: tl.constexpr, ROPE_ROWS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_work = num_table * num_heads
    if pid >= num_work:  # padding rows: out 0, lse -inf (and rotated q 0: the backward never reads it)
        lo, hi = _padding_range(cu_q_ptr, num_seqs, total_q, pid - num_work, PAD)
        _zero_rows(out_ptr, stride_o_t, stride_o_h, lo, hi, num_heads, HEAD_DIM, BLOCK_D, BLOCK_M)
        _fill_lse(lse_ptr, stride_lse_h, lo, hi, num_heads, BLOCK_M)
        if ROPE:
            _zero_rows(q_rot_ptr, stride_qr_t, stride_qr_h, lo, hi, num_heads, HEAD_DIM, BLOCK_D, BLOCK_M)
        return
    i = tl.load(table_ptr + pid // num_heads)
    if i >= num_seqs:
        return
    tile0, ntiles, q0, lq, k0, lk = _tile(rec_ptr, i, num_seqs)
    local = pid - tile0 * num_heads
    head = local // ntiles
    start_m = (local - head * ntiles) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_valid = offs_m < lq
    rows_q = (q0 + offs_m).to(tl.int64)[:, None]
    d, dmask = _dims(HEAD_DIM, BLOCK_D, ROPE)
    if ROPE:
        # Rotate ROPE_ROWS rows at a time into q_rot (few live registers: the rotation must not cost the
        # main loop its occupancy), then load the tile back like an unrotated q (L2-hot, once per program).
        for c in tl.static_range(BLOCK_M // ROPE_ROWS):
            offs_r = start_m + c * ROPE_ROWS + tl.arange(0, ROPE_ROWS)
            r_valid = offs_r < lq
            rows_r = (q0 + offs_r).to(tl.int64)[:, None]
            q_r = _rotate_on_load(
                q_ptr + rows_r * stride_q_t + head * stride_q_h, d, dmask, r_valid, cs_ptr, q0 + offs_r,
                HEAD_DIM, BLOCK_D,
            )  # fmt: skip
            qr_ptrs = q_rot_ptr + rows_r * stride_qr_t + head * stride_qr_h + d[None, :]
            tl.store(qr_ptrs, q_r.to(q_rot_ptr.dtype.element_ty), mask=r_valid[:, None] & dmask[None, :])
        tl.debug_barrier()  # this program's rotated rows, written by other threads, are read back below
        q_src, stride_src_t, stride_src_h = q_rot_ptr, stride_qr_t, stride_qr_h
    else:
        q_src, stride_src_t, stride_src_h = q_ptr, stride_q_t, stride_q_h
    q_rows = q_src + rows_q * stride_src_t + head * stride_src_h
    q_b = 0.0  # the second piece of a split head dim (none without SPLIT_D)
    acc_b = 0.0
    if SPLIT_D:  # natural order: dims [0, BLOCK_DA) and [BLOCK_DA, BLOCK_DA + BLOCK_DB) (masked)
        d, dmask = _piece_dims(HEAD_DIM, 0, BLOCK_DA, False)
        d_b, dmask_b = _piece_dims(HEAD_DIM, BLOCK_DA, BLOCK_DB, False)
        q_b = _load(q_rows + d_b[None, :], m_valid, dmask_b, True, EVEN_DB)
        acc_b = tl.zeros([BLOCK_M, BLOCK_DB], dtype=tl.float32)
    else:
        d_b, dmask_b = d, dmask
    q = _load(q_rows + d[None, :], m_valid, dmask, True, EVEN_D or SPLIT_D)
    kv_head = head // group
    k_base = k_ptr + k0.to(tl.int64) * stride_k_t + kv_head * stride_k_h
    v_base = v_ptr + k0.to(tl.int64) * stride_v_t + kv_head * stride_v_h
    n_full, n_end = _visible_keys(start_m, lq, lk, CAUSAL, BLOCK_M, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_DA], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, acc_b, l_i, m_i = _fwd_blocks(
        acc, acc_b, l_i, m_i, q, q_b, k_base, v_base, stride_k_t, stride_v_t, d, dmask, d_b, dmask_b, offs_m,
        0, n_full, lk - lq, qk_scale, False, CAUSAL, EVEN_D or SPLIT_D, SPLIT_D, EVEN_DB, BLOCK_N, DOT_PREC,
    )  # fmt: skip
    acc, acc_b, l_i, m_i = _fwd_blocks(
        acc, acc_b, l_i, m_i, q, q_b, k_base, v_base, stride_k_t, stride_v_t, d, dmask, d_b, dmask_b, offs_m,
        n_full, n_end, lk - lq, qk_scale, True, CAUSAL, EVEN_D or SPLIT_D, SPLIT_D, EVEN_DB, BLOCK_N,
        DOT_PREC,
    )  # fmt: skip
    # l_i is exactly 0 for a row that saw no key (or only -inf scores): out 0, lse -inf. A NaN or
    # +inf score makes l_i NaN, which must stay NaN in lse rather than read as "no key".
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_rows = out_ptr + rows_q * stride_o_t + head * stride_o_h
    tl.store(o_rows + d[None, :], out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & dmask[None, :])
    if SPLIT_D:
        out_b = acc_b / l_safe[:, None]
        tl.store(
            o_rows + d_b[None, :],
            out_b.to(out_ptr.dtype.element_ty),
            mask=m_valid[:, None] & dmask_b[None, :],
        )
    tl.store(lse_ptr + head * stride_lse_h + q0 + offs_m, lse, mask=m_valid)
