"""Triton moe_ffn: gather-fused GEMM-1 + SwiGLU, gate-weighted GEMM-2, deterministic combine.

Math and the reference: seedvl_kernels.moe_ffn. Routing metadata comes from the same stable sort as
moe_permute (row_map, offsets; plain PyTorch on the device, no host sync); then, with
src[r] = row_map[r] // k (the token of permuted row r) and w_perm[r] = gate_weights.flat[row_map[r]]:

    forward
      F1  gu, h = x[src] @ w_gate_up[e], swiglu      _moe_gate_up_fwd_kernel: the token rows are
                                                     gathered in the A-operand load (no x_perm);
                                                     gate and up columns n and F+n are two
                                                     accumulators of one program, so SwiGLU runs in
                                                     the epilogue on the rounded gu, as the reference
      F2  y[row_map[r]] = w_perm[r] * (h @ w_down[e])  grouped GEMM with the gate weight applied in
                                                     the epilogue and the row scattered to its slot
                                                     t*k+j (a permutation: one writer per row)
      F3  out[t] = sum_{j<k} y[t*k+j]                _moe_combine_kernel, fp32, j in fixed order
    backward (dout = d out)
      B1  dh~ = dout[src] @ w_down[e]^T              _moe_down_bwd_kernel (gather in the load); its
                                                     epilogue forms dgate partials <dh~, h> per
                                                     F-tile, dh = w_perm * dh~ and the SwiGLU
                                                     backward: dgu = [dh*up*silu'(gate), dh*silu(gate)]
          dgate[slot] = sum of the partials           fixed order over F-tiles (no atomics)
      B2  dw_down[e] = h_e^T @ (w_perm * dout[src])_e  K-grouped, gather + scale in the dC load
      B3  dw_gate_up[e] = x[src]_e^T @ dgu_e           K-grouped, gather in the A load
      B4  dx_slot[row_map[r]] = dgu @ w_gate_up[e]^T   M-grouped, rows scattered to slots
      B5  dx[t] = sum_{j<k} dx_slot[t*k+j]             the combine kernel again

dgate uses <dout, h @ Wd> = <dout @ Wd^T, h>, so y never needs saving and a zero gate weight is
fine. Every reduction has a fixed order and one writer per output element: forward and all
gradients are bitwise reproducible.

Saved for backward: x, gate_weights, row_map, offsets and the weights (inputs), plus gu (T*k, 2F)
for the SwiGLU backward and h (T*k, F), which the forward materialises anyway as GEMM-2's input, for
dw_down. The reference also keeps x_perm (T*k, D) and y (T*k, D). Nothing is saved when no input
requires grad (gu is then never written).

Rounding (bf16/fp16): gu, h and y (gate-weighted) are rounded to the input dtype once each; the
combine adds the k rounded rows in fp32. The reference rounds y before weighting; the difference
is one rounding of each term. In backward dh stays in fp32 (the reference rounds it).

Bytes written per routed row (forward, training): gu 2F + h F + y D elements; read: x row D
(gathered, L2-resident across the k copies), h F, y D.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from .grouped_gemm_triton import (
    MGroupedConfig,
    _m_tile,
    _swizzle,
    dot_precision,
    groups_pow2,
    launch_k_grouped,
    launch_m_grouped,
    m_grouped_config,
    num_m_tiles_bound,
)
from .moe_permute import moe_permute_index

# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["M"])
def _moe_gate_up_fwd_kernel(
    x_ptr,
    w_ptr,
    gu_ptr,
    h_ptr,
    offsets_ptr,
    src_ptr,
    M,
    FF,
    D,
    stride_xt,
    stride_xd,
    stride_we,
    stride_wd,
    stride_wf,
    stride_gum,
    stride_gun,
    stride_hm,
    stride_hn,
    NUM_GROUPS: tl.constexpr,
    GROUPS_POW2: tl.constexpr,
    SAVE_GU: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M) + NUM_GROUPS
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, tl.cdiv(FF, BLOCK_N), GROUP_M)
    group, row_start, row_end = _m_tile(offsets_ptr, pid_m, M, NUM_GROUPS, GROUPS_POW2, BLOCK_M)

    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < row_end
    mask_n = offs_n < FF
    tokens = tl.load(src_ptr + offs_m, mask=mask_m, other=0)
    x_ptrs = x_ptr + tokens[:, None].to(tl.int64) * stride_xt + offs_k[None, :] * stride_xd
    wg_ptrs = (
        w_ptr + group.to(tl.int64) * stride_we + offs_k[:, None] * stride_wd + offs_n[None, :] * stride_wf
    )
    wu_ptrs = wg_ptrs + FF * stride_wf

    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_k = tl.where(group < NUM_GROUPS, tl.cdiv(D, BLOCK_K), 0)
    for ki in range(0, num_k):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            bg = tl.load(wg_ptrs, mask=mask_n[None, :], other=0.0)
            bu = tl.load(wu_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            k_left = D - ki * BLOCK_K
            a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            mask_b = (offs_k[:, None] < k_left) & mask_n[None, :]
            bg = tl.load(wg_ptrs, mask=mask_b, other=0.0)
            bu = tl.load(wu_ptrs, mask=mask_b, other=0.0)
        acc_gate = tl.dot(a, bg, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(a, bu, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        wg_ptrs += BLOCK_K * stride_wd
        wu_ptrs += BLOCK_K * stride_wd

    mask = mask_m[:, None] & mask_n[None, :]
    gate = acc_gate.to(h_ptr.dtype.element_ty)
    up = acc_up.to(h_ptr.dtype.element_ty)
    if SAVE_GU:
        gu_ptrs = gu_ptr + offs_m[:, None].to(tl.int64) * stride_gum + offs_n[None, :] * stride_gun
        tl.store(gu_ptrs, gate, mask=mask)
        tl.store(gu_ptrs + FF * stride_gun, up, mask=mask)
    gate32 = gate.to(tl.float32)
    h = gate32 * tl.sigmoid(gate32) * up.to(tl.float32)
    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_n[None, :] * stride_hn
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _moe_down_bwd_kernel(
    dout_ptr,
    w_ptr,
    gu_ptr,
    dgu_ptr,
    part_ptr,
    offsets_ptr,
    src_ptr,
    slot_ptr,
    scale_ptr,
    M,
    FF,
    D,
    stride_dt,
    stride_dd,
    stride_we,
    stride_wf,
    stride_wd,
    stride_gum,
    stride_gun,
    stride_dgm,
    stride_dgn,
    stride_pm,
    NUM_GROUPS: tl.constexpr,
    GROUPS_POW2: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M) + NUM_GROUPS
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, tl.cdiv(FF, BLOCK_N), GROUP_M)
    group, row_start, row_end = _m_tile(offsets_ptr, pid_m, M, NUM_GROUPS, GROUPS_POW2, BLOCK_M)

    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < row_end
    mask_n = offs_n < FF
    tokens = tl.load(src_ptr + offs_m, mask=mask_m, other=0)
    a_ptrs = dout_ptr + tokens[:, None].to(tl.int64) * stride_dt + offs_k[None, :] * stride_dd
    # B[d, f] = w_down[e, f, d]: the transposed expert weight, read through strides.
    b_ptrs = (
        w_ptr + group.to(tl.int64) * stride_we + offs_k[:, None] * stride_wd + offs_n[None, :] * stride_wf
    )

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_k = tl.where(group < NUM_GROUPS, tl.cdiv(D, BLOCK_K), 0)
    for ki in range(0, num_k):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            k_left = D - ki * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_dd
        b_ptrs += BLOCK_K * stride_wd

    mask = mask_m[:, None] & mask_n[None, :]
    gu_ptrs = gu_ptr + offs_m[:, None].to(tl.int64) * stride_gum + offs_n[None, :] * stride_gun
    gate = tl.load(gu_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptrs + FF * stride_gun, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    h = (silu * up).to(dgu_ptr.dtype.element_ty).to(tl.float32)  # the h GEMM-2 consumed
    partial = tl.sum(acc * h, 1)  # this F-tile's share of <dout @ Wd^T, h>
    slots = tl.load(slot_ptr + offs_m, mask=mask_m, other=0)
    tl.store(part_ptr + slots.to(tl.int64) * stride_pm + pid_n, partial, mask=mask_m)

    dh = acc * tl.load(scale_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    d_gate = dh * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = dh * silu
    dgu_ptrs = dgu_ptr + offs_m[:, None].to(tl.int64) * stride_dgm + offs_n[None, :] * stride_dgn
    tl.store(dgu_ptrs, d_gate.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgu_ptrs + FF * stride_dgn, d_up.to(dgu_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T"])
def _moe_combine_kernel(
    y_ptr,
    out_ptr,
    T,
    D,
    TOP_K,
    stride_ym,
    stride_ot,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # out[t] = sum_{j < k} y[t*k + j] in fp32, j ascending: the deterministic unpermute.
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (offs_t < T)[:, None] & (offs_d < D)[None, :]
    y_ptrs = y_ptr + (offs_t[:, None].to(tl.int64) * TOP_K) * stride_ym + offs_d[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for _ in range(0, TOP_K):
        acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        y_ptrs += stride_ym
    out_ptrs = out_ptr + offs_t[:, None].to(tl.int64) * stride_ot + offs_d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _gather_index(row_map: torch.Tensor, gate_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(src int32 (T*k,): the token of each permuted row, w_perm fp32 (T*k,): its gate weight)."""
    k = gate_weights.shape[1]
    src = torch.div(row_map, k, rounding_mode="floor")
    w_perm = gate_weights.reshape(-1).to(torch.float32).index_select(0, row_map)
    return src, w_perm


