"""Group tokens by expert for the grouped GEMMs, and bring the expert outputs back per token.

Definitions. T tokens each choose k experts, ``expert_ids`` (T, k). The routed slot (t, j) has the
flat index ``t * k + j``. :func:`moe_permute` orders the T*k slots by expert, stably:

    row_map = argsort(expert_ids.flatten(), stable=True)          (T*k,) int32
    row_map[r] = t * k + j   <=>   permuted row r is slot j of token t
    x_perm[r]  = x[row_map[r] // k]
    offsets[e] = #{slots with expert id < e}                     (E+1,) int32, offsets[0] = 0

so rows offsets[e] : offsets[e+1] of x_perm are the tokens of expert e, in increasing (t, j)
order, and offsets[E] = T*k. A token that lists an expert twice appears twice in its group.
:func:`moe_unpermute` is the weighted inverse, with inv = the inverse permutation of row_map
(inv[t*k + j] = r):

    out[t] = sum_{j = 0..k-1} gate_weights[t, j] * y[inv[t*k + j]]

The sum runs over j in that fixed order in fp32 (fp64 for fp64 inputs), with no atomics and no
scatter_add, so the result is bitwise reproducible; it is returned in y's dtype.

Backward, written out so that it is as deterministic as the forward (both are gathers followed by
a fixed-order slot reduction; autograd's own backward of an index would be an index_add):

    permute:    dx[t]       = sum_j dx_perm[inv[t*k + j]]                   (fp32, fixed order)
    unpermute:  dy[r]       = gate_weights[t, j] * dout[t]     with t*k + j = row_map[r]
                dgate[t, j] = <dout[t], y[inv[t*k + j]]>                    (fp32)

Saved for backward: permute keeps inv (T*k,) int64; unpermute keeps y, gate_weights, row_map and
inv. expert_ids, offsets and row_map are integer tensors and get no gradient.

Shapes: x (T, D), expert_ids (T, k) int32 -> x_perm (T*k, D), offsets (E+1,) int32, row_map
(T*k,) int32; y (T*k, D), gate_weights (T, k) -> out (T, D).

Cost: permute reads T*D and writes T*k*D elements (plus a sort of T*k keys); unpermute reads T*k*D
and writes T*D elements, 2*T*k*D FLOPs. Both are memory-bound; all outputs stay on the device and
nothing waits for the host (offsets come from a searchsorted over the sorted ids, not a count on
the host), so the pair is plain, compile-friendly PyTorch.
"""

from __future__ import annotations

import torch

from . import _backends, _dispatch, _validate

OP_PERMUTE = "moe_permute"
OP_UNPERMUTE = "moe_unpermute"
DTYPES = (*_backends.FLOAT_DTYPES, torch.float64)


# ----------------------------------------------------------------------------- reference


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32, or fp64 when any input is fp64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _slot_sum(rows: torch.Tensor, weights: torch.Tensor | None, compute: torch.dtype) -> torch.Tensor:
    """sum_j weights[:, j] * rows[:, j] over j = 0..k-1 in this order; rows (T, k, D) -> (T, D)."""
    acc = rows[:, 0].to(compute)
    if weights is not None:
        acc = acc * weights[:, :1].to(compute)
    for j in range(1, rows.shape[1]):
        term = rows[:, j].to(compute)
        acc = acc + (term if weights is None else term * weights[:, j : j + 1].to(compute))
    return acc


def _inverse(row_map: torch.Tensor) -> torch.Tensor:
    """inv with inv[row_map[r]] = r (row_map is a permutation, so this index_put has no collisions)."""
    rm = row_map.long()
    inv = torch.empty_like(rm)
    inv[rm] = torch.arange(rm.numel(), device=rm.device)
    return inv


