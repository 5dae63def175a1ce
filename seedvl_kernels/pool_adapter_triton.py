"""Triton pool_adapter: the ``triton`` implementation of seedvl::pool_adapter_fwd / _bwd.

Math, shapes and what is saved: see seedvl_kernels.pool_adapter. Here N = T/4 pooled tokens, and
every kernel below is one launch of ``_pool_adapter_gemm_kernel``, a tiled GEMM out = A @ B
(fp32 accumulator, rounded once to the output dtype) whose operand load and epilogue are picked by
constexprs:

* ``POOL_A``: A(m, k) = mean_{j<4} a[m * stride_am + k * stride_ak + j * stride_aw], summed in fp32
  while the tile is loaded and rounded to the input dtype for the tensor-core dot. With
  stride_am = 4 * T-stride the pooled rows are tokens (the forward); with stride_ak = 4 * T-stride
  the pooled axis is the reduction axis (dw1 = mean4(x)^T dh). mean4(x) never exists in memory.
* ``EPILOGUE``: STORE; BIAS (+ b[n]); BIAS_GELU (h = acc + b -> out, GELU(h) -> out2);
  DGELU (h loaded from aux: dh = acc * GELU'(h) -> out, GELU(h) -> out2, one erf for both; plus
  the bias gradients as per-M-tile partial column sums of dh and of the A operand dy, reduced over
  the few M-tiles by the launcher); WINDOW (acc / 4 stored to the 4 rows 4m..4m+3 of out: dx
  without a pooled gradient in memory).

Launches (M x N x K):

    forward   F1  h, a = mean4(x) @ w1 + b1, GELU(.)      POOL_A, BIAS_GELU   N x F x C
              F2  y = a @ w2 + b2                           BIAS               N x C_out x F
    backward  B1  dh, a = (dy @ w2^T) * GELU'(h), GELU(h)   DGELU              N x F x C_out
                  + partial sums of dh and dy -> db1, db2
              B2  dw2 = a^T dy                              STORE              F x C_out x N
              B3  dw1 = mean4(x)^T dh                       POOL_A, STORE      C x F x N
              B4  dx[4n+j] = (dh @ w1^T)[n] / 4             WINDOW             N x C x F

The bias gradients live in B1's epilogue, after its main loop, rather than in the wgrad loops
(B2/B3 stream dy and dh too): a reduction inside a main loop costs it pipeline stages and
registers (profiles/pool_adapter.md). B1's epilogue sums its fp32 dh tile, and dy's rows of its
M-tile, which its main loop has just pulled through L2, split across the program's row of N-tiles.

a = GELU(h) goes to memory once in each direction (written by an epilogue, read by the next GEMM)
and is never saved: applying GELU while loading a GEMM operand would evaluate erf once per element
per output tile (C_out / BLOCK_N times), which costs more than the N x F round trip. Weights may be
row- or column-major (a transpose is a stride swap); no shape is required to fit the tiles.

Cost of the pooled load: the pooled operand's tile is 4 tiles of the source, so F1 and B3 move
about twice the L2 -> SM bytes of a plain GEMM of the same shape (4 * BLOCK_M * BLOCK_K + BLOCK_K *
BLOCK_N elements per step instead of BLOCK_M * BLOCK_K + BLOCK_K * BLOCK_N); DRAM reads x once per
pass when the swizzle keeps the source rows in L2. profiles/pool_adapter.md has the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .grouped_gemm_triton import _swizzle, dot_precision

# Epilogues (values of the EPILOGUE constexpr).
STORE = tl.constexpr(0)
BIAS = tl.constexpr(1)
BIAS_GELU = tl.constexpr(2)
DGELU = tl.constexpr(3)
WINDOW = tl.constexpr(4)
WINDOW_ROWS = 4


def _epilogue_id(epilogue: tl.constexpr | int) -> int:
    return epilogue.value if isinstance(epilogue, tl.constexpr) else epilogue


# ----------------------------------------------------------------------------- tunables


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int  # M-tiles per swizzle band
    num_warps: int
    num_stages: int


# The interpreter runs each program in numpy: 32-wide tiles keep the odd test sizes exercising
# partial tiles and multi-step K loops.
_INTERPRET = GemmConfig(32, 32, 32, 4, 4, 1)


def gemm_config(
    m: int, n: int, pooled: bool, epilogue: tl.constexpr | int, dtype: torch.dtype, device: torch.device
) -> GemmConfig:
    """Tiles for one launch. GPU values are starting points for tuning (profiles/pool_adapter.md),
    checked for spills and pipelining on sm_90 by profiles/triton_aot.py.

    A pooled A operand stages 4 source tiles per step, hence BLOCK_K = 32; at BLOCK_N = 256 it and
    the DGELU epilogue (erf, exp and the loaded h beside the accumulator) exceed 255 registers.
    """
    if device.type != "cuda":
        return _INTERPRET
    if dtype == torch.float32:  # IEEE fp32 dots run on FMA units: small tiles
        return GemmConfig(64, 64, 32, 8, 4, 3)
    if pooled:
        return GemmConfig(128, 128, 32, 8, 8, 3)
    block_n = 256 if n >= 2048 and m >= 2048 and _epilogue_id(epilogue) != DGELU.value else 128
    return GemmConfig(128, block_n, 64, 8, 8, 3)


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _gelu_parts(h):
    """(GELU(h), GELU'(h)) in fp32 from one erf: h * Phi(h) and Phi(h) + h * phi(h)."""
    cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
    pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
    return h * cdf, cdf + h * pdf


@triton.jit(do_not_specialize=["M", "K"])
def _pool_adapter_gemm_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    out2_ptr,
    aux_ptr,
    bias_ptr,
    sum_out_ptr,
    sum_a_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_aw,
    stride_bk,
    stride_bn,
    stride_om,
    stride_on,
    stride_o2m,
    stride_o2n,
    stride_auxm,
    stride_auxn,
    POOL_A: tl.constexpr,
    EPILOGUE: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_pid_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # int64 row offsets: token-indexed strides times token counts can pass 2^31 elements.
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            mask_a = mask_m[:, None]
            mask_b = mask_n[None, :]
        else:
            mask_a = mask_m[:, None] & (offs_k[None, :] < K - k0)
            mask_b = (offs_k[:, None] < K - k0) & mask_n[None, :]
        if POOL_A:
            a = tl.load(a_ptrs, mask=mask_a, other=0.0).to(tl.float32)
            a += tl.load(a_ptrs + stride_aw, mask=mask_a, other=0.0).to(tl.float32)
            a += tl.load(a_ptrs + 2 * stride_aw, mask=mask_a, other=0.0).to(tl.float32)
            a += tl.load(a_ptrs + 3 * stride_aw, mask=mask_a, other=0.0).to(tl.float32)
            a = (a * 0.25).to(a_ptr.dtype.element_ty)
        else:
            a = tl.load(a_ptrs, mask=mask_a, other=0.0)
        b = tl.load(b_ptrs, mask=mask_b, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask = mask_m[:, None] & mask_n[None, :]
    rows = offs_m[:, None].to(tl.int64)
    out_ptrs = out_ptr + rows * stride_om + offs_n[None, :] * stride_on
    dtype = out_ptr.dtype.element_ty
    if EPILOGUE == BIAS or EPILOGUE == BIAS_GELU:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == BIAS_GELU:
        gelu, _ = _gelu_parts(acc)
        tl.store(out_ptrs, acc.to(dtype), mask=mask)
        tl.store(out2_ptr + rows * stride_o2m + offs_n[None, :] * stride_o2n, gelu.to(dtype), mask=mask)
    elif EPILOGUE == DGELU:
        h = tl.load(aux_ptr + rows * stride_auxm + offs_n[None, :] * stride_auxn, mask=mask, other=0.0)
        gelu, dgelu = _gelu_parts(h.to(tl.float32))
        dh = acc * dgelu  # rows past M are 0: their A rows loaded as 0
        tl.store(out_ptrs, dh.to(dtype), mask=mask)
        tl.store(out2_ptr + rows * stride_o2m + offs_n[None, :] * stride_o2n, gelu.to(dtype), mask=mask)
        # Bias gradients as per-M-tile partial column sums (reduced by the launcher): db1 from the
        # fp32 dh tile, db2 from the A operand (dy), whose rows this program just streamed through
        # L2; the K columns of A are split among the program's row of N-tiles. After the main loop,
        # so the pipelined loop is untouched; fixed order, no atomics.
        tl.store(sum_out_ptr + pid_m * N + offs_n, tl.sum(dh, axis=0), mask=mask_n)
        for c0 in range(pid_n * BLOCK_N, K, num_pid_n * BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            a_rows = tl.load(
                a_ptr + rows * stride_am + cols[None, :] * stride_ak,
                mask=mask_m[:, None] & (cols[None, :] < K),
                other=0.0,
            )
            tl.store(sum_a_ptr + pid_m * K + cols, tl.sum(a_rows.to(tl.float32), axis=0), mask=cols < K)
    elif EPILOGUE == WINDOW:
        val = (acc * 0.25).to(dtype)
        win_ptrs = out_ptr + (rows * 4) * stride_om + offs_n[None, :] * stride_on
        for j in tl.static_range(4):
            tl.store(win_ptrs + j * stride_om, val, mask=mask)
    else:
        tl.store(out_ptrs, acc.to(dtype), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _gemm(
    a: torch.Tensor,
    a_strides: tuple[int, int],
    b: torch.Tensor,
    b_strides: tuple[int, int],
    out: torch.Tensor,
    m: int,
    n: int,
    k: int,
    *,
    pool_stride: int | None = None,
    epilogue: tl.constexpr | int = STORE,
    out2: torch.Tensor | None = None,
    aux: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    sums: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: GemmConfig | None = None,
) -> None:
    """out = A @ B with A (m, k) at a_strides (pooled over 4 source rows pool_stride apart when
    given) and B (k, n) at b_strides, then the epilogue (module docstring); ``sums`` are DGELU's
    partial column-sum buffers, (cdiv(m, BLOCK_M), n) and (cdiv(m, BLOCK_M), k) fp32. ``config``
    overrides gemm_config (tuning scripts)."""
    if m == 0 or n == 0:
        return
    cfg = config or gemm_config(m, n, pool_stride is not None, epilogue, a.dtype, a.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    out2 = out if out2 is None else out2
    aux = out if aux is None else aux
    sum_out, sum_a = sums if sums is not None else (out, out)
    _pool_adapter_gemm_kernel[grid](
        a,
        b,
        out,
        out2,
        aux,
        bias if bias is not None else out,
        sum_out,
        sum_a,
        m,
        n,
        k,
        a_strides[0],
        a_strides[1],
        pool_stride or 0,
        b_strides[0],
        b_strides[1],
        out.stride(0),
        out.stride(1),
        out2.stride(0),
        out2.stride(1),
        aux.stride(0),
        aux.stride(1),
        POOL_A=pool_stride is not None,
        EPILOGUE=_epilogue_id(epilogue),
        EVEN_K=k % cfg.block_k == 0,
        DOT_PRECISION=dot_precision(a.dtype),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _t(w: torch.Tensor) -> tuple[int, int]:
    """Strides of w^T: a transpose is a stride swap."""
    return w.stride(1), w.stride(0)


def launch_fwd(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor,
) -> None:
    """The ``triton`` entry of pool_adapter's _LAUNCH_FWD: writes y (N, C_out) and h (N, F)."""
    n, c = x.shape[0] // WINDOW_ROWS, x.shape[1]
    f, c_out = w1.shape[1], w2.shape[1]
    a = torch.empty_like(h)  # GELU(h): read by F2, then freed
    sx = x.stride(0)
    pooled_rows = (WINDOW_ROWS * sx, x.stride(1))
    _gemm(x, pooled_rows, w1, w1.stride(), h, n, f, c, pool_stride=sx, epilogue=BIAS_GELU, out2=a, bias=b1)
    _gemm(a, a.stride(), w2, w2.stride(), y, n, c_out, f, epilogue=BIAS, bias=b2)


def launch_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    h: torch.Tensor,
    grads: tuple[torch.Tensor, ...],
) -> None:
    """The ``triton`` entry of pool_adapter's _LAUNCH_BWD: writes (dx, dw1, db1, dw2, db2)."""
    dx, dw1, db1, dw2, db2 = grads
    n, c = dy.shape[0], x.shape[1]
    f, c_out = w1.shape[1], w2.shape[1]
    dh = torch.empty_like(h)
    a = torch.empty_like(h)  # GELU(h) recomputed by B1's epilogue, read by B2
    tiles_m = triton.cdiv(n, gemm_config(n, f, False, DGELU, dy.dtype, dy.device).block_m)
    sum_dh = torch.empty((tiles_m, f), dtype=torch.float32, device=dy.device)
    sum_dy = torch.empty((tiles_m, c_out), dtype=torch.float32, device=dy.device)
    sx = x.stride(0)
    _gemm(dy, dy.stride(), w2, _t(w2), dh, n, f, c_out, epilogue=DGELU, out2=a, aux=h, sums=(sum_dh, sum_dy))
    if f == 0:  # no B1 program ran to sum dy
        sum_dy = dy.float().sum(dim=0, keepdim=True)
    db1.copy_(sum_dh.sum(dim=0))
    db2.copy_(sum_dy.sum(dim=0))
    _gemm(a, _t(a), dy, dy.stride(), dw2, f, c_out, n)
    _gemm(x, (x.stride(1), WINDOW_ROWS * sx), dh, dh.stride(), dw1, c, f, n, pool_stride=sx)
    _gemm(dh, dh.stride(), w1, _t(w1), dx, n, c, f, epilogue=WINDOW)