def _combine(y: torch.Tensor, out: torch.Tensor, k: int) -> None:
    T, D = out.shape
    if T == 0 or D == 0:
        return
    block_t, block_d = 16, (min(256, triton.next_power_of_2(D)) if out.is_cuda else 32)
    grid = (triton.cdiv(T, block_t), triton.cdiv(D, block_d))
    _moe_combine_kernel[grid](y, out, T, D, k, y.stride(0), out.stride(0), BLOCK_T=block_t, BLOCK_D=block_d)


def _gemm_grid(m: int, n: int, num_groups: int, cfg: MGroupedConfig) -> tuple[int]:
    return (num_m_tiles_bound(m, num_groups, cfg.block_m) * triton.cdiv(n, cfg.block_n),)


def _swiglu_config(n: int, k: int, dtype: torch.dtype, device: torch.device) -> MGroupedConfig:
    """GEMM-1 keeps two accumulators (gate, up): half the N width of a plain GEMM."""
    cfg = m_grouped_config(n, k, dtype, device)
    if device.type == "cuda" and dtype != torch.float32:
        cfg = replace(cfg, block_n=128)
    return cfg


def _down_bwd_config(n: int, k: int, dtype: torch.dtype, device: torch.device) -> MGroupedConfig:
    """B1's epilogue holds gate, up and the accumulator at once: at 128x128 (8 warps) it spills on
    sm_90 (255 registers + 1 KB of stack, AOT-compiled with Triton 3.9); 128x64 does not (253)."""
    cfg = m_grouped_config(n, k, dtype, device)
    if device.type == "cuda" and dtype != torch.float32:
        cfg = replace(cfg, block_n=64)
    return cfg


