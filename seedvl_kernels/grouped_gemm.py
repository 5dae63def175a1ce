"""Grouped GEMM: one matrix product per expert over that expert's contiguous rows.

Math. a (M, K) holds E groups of rows, group e = rows offsets[e] : offsets[e+1]; b holds one matrix
per group, (E, K, N), or (E, N, K) with trans_b. For each e, with a_e the rows of group e:

    out_e = a_e @ b[e]            (trans_b=False)
    out_e = a_e @ b[e]^T          (trans_b=True)

Rows at or past offsets[-1] are padding: their output rows are zero and they get zero gradient.
Products accumulate in fp32 (fp64 for fp64 inputs) and are rounded once to the input dtype.

Backward (dC = d out; both are grouped GEMMs again):

    dA_e = dC_e @ b[e]^T  = grouped_gemm(dC, b, trans_b=not trans_b)     M-grouped, like the forward
    dB[e] = a_e^T @ dC_e  (dC_e^T @ a_e with trans_b)                    K-grouped: a reduction over
                                                                          the rows of group e
An empty group contributes no rows, so its dB slice is exactly zero. The dB entry is its own op,
``seedvl::grouped_gemm_dw``, whose backward is again two grouped GEMMs (so double backward works):
for an upstream G shaped like b, d a = grouped_gemm(dC, G, not trans_b) and
d dC = grouped_gemm(a, G, trans_b).

Saved for backward: a, b and offsets (no activations of size M x N).

Shapes: a (M, K), b (E, K, N) or (E, N, K), offsets (E+1,) int32 -> out (M, N) in a's dtype.

Cost: 2 * offsets[-1] * K * N FLOPs forward, twice that backward. Bytes: (M*K + E*K*N + M*N) *
itemsize forward; for MoE shapes (M = T*k routed rows) the expert weights dominate when few tokens
are routed, the activations when many are.

Host synchronisation: the reference loops over groups in Python, so it reads the group bounds with
``offsets.tolist()`` inside the custom op (the only sync on the MoE path, and invisible to
torch.compile, which sees an opaque op). The Triton kernels (seedvl_kernels.grouped_gemm_triton,
impl "triton") and the CUTLASS sm_90a kernels (seedvl_kernels.grouped_gemm_cuda, impl "cuda",
bf16 on H100/H200, K and N multiples of 8) read offsets on the device and never sync.
"""

from __future__ import annotations

import torch

from . import _backends, _dispatch, _validate, grouped_gemm_cuda, grouped_gemm_triton

OP = "grouped_gemm"
DTYPES = (*_backends.FLOAT_DTYPES, torch.float64)


# ----------------------------------------------------------------------------- reference


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def grouped_gemm_ref(
    a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, trans_b: bool = False
) -> torch.Tensor:
    """Pure-PyTorch grouped GEMM (the spec): a per-group loop of fp32-accumulated matmuls."""
    compute = _compute_dtype(a.dtype)
    n = b.shape[1] if trans_b else b.shape[2]
    out = torch.zeros(a.shape[0], n, dtype=a.dtype, device=a.device)
    bounds = offsets.tolist()  # host sync: the reference only
    for e in range(b.shape[0]):
        start, end = bounds[e], bounds[e + 1]
        if start == end:
            continue
        be = b[e].to(compute)
        out[start:end] = (a[start:end].to(compute) @ (be.T if trans_b else be)).to(a.dtype)
    return out


def grouped_gemm_dw_ref(
    a: torch.Tensor, grad_out: torch.Tensor, offsets: torch.Tensor, trans_b: bool = False
) -> torch.Tensor:
    """dB of the grouped GEMM: (E, K, N) = a_e^T dC_e per group ((E, N, K) = dC_e^T a_e with trans_b)."""
    compute = _compute_dtype(a.dtype)
    num_groups = offsets.shape[0] - 1
    k_dim, n_dim = a.shape[1], grad_out.shape[1]
    shape = (num_groups, n_dim, k_dim) if trans_b else (num_groups, k_dim, n_dim)
    out = torch.zeros(shape, dtype=a.dtype, device=a.device)
    bounds = offsets.tolist()  # host sync: the reference only
    for e in range(num_groups):
        start, end = bounds[e], bounds[e + 1]
        if start == end:
            continue
        a_e = a[start:end].to(compute)
        g_e = grad_out[start:end].to(compute)
        out[e] = (g_e.T @ a_e if trans_b else a_e.T @ g_e).to(a.dtype)
    return out


