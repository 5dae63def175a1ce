"""Expert parallelism: send each routed token to the rank that owns its expert, and bring it back.

Layout. An EP group of W ranks shares E experts, split contiguously: rank r owns experts
[r * E_l, (r+1) * E_l) with E_l = E / W (E % W == 0), and holds their weights as its local
(E_l, ...) shard. Every rank has its own T_r tokens (T_r may differ between ranks and may be 0),
each routed to k global experts.

Dispatch, on every rank (source side first, then the receiving side):

    x_perm, offsets, row_map = moe_permute(x, ids, E)         (T*k, D) grouped by global expert,
                                                                so also by destination rank
    count[e]  = offsets[e+1] - offsets[e]                      (E,) int32, on the device
    recv[s, l] = count of source s for local expert l          all_to_all_single of count,
                                                                E_l entries to each rank: (W, E_l)
    send_splits[d] = sum_l count[d*E_l + l]                    one device-to-host copy of both
    recv_splits[s] = sum_l recv[s, l]                          (the only host sync, see below)
    x_recv = all_to_all_single(x_perm, recv_splits, send_splits)   (R, D), R = sum_s recv_splits[s],
                                                                ordered (source, local expert, slot)
    x_local = x_recv[gather]                                    (R, D) ordered (local expert, source,
                                                                slot); offsets_local (E_l+1,) int32

The reorder is computed on the device in O(R) without a sort: received row i of chunk
c = (s, l) at position p inside it goes to dest[i] = start_el[l, s] + p, where start_el is the
exclusive prefix sum of recv in (l, s) order; ``gather`` is the inverse permutation of ``dest``.

Combine (inverse of the above, then the single-process weighted reduction):

    y_recv = y[dest]                                            back to (source, expert, slot) order
    y_perm = all_to_all_single(y_recv, send_splits, recv_splits)   (T*k, D) on the source, in x_perm's
                                                                order
    out    = moe_unpermute(y_perm, row_map, gate_weights)       out[t] = sum_j w[t, j] y(t, j), j in
                                                                fixed order, fp32, no atomics

so the result is what single-process ``moe_ffn`` computes for these tokens: within every expert,
rows arrive in (source rank, token, slot) order, which is the single-process order of the
concatenated tokens of all ranks, and the combine is the same function.

Backward. Every step is a copy or a gather, so its backward is the reverse copy: an all-to-all
with the splits swapped (:class:`_AllToAll`) and the gather through the inverse permutation
(:class:`_RowGather`; no index_add, so it is deterministic on the GPU too). The permute/unpermute
backward are moe_permute's own (fixed-order sums). Backward is collective: every rank of the
group must run it (the same tensors must require grad on every rank, as in any EP training step).
Gradients reach x, gate_weights and the local expert weights; the weight gradients cover every
token routed to the local experts from any rank, and an expert that received none gets exact
zeros.

Host synchronisation (the one this op needs, as in Megatron-LM's and DeepSpeed's token
dispatchers): ``all_to_all_single`` with uneven splits takes the split sizes as host ints, and the
receive buffer's size is the number of rows the other ranks send. So dispatch does one all-to-all
of the (E,) expert counts and then copies W send and W receive counts to the host in one transfer
(a device-to-host sync per MoE layer, waiting for the router). Combine and both backward passes
reuse those sizes: no further sync. A capacity factor (fixed-size buffers with dropped or padded
tokens) would remove the sync at the price of dropping tokens or moving padding; not done here.

Saved for backward: the split sizes (host), ``gather`` and ``dest`` (R,) int64, and what
moe_permute/moe_unpermute save (the combine keeps y_perm, gate_weights, row_map).

Communication per layer (bytes, forward): T*k*D*itemsize sent and received by dispatch, again by
combine, the same twice more in backward; plus W*E_l*4 bytes of counts. No FLOPs of its own.

Shapes: x (T, D), expert_ids (T, k) int32, gate_weights (T, k) -> x_local (R, D), offsets_local
(E_l+1,) int32; y (R, D) -> out (T, D).

Layout: x and y need a contiguous last dimension (rows are sent as they are); expert_ids and
gate_weights may have any strides; the expert weights follow grouped_gemm's rules. Non-finite
values travel with their rows: a NaN/inf in x[t] or gate_weights[t] reaches out[t] only (on its
own rank), one in an expert's weights reaches the tokens routed to that expert, whichever rank
sent them. Expert ids outside [0, E) are refused on CPU; on a GPU they are not checked (that
would sync) and must not occur.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import _backends, _validate
from .grouped_gemm import grouped_gemm
from .moe_ffn import check_expert_weights, swiglu
from .moe_permute import _check_expert_ids, _check_num_experts, moe_permute, moe_unpermute

DTYPES = (*_backends.FLOAT_DTYPES, torch.float64)


# ----------------------------------------------------------------------------- autograd pieces


class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` split by ``send_splits`` go to the ranks of ``group`` in order; the reply is
    concatenated by ``recv_splits``. Backward: the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return _all_to_all(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        send_splits, recv_splits = ctx.splits
        return _all_to_all(grad, recv_splits, send_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


class _RowGather(torch.autograd.Function):
    """out = x[index]; ``inverse`` is index's inverse permutation, so backward is a gather too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def exchange_rows(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    """Differentiable all-to-all of rows: ``x``'s rows, split by ``send_splits``, go to the ranks of
    ``group`` in order, and the rows received are concatenated by ``recv_splits``. Its backward
    sends the gradient back the same way."""
    return _AllToAll.apply(x, send_splits, recv_splits, group)


def gather_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for a permutation ``index`` whose inverse is ``inverse``. The backward is a
    gather through ``inverse``, not a scatter-add, so it is deterministic on every device."""
    return _RowGather.apply(x, index, inverse)


