"""ring_attention's log-sum-exp merge as one Triton kernel (the math: :mod:`seedvl_kernels.ring_attention`).

Every ring step folds a block's partial result (o_t, lse_t) into the running (o, lse):

    m = max(lse, lse_t) (0 where both are -inf);  lse' = m + log(exp(lse - m) + exp(lse_t - m))
    o' = exp(lse - lse') o + exp(lse_t - lse') o_t

In eager PyTorch (ring_attention._merge_ref) that is 20 ATen kernels a step (maximum, isneginf,
masked_fill, four sub/exp pairs, log, ... counted under a dispatch mode), each a full pass over
(T, Hq) or (T, Hq, D); the (T, Hq, D) passes alone move 7 * T*Hq*D*4 bytes (o scaled in place, o_t
scaled into a temporary, the two summed into o). Here one program per (BLOCK_T rows, head) reads
lse, lse_t, o and o_t once and writes o' and lse' once, in place: 3 * T*Hq*D*4 + 3 * T*Hq*4 bytes
and one launch.

Layouts: out, blk_out (T, Hq, D) fp32 with unit stride in D; lse, blk_lse (Hq, T) fp32 with unit
stride in T. The arithmetic is the reference's, in fp32, so results agree to a few ulps (exp and log
are libdevice's on the GPU, the interpreter's numpy ones on CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _backends

TILE_ELEMS = 2048  # fp32 elements of out (and as many of blk_out) per program: 16 + 16 a thread


def block_t(block_d: int) -> int:
    """Rows per program (all BLOCK_D columns of one head): a fixed tile of TILE_ELEMS, so that a
    program holds few registers (the kernel is bound by memory, and wants many programs in flight)."""
    return max(8, TILE_ELEMS // block_d)


@triton.jit(do_not_specialize=["num_rows"])
def _ring_attention_merge_kernel(
    out_ptr, lse_ptr, blk_out_ptr, blk_lse_ptr, num_rows,
    stride_o_t, stride_o_h, stride_b_t, stride_b_h, stride_lse_h, stride_blse_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    row_ok = rows < num_rows
    lse = tl.load(lse_ptr + head * stride_lse_h + rows, mask=row_ok, other=float("-inf"))
    blk = tl.load(blk_lse_ptr + head * stride_blse_h + rows, mask=row_ok, other=float("-inf"))
    m = tl.maximum(lse, blk)
    m = tl.where(m == float("-inf"), 0.0, m)
    new = m + tl.log(tl.exp(lse - m) + tl.exp(blk - m))
    safe = tl.where(new == float("-inf"), 0.0, new)
    w_old = tl.exp(lse - safe)
    w_blk = tl.exp(blk - safe)
    d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (d < HEAD_DIM)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    o_ptrs = out_ptr + rows64 * stride_o_t + head * stride_o_h + d[None, :]
    b_ptrs = blk_out_ptr + rows64 * stride_b_t + head * stride_b_h + d[None, :]
    o = tl.load(o_ptrs, mask=mask, other=0.0)
    b = tl.load(b_ptrs, mask=mask, other=0.0)
    tl.store(o_ptrs, o * w_old[:, None] + b * w_blk[:, None], mask=mask)
    tl.store(lse_ptr + head * stride_lse_h + rows, new, mask=row_ok)


def merge_unavailable(out: torch.Tensor, blk_out: torch.Tensor) -> str | None:
    """Why the fused merge cannot serve these tensors (None: it can)."""
    if _backends.triton_version() is None:
        return "triton is not installed"
    if out.dtype != torch.float32 or blk_out.dtype != torch.float32:
        return f"the fused merge handles float32 partials, got {out.dtype} and {blk_out.dtype}"
    if out.device.type != "cuda" and not (out.device.type == "cpu" and _backends.triton_interpret()):
        return f"Triton runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), not on {out.device.type}"
    return None


def merge_(out: torch.Tensor, lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor) -> None:
    """In place: (out, lse) <- the log-sum-exp merge with (blk_out, blk_lse), one kernel launch.

    out, blk_out: (T, Hq, D) float32, unit stride in D. lse, blk_lse: (Hq, T) float32, unit stride in T.
    """
    why = merge_unavailable(out, blk_out)
    if why is not None:
        raise ValueError(f"out: {why}")
    T, H, D = out.shape
    if blk_out.shape != out.shape or lse.shape != (H, T) or blk_lse.shape != (H, T):
        raise ValueError(
            f"blk_out, lse, blk_lse: expected shapes {tuple(out.shape)}, {(H, T)}, {(H, T)}; got "
            f"{tuple(blk_out.shape)}, {tuple(lse.shape)}, {tuple(blk_lse.shape)}"
        )
    for name, t in (("out", out), ("blk_out", blk_out), ("lse", lse), ("blk_lse", blk_lse)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: expected unit stride in the last dim, got strides {t.stride()}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: expected float32, got {t.dtype}")
    if T == 0 or H == 0:
        return
    block_d = max(16, triton.next_power_of_2(D))
    rows = block_t(block_d)
    _ring_attention_merge_kernel[(triton.cdiv(T, rows), H)](
        out, lse, blk_out, blk_lse, T,
        out.stride(0), out.stride(1), blk_out.stride(0), blk_out.stride(1), lse.stride(0), blk_lse.stride(0),
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_T=rows, num_warps=4,
    )  # fmt: skip
