"""The vision-to-language adapter: 2x2 average pooling, then a two-layer GELU MLP.

Math. x (T, C) holds ViT tokens in 2x2-window order (rows 4n..4n+3 are one window), N = T/4:

    p = mean4(x)             p_n = (x_4n + x_4n+1 + x_4n+2 + x_4n+3) / 4        (N, C)
    h = p @ w1 + b1          pre-activation                                    (N, F)
    a = GELU(h)              exact erf form: h * Phi(h), Phi(h) = (1 + erf(h / sqrt 2)) / 2
    y = a @ w2 + b2                                                            (N, C_out)

Seed1.5-VL §2 says "2x2 average pooling ... a two-layer MLP" and names neither the activation nor
the hidden width; exact GELU is the LLaVA/Qwen2-VL adapter's and the ViT's own activation.

Layout. w1 is (C, F) and w2 is (F, C_out), "in x out", so the math reads x @ w. An ``nn.Linear``
stores (out, in): pass ``linear.weight.t()`` (a column-major view, accepted without a copy). Every
weight must be row- or column-major (one unit stride); x must have a contiguous last dim; the
biases must be contiguous (the kernels read them with unit stride).

Backward, with dy (N, C_out) and GELU'(h) = Phi(h) + h * phi(h), phi the normal density:

    dw2 = a^T dy    db2 = sum_n dy    da = dy w2^T    dh = da * GELU'(h)
    dw1 = p^T dh    db1 = sum_n dh    dp = dh w1^T    dx_4n+k = dp_n / 4   (k = 0..3)

Saved for backward: x, w1, w2 and h (in x's dtype); a = GELU(h) and p = mean4(x) are recomputed
(elementwise, and a pooling the fused kernels do while loading the GEMM operand). h is saved, not
recomputed: recomputing it is a whole N x C x F GEMM (8% of forward + backward FLOPs at
C_out = F = 4096, 13% at 2048), while keeping it costs N * F elements -- the same tensor the unfused
peer's GELU keeps. x is saved, not p: saving an input allocates nothing and p never has to be
written to memory; the price is that x (T * C elements) stays alive where p would be T * C / 4,
worth revisiting if the adapter's activation memory ever matters.

Precision: fp32 accumulation and fp32 elementwise math; y, h and the gradients are rounded to the
inputs' dtype once. The reference computes everything in fp32 (fp64 for fp64 input). The kernels
also round the GEMM operands they make (the pooled tile, a, dh) to the dtype before each tensor-core
dot, as the unfused PyTorch adapter rounds its intermediates; their tests allow twice that
adapter's low-precision error.

Implementations: ``ref`` (this file), ``triton`` (seedvl_kernels/pool_adapter_triton.py) and ``cuda``
(csrc/pool_adapter/, mma.sync tensor cores, float16/bfloat16). Both kernels pool while loading the
first GEMM's operand (forward, and dw1 = p^T dh), fuse bias + GELU into GEMM-1's epilogue and
GELU' into the epilogue of dh = dy w2^T, and write dx from one computed row per window. a = GELU(h)
is written by an epilogue and read by the next GEMM in each direction (transient, never saved).
Design and costs: profiles/pool_adapter.md.

Cost (N = T/4): forward 2 * N * F * (C + C_out) FLOPs, backward twice that; the pooling and GELU
are O(T * C + N * F). Minimum forward traffic: read x and the weights, write y and h:
(T * C + C * F + F * C_out + F + C_out + N * C_out + N * F) * itemsize bytes.
"""

from __future__ import annotations

import math

import torch

from . import _backends, _dispatch, _validate, pool_adapter_triton

OP = "pool_adapter"
DTYPES = _backends.FLOAT_DTYPES  # Triton kernels
CUDA_DTYPES = (torch.float16, torch.bfloat16)  # CUDA kernels (tensor-core mma only)
REF_DTYPES = (*DTYPES, torch.float64)
WINDOW = 4  # tokens of one 2x2 window


# ----------------------------------------------------------------------------- reference


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def mean4(x: torch.Tensor) -> torch.Tensor:
    """(T, C) -> (T/4, C): the mean of every 4 consecutive rows (one 2x2 window)."""
    return x.unflatten(0, (-1, WINDOW)).mean(dim=1)


def gelu_erf(h: torch.Tensor) -> torch.Tensor:
    """Exact GELU, h * Phi(h)."""
    return 0.5 * h * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))