# ----------------------------------------------------------------------------- launchers


def _launch_ref(
    a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor, trans_b: bool
) -> None:
    out.copy_(grouped_gemm_ref(a, b, offsets, trans_b))


def _launch_ref_dw(
    a: torch.Tensor, grad_out: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor, trans_b: bool
) -> None:
    out.copy_(grouped_gemm_dw_ref(a, grad_out, offsets, trans_b))


# Every launcher writes all of ``out``: zeros for padding rows and for empty groups' dB slices.
_LAUNCH = {
    "ref": _launch_ref,
    "triton": grouped_gemm_triton.launch_grouped_gemm,
    "cuda": grouped_gemm_cuda.launch_grouped_gemm,
}
_LAUNCH_DW = {
    "ref": _launch_ref_dw,
    "triton": grouped_gemm_triton.launch_grouped_gemm_dw,
    "cuda": grouped_gemm_cuda.launch_grouped_gemm_dw,
}
_dispatch.register(OP, "ref", _backends.ref_support)
_dispatch.register(OP, "triton", _backends.triton_support_for(_backends.FLOAT_DTYPES))
_dispatch.register(OP, "cuda", grouped_gemm_cuda.support)


def _resolve(impl: str | None, device: torch.device, dtype: torch.dtype, k: int, n: int) -> str:
    """The dispatcher's choice, then the CUTLASS kernels' shape rule: an explicit impl="cuda" with
    K or N not a multiple of 8 raises naming the argument; "auto" moves on to the next candidate."""
    chosen = _dispatch.resolve(OP, impl, device, dtype)
    if chosen != "cuda":
        return chosen
    reason = grouped_gemm_cuda.shape_reason(k, n)
    if reason is None:
        return chosen
    if _dispatch.requested(OP, impl) != "auto":
        raise ValueError(reason)
    for fallback in ("triton", "ref"):
        if _dispatch.unavailable_reason(OP, fallback, device, dtype) is None:
            return fallback
    raise _dispatch.ImplUnavailableError(f"{OP}: no implementation serves this call ({reason})")


# ----------------------------------------------------------------------------- custom ops


def _out_shape(a: torch.Tensor, b: torch.Tensor, trans_b: bool) -> tuple[int, int]:
    return (a.shape[0], b.shape[1] if trans_b else b.shape[2])


def _dw_shape(
    a: torch.Tensor, grad_out: torch.Tensor, offsets: torch.Tensor, trans_b: bool
) -> tuple[int, ...]:
    num_groups = offsets.shape[0] - 1
    if trans_b:
        return (num_groups, grad_out.shape[1], a.shape[1])
    return (num_groups, a.shape[1], grad_out.shape[1])


@torch.library.custom_op("seedvl::grouped_gemm", mutates_args=())
def _grouped_gemm_op(
    a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, trans_b: bool, impl: str
) -> torch.Tensor:
    out = torch.empty(_out_shape(a, b, trans_b), dtype=a.dtype, device=a.device)
    _LAUNCH[impl](a, b, offsets, out, trans_b)
    return out


@_grouped_gemm_op.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, trans_b: bool, impl: str) -> torch.Tensor:
    return torch.empty(_out_shape(a, b, trans_b), dtype=a.dtype, device=a.device)


@torch.library.custom_op("seedvl::grouped_gemm_dw", mutates_args=())
def _grouped_gemm_dw_op(
    a: torch.Tensor, grad_out: torch.Tensor, offsets: torch.Tensor, trans_b: bool, impl: str
) -> torch.Tensor:
    out = torch.empty(_dw_shape(a, grad_out, offsets, trans_b), dtype=a.dtype, device=a.device)
    _LAUNCH_DW[impl](a, grad_out, offsets, out, trans_b)
    return out


@_grouped_gemm_dw_op.register_fake
def _(
    a: torch.Tensor, grad_out: torch.Tensor, offsets: torch.Tensor, trans_b: bool, impl: str
) -> torch.Tensor:
    return torch.empty(_dw_shape(a, grad_out, offsets, trans_b), dtype=a.dtype, device=a.device)


