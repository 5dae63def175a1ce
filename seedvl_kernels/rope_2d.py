"""2D rotary position embedding for native-resolution ViT tokens.

Math (interoperable with the Qwen2-VL vision RoPE). For x of shape (T, H, D) and each token's
(row, col) inside its image, with Q = D/4 and f_j = theta^(-j/Q) for j < Q:

    angle_i = row * f_i          for i < Q
    angle_i = col * f_(i - Q)    for Q <= i < D/2
    out_i       = x_i * cos(angle_i) - x_(i+D/2) * sin(angle_i)      for i < D/2
    out_(i+D/2) = x_(i+D/2) * cos(angle_i) + x_i * sin(angle_i)

i.e. dim i rotates with dim i + D/2 ("rotate_half", non-interleaved). Math is in fp32; the
frequencies are computed in float64 and rounded to fp32 once, by every implementation, and each
angle is the fp32 product fp32(row or col) * f_i.

theta is a finite host float >= 1, so that every frequency lies in (0, 1] and every angle is
finite (a base below 1 would give frequencies up to 1/theta, which overflow fp32 for tiny bases).

Non-finite values: the rotation is elementwise per (token, pair of dims), so a NaN or inf in x
makes only the two output dims it is rotated into NaN/inf (inf * sin(0) = NaN); other dims,
heads and tokens are unaffected.

Backward: a rotation's adjoint is its inverse, so dx = rope_2d(dy) with the angles negated. Nothing
but pos_hw is saved.

Cost: one read and one write of x, 2 * T * H * D * itemsize bytes; the sin/cos of a token are
computed once and shared by its H heads.

The Triton kernel can also write those sin/cos out, as a per-token table cs (T, 2, D/2) fp32 (cs[t, 0]
the cosines, cs[t, 1] the sines of angle_0..angle_(D/2-1); both halves of a head rotate by the same
D/2 angles), 4 * T * D bytes (``cos_sin_table``). varlen_attention's fused RoPE reads it instead of
evaluating sin/cos in every (tile, head) program: each angle is then computed once per call, not
once per head, bit for bit the value rope_2d uses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _backends, _dispatch, _validate

OP = "rope_2d"
DTYPES = _backends.FLOAT_DTYPES  # kernels
REF_DTYPES = (*DTYPES, torch.float64)


# ----------------------------------------------------------------------------- reference


def inv_freq(head_dim: int, theta: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """f_j = theta^(-j/(D/4)) for j < D/4, computed in float64 and rounded to fp32."""
    quarter = head_dim // 4
    j = torch.arange(quarter, dtype=torch.float64, device=device)
    return (1.0 / theta ** (j / quarter)).to(torch.float32)


def check_theta(name: str, value: object) -> float:
    """The RoPE base as a float: a finite host float >= 1 (see the module docstring)."""
    return _validate.host_float(name, value, low=1.0, what="a finite host float (the RoPE base)")


def rope_2d_angles(
    pos_hw: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(T, D/2) rotation angles of each token, in ``dtype`` (fp32 as the kernels compute them)."""
    f = inv_freq(head_dim, theta, pos_hw.device).to(dtype)
    pos = pos_hw.to(dtype)
    return torch.cat([pos[:, :1] * f, pos[:, 1:2] * f], dim=-1)


def rope_2d_ref(
    x: torch.Tensor, pos_hw: torch.Tensor, theta: float = 10000.0, inverse: bool = False
) -> torch.Tensor:
    """Pure-PyTorch rope_2d (the spec): fp32 math (fp64 for fp64 input), result in x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    angle = rope_2d_angles(pos_hw, x.shape[-1], theta, compute)[:, None, :]  # (T, 1, D/2)
    cos, sin = angle.cos(), angle.sin()
    if inverse:
        sin = -sin
    x1, x2 = x.to(compute).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def cos_sin_table_ref(pos_hw: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """(T, 2, D/2) fp32: cos and sin of each token's angles (the table of ``cos_sin_table``)."""
    angle = rope_2d_angles(pos_hw, head_dim, theta)
    return torch.stack([angle.cos(), angle.sin()], dim=1)


# ----------------------------------------------------------------------------- Triton kernel


