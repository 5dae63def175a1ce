"""The routed-expert block of an MoE layer: permute -> GEMM -> SwiGLU -> GEMM -> weighted unpermute.

Math. T tokens x (T, D), each routed to k experts with gate weights w (T, k) and ids (T, k); expert
e has w_gate_up[e] (D, 2F) and w_down[e] (F, D). With G = w_gate_up[..., :F] (the SiLU "gate"
half) and U = w_gate_up[..., F:] (the "up" half), the Hugging Face Qwen3-MoE layout transposed
(HF stores gate_proj/up_proj as (F, D) nn.Linear weights; w_gate_up[e] = cat([gate.T, up.T], -1)):

    out[t] = sum_j w[t, j] * FFN_{ids[t, j]}(x[t]),   FFN_e(v) = (silu(v G_e) * (v U_e)) w_down[e]

computed as

    x_perm, offsets, row_map = moe_permute(x, ids, E)                  (T*k, D)
    gu  = grouped_gemm(x_perm, w_gate_up, offsets)                     (T*k, 2F)
    h   = silu(gu[:, :F]) * gu[:, F:]                                  (T*k, F), fp32 math
    y   = grouped_gemm(h, w_down, offsets)                             (T*k, D)
    out = moe_unpermute(y, row_map, w)                                 (T, D), fixed slot order

Backward: the composition's, through each op's own backward (grouped GEMMs: dA M-grouped, dW
K-grouped; SwiGLU: d gate = dh * up * silu'(gate), d up = dh * silu(gate); unpermute: dy = w * dout,
dw = <dout, y>; permute: sum of the k slot gradients of each token). Every piece is deterministic.

Saved for backward (activations, T*k rows each): x_perm (D), gu (2F), h (F), y (D), plus the
weights, offsets and row maps. A fused kernel would recompute h from gu instead of saving it.

FLOPs: forward 2*T*k*D*2F + 2*T*k*F*D = 6*T*k*D*F (plus O(T*k*(D+F)) elementwise); backward twice
that. Bytes (forward, reference): weights E*3*D*F plus activations ~T*k*(2D + 4F) elements read or
written once each, times itemsize.

Host synchronisation: none of its own; the reference grouped GEMM reads offsets on the host (see
seedvl_kernels.grouped_gemm).

The ``triton`` implementation (seedvl_kernels.moe_ffn_triton) fuses the permute into GEMM-1's
operand loads, SwiGLU into its epilogue and the gate weight into GEMM-2's epilogue, combines in
fixed slot order, and never syncs with the host; it matches this reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backends, _dispatch, _validate, moe_ffn_triton
from .grouped_gemm import grouped_gemm
from .moe_permute import _check_expert_ids, moe_permute, moe_unpermute

OP = "moe_ffn"
DTYPES = (*_backends.FLOAT_DTYPES, torch.float64)


# ----------------------------------------------------------------------------- reference


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate_up[..., :F]) * gate_up[..., F:] in fp32 (fp64 for fp64), rounded to the input dtype."""
    compute = torch.float64 if gate_up.dtype == torch.float64 else torch.float32
    gate, up = gate_up.to(compute).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def moe_ffn_ref(
    x: torch.Tensor,
    gate_weights: torch.Tensor,
    expert_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    impl: str = "ref",
) -> torch.Tensor:
    """The block as a composition of the public ops, each run with ``impl`` (the spec with "ref")."""
    num_experts = w_gate_up.shape[0]
    x_perm, offsets, row_map = moe_permute(x, expert_ids, num_experts, impl=impl)
    h = swiglu(grouped_gemm(x_perm, w_gate_up, offsets, impl=impl))
    y = grouped_gemm(h, w_down, offsets, impl=impl)
    return moe_unpermute(y, row_map, gate_weights, impl=impl)


_dispatch.register(OP, "ref", _backends.ref_support)
_dispatch.register(OP, "triton", _backends.triton_support_for(_backends.FLOAT_DTYPES))


# ----------------------------------------------------------------------------- public function