# ----------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output) -> None:
    a, b, offsets, trans_b, impl = inputs
    ctx.save_for_backward(a, b, offsets)
    ctx.trans_b, ctx.impl = trans_b, impl


def _backward(ctx, grad_out: torch.Tensor):
    a, b, offsets = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = _grouped_gemm_op(grad_out, b, offsets, not ctx.trans_b, ctx.impl)
    if ctx.needs_input_grad[1]:
        grad_b = _grouped_gemm_dw_op(a, grad_out, offsets, ctx.trans_b, ctx.impl)
    return grad_a, grad_b, None, None, None


_grouped_gemm_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_context_dw(ctx, inputs, output) -> None:
    a, grad_out, offsets, trans_b, impl = inputs
    ctx.save_for_backward(a, grad_out, offsets)
    ctx.trans_b, ctx.impl = trans_b, impl


def _backward_dw(ctx, grad_dw: torch.Tensor):
    a, grad_out, offsets = ctx.saved_tensors
    grad_dw = grad_dw.contiguous()
    grad_a = grad_grad_out = None
    if ctx.needs_input_grad[0]:
        grad_a = _grouped_gemm_op(grad_out, grad_dw, offsets, not ctx.trans_b, ctx.impl)
    if ctx.needs_input_grad[1]:
        grad_grad_out = _grouped_gemm_op(a, grad_dw, offsets, ctx.trans_b, ctx.impl)
    return grad_a, grad_grad_out, None, None, None


_grouped_gemm_dw_op.register_autograd(_backward_dw, setup_context=_setup_context_dw)


# ----------------------------------------------------------------------------- public function


def grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    *,
    trans_b: bool = False,
    impl: str | None = None,
) -> torch.Tensor:
    """Multiply each group of rows of ``a`` by its own matrix of ``b``.

    Args:
        a: (M, K) float32/float16/bfloat16/float64 (float64: reference only), last dim contiguous;
            rows grouped by ``offsets``, rows past offsets[-1] are padding.
        b: (E, K, N), or (E, N, K) with ``trans_b``, a's dtype and device, last dim contiguous.
        offsets: (E+1,) int32 on a's device, contiguous (every kernel reads it with unit stride; a
            strided view raises), offsets[0] = 0, non-decreasing, offsets[-1] <= M (values
            checked for CPU tensors only; a GPU check would sync). Empty groups are legal.
        trans_b: multiply by b[e]^T (b stored (E, N, K), as in nn.Linear weights).
        impl: "ref", "triton" (float32/float16/bfloat16), "cuda" (bfloat16 on sm_90, K and N
            multiples of 8) or "auto" (see seedvl_kernels._dispatch).

    Returns:
        (M, N) in a's dtype, zero in padding rows; fp32 accumulation. Differentiable in a and b
        (padding rows get zero gradient, empty groups a zero dB slice). Only the reference syncs
        with the host (it reads ``offsets.tolist()`` inside the custom op). Non-finite values
        propagate as in a matmul, within a group: a NaN/inf in a row of a poisons that output row,
        one in b[e] the columns it reaches of group e's rows; padding rows stay zero.

    Raises:
        TypeError/ValueError naming the argument for bad input; ImplUnavailableError for an explicit
        ``impl`` that cannot serve the call.
    """
    _validate.tensor("a", a)
    _validate.tensor("b", b)
    _validate.ndim("a", a, 2, "(M, K)")
    _validate.dtype("a", a, DTYPES)
    _validate.ndim("b", b, 3, "(E, N, K)" if trans_b else "(E, K, N)")
    _validate.same_dtype("b", b, "a", a)
    if not isinstance(trans_b, bool):
        raise TypeError(f"trans_b: expected a bool, got {type(trans_b).__name__}")
    _validate.dim_size("b", b, 2 if trans_b else 1, a.shape[1], "K, the columns of a")
    _validate.last_dim_contiguous("a", a)
    _validate.last_dim_contiguous("b", b)
    _validate.cu_seqlens("offsets", offsets, total=a.shape[0])
    _validate.dim_size("offsets", offsets, 0, b.shape[0] + 1, "E+1, one more than the groups of b")
    device = _validate.same_device({"a": a, "b": b, "offsets": offsets})
    chosen = _resolve(impl, device, a.dtype, a.shape[1], b.shape[1] if trans_b else b.shape[2])
    return _grouped_gemm_op(a, b, offsets, trans_b, chosen)