@triton.jit(do_not_specialize=["T"])  # the token count changes every batch
def _rope_2d_fwd_kernel(
    x_ptr,
    out_ptr,
    pos_ptr,
    inv_freq_ptr,
    cs_ptr,
    T,
    H,
    stride_x_t,
    stride_x_h,
    stride_out_t,
    stride_out_h,
    stride_pos_t,
    stride_pos_c,
    QUARTER: tl.constexpr,
    INVERSE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    WRITE_CS: tl.constexpr,
):
    # One program rotates BLOCK_T tokens across all heads, computing their sin/cos once (and, with
    # WRITE_CS, stores them in the (T, 2, D/2) table; H may then be 0: the table alone).
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_i = tl.arange(0, BLOCK_HALF)
    mask_t = offs_t < T
    mask_i = offs_i < 2 * QUARTER
    mask = mask_t[:, None] & mask_i[None, :]
    row = tl.load(pos_ptr + offs_t * stride_pos_t, mask=mask_t, other=0).to(tl.float32)
    col = tl.load(pos_ptr + offs_t * stride_pos_t + stride_pos_c, mask=mask_t, other=0).to(tl.float32)
    is_row = offs_i < QUARTER
    f = tl.load(inv_freq_ptr + tl.where(is_row, offs_i, offs_i - QUARTER), mask=mask_i, other=0.0)
    angle = tl.where(is_row[None, :], row[:, None], col[:, None]) * f[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    if WRITE_CS:
        cs = cs_ptr + offs_t[:, None].to(tl.int64) * (4 * QUARTER) + offs_i[None, :]
        tl.store(cs, cos, mask=mask)
        tl.store(cs + 2 * QUARTER, sin, mask=mask)
    if INVERSE:
        sin = -sin
    x_base = x_ptr + offs_t[:, None].to(tl.int64) * stride_x_t + offs_i[None, :]
    o_base = out_ptr + offs_t[:, None].to(tl.int64) * stride_out_t + offs_i[None, :]
    for h in range(H):
        x1 = tl.load(x_base + h * stride_x_h, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_base + h * stride_x_h + 2 * QUARTER, mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        tl.store(o_base + h * stride_out_h, o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(o_base + h * stride_out_h + 2 * QUARTER, o2.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _launch_ref(
    x: torch.Tensor, pos_hw: torch.Tensor, out: torch.Tensor, theta: float, inverse: bool
) -> None:
    out.copy_(rope_2d_ref(x, pos_hw, theta, inverse))


def _launch_triton(
    x: torch.Tensor,
    pos_hw: torch.Tensor,
    out: torch.Tensor,
    theta: float,
    inverse: bool,
    cs: torch.Tensor | None = None,
) -> None:
    """out = rope_2d(x); with ``cs`` ((T, 2, D/2) fp32) also the sin/cos table, in the same launch."""
    T, H, D = x.shape
    if T == 0 or (H == 0 and cs is None):
        return
    block_t = 16
    _rope_2d_fwd_kernel[(triton.cdiv(T, block_t),)](
        x,
        out,
        pos_hw,
        inv_freq(D, theta, x.device),
        out if cs is None else cs,
        T,
        H,
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        pos_hw.stride(0),
        pos_hw.stride(1),
        QUARTER=D // 4,
        INVERSE=inverse,
        BLOCK_T=block_t,
        BLOCK_HALF=triton.next_power_of_2(D // 2),
        WRITE_CS=cs is not None,
    )


def cos_sin_table(
    pos_hw: torch.Tensor,
    head_dim: int,
    theta: float,
    *,
    x: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(T, 2, D/2) fp32 cos and sin of each token's angles, from the Triton kernel (cos_sin_table_ref
    is the spec); with ``x`` and ``out`` it also writes rope_2d(x) into ``out`` in the same launch.
    For fused kernels (varlen_attention): no validation beyond what its callers did."""
    T = pos_hw.shape[0]
    cs = torch.empty((T, 2, head_dim // 2), dtype=torch.float32, device=pos_hw.device)
    if x is None:
        x = out = torch.empty((T, 0, head_dim), dtype=torch.float32, device=pos_hw.device)
    _launch_triton(x, pos_hw, out, theta, False, cs)
    return cs


def _launch_cuda(
    x: torch.Tensor, pos_hw: torch.Tensor, out: torch.Tensor, theta: float, inverse: bool
) -> None:
    dl = _backends.dl
    _backends.C.rope_2d(dl(x), dl(pos_hw), dl(out), float(theta), bool(inverse), _backends.stream_of(x))


_LAUNCH = {"ref": _launch_ref, "triton": _launch_triton, "cuda": _launch_cuda}
_dispatch.register(OP, "ref", _backends.ref_support)
_dispatch.register(OP, "triton", _backends.triton_support_for(DTYPES, uses_dot=False))  # elementwise
_dispatch.register(OP, "cuda", _backends.cuda_support_for(OP, DTYPES))


# ----------------------------------------------------------------------------- custom op + autograd


@torch.library.custom_op("seedvl::rope_2d", mutates_args=())
def _rope_2d_op(
    x: torch.Tensor, pos_hw: torch.Tensor, theta: float, inverse: bool, impl: str
) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _LAUNCH[impl](x, pos_hw, out, theta, inverse)
    return out


@_rope_2d_op.register_fake
def _(x: torch.Tensor, pos_hw: torch.Tensor, theta: float, inverse: bool, impl: str) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output) -> None:
    _, pos_hw, theta, inverse, impl = inputs
    ctx.save_for_backward(pos_hw)
    ctx.theta, ctx.inverse, ctx.impl = theta, inverse, impl


def _backward(ctx, grad_out: torch.Tensor):
    (pos_hw,) = ctx.saved_tensors
    grad_out = _validate.with_last_dim_contiguous(grad_out)
    grad_x = _rope_2d_op(grad_out, pos_hw, ctx.theta, not ctx.inverse, ctx.impl)
    return grad_x, None, None, None, None


_rope_2d_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public function


def rope_2d(
    x: torch.Tensor,
    pos_hw: torch.Tensor,
    theta: float = 10000.0,
    *,
    inverse: bool = False,
    impl: str | None = None,
) -> torch.Tensor:
    """Rotate each token's head vectors by its (row, col) position.

    Args:
        x: (T, H, D) float32/float16/bfloat16 (float64: reference only), D a multiple of 4,
            last dim contiguous; other strides are free (a strided view such as q of a fused qkv is
            fine). T = 0 and H = 0 are legal.
        pos_hw: (T, 2) int32, (row, col) of each patch inside its image, on x's device, any strides.
        theta: RoPE base, a finite host float >= 1 (a Python or NumPy number, not a tensor).
        inverse: rotate by the negated angles (the adjoint; used by fused backward passes).
        impl: "ref", "triton", "cuda" or "auto" (see seedvl_kernels._dispatch).

    Returns:
        (T, H, D) contiguous tensor in x's dtype. Differentiable in x. NaN/inf in x stay local to
        the rotated pair of dims (see the module docstring).

    Raises:
        TypeError/ValueError naming the argument for bad input; ImplUnavailableError for an explicit
        ``impl`` that cannot serve the call.
    """
    _validate.tensor("x", x)
    _validate.tensor("pos_hw", pos_hw)
    _validate.ndim("x", x, 3, "(T, H, D)")
    _validate.dtype("x", x, REF_DTYPES)
    if x.shape[-1] % 4 != 0 or x.shape[-1] == 0:
        raise ValueError(f"x: head dim D must be a positive multiple of 4, got {x.shape[-1]}")
    _validate.last_dim_contiguous("x", x)
    _validate.ndim("pos_hw", pos_hw, 2, "(T, 2)")
    _validate.dtype("pos_hw", pos_hw, (torch.int32,))
    _validate.dim_size("pos_hw", pos_hw, 0, x.shape[0], "T, the tokens of x")
    _validate.dim_size("pos_hw", pos_hw, 1, 2, "(row, col)")
    theta = check_theta("theta", theta)
    device = _validate.same_device({"x": x, "pos_hw": pos_hw})
    chosen = _dispatch.resolve(OP, impl, device, x.dtype)
    return _rope_2d_op(x, pos_hw, theta, bool(inverse), chosen)