def moe_permute_index(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_map int64 (T*k,), offsets int32 (E+1,)) as defined in the module docstring."""
    flat = expert_ids.reshape(-1).long()
    sorted_ids, row_map = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts + 1, dtype=torch.long, device=flat.device)
    offsets = torch.searchsorted(sorted_ids, bounds, out_int32=True)
    return row_map, offsets


class _PermuteRows(torch.autograd.Function):
    """x_perm = x[row_map // k]; backward gathers through inv and sums the k slots in order."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, src_token: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, src_token)

    @staticmethod
    def backward(ctx, grad_perm: torch.Tensor):
        (inv,) = ctx.saved_tensors
        k = ctx.k
        rows = grad_perm.index_select(0, inv)
        rows = rows.view(inv.numel() // k, k, grad_perm.shape[-1])
        dx = _slot_sum(rows, None, _compute_dtype(grad_perm.dtype)).to(grad_perm.dtype)
        return dx, None, None, None


class _UnpermuteRows(torch.autograd.Function):
    """out[t] = sum_j w[t, j] * y[inv[t*k + j]] in fixed j order; explicit gather-only backward."""

    @staticmethod
    def forward(
        ctx, y: torch.Tensor, gate_weights: torch.Tensor, row_map: torch.Tensor, inv: torch.Tensor
    ) -> torch.Tensor:
        T, k = gate_weights.shape
        rows = y.index_select(0, inv).view(T, k, y.shape[-1])
        out = _slot_sum(rows, gate_weights, _compute_dtype(y.dtype, gate_weights.dtype))
        ctx.save_for_backward(y, gate_weights, row_map, inv)
        return out.to(y.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        y, gate_weights, row_map, inv = ctx.saved_tensors
        T, k = gate_weights.shape
        compute = _compute_dtype(y.dtype, gate_weights.dtype, grad_out.dtype)
        dy = dgate = None
        if ctx.needs_input_grad[0]:
            w_row = gate_weights.reshape(-1).index_select(0, row_map).to(compute)  # (T*k,)
            g_row = grad_out.index_select(0, torch.div(row_map, k, rounding_mode="floor")).to(compute)
            dy = (g_row * w_row[:, None]).to(y.dtype)
        if ctx.needs_input_grad[1]:
            rows = y.index_select(0, inv).view(T, k, y.shape[-1]).to(compute)
            dgate = (rows * grad_out.to(compute)[:, None, :]).sum(-1).to(gate_weights.dtype)
        return dy, dgate, None, None


def moe_permute_ref(
    x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch moe_permute (the spec): (x_perm, offsets int32, row_map int32)."""
    k = expert_ids.shape[1]
    row_map, offsets = moe_permute_index(expert_ids, num_experts)
    src_token = torch.div(row_map, k, rounding_mode="floor")
    x_perm = _PermuteRows.apply(x, src_token, _inverse(row_map), k)
    return x_perm, offsets, row_map.to(torch.int32)


def moe_unpermute_ref(y: torch.Tensor, row_map: torch.Tensor, gate_weights: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch moe_unpermute (the spec): (T, D) in y's dtype."""
    rm = row_map.long()
    return _UnpermuteRows.apply(y, gate_weights, rm, _inverse(rm))


_dispatch.register(OP_PERMUTE, "ref", _backends.ref_support)
_dispatch.register(OP_UNPERMUTE, "ref", _backends.ref_support)


# ----------------------------------------------------------------------------- validation


def _check_expert_ids(expert_ids: torch.Tensor, tokens: int, num_experts: int) -> None:
    """(T, k) int32 with k >= 1; ids in [0, E) checked on CPU only (a GPU check would sync)."""
    _validate.tensor("expert_ids", expert_ids)
    _validate.ndim("expert_ids", expert_ids, 2, "(T, k)")
    _validate.dtype("expert_ids", expert_ids, (torch.int32,))
    _validate.dim_size("expert_ids", expert_ids, 0, tokens, "T, the tokens of x")
    if expert_ids.shape[1] < 1:
        raise ValueError(
            f"expert_ids: expected k >= 1 experts per token, got shape {tuple(expert_ids.shape)}"
        )
    if expert_ids.device.type == "cpu" and not _validate._is_fake(expert_ids) and expert_ids.numel() > 0:
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(
                f"expert_ids: expected ids in [0, {num_experts}) (num_experts), got values in [{lo}, {hi}]"
            )


def _check_num_experts(num_experts: object) -> int:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"num_experts: expected a host int, got {type(num_experts).__name__}")
    if num_experts < 1:
        raise ValueError(f"num_experts: expected >= 1, got {num_experts}")
    return num_experts


# ----------------------------------------------------------------------------- public functions


def moe_permute(
    x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, *, impl: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy each token once per chosen expert, grouped by expert (stable within a group).

    Args:
        x: (T, D) float32/float16/bfloat16/float64 tokens.
        expert_ids: (T, k) int32 experts of each token (as from :func:`route`), on x's device,
            k >= 1, values in [0, num_experts) (checked for CPU tensors only; out-of-range ids on a
            GPU give undefined groups).
        num_experts: E, a host int >= 1.
        impl: "ref" or "auto" (only the reference exists; see seedvl_kernels._dispatch).

    Returns:
        x_perm (T*k, D) in x's dtype, differentiable in x (backward sums the k copies of each
        token in slot order); offsets (E+1,) int32 on the device, rows offsets[e]:offsets[e+1]
        belong to expert e; row_map (T*k,) int32 with row_map[r] = t*k + j, the (token, slot) that
        permuted row r came from. No host synchronisation. Any strides; values (NaN/inf
        included) are copied, never inspected.
    """
    _validate.tensor("x", x)
    _validate.ndim("x", x, 2, "(T, D)")
    _validate.dtype("x", x, DTYPES)
    num_experts = _check_num_experts(num_experts)
    _check_expert_ids(expert_ids, x.shape[0], num_experts)
    device = _validate.same_device({"x": x, "expert_ids": expert_ids})
    _dispatch.resolve(OP_PERMUTE, impl, device, x.dtype)
    return moe_permute_ref(x, expert_ids, num_experts)


def moe_unpermute(
    y: torch.Tensor, row_map: torch.Tensor, gate_weights: torch.Tensor, *, impl: str | None = None
) -> torch.Tensor:
    """Weighted sum of each token's k expert outputs: out[t] = sum_j w[t, j] * y[row of (t, j)].

    Args:
        y: (T*k, D) float32/float16/bfloat16/float64 expert outputs in permuted order.
        row_map: (T*k,) int32 from :func:`moe_permute` (a permutation of 0..T*k-1; checked for CPU
            tensors only).
        gate_weights: (T, k) float gate weights (fp32 from :func:`route`), on y's device.
        impl: "ref" or "auto" (only the reference exists; see seedvl_kernels._dispatch).

    Returns:
        (T, D) in y's dtype, reduced over slots j = 0..k-1 in that order in fp32 (bitwise
        deterministic). Differentiable in y and gate_weights.
    """
    _validate.tensor("y", y)
    _validate.ndim("y", y, 2, "(T*k, D)")
    _validate.dtype("y", y, DTYPES)
    _validate.tensor("gate_weights", gate_weights)
    _validate.ndim("gate_weights", gate_weights, 2, "(T, k)")
    _validate.dtype("gate_weights", gate_weights, DTYPES)
    T, k = gate_weights.shape
    if k < 1:
        raise ValueError(
            f"gate_weights: expected k >= 1 slots per token, got shape {tuple(gate_weights.shape)}"
        )
    _validate.dim_size("y", y, 0, T * k, f"T*k = {T}*{k} from gate_weights")
    _validate.tensor("row_map", row_map)
    _validate.ndim("row_map", row_map, 1, "(T*k,)")
    _validate.dtype("row_map", row_map, (torch.int32,))
    _validate.dim_size("row_map", row_map, 0, T * k, f"T*k = {T}*{k} from gate_weights")
    device = _validate.same_device({"y": y, "row_map": row_map, "gate_weights": gate_weights})
    if device.type == "cpu" and not _validate._is_fake(row_map) and row_map.numel() > 0:
        expected = torch.arange(row_map.numel(), dtype=torch.int32)
        if not torch.equal(torch.sort(row_map).values, expected):
            raise ValueError(
                f"row_map: expected a permutation of 0..{row_map.numel() - 1} (from moe_permute)"
            )
    _dispatch.resolve(OP_UNPERMUTE, impl, device, y.dtype)
    return moe_unpermute_ref(y, row_map, gate_weights)