def moe_ffn_fwd(
    x: torch.Tensor,
    gate_weights: torch.Tensor,
    row_map: torch.Tensor,
    offsets: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    save_for_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F1-F3 of the module docstring: (out (T, D), gu (T*k, 2F) or (0, 2F), h (T*k, F))."""
    T, D = x.shape
    k = gate_weights.shape[1]
    E, FF = w_down.shape[0], w_down.shape[1]
    M = row_map.shape[0]
    src, w_perm = _gather_index(row_map, gate_weights)
    gu = x.new_empty((M if save_for_backward else 0, 2 * FF))
    h = x.new_empty((M, FF))
    out = x.new_empty((T, D))
    if M == 0 or FF == 0:  # gu and h have no elements; D == 0 runs through (no K steps: zeros)
        return out.zero_(), gu, h
    cfg = _swiglu_config(FF, D, x.dtype, x.device)
    _moe_gate_up_fwd_kernel[_gemm_grid(M, FF, E, cfg)](
        x,
        w_gate_up,
        gu if save_for_backward else h,
        h,
        offsets,
        src,
        M,
        FF,
        D,
        *x.stride(),
        *w_gate_up.stride(),
        *(gu.stride() if save_for_backward else (0, 0)),
        *h.stride(),
        NUM_GROUPS=E,
        GROUPS_POW2=groups_pow2(E),
        SAVE_GU=save_for_backward,
        EVEN_K=D % cfg.block_k == 0,
        DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    y = x.new_empty((M, D))  # slot order: row t*k + j
    launch_m_grouped(h, w_down, offsets, y, False, out_rows=row_map, row_scale=w_perm)
    _combine(y, out, k)
    return out, gu, h


def moe_ffn_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    gate_weights: torch.Tensor,
    row_map: torch.Tensor,
    offsets: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    gu: torch.Tensor,
    h: torch.Tensor,
    need_dx: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """B1-B5 of the module docstring: (dx, dgate, dw_gate_up, dw_down); dx and the dW are empty
    (0,) tensors when not needed. dgate is always computed (it falls out of B1)."""
    T, D = x.shape
    k = gate_weights.shape[1]
    E, FF = w_down.shape[0], w_down.shape[1]
    M = row_map.shape[0]
    src, w_perm = _gather_index(row_map, gate_weights)
    dgu = x.new_empty((M, 2 * FF))
    cfg = _down_bwd_config(FF, D, x.dtype, x.device)
    n_tiles = triton.cdiv(FF, cfg.block_n)
    partials = torch.zeros((M, max(n_tiles, 1)), dtype=torch.float32, device=x.device)
    if M > 0 and FF > 0:
        _moe_down_bwd_kernel[_gemm_grid(M, FF, E, cfg)](
            grad_out,
            w_down,
            gu,
            dgu,
            partials,
            offsets,
            src,
            row_map,
            w_perm,
            M,
            FF,
            D,
            *grad_out.stride(),
            *w_down.stride(),
            *gu.stride(),
            *dgu.stride(),
            partials.stride(0),
            NUM_GROUPS=E,
            GROUPS_POW2=groups_pow2(E),
            EVEN_K=D % cfg.block_k == 0,
            DOT_PRECISION=dot_precision(x.dtype),
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    dgate = partials.sum(1).view(T, k).to(gate_weights.dtype)

    dx, dw_gate_up, dw_down = (x.new_empty((0,)) for _ in range(3))  # distinct: outputs may not alias
    if need_dw:
        dw_down = w_down.new_empty(w_down.shape)
        launch_k_grouped(h, grad_out, offsets, dw_down, False, c_rows=src, c_scale=w_perm)
        dw_gate_up = w_gate_up.new_empty(w_gate_up.shape)
        launch_k_grouped(x, dgu, offsets, dw_gate_up, False, a_rows=src)
    if need_dx:
        dx_slots = x.new_empty((M, D))
        launch_m_grouped(dgu, w_gate_up, offsets, dx_slots, True, out_rows=row_map)
        dx = x.new_empty((T, D))
        if M == 0 or D == 0:
            dx.zero_()
        _combine(dx_slots, dx, k)
    return dx, dgate, dw_gate_up, dw_down


# ----------------------------------------------------------------------------- custom ops + autograd


@torch.library.custom_op("seedvl::moe_ffn_triton_fwd", mutates_args=())
def _moe_ffn_fwd_op(
    x: torch.Tensor,
    gate_weights: torch.Tensor,
    row_map: torch.Tensor,
    offsets: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    save_for_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return moe_ffn_fwd(x, gate_weights, row_map, offsets, w_gate_up, w_down, save_for_backward)


@_moe_ffn_fwd_op.register_fake
def _(x, gate_weights, row_map, offsets, w_gate_up, w_down, save_for_backward):
    M, FF = row_map.shape[0], w_down.shape[1]
    return (
        x.new_empty(x.shape),
        x.new_empty((M if save_for_backward else 0, 2 * FF)),
        x.new_empty((M, FF)),
    )


@torch.library.custom_op("seedvl::moe_ffn_triton_bwd", mutates_args=())
def _moe_ffn_bwd_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    gate_weights: torch.Tensor,
    row_map: torch.Tensor,
    offsets: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    gu: torch.Tensor,
    h: torch.Tensor,
    need_dx: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return moe_ffn_bwd(
        grad_out, x, gate_weights, row_map, offsets, w_gate_up, w_down, gu, h, need_dx, need_dw
    )


@_moe_ffn_bwd_op.register_fake
def _(grad_out, x, gate_weights, row_map, offsets, w_gate_up, w_down, gu, h, need_dx, need_dw):
    return (
        x.new_empty(x.shape if need_dx else (0,)),
        gate_weights.new_empty(gate_weights.shape),
        w_gate_up.new_empty(w_gate_up.shape if need_dw else (0,)),
        w_down.new_empty(w_down.shape if need_dw else (0,)),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, gate_weights, row_map, offsets, w_gate_up, w_down, save_for_backward = inputs
    _, gu, h = output
    ctx.save_for_backward(x, gate_weights, row_map, offsets, w_gate_up, w_down, gu, h)
    ctx.mark_non_differentiable(gu, h)
    ctx.saved_gu = save_for_backward


def _backward(ctx, grad_out: torch.Tensor, _grad_gu, _grad_h):
    x, gate_weights, row_map, offsets, w_gate_up, w_down, gu, h = ctx.saved_tensors
    if not ctx.saved_gu:
        raise RuntimeError("moe_ffn (triton): backward needs the forward to run with save_for_backward=True")
    need = ctx.needs_input_grad
    need_dw = need[4] or need[5]
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    dx, dgate, dw_gate_up, dw_down = _moe_ffn_bwd_op(
        grad_out, x, gate_weights, row_map, offsets, w_gate_up, w_down, gu, h, need[0], need_dw
    )
    return (
        dx if need[0] else None,
        dgate if need[1] else None,
        None,
        None,
        dw_gate_up if need[4] else None,
        dw_down if need[5] else None,
        None,
    )


_moe_ffn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- entry


def moe_ffn_triton(
    x: torch.Tensor,
    gate_weights: torch.Tensor,
    expert_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """The ``triton`` implementation behind seedvl_kernels.moe_ffn (arguments validated there)."""
    row_map, offsets = moe_permute_index(expert_ids, w_gate_up.shape[0])
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate_weights, w_gate_up, w_down))
    out, _, _ = _moe_ffn_fwd_op(x, gate_weights, row_map.to(torch.int32), offsets, w_gate_up, w_down, save)
    return out