def gelu_erf_grad(h: torch.Tensor) -> torch.Tensor:
    """d GELU / dh = Phi(h) + h * phi(h)."""
    cdf = 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + h * pdf


def pool_adapter_fwd_ref(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h) in fp32 (fp64 for fp64 input), not yet rounded to x's dtype."""
    c = _compute_dtype(x.dtype)
    h = mean4(x.to(c)) @ w1.to(c) + b1.to(c)
    y = gelu_erf(h) @ w2.to(c) + b2.to(c)
    return y, h


def pool_adapter_bwd_ref(
    dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, h: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """(dx, dw1, db1, dw2, db2) in fp32 (fp64 for fp64 input), from the saved x, w1, w2 and h."""
    c = _compute_dtype(x.dtype)
    dy, h = dy.to(c), h.to(c)
    dw2 = gelu_erf(h).t() @ dy
    db2 = dy.sum(dim=0)
    dh = (dy @ w2.to(c).t()) * gelu_erf_grad(h)
    dw1 = mean4(x.to(c)).t() @ dh
    db1 = dh.sum(dim=0)
    dp = dh @ w1.to(c).t()
    dx = (dp * (1.0 / WINDOW)).repeat_interleave(WINDOW, dim=0)
    return dx, dw1, db1, dw2, db2


def pool_adapter_ref(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """Pure-PyTorch pool_adapter (the spec): fp32 math, result in x's dtype."""
    return pool_adapter_fwd_ref(x, w1, b1, w2, b2)[0].to(x.dtype)


# ----------------------------------------------------------------------------- launchers


def _launch_fwd_ref(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor,
) -> None:
    y_c, h_c = pool_adapter_fwd_ref(x, w1, b1, w2, b2)
    y.copy_(y_c)
    h.copy_(h_c)


def _launch_bwd_ref(
    dy: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    h: torch.Tensor,
    grads: tuple[torch.Tensor, ...],
) -> None:
    for out, value in zip(grads, pool_adapter_bwd_ref(dy, x, w1, w2, h), strict=True):
        out.copy_(value)


_CUDA_TILE_M = 128  # csrc/pool_adapter kPoolAdapterTileM (the binding checks the scratch size)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy if its data is not 16-byte aligned (the CUDA kernels load 16 B)."""
    return t if t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)


def _launch_fwd_cuda(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor,
) -> None:
    dl = _backends.dl
    a = torch.empty_like(h)  # GELU(h), between the two GEMMs only
    x, w1, b1, w2, b2 = (_aligned(t) for t in (x, w1, b1.contiguous(), w2, b2.contiguous()))
    _backends.C.pool_adapter_fwd(
        dl(x), dl(w1), dl(b1), dl(w2), dl(b2), dl(y), dl(h), dl(a), _backends.stream_of(x)
    )


def _launch_bwd_cuda(
    dy: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    h: torch.Tensor,
    grads: tuple[torch.Tensor, ...],
) -> None:
    dl = _backends.dl
    dh, a = torch.empty_like(h), torch.empty_like(h)  # scratch of the backward GEMMs
    tiles = -(-h.shape[0] // _CUDA_TILE_M)  # one row of partial bias-gradient sums per M-tile
    partial = torch.empty(tiles * (h.shape[1] + dy.shape[1]), dtype=torch.float32, device=dy.device)
    dy, x, w1, w2 = (_aligned(t) for t in (dy, x, w1, w2))
    _backends.C.pool_adapter_bwd(
        dl(dy),
        dl(x),
        dl(w1),
        dl(w2),
        dl(h),
        *(dl(g) for g in grads),
        dl(dh),
        dl(a),
        dl(partial),
        _backends.stream_of(x),
    )


_LAUNCH_FWD = {"ref": _launch_fwd_ref, "triton": pool_adapter_triton.launch_fwd, "cuda": _launch_fwd_cuda}
_LAUNCH_BWD = {"ref": _launch_bwd_ref, "triton": pool_adapter_triton.launch_bwd, "cuda": _launch_bwd_cuda}
_dispatch.register(OP, "ref", _backends.ref_support)
_dispatch.register(OP, "triton", _backends.triton_support_for(DTYPES))
_dispatch.register(OP, "cuda", _backends.cuda_support_for(OP, CUDA_DTYPES))


def cuda_shape_reason(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> str | None:
    """None if the CUDA kernels take these shapes and strides, else why not: they move 16-byte
    vectors, so C, F, C_out, x's row stride and each weight's leading stride must be multiples of 8."""
    sizes = {"C": x.shape[1], "F": w1.shape[1], "C_out": w2.shape[1]}
    bad = [f"{name}={v}" for name, v in sizes.items() if v % 8]
    if bad:
        return f"the CUDA kernel needs C, F and C_out to be multiples of 8, got {', '.join(bad)}"
    strides = {"x": x.stride(0), "w1": max(w1.stride()), "w2": max(w2.stride())}
    bad = [f"{name}={v}" for name, v in strides.items() if v % 8]
    if bad:
        return f"the CUDA kernel needs leading strides that are multiples of 8, got {', '.join(bad)}"
    return None


@torch.compiler.assume_constant_result
def _fall_back_from_cuda(impl: str | None, device: torch.device, dtype: torch.dtype, reason: str) -> str:
    """``auto`` moves on to Triton (or the reference) for shapes the CUDA kernel does not take; an
    explicit ``cuda`` raises."""
    if _dispatch.requested(OP, impl) != "auto":
        raise _dispatch.ImplUnavailableError(f"{OP}: impl='cuda' cannot run this call: {reason}")
    return "triton" if _dispatch.unavailable_reason(OP, "triton", device, dtype) is None else "ref"


# auto's rule between the two fast kernels, by architecture. The CUDA kernel multiplies with mma.sync
# (Ampere's tensor-core instruction); on sm_90 and newer the Triton kernel issues wgmma with its loads
# pipelined (profiles/kernel_report.md: `pool_adapter_gemm_kernel` mma.sync; `_pool_adapter_gemm_kernel`
# wgmma, 2 groups in flight in F1, F2, B1, B4); an offline review (issue 19) puts the CUDA kernel at
# 50-60% of wgmma speed there, an estimate no GPU has checked yet. So auto takes Triton on compute
# capability >= 9 and the CUDA kernel on sm_80/sm_86/sm_89, until the CUDA kernel is ported to wgmma
# (then this rule goes).
# bench/bench_pool_adapter.py's curated rows in the GPU pass time both on a lent H100/H200.
TRITON_FIRST_FROM_CAPABILITY = 9


@torch.compiler.assume_constant_result
def _auto_by_architecture(impl: str | None, chosen: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto``'s pick after the generic order (CUDA, Triton, reference): Triton instead of CUDA on
    GPUs of compute capability >= TRITON_FIRST_FROM_CAPABILITY (see above); explicit choices stay."""
    if chosen != "cuda" or _dispatch.requested(OP, impl) != "auto":
        return chosen
    if torch.cuda.get_device_capability(device)[0] < TRITON_FIRST_FROM_CAPABILITY:
        return chosen
    return "triton" if _dispatch.unavailable_reason(OP, "triton", device, dtype) is None else chosen


# ----------------------------------------------------------------------------- custom ops + autograd


def _fwd_outputs(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0] // WINDOW
    y = torch.empty((n, w2.shape[1]), dtype=x.dtype, device=x.device)
    h = torch.empty((n, w1.shape[1]), dtype=x.dtype, device=x.device)
    return y, h


@torch.library.custom_op("seedvl::pool_adapter_fwd", mutates_args=())
def _pool_adapter_fwd_op(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    y, h = _fwd_outputs(x, w1, w2)
    _LAUNCH_FWD[impl](x, w1, b1, w2, b2, y, h)
    return y, h


@_pool_adapter_fwd_op.register_fake
def _(x, w1, b1, w2, b2, impl):
    return _fwd_outputs(x, w1, w2)


def _bwd_outputs(x, w1, b1_shape, w2, b2_shape) -> tuple[torch.Tensor, ...]:
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
        torch.empty(w1.shape, dtype=w1.dtype, device=w1.device),
        torch.empty(b1_shape, dtype=w1.dtype, device=w1.device),
        torch.empty(w2.shape, dtype=w2.dtype, device=w2.device),
        torch.empty(b2_shape, dtype=w2.dtype, device=w2.device),
    )


@torch.library.custom_op("seedvl::pool_adapter_bwd", mutates_args=())
def _pool_adapter_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, h: torch.Tensor, impl: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _bwd_outputs(x, w1, (w1.shape[1],), w2, (w2.shape[1],))
    _LAUNCH_BWD[impl](dy, x, w1, w2, h, grads)
    return grads


@_pool_adapter_bwd_op.register_fake
def _(dy, x, w1, w2, h, impl):
    return _bwd_outputs(x, w1, (w1.shape[1],), w2, (w2.shape[1],))


def _setup_context(ctx, inputs, output) -> None:
    x, w1, _, w2, _, impl = inputs
    _, h = output
    ctx.mark_non_differentiable(h)  # an internal saved tensor, not part of the public result
    ctx.set_materialize_grads(False)  # so no zero gradient is allocated for h
    ctx.save_for_backward(x, w1, w2, h)
    ctx.impl = impl


def _backward(ctx, grad_y: torch.Tensor | None, grad_h: torch.Tensor | None):
    if grad_y is None:
        return None, None, None, None, None, None
    x, w1, w2, h = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = _pool_adapter_bwd_op(grad_y.contiguous(), x, w1, w2, h, ctx.impl)
    return dx, dw1, db1, dw2, db2, None


_pool_adapter_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public function


def _check_matrix_layout(name: str, w: torch.Tensor) -> None:
    rows, cols = w.shape
    if rows > 1 and cols > 1 and 1 not in w.stride():
        raise ValueError(
            f"{name}: expected a row-major or column-major matrix (one unit stride), got strides {w.stride()}"
        )


def pool_adapter(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """2x2 average pool, then Linear -> GELU (erf) -> Linear: GELU(mean4(x) @ w1 + b1) @ w2 + b2.

    Args:
        x: (T, C) float32/float16/bfloat16 (float64: reference only), T a multiple of 4 (T = 0 is
            legal), rows in 2x2-window order (every 4 consecutive rows are one window), last dim
            contiguous.
        w1: (C, F) first layer, "in x out" (``nn.Linear(C, F).weight.t()``), row- or column-major.
        b1: (F,) first bias, contiguous (the kernels read biases with unit stride; a strided view
            raises).
        w2: (F, C_out) second layer, "in x out", row- or column-major.
        b2: (C_out,) second bias, contiguous.
        impl: "ref", "triton" (float32/float16/bfloat16), "cuda" (float16/bfloat16; C, F, C_out
            multiples of 8) or "auto" (see seedvl_kernels._dispatch; auto passes over CUDA for
            shapes it does not take, and takes Triton over CUDA on sm_90 and newer, where only the
            Triton kernel uses wgmma). All tensors share x's dtype and device.

    Returns:
        (T/4, C_out) tensor in x's dtype. Differentiable in x, w1, b1, w2 and b2. Non-finite
        values propagate as in the two matmuls: a NaN/inf in a window of x poisons that output row,
        one in w1, b1, w2 or b2 the output columns it reaches (every column, through GEMM-2, for
        w1 and b1).

    Raises:
        TypeError/ValueError naming the argument for bad input; ImplUnavailableError for an explicit
        ``impl`` that cannot serve the call.
    """
    _validate.tensor("x", x)
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        _validate.tensor(name, t)
    _validate.ndim("x", x, 2, "(T, C)")
    _validate.dtype("x", x, REF_DTYPES)
    if x.shape[0] % WINDOW != 0:
        raise ValueError(
            f"x: the number of tokens T must be a multiple of {WINDOW} (every {WINDOW} consecutive rows "
            f"are one 2x2 pooling window), got T={x.shape[0]}"
        )
    _validate.last_dim_contiguous("x", x)
    _validate.ndim("w1", w1, 2, "(C, F)")
    _validate.dim_size("w1", w1, 0, x.shape[1], "C, the channels of x")
    _validate.ndim("w2", w2, 2, "(F, C_out)")
    _validate.dim_size("w2", w2, 0, w1.shape[1], "F, the columns of w1")
    _validate.same_dtype("w1", w1, "x", x)
    _validate.same_dtype("w2", w2, "x", x)
    _validate.bias_vector("b1", b1, w1.shape[1], "F", "F, the columns of w1", "x", x)
    _validate.bias_vector("b2", b2, w2.shape[1], "C_out", "C_out, the columns of w2", "x", x)
    _check_matrix_layout("w1", w1)
    _check_matrix_layout("w2", w2)
    device = _validate.same_device({"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2})
    chosen = _auto_by_architecture(impl, _dispatch.resolve(OP, impl, device, x.dtype), device, x.dtype)
    if chosen == "cuda" and (reason := cuda_shape_reason(x, w1, w2)) is not None:
        chosen = _fall_back_from_cuda(impl, device, x.dtype, reason)
    y, _ = _pool_adapter_fwd_op(x, w1, b1, w2, b2, chosen)
    return y