def check_expert_weights(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, experts: str = "E"
) -> int:
    """Validate w_gate_up (E, D, 2F) and w_down (E, F, D) against x (T, D); return E.

    ``experts`` names the expert count in messages ("E_l" for one rank's shard under expert parallel).
    """
    D = x.shape[1]
    _validate.tensor("w_gate_up", w_gate_up)
    _validate.ndim("w_gate_up", w_gate_up, 3, f"({experts}, D, 2F)")
    _validate.same_dtype("w_gate_up", w_gate_up, "x", x)
    _validate.dim_size("w_gate_up", w_gate_up, 1, D, "D, the hidden size of x")
    num_experts, two_f = w_gate_up.shape[0], w_gate_up.shape[2]
    if num_experts < 1:
        raise ValueError(
            f"w_gate_up: expected at least one expert ({experts} >= 1), got shape {tuple(w_gate_up.shape)}"
        )
    if two_f % 2 != 0:
        raise ValueError(f"w_gate_up: expected an even last dim 2F (gate half, then up half), got {two_f}")
    _validate.last_dim_contiguous("w_gate_up", w_gate_up)
    _validate.tensor("w_down", w_down)
    _validate.ndim("w_down", w_down, 3, f"({experts}, F, D)")
    _validate.same_dtype("w_down", w_down, "x", x)
    _validate.dim_size("w_down", w_down, 0, num_experts, f"{experts}, the experts of w_gate_up")
    _validate.dim_size("w_down", w_down, 1, two_f // 2, "F, half the last dim of w_gate_up")
    _validate.dim_size("w_down", w_down, 2, D, "D, the hidden size of x")
    _validate.last_dim_contiguous("w_down", w_down)
    return num_experts


def moe_ffn(
    x: torch.Tensor,
    gate_weights: torch.Tensor,
    expert_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """Run each token through its k experts' SwiGLU FFNs and sum the outputs by gate weight.

    Args:
        x: (T, D) float32/float16/bfloat16/float64 tokens, last dim contiguous.
        gate_weights: (T, k) float gate weights (fp32 from :func:`route`), on x's device.
        expert_ids: (T, k) int32 experts of each token, values in [0, E) (checked for CPU
            tensors only).
        w_gate_up: (E, D, 2F) in x's dtype, gate half ``[..., :F]`` first, last dim contiguous.
        w_down: (E, F, D) in x's dtype, last dim contiguous.
        impl: "ref", "triton" (float32/float16/bfloat16: fused kernels, see
            seedvl_kernels.moe_ffn_triton) or "auto"; the reference also runs the permute, grouped
            GEMMs and unpermute inside the block with the chosen implementation (see
            seedvl_kernels._dispatch).

    Returns:
        (T, D) in x's dtype. Differentiable in x, gate_weights, w_gate_up and w_down.
        gate_weights and expert_ids may have any strides. Non-finite values propagate per token: a
        NaN/inf in x[t] or gate_weights[t] reaches out[t] only; one in an expert's weights reaches
        the tokens routed to that expert.
    """
    _validate.tensor("x", x)
    _validate.ndim("x", x, 2, "(T, D)")
    _validate.dtype("x", x, DTYPES)
    _validate.last_dim_contiguous("x", x)
    T = x.shape[0]
    E = check_expert_weights(x, w_gate_up, w_down)
    _check_expert_ids(expert_ids, T, E)
    _validate.tensor("gate_weights", gate_weights)
    _validate.ndim("gate_weights", gate_weights, 2, "(T, k)")
    _validate.dtype("gate_weights", gate_weights, DTYPES)
    if gate_weights.shape != expert_ids.shape:
        raise ValueError(
            f"gate_weights: expected the shape of expert_ids {tuple(expert_ids.shape)}, "
            f"got {tuple(gate_weights.shape)}"
        )
    device = _validate.same_device(
        {
            "x": x,
            "gate_weights": gate_weights,
            "expert_ids": expert_ids,
            "w_gate_up": w_gate_up,
            "w_down": w_down,
        }
    )
    chosen = _dispatch.resolve(OP, impl, device, x.dtype)
    if chosen == "triton":
        return moe_ffn_triton.moe_ffn_triton(x, gate_weights, expert_ids, w_gate_up, w_down)
    return moe_ffn_ref(x, gate_weights, expert_ids, w_gate_up, w_down, chosen)