# ----------------------------------------------------------------------------- dispatch / combine


@dataclass(frozen=True)
class EPState:
    """What :func:`ep_combine` needs from :func:`ep_dispatch` (opaque to callers)."""

    group: dist.ProcessGroup
    send_splits: list[int]  # rows this rank sends to each rank (host ints)
    recv_splits: list[int]  # rows this rank receives from each rank (host ints)
    gather: torch.Tensor  # (R,) int64: x_local = x_recv[gather]
    dest: torch.Tensor  # (R,) int64: the inverse, x_recv = x_local[dest]
    row_map: torch.Tensor  # (T*k,) int32 from moe_permute
    gate_weights: torch.Tensor  # (T, k), the combine weights (keeps its autograd history)
    recv_counts: torch.Tensor  # (W, E_l) int32 on the device: rows from source s for local expert l


class EPDispatch(NamedTuple):
    """What :func:`ep_dispatch` returns."""

    x_local: torch.Tensor  # (R, D): the rows this rank's experts process, grouped by local expert
    offsets: torch.Tensor  # (E_l+1,) int32 on the device: rows offsets[l]:offsets[l+1] are expert l's
    state: EPState


def _reorder_index(recv_counts: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gather, dest) taking rows in (source, expert, slot) order to (expert, source, slot) order."""
    world, local_experts = recv_counts.shape
    counts = recv_counts.long()
    flat = counts.reshape(-1)
    src_start = torch.cumsum(flat, 0) - flat  # chunk (s, l) in received order
    by_expert = counts.t().reshape(-1)
    dst_start = (torch.cumsum(by_expert, 0) - by_expert).view(local_experts, world).t().reshape(-1)
    chunk = torch.repeat_interleave(
        torch.arange(flat.numel(), device=flat.device), flat, output_size=total
    )  # output_size: no sync
    row = torch.arange(total, device=flat.device)
    dest = dst_start[chunk] + (row - src_start[chunk])
    gather = torch.empty_like(dest)
    gather[dest] = row  # dest is a permutation: one writer per element
    return gather, dest


def ep_dispatch(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    gate_weights: torch.Tensor,
    num_experts: int,
    group: dist.ProcessGroup,
) -> EPDispatch:
    """Send every routed (token, slot) of this rank to the rank owning its expert.

    Every rank of ``group`` must call it (a collective), with the same ``num_experts``.

    Args:
        x: (T, D) float32/float16/bfloat16/float64 tokens of this rank (T may be 0), last dim
            contiguous.
        expert_ids: (T, k) int32 global expert ids in [0, num_experts), on x's device.
        gate_weights: (T, k) float combine weights (fp32 from :func:`route`), kept for
            :func:`ep_combine` (they stay on this rank; gradients reach them there).
        num_experts: E, a host int divisible by the group size; rank r owns experts
            [r*E/W, (r+1)*E/W).
        group: the expert-parallel process group (NCCL on GPU, gloo on CPU).

    Returns:
        :class:`EPDispatch`: x_local (R, D) in x's dtype, the rows sent to this rank's E/W experts by
        every rank, grouped by local expert (within an expert: by source rank, then token and slot);
        offsets (E/W+1,) int32 on the device; state for :func:`ep_combine`. Differentiable in x.
        One host sync (the split sizes; see the module docstring).
    """
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a torch.distributed ProcessGroup, got {type(group).__name__}")
    _validate.tensor("x", x)
    _validate.ndim("x", x, 2, "(T, D)")
    _validate.dtype("x", x, DTYPES)
    _validate.last_dim_contiguous("x", x)
    num_experts = _check_num_experts(num_experts)
    world = dist.get_world_size(group)
    if num_experts % world != 0:
        raise ValueError(
            f"num_experts: expected a multiple of the expert-parallel group size {world}, got {num_experts}"
        )
    _check_expert_ids(expert_ids, x.shape[0], num_experts)
    _validate.tensor("gate_weights", gate_weights)
    _validate.ndim("gate_weights", gate_weights, 2, "(T, k)")
    _validate.dtype("gate_weights", gate_weights, DTYPES)
    if gate_weights.shape != expert_ids.shape:
        raise ValueError(
            f"gate_weights: expected the shape of expert_ids {tuple(expert_ids.shape)}, "
            f"got {tuple(gate_weights.shape)}"
        )
    _validate.same_device({"x": x, "expert_ids": expert_ids, "gate_weights": gate_weights})
    local_experts = num_experts // world

    x_perm, offsets, row_map = moe_permute(x, expert_ids, num_experts)
    counts = (offsets[1:] - offsets[:-1]).contiguous()  # (E,) int32, grouped by destination rank
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)  # E_l counts to and from every rank
    recv_counts = recv_counts.view(world, local_experts)
    splits = torch.cat([counts.view(world, local_experts).sum(1), recv_counts.sum(1)])
    splits = splits.tolist()  # the host sync: all_to_all_single needs host split sizes
    send_splits, recv_splits = splits[:world], splits[world:]

    x_recv = exchange_rows(x_perm, send_splits, recv_splits, group)
    gather, dest = _reorder_index(recv_counts, x_recv.shape[0])
    x_local = gather_rows(x_recv, gather, dest)
    offsets_local = torch.zeros(local_experts + 1, dtype=torch.int32, device=x.device)
    torch.cumsum(recv_counts.sum(0), 0, out=offsets_local[1:])
    state = EPState(group, send_splits, recv_splits, gather, dest, row_map, gate_weights, recv_counts)
    return EPDispatch(x_local, offsets_local, state)


def ep_combine(y: torch.Tensor, state: EPState) -> torch.Tensor:
    """Send the expert outputs back to their source ranks and sum each token's k outputs.

    Every rank of the group must call it (a collective).

    Args:
        y: (R, D) expert outputs in the order of :func:`ep_dispatch`'s x_local (D may differ from
            x's), float32/float16/bfloat16/float64.
        state: the :class:`EPState` of the matching dispatch.

    Returns:
        (T, D) in y's dtype on the source rank: out[t] = sum_j gate_weights[t, j] * y(t, j), summed
        over j in fixed order in fp32 (deterministic). Differentiable in y and gate_weights.
    """
    if not isinstance(state, EPState):
        raise TypeError(f"state: expected the EPState of ep_dispatch, got {type(state).__name__}")
    _validate.tensor("y", y)
    _validate.ndim("y", y, 2, "(R, D)")
    _validate.dtype("y", y, DTYPES)
    _validate.dim_size("y", y, 0, state.dest.numel(), "R, the rows of ep_dispatch's x_local")
    y_recv = gather_rows(y, state.dest, state.gather)
    y_perm = exchange_rows(y_recv, state.recv_splits, state.send_splits, state.group)
    return moe_unpermute(y_perm, state.row_map, state.gate_weights)


# ----------------------------------------------------------------------------- the layer


def ep_moe_ffn(
    x: torch.Tensor,
    gate_weights: torch.Tensor,
    expert_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    group: dist.ProcessGroup,
    impl: str | None = None,
) -> torch.Tensor:
    """moe_ffn with the experts spread over ``group``: dispatch -> local grouped GEMMs -> combine.

    Every rank of ``group`` calls it with its own tokens and its shard of the experts. The result
    on each rank equals single-process :func:`moe_ffn` over the tokens of all ranks with the full
    (concatenated) expert weights, restricted to this rank's tokens.

    Args:
        x: (T, D) tokens of this rank (T may be 0), float32/float16/bfloat16/float64.
        gate_weights: (T, k) float gate weights (fp32 from :func:`route`).
        expert_ids: (T, k) int32 global expert ids in [0, E), E = W * E_l.
        w_gate_up: (E_l, D, 2F) this rank's experts (global ids rank*E_l ...), gate half first,
            in x's dtype.
        w_down: (E_l, F, D) this rank's experts, in x's dtype.
        group: the expert-parallel process group of W ranks.
        impl: implementation of the two grouped GEMMs ("ref", "triton", "cuda" or "auto"; see
            seedvl_kernels._dispatch); the permute and unpermute around the exchange follow the
            usual per-op choice.

    Returns:
        (T, D) in x's dtype. Differentiable in x, gate_weights, w_gate_up and w_down (backward is
        collective).
    """
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a torch.distributed ProcessGroup, got {type(group).__name__}")
    _validate.tensor("x", x)
    _validate.ndim("x", x, 2, "(T, D)")
    check_expert_weights(x, w_gate_up, w_down, experts="E_l")
    num_experts = w_gate_up.shape[0] * dist.get_world_size(group)
    x_local, offsets, state = ep_dispatch(x, expert_ids, gate_weights, num_experts, group)
    h = swiglu(grouped_gemm(x_local, w_gate_up, offsets, impl=impl))
    y = grouped_gemm(h, w_down, offsets, impl=impl)
    return ep_combine(y, state)
