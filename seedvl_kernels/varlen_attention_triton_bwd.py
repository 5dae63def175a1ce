"""Backward kernels of varlen_attention's Triton implementation (design: varlen_attention_triton.py).

Deterministic (no atomics): a preprocess kernel (delta = rowsum(dO * O) - dlse, lse in log2 units),
one program per (key tile, KV head, split) for dK and dV summed over the query heads of one of the
``splits`` equal parts of its GQA group, and one program per (query tile, head) for dQ. With more
than one split the programs write fp32 partials, one per split, that the launcher sums in a fixed
order (varlen_attention_triton.dkdv_splits says when). With RoPE, q and k are the rotated tensors the forward
saved, and dQ, dK are rotated back in registers before they are stored.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .varlen_attention_triton_common import (
    TUNE_KEY,
    _cos_sin,
    _dims,
    _load,
    _padding_range,
    _piece_dims,
    _rotate,
    _tile,
    _zero_rows,
    configs,
    prune_by_mode,
)
from .varlen_attention_triton_fwd import _visible_keys


@triton.jit(do_not_specialize=["total_q", "stride_lse_h", "stride_dlse_h"])
def _varlen_attention_bwd_preprocess_kernel(
    out_ptr, dout_ptr, lse_ptr, dlse_ptr, delta_ptr, lse2_ptr, total_q,
    stride_o_t, stride_o_h, stride_do_t, stride_do_h, stride_lse_h, stride_dlse_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, HAS_DLSE: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    r_mask = rows < total_q
    d = tl.arange(0, BLOCK_D)
    mask = r_mask[:, None] & (d < HEAD_DIM)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    o = tl.load(out_ptr + rows64 * stride_o_t + head * stride_o_h + d[None, :], mask=mask, other=0.0)
    do = tl.load(dout_ptr + rows64 * stride_do_t + head * stride_do_h + d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + head * stride_dlse_h + rows, mask=r_mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + head * stride_lse_h + rows, mask=r_mask, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(delta_ptr + head * total_q + rows, delta, mask=r_mask)
    tl.store(lse2_ptr + head * total_q + rows, lse2, mask=r_mask)


@triton.jit
def _split_dims(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
                ROPE: tl.constexpr, SPLIT_D: tl.constexpr):  # fmt: skip
    """(d, dmask, d_b, dmask_b): the head-dim columns of the tile, or with SPLIT_D of its two pieces
    (halves order with RoPE, so that each piece rotates on its own; d_b = d without SPLIT_D)."""
    if SPLIT_D:
        d, dmask = _piece_dims(HEAD_DIM, 0, BLOCK_DA, ROPE)
        d_b, dmask_b = _piece_dims(HEAD_DIM, BLOCK_DA, BLOCK_DB, ROPE)
    else:
        d, dmask = _dims(HEAD_DIM, BLOCK_D, ROPE)
        d_b, dmask_b = d, dmask
    return d, dmask, d_b, dmask_b


@triton.jit
def _finish_grad(g, cs_ptr, rows, row_mask, HEAD_DIM: tl.constexpr, WIDTH: tl.constexpr, OFF: tl.constexpr,
                 ROWS: tl.constexpr, ROPE: tl.constexpr):  # fmt: skip
    """With RoPE, the gradient of the unrotated input: the inverse rotation of a (ROWS, WIDTH) piece in
    halves order whose first column holds angle OFF (sin/cos of its rows read from the table)."""
    if ROPE:
        cos, sin = _cos_sin(cs_ptr, rows, row_mask, HEAD_DIM, WIDTH // 2, WIDTH // 2, OFF)
        g = _rotate(g, cos, -sin, ROWS, WIDTH // 2)
    return g


@triton.jit
def _dkdv_blocks(
    dk, dv, dk_b, dv_b, k, v, k_b, v_b, q_base, do_base, lse2_base, delta_base, stride_q_t, stride_do_t, d,
    dmask, d_b, dmask_b, offs_n, lo, hi, lq, shift, qk_scale,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, SPLIT_D: tl.constexpr, EVEN_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key tile from query blocks [lo, hi) of one head (MASKED: causal diagonal); with
    SPLIT_D the second head-dim piece in k_b, v_b, dk_b, dv_b.

    Query rows past lq load as zeros with lse2 = +inf, so their P is exactly 0. Key rows past Lk
    (the tile's tail) may get non-finite values, which stay in their own rows and are never stored.
    """
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < lq
        rows_m = offs_m.to(tl.int64)[:, None]
        q = _load(q_base + rows_m * stride_q_t + d[None, :], m_valid, dmask, True, EVEN_D)
        do = _load(do_base + rows_m * stride_do_t + d[None, :], m_valid, dmask, True, EVEN_D)
        lse2 = tl.load(lse2_base + offs_m, mask=m_valid, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=m_valid, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
        if SPLIT_D:
            q_b = _load(q_base + rows_m * stride_q_t + d_b[None, :], m_valid, dmask_b, True, EVEN_DB)
            do_b = _load(do_base + rows_m * stride_do_t + d_b[None, :], m_valid, dmask_b, True, EVEN_DB)
            s_t = tl.dot(k_b, tl.trans(q_b), s_t, input_precision=DOT_PREC)
        p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
        if MASKED:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + shift, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        if SPLIT_D:
            dv_b += tl.dot(p_t.to(do.dtype), do_b, input_precision=DOT_PREC)
            dp_t = tl.dot(v_b, tl.trans(do_b), dp_t, input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
        if SPLIT_D:
            dk_b += tl.dot(ds_t.to(q.dtype), q_b, input_precision=DOT_PREC)
    return dk, dv, dk_b, dv_b


@triton.autotune(configs=configs("dkdv"), key=TUNE_KEY, prune_configs_by=prune_by_mode("dkdv"))
@triton.jit(do_not_specialize=["num_seqs", "num_table", "total_q", "total_k"])
def _varlen_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse2_ptr, delta_ptr, dk_ptr, dv_ptr, rec_ptr, table_ptr, cu_k_ptr, cs_ptr,
    num_seqs, num_table, total_q, total_k, num_kv_heads, group, splits, qk_scale, sm_scale,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_do_t, stride_do_h,
    stride_dk_t, stride_dk_h, stride_dv_t, stride_dv_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, ROPE: tl.constexpr,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAD: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, SPLIT_D: tl.constexpr,
    EVEN_DB: tl.constexpr,
):  # fmt: skip
    # Output heads: (KV head, split) pairs, out_head = kv_head * splits + split; dk_ptr and dv_ptr
    # hold num_kv_heads * splits heads (the partials) and out_head's programs sum the query heads
    # [out_head * per_split, (out_head + 1) * per_split), a contiguous part of kv_head's group.
    pid = tl.program_id(0)
    num_out = num_kv_heads * splits
    num_work = num_table * num_out
    if pid >= num_work:  # padding key rows: zero gradients
        lo, hi = _padding_range(cu_k_ptr, num_seqs, total_k, pid - num_work, PAD)
        _zero_rows(dk_ptr, stride_dk_t, stride_dk_h, lo, hi, num_out, HEAD_DIM, BLOCK_D, BLOCK_N)
        _zero_rows(dv_ptr, stride_dv_t, stride_dv_h, lo, hi, num_out, HEAD_DIM, BLOCK_D, BLOCK_N)
        return
    i = tl.load(table_ptr + pid // num_out)
    if i >= num_seqs:
        return
    tile0, ntiles, k0, lk, q0, lq = _tile(rec_ptr, i, num_seqs)
    local = pid - tile0 * num_out
    out_head = local // ntiles
    kv_head = out_head // splits
    per_split = group // splits
    start_n = (local - out_head * ntiles) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < lk
    rows_k = (k0 + offs_n).to(tl.int64)[:, None]
    d, dmask, d_b, dmask_b = _split_dims(HEAD_DIM, BLOCK_D, BLOCK_DA, BLOCK_DB, ROPE, SPLIT_D)
    even_a: tl.constexpr = EVEN_D or SPLIT_D
    k_rows = k_ptr + rows_k * stride_k_t + kv_head * stride_k_h
    v_rows = v_ptr + rows_k * stride_v_t + kv_head * stride_v_h
    k = _load(k_rows + d[None, :], n_valid, dmask, True, even_a)
    v = _load(v_rows + d[None, :], n_valid, dmask, True, even_a)
    dk = tl.zeros([BLOCK_N, BLOCK_DA], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DA], dtype=tl.float32)
    k_b, v_b, dk_b, dv_b = 0.0, 0.0, 0.0, 0.0  # the second head-dim piece (none without SPLIT_D)
    if SPLIT_D:
        k_b = _load(k_rows + d_b[None, :], n_valid, dmask_b, True, EVEN_DB)
        v_b = _load(v_rows + d_b[None, :], n_valid, dmask_b, True, EVEN_DB)
        dk_b = tl.zeros([BLOCK_N, BLOCK_DB], dtype=tl.float32)
        dv_b = tl.zeros([BLOCK_N, BLOCK_DB], dtype=tl.float32)
    shift = lk - lq
    if CAUSAL:  # query i sees key j iff j <= i + shift: rows below m_full see part of the tile
        m_lo = tl.maximum(start_n - shift, 0)
        m_full = tl.minimum(lq, tl.maximum(m_lo, start_n + BLOCK_N - 1 - shift))
        m_mid = m_lo + tl.cdiv(m_full - m_lo, BLOCK_M) * BLOCK_M
    else:
        m_lo = 0
        m_mid = 0
    q_base = q_ptr + q0.to(tl.int64) * stride_q_t
    do_base = dout_ptr + q0.to(tl.int64) * stride_do_t
    for g in range(per_split):
        head = out_head * per_split + g
        qh, doh = q_base + head * stride_q_h, do_base + head * stride_do_h
        lse2_base, delta_base = lse2_ptr + head * total_q + q0, delta_ptr + head * total_q + q0
        dk, dv, dk_b, dv_b = _dkdv_blocks(
            dk, dv, dk_b, dv_b, k, v, k_b, v_b, qh, doh, lse2_base, delta_base, stride_q_t, stride_do_t,
            d, dmask, d_b, dmask_b, offs_n, m_lo, m_mid, lq, shift, qk_scale,
            True, even_a, SPLIT_D, EVEN_DB, BLOCK_M, DOT_PREC,
        )  # fmt: skip
        dk, dv, dk_b, dv_b = _dkdv_blocks(
            dk, dv, dk_b, dv_b, k, v, k_b, v_b, qh, doh, lse2_base, delta_base, stride_q_t, stride_do_t,
            d, dmask, d_b, dmask_b, offs_n, m_mid, lq, lq, shift, qk_scale,
            False, even_a, SPLIT_D, EVEN_DB, BLOCK_M, DOT_PREC,
        )  # fmt: skip
    # dk of the unrotated k with RoPE: the inverse rotation, sin/cos of this tile's rows from the table
    dk = _finish_grad(dk * sm_scale, cs_ptr, k0 + offs_n, n_valid, HEAD_DIM, BLOCK_DA, 0, BLOCK_N, ROPE)
    dk_rows = dk_ptr + rows_k * stride_dk_t + out_head * stride_dk_h
    dv_rows = dv_ptr + rows_k * stride_dv_t + out_head * stride_dv_h
    mask = n_valid[:, None] & dmask[None, :]
    tl.store(dk_rows + d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_rows + d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask)
    if SPLIT_D:
        dk_b = _finish_grad(
            dk_b * sm_scale, cs_ptr, k0 + offs_n, n_valid, HEAD_DIM, BLOCK_DB, BLOCK_DA // 2, BLOCK_N, ROPE
        )
        mask_b = n_valid[:, None] & dmask_b[None, :]
        tl.store(dk_rows + d_b[None, :], dk_b.to(dk_ptr.dtype.element_ty), mask=mask_b)
        tl.store(dv_rows + d_b[None, :], dv_b.to(dv_ptr.dtype.element_ty), mask=mask_b)


@triton.jit
def _dq_blocks(
    dq, dq_b, q, q_b, do, do_b, lse2, delta, k_base, v_base, stride_k_t, stride_v_t, d, dmask, d_b, dmask_b,
    offs_m, lo, hi, shift, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, SPLIT_D: tl.constexpr,
    EVEN_DB: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """dQ of one query tile from key blocks [lo, hi); with SPLIT_D the second head-dim piece in
    q_b, do_b, dq_b."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        rows_n = offs_n.to(tl.int64)[:, None]
        k = _load(k_base + rows_n * stride_k_t + d[None, :], offs_n < hi, dmask, MASKED, EVEN_D)
        v = _load(v_base + rows_n * stride_v_t + d[None, :], offs_n < hi, dmask, MASKED, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if SPLIT_D:
            k_b = _load(k_base + rows_n * stride_k_t + d_b[None, :], offs_n < hi, dmask_b, MASKED, EVEN_DB)
            v_b = _load(v_base + rows_n * stride_v_t + d_b[None, :], offs_n < hi, dmask_b, MASKED, EVEN_DB)
            s = tl.dot(q_b, tl.trans(k_b), s, input_precision=DOT_PREC)
            dp = tl.dot(do_b, tl.trans(v_b), dp, input_precision=DOT_PREC)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            visible = (offs_n < hi)[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + shift)
            p = tl.where(visible, p, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        if SPLIT_D:
            dq_b += tl.dot(ds.to(k.dtype), k_b, input_precision=DOT_PREC)
    return dq, dq_b


@triton.autotune(configs=configs("dq"), key=TUNE_KEY, prune_configs_by=prune_by_mode("dq"))
@triton.jit(do_not_specialize=["num_seqs", "num_table", "total_q"])
def _varlen_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse2_ptr, delta_ptr, dq_ptr, rec_ptr, table_ptr, cu_q_ptr, cs_ptr,
    num_seqs, num_table, total_q, num_heads, group, qk_scale, sm_scale,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_do_t, stride_do_h,
    stride_dq_t, stride_dq_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, ROPE: tl.constexpr,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAD: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, SPLIT_D: tl.constexpr,
    EVEN_DB: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_work = num_table * num_heads
    if pid >= num_work:  # padding query rows: zero gradients
        lo, hi = _padding_range(cu_q_ptr, num_seqs, total_q, pid - num_work, PAD)
        _zero_rows(dq_ptr, stride_dq_t, stride_dq_h, lo, hi, num_heads, HEAD_DIM, BLOCK_D, BLOCK_M)
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
    d, dmask, d_b, dmask_b = _split_dims(HEAD_DIM, BLOCK_D, BLOCK_DA, BLOCK_DB, ROPE, SPLIT_D)
    even_a: tl.constexpr = EVEN_D or SPLIT_D
    q_rows = q_ptr + rows_q * stride_q_t + head * stride_q_h
    do_rows = dout_ptr + rows_q * stride_do_t + head * stride_do_h
    q = _load(q_rows + d[None, :], m_valid, dmask, True, even_a)
    do = _load(do_rows + d[None, :], m_valid, dmask, True, even_a)
    dq = tl.zeros([BLOCK_M, BLOCK_DA], dtype=tl.float32)
    q_b, do_b, dq_b = 0.0, 0.0, 0.0  # the second head-dim piece (none without SPLIT_D)
    if SPLIT_D:
        q_b = _load(q_rows + d_b[None, :], m_valid, dmask_b, True, EVEN_DB)
        do_b = _load(do_rows + d_b[None, :], m_valid, dmask_b, True, EVEN_DB)
        dq_b = tl.zeros([BLOCK_M, BLOCK_DB], dtype=tl.float32)
    lse2 = tl.load(lse2_ptr + head * total_q + q0 + offs_m, mask=m_valid, other=float("inf"))
    delta = tl.load(delta_ptr + head * total_q + q0 + offs_m, mask=m_valid, other=0.0)
    kv_head = head // group
    k_base = k_ptr + k0.to(tl.int64) * stride_k_t + kv_head * stride_k_h
    v_base = v_ptr + k0.to(tl.int64) * stride_v_t + kv_head * stride_v_h
    n_full, n_end = _visible_keys(start_m, lq, lk, CAUSAL, BLOCK_M, BLOCK_N)
    dq, dq_b = _dq_blocks(
        dq, dq_b, q, q_b, do, do_b, lse2, delta, k_base, v_base, stride_k_t, stride_v_t, d, dmask, d_b,
        dmask_b, offs_m, 0, n_full, lk - lq, qk_scale, False, CAUSAL, even_a, SPLIT_D, EVEN_DB, BLOCK_N,
        DOT_PREC,
    )  # fmt: skip
    dq, dq_b = _dq_blocks(
        dq, dq_b, q, q_b, do, do_b, lse2, delta, k_base, v_base, stride_k_t, stride_v_t, d, dmask, d_b,
        dmask_b, offs_m, n_full, n_end, lk - lq, qk_scale, True, CAUSAL, even_a, SPLIT_D, EVEN_DB, BLOCK_N,
        DOT_PREC,
    )  # fmt: skip
    dq = _finish_grad(dq * sm_scale, cs_ptr, q0 + offs_m, m_valid, HEAD_DIM, BLOCK_DA, 0, BLOCK_M, ROPE)
    dq_rows = dq_ptr + rows_q * stride_dq_t + head * stride_dq_h
    tl.store(dq_rows + d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=m_valid[:, None] & dmask[None, :])
    if SPLIT_D:
        dq_b = _finish_grad(
            dq_b * sm_scale, cs_ptr, q0 + offs_m, m_valid, HEAD_DIM, BLOCK_DB, BLOCK_DA // 2, BLOCK_M, ROPE
        )
        tl.store(
            dq_rows + d_b[None, :], dq_b.to(dq_ptr.dtype.element_ty), mask=m_valid[:, None] & dmask_b[None, :]
        )
