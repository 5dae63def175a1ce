"""Context-parallel causal attention over packed documents: zigzag ring attention, or all-gather KV.

Layout. CP ranks share every document. ``zigzag_shard`` pads a document of length L at its end to
Lp = ceil(L / 2CP) * 2CP tokens, cuts it into 2CP chunks of c = Lp / 2CP and gives rank r chunks
a = r and b = 2CP-1-r, back to back. Every rank then holds 2c rows of every document, in the same
local ``cu_seqlens`` on every rank. Position ids and labels are sharded with the tokens, so positions
stay global within the document; padding labels are the ignore index. Under a causal mask the
padding (after the document's last token) is invisible to real tokens, and its gradients are zero
when its loss weight is.

Forward. Query chunk i sees key chunk j of its document fully if j < i, causally if j == i, not at
all if j > i. At ring step t rank r holds the KV of rank s = (r - t) mod CP (chunks s, 2CP-1-s):

    t = 0 (s == r): causal attention over its own 2c rows (b sees a fully and itself causally)
    s < r:          both query chunks see KV chunk s fully, chunk 2CP-1-s not at all   (2c x c)
    s > r:          only query chunk b sees, both KV chunks fully                       (c x 2c)

so every step is one ``varlen_attention`` call over 2c^2 (query, key) pairs per document: equal
work on every rank at every step. The one-sided steps select half of the rows with interleaved
cu_seqlens that give the other half zero-length sequences (no gather copies). Each step's
(o_t, lse_t) merges into fp32 accumulators (fp64 for fp64 inputs) through the log-sum-exp (one
fused kernel with Triton blocks, :mod:`seedvl_kernels.ring_attention_triton`; the reference here):

    m = max(lse, lse_t) (0 where both are -inf);  lse' = m + log(exp(lse - m) + exp(lse_t - m))
    o' = exp(lse - lse') o + exp(lse_t - lse') o_t       (weights <= 1: no overflow)

Rows that see no key (yet) have lse -inf and weight 0, never NaN. Nothing rounds to the input dtype
before the end: each step's o_t comes back from varlen_attention in fp32 (the op's ``out_dtype``) and
the running sum is fp32, so out is rounded once, as in a single-process call, and the error does not
grow with CP. (Users of ring implementations that keep the accumulator in bf16 see it grow; rounding
only each o_t to bf16 costs about 1.3x the single-process error from CP=2 on.)

Backward, with the global out O and lse L of the local queries (and dL when lse is used):

    P_t = exp(S_t - L)    D = rowsum(dO * O) - dL    dS_t = P_t (dO V_t^T - D)
    dQ += s dS_t K_t      dK_t = s dS_t^T Q          dV_t = P_t^T dO

which is exactly ``torch.ops.seedvl.varlen_attention_bwd`` called with (O, L) for each step's KV
block, returning fp32 dq_t, dk_t, dv_t. dQ accumulates locally in fp32; dK/dV of a block accumulate
in an fp32 buffer that travels around the ring with the block, and after the last step takes one more
hop home to its owner.

Communication (KV of T rows: 2*T*Hkv*D*itemsize bytes). Forward: CP-1 KV hops. Backward: CP-1 KV
hops and CP fp32 dKV hops (2*T*Hkv*D*4 bytes each). Every hop is an isend to rank r+1 and an irecv
from r-1: under NCCL the two as one ``batch_isend_irecv`` (one NCCL group, so the send and the
receive run concurrently), elsewhere posted in rank-parity order (even ranks send first, odd ranks
receive first: no cycle of blocking sends, and none of batch_isend_irecv's gloo pitfalls). Buffers are
double-buffered: block t+1 arrives while block t is computed. With NCCL the transfers run on the
process group's own CUDA stream (the separate communication stream), which waits for the current
stream's producers; Work.wait() makes the compute stream wait for an arrival, with no host sync.

All-gather mode (Llama 3 style): one all_gather of every rank's KV, reordered into document order
on the device; query chunk a attends causally (bottom-right aligned) to the first (a+1)c keys of
its document and chunk b to the first (b+1)c; the backward reduce-scatters dK/dV in fp32. It holds
CP x the KV and does not overlap, but any mask expressible per document works with it.

Saved for backward: q, k, v (local), out (input dtype), lse (fp32) and the O(B) derived cu_seqlens.
Other ranks' KV is not kept: the backward circulates it again.

Host syncs: none on the GPU path. The per-step cu_seqlens and the all-gather row index are built on
the device from the local cu_seqlens; ``max_seqlen`` is the caller's host int; cu_seqlens values
are checked only for CPU tensors. ``zigzag_shard`` / ``zigzag_unshard`` are data-pipeline helpers:
they read cu_seqlens on the host (the packer makes it on the CPU).
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import _dispatch, _validate
from . import ring_attention_triton as _merge_triton
from .varlen_attention import OP as VARLEN_OP
from .varlen_attention import _check_qkv, _compute_dtype

MODES = ("ring", "allgather")
_KV_TAG, _DKV_TAG = 0, 1  # gloo matches messages by tag: KV and dKV hops may be in flight together
# One block: (cu_seqlens_q, cu_seqlens_k, causal) of a varlen_attention call over this rank's queries.
Call = tuple[torch.Tensor, torch.Tensor, bool]


# ----------------------------------------------------------------------------- zigzag sharding


class ZigzagShard(NamedTuple):
    """What zigzag_shard returns: the model's inputs on this rank."""

    tensors: list[torch.Tensor]  # this rank's rows of each input, in the zigzag layout
    cu_seqlens: torch.Tensor  # (B+1,) int32 local offsets: document b spans 2 * c_b rows
    max_seqlen: int  # longest local document (2 * max c_b)


def _host_lengths(cu_seqlens: object) -> list[int]:
    _validate.cu_seqlens("cu_seqlens", cu_seqlens)
    if cu_seqlens.device.type == "meta":
        raise ValueError(
            "cu_seqlens: expected a tensor with values (the helpers read it on the host), got meta"
        )
    cu = cu_seqlens.tolist()
    return [e - s for s, e in itertools.pairwise(cu)]


def _tensor_list(name: str, value: object) -> list[torch.Tensor]:
    """A sequence of tensors (a bare tensor is refused: iterating it would yield its rows)."""
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
        raise TypeError(f"{name}: expected a list or tuple of tensors, got {type(value).__name__}")
    return [_validate.tensor(f"{name}[{i}]", t) for i, t in enumerate(value)]


def _pad_value(name: str, value: object, dtype: torch.dtype) -> float | int | bool:
    """``value`` if a tensor of ``dtype`` holds it exactly (masked_fill would truncate 0.5 to 0 in an
    integer tensor), else TypeError/ValueError."""
    if isinstance(value, torch.Tensor) or not isinstance(value, numbers.Number):
        raise TypeError(f"{name}: expected a host number, got {type(value).__name__}")
    if dtype.is_floating_point or dtype.is_complex:
        if isinstance(value, complex) and not dtype.is_complex:
            raise TypeError(f"{name}: expected a real number for a {dtype} tensor, got {value!r}")
        return value
    if dtype == torch.bool:
        if value not in (0, 1):
            raise ValueError(f"{name}: expected a bool (or 0/1) for a bool tensor, got {value!r}")
        return bool(value)
    info = torch.iinfo(dtype)
    if not isinstance(value, numbers.Integral) or not info.min <= value <= info.max:
        raise ValueError(
            f"{name}: expected an integer in [{info.min}, {info.max}] for a {dtype} tensor, got {value!r}"
        )
    return int(value)


def _check_cp(cp_size: object, rank: object | None = None) -> None:
    if not isinstance(cp_size, int) or isinstance(cp_size, bool) or cp_size < 1:
        raise ValueError(f"cp_size: expected a positive int, got {cp_size!r}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < cp_size):
        raise ValueError(f"rank: expected an int in [0, {cp_size}), got {rank!r}")


def _zigzag_rows(lengths: list[int], cp_size: int, rank: int) -> tuple[torch.Tensor, list[int]]:
    """Global row of each local row of ``rank`` (-1 for padding), and the local document lengths."""
    n = 2 * cp_size
    rows, local = [], []
    start = 0
    for length in lengths:
        c = -(-length // n)
        for chunk in (rank, n - 1 - rank):
            pos = torch.arange(chunk * c, (chunk + 1) * c)
            rows.append(torch.where(pos < length, start + pos, -1))
        local.append(2 * c)
        start += length
    return (torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)), local


def zigzag_shard(
    tensors: Sequence[torch.Tensor],
    cu_seqlens: torch.Tensor,
    cp_size: int,
    rank: int,
    *,
    pad_values: Sequence[float] | float = 0,
) -> ZigzagShard:
    """This rank's zigzag shard of packed tensors that share ``cu_seqlens`` (tokens, positions, labels).

    Each document is padded at its end to a multiple of 2*cp_size rows and cut into 2*cp_size chunks;
    rank r keeps chunks r and 2*cp_size-1-r, back to back. Example, for a packed batch:

        ids, pos, labels = zigzag_shard([ids, pos, labels], cu, cp, r, pad_values=[0, 0, -100]).tensors

    Args:
        tensors: a list or tuple (not a bare tensor) of tensors, each (T, ...) on any device (meta
            included), T >= cu_seqlens[-1]; rows past cu_seqlens[-1] are dropped.
        cu_seqlens: (B+1,) int32 contiguous document offsets with values (not meta; read on the
            host: a sync if it lives on a GPU).
        cp_size: context-parallel ranks; rank: this rank's index in the context-parallel group.
        pad_values: the value of padding rows, one for all tensors or one per tensor (labels: -100);
            each must fit its tensor's dtype exactly (an int in range for integer tensors, 0/1 for
            bool), else TypeError/ValueError.
    Returns:
        ZigzagShard(tensors, cu_seqlens (B+1,) int32 local offsets on cu_seqlens' device, max_seqlen).
    """
    tensors = _tensor_list("tensors", tensors)
    _check_cp(cp_size, rank)
    lengths = _host_lengths(cu_seqlens)
    if isinstance(pad_values, Sequence) and not isinstance(pad_values, str):
        if len(pad_values) != len(tensors):
            raise ValueError(f"pad_values: expected one value or {len(tensors)}, got {len(pad_values)}")
        pads = [
            _pad_value(f"pad_values[{i}]", p, t.dtype)
            for i, (p, t) in enumerate(zip(pad_values, tensors, strict=True))
        ]
    else:
        pads = [_pad_value("pad_values", pad_values, t.dtype) for t in tensors]
    rows, local = _zigzag_rows(lengths, cp_size, rank)
    shards = []
    for i, t in enumerate(tensors):
        if t.dim() == 0 or t.shape[0] < sum(lengths):
            raise ValueError(
                f"tensors[{i}]: expected (T, ...) with T >= cu_seqlens[-1] = {sum(lengths)}, "
                f"got shape {tuple(t.shape)}"
            )
        r = rows.to(t.device)
        pad = (r < 0).view(-1, *([1] * (t.dim() - 1)))
        shards.append(t.index_select(0, r.clamp(min=0)).masked_fill(pad, pads[i]))
    cu_local = torch.tensor([0, *itertools.accumulate(local)], dtype=torch.int32, device=cu_seqlens.device)
    return ZigzagShard(shards, cu_local, max(local, default=0))


def zigzag_unshard(shards: Sequence[torch.Tensor], cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Inverse of zigzag_shard: the per-rank shards (in rank order) back in the original packing.

    Args:
        shards: a list or tuple of cp_size tensors (T_local, ...) of one dtype and device, as
            zigzag_shard laid them out (rows past the local cu_seqlens[-1] are ignored).
        cu_seqlens: (B+1,) int32 contiguous original document offsets with values (not meta).
    Returns:
        (cu_seqlens[-1], ...) tensor; the padding rows are dropped.
    """
    shards = _tensor_list("shards", shards)
    if len(shards) == 0:
        raise ValueError("shards: expected one tensor per context-parallel rank, got none")
    lengths = _host_lengths(cu_seqlens)
    first = shards[0]
    if first.dim() == 0:
        raise ValueError("shards[0]: expected (T_local, ...) rows of a zigzag shard, got a 0-dim tensor")
    out = first.new_empty((sum(lengths), *first.shape[1:]))
    for rank, shard in enumerate(shards):
        rows, _ = _zigzag_rows(lengths, len(shards), rank)
        _validate.same_dtype(f"shards[{rank}]", shard, "shards[0]", first)
        _validate.same_device({"shards[0]": first, f"shards[{rank}]": shard})
        if shard.dim() == 0 or shard.shape[0] < rows.numel() or shard.shape[1:] != first.shape[1:]:
            raise ValueError(
                f"shards[{rank}]: expected ({rows.numel()}, {', '.join(map(str, first.shape[1:]))}) rows "
                f"of a zigzag shard, got shape {tuple(shard.shape)}"
            )
        keep = (rows >= 0).nonzero().squeeze(1)
        out.index_copy_(0, rows[keep].to(out.device), shard.index_select(0, keep.to(shard.device)))
    return out


# ----------------------------------------------------------------------------- device-side offsets


def _interleave(*columns: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """(c0[0], c1[0], ..., c0[1], c1[1], ..., end) as int32: offsets of per-document sub-sequences."""
    return torch.cat([torch.stack(columns, dim=1).flatten(), end.view(1)]).to(torch.int32)


def _ring_offsets(cu: torch.Tensor, causal: bool) -> dict[str, Call]:
    """(cu_q, cu_k, causal) of the three kinds of ring step, built on cu's device (no sync)."""
    st, en = cu[:-1], cu[1:]
    mid = (st + en) // 2
    if not causal:
        return {kind: (cu, cu, False) for kind in ("self", "before", "after")}
    whole = _interleave(st, en, end=cu[-1])  # each document, then an empty sequence
    halves = _interleave(st, mid, end=cu[-1])  # each document's first chunk, then its second
    empty_then_whole = _interleave(st, st, end=cu[-1])
    return {
        "self": (cu, cu, True),
        "before": (whole, halves, False),  # all queries against the first KV chunk
        "after": (halves, empty_then_whole, False),  # the second query chunk against all KV
    }


def _step_kind(rank: int, source: int) -> str:
    return "self" if source == rank else ("before" if source < rank else "after")


def _merge_ref(out: torch.Tensor, lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor) -> None:
    """In place: (out, lse) <- LSE-weighted combination with a partial result; see the docstring."""
    m = torch.maximum(lse, blk_lse)
    m = m.masked_fill(torch.isneginf(m), 0.0)
    new = m + torch.log(torch.exp(lse - m) + torch.exp(blk_lse - m))
    safe = new.masked_fill(torch.isneginf(new), 0.0)
    w_old = torch.exp(lse - safe).t().unsqueeze(-1)  # (T, Hq, 1)
    w_blk = torch.exp(blk_lse - safe).t().unsqueeze(-1)
    out.mul_(w_old).add_(blk_out.to(out.dtype) * w_blk)
    lse.copy_(new)


def _merge(out, lse, blk_out, blk_lse, impl: str) -> None:
    """The merge on the implementation the blocks run on: with Triton blocks one fused kernel
    (ring_attention_triton.merge_) where it serves the partials (fp32), else the reference."""
    if impl == "triton" and _merge_triton.merge_unavailable(out, blk_out) is None:
        _merge_triton.merge_(out, lse, blk_out, blk_lse)
    else:
        _merge_ref(out, lse, blk_out, blk_lse)


# ----------------------------------------------------------------------------- communication


class _Ring:
    """Neighbours in a process group, and the exchange of one hop: one batch_isend_irecv under NCCL,
    a parity-ordered isend/irecv pair otherwise."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)
        # NCCL runs separately posted point-to-point calls one after the other on its stream (the
        # send, then the receive that the peer posts after its own receive), so a hop's two
        # transfers serialise; one batch_isend_irecv is one NCCL group, in which they overlap.
        # gloo has no grouped launch (batching buys nothing there): it keeps the parity order.
        self.batched = dist.get_backend(group) == "nccl"

    def exchange(self, send: torch.Tensor, recv: torch.Tensor, tag: int) -> list:
        """Start sending ``send`` to the next rank and receiving the previous rank's into ``recv``."""
        if self.batched:
            ops = [
                dist.P2POp(dist.isend, send, self.next, self.group, tag),
                dist.P2POp(dist.irecv, recv, self.prev, self.group, tag),
            ]
            return dist.batch_isend_irecv(ops)
        ops = [
            lambda: dist.isend(send, self.next, group=self.group, tag=tag),
            lambda: dist.irecv(recv, self.prev, group=self.group, tag=tag),
        ]
        return [op() for op in (ops if self.rank % 2 == 0 else ops[::-1])]


def _wait(works: list) -> None:
    for w in works:
        w.wait()


# ----------------------------------------------------------------------------- local blocks


def _partial_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of each block's partial out, dq, dk, dv: the compute dtype (fp32; fp64 for fp64),
    so that nothing is rounded to the input dtype before the sums over the ring."""
    return _compute_dtype(dtype)


def _op_params(call: Call, max_q: int, max_k: int, scale: float, impl: str, dtype: torch.dtype) -> tuple:
    """The varlen_attention ops' arguments after the tensors: no RoPE, unrounded partial outputs."""
    cu_q, cu_k, causal = call
    return (cu_q, cu_k, max_q, max_k, causal, scale, None, 10000.0, impl, _partial_dtype(dtype))


def _block_fwd(q, k, v, call: Call, max_q: int, max_k: int, scale: float, impl: str):
    """(out, lse) of one block, out unrounded (the op's other two outputs, the rotated q and k of
    pos_hw, are unused)."""
    params = _op_params(call, max_q, max_k, scale, impl, q.dtype)
    out, lse, *_ = torch.ops.seedvl.varlen_attention_fwd(q, k, v, *params)
    return out, lse


def _block_bwd(dout, dlse, q, k, v, out, lse, call: Call, max_q: int, max_k: int, scale: float, impl: str):
    """(dq, dk, dv) of one block, unrounded, given the global out and lse of the queries."""
    params = _op_params(call, max_q, max_k, scale, impl, q.dtype)
    return torch.ops.seedvl.varlen_attention_bwd(dout, dlse, q, k, v, out, lse, *params)


# ----------------------------------------------------------------------------- ring autograd


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, max_seqlen, group, causal, scale, impl):
        ring = _Ring(group)
        offsets = _ring_offsets(cu, causal)
        c = _compute_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=c, device=q.device)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=c, device=q.device)
        kv, spare = torch.stack([k, v]), None
        for t in range(ring.size):
            works = []
            if t + 1 < ring.size:
                spare = torch.empty_like(kv) if spare is None else spare
                works = ring.exchange(kv, spare, _KV_TAG)
            kind = _step_kind(ring.rank, (ring.rank - t) % ring.size)
            blk_out, blk_lse = _block_fwd(q, kv[0], kv[1], offsets[kind], max_seqlen, max_seqlen, scale, impl)
            _merge(out, lse, blk_out, blk_lse, impl)
            _wait(works)
            kv, spare = spare, kv
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.offsets, ctx.args = ring, offsets, (max_seqlen, scale, impl)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        ring, offsets, (max_seqlen, scale, impl) = ctx.ring, ctx.offsets, ctx.args
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dlse = None if dlse is None else dlse.contiguous()
        dq = torch.zeros(q.shape, dtype=_compute_dtype(q.dtype), device=q.device)
        kv, spare = torch.stack([k, v]), None
        dkv, dkv_spare, dkv_works = None, None, []
        for t in range(ring.size):
            kv_works = []
            if t + 1 < ring.size:
                spare = torch.empty_like(kv) if spare is None else spare
                kv_works = ring.exchange(kv, spare, _KV_TAG)
            kind = _step_kind(ring.rank, (ring.rank - t) % ring.size)
            dq_t, dk_t, dv_t = _block_bwd(
                dout, dlse, q, kv[0], kv[1], out, lse, offsets[kind], max_seqlen, max_seqlen, scale, impl
            )
            dq.add_(dq_t)
            if t == 0:
                dkv = torch.stack([dk_t, dv_t]).to(dq.dtype)
            else:
                _wait(dkv_works)  # this block's dK/dV so far, from the previous rank
                dkv, dkv_spare = dkv_spare, dkv
                dkv[0].add_(dk_t)
                dkv[1].add_(dv_t)
            if ring.size > 1:  # pass it on; after the last step this is the hop home
                dkv_spare = torch.empty_like(dkv) if dkv_spare is None else dkv_spare
                dkv_works = ring.exchange(dkv, dkv_spare, _DKV_TAG)
            _wait(kv_works)
            kv, spare = spare, kv
        if ring.size > 1:
            _wait(dkv_works)
            dkv = dkv_spare
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), *([None] * 6)


# ----------------------------------------------------------------------------- all-gather autograd


def _allgather_rows(cu: torch.Tensor, cp: int, rows: int) -> torch.Tensor:
    """Row of the gathered (CP, 2, T) KV buffer holding each key in document order (device-side).

    Key p of the global packing lies in document b at t = p - CP*cu[b], chunk j = t // c_b, held by
    rank j (first half) or 2CP-1-j (second half). Rows past CP*cu[-1] are never read as keys and map
    to row 0 (their key gradients are zero, so the backward's index_add leaves row 0 unchanged).
    """
    p = torch.arange(cp * rows, device=cu.device)
    if cu.numel() == 1:
        return torch.zeros_like(p)
    cu64 = cu.to(torch.int64)
    st, c = cu64[:-1], (cu64[1:] - cu64[:-1]) // 2
    b = (torch.searchsorted(cp * cu64, p, right=True) - 1).clamp(0, st.numel() - 1)
    t = p - cp * st[b]
    chunk, offset = t // c[b].clamp(min=1), t % c[b].clamp(min=1)
    first = chunk < cp
    src = torch.where(first, chunk, 2 * cp - 1 - chunk)
    local = st[b] + offset + torch.where(first, 0, c[b])
    return torch.where(p < cp * cu64[-1], src * 2 * rows + local, 0)


def _allgather_offsets(cu: torch.Tensor, cp: int, rank: int, causal: bool) -> list[Call]:
    """(cu_q, cu_k, causal) of the calls: query chunks a and b against their key prefixes."""
    if not causal:
        return [(cu, cp * cu, False)]
    st, en = cu[:-1], cu[1:]
    mid, gst, end = (st + en) // 2, cp * st, cp * cu[-1]
    cu_q = _interleave(st, mid, en, end=cu[-1])  # chunk a, chunk b, an empty query sequence
    calls = []
    for chunk_a_sees, chunk_b_sees in ((rank + 1, 0), (0, 2 * cp - rank)):  # key chunks visible
        a_end = gst + chunk_a_sees * (mid - st)
        b_end = a_end + chunk_b_sees * (mid - st)
        calls.append((cu_q, _interleave(gst, a_end, b_end, end=end), True))
    return calls


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, max_seqlen, group, causal, scale, impl):
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        T = q.shape[0]
        kv = torch.stack([k, v])
        gathered = [torch.empty_like(kv) for _ in range(cp)]
        dist.all_gather(gathered, kv, group=group)
        flat = torch.stack(gathered).flatten(0, 2)  # (CP * 2 * T, Hkv, D)
        rows = _allgather_rows(cu, cp, T)
        kg, vg = flat.index_select(0, rows), flat.index_select(0, rows + T)
        calls = _allgather_offsets(cu, cp, rank, causal)
        c = _compute_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=c, device=q.device)
        lse = torch.full((q.shape[1], T), float("-inf"), dtype=c, device=q.device)
        max_k = cp * max_seqlen
        for call in calls:
            _merge(out, lse, *_block_fwd(q, kg, vg, call, max_seqlen, max_k, scale, impl), impl)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, kg, vg, out, lse, rows)
        ctx.group, ctx.calls, ctx.args = group, calls, (max_seqlen, max_k, scale, impl)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, kg, vg, out, lse, rows = ctx.saved_tensors
        max_q, max_k, scale, impl = ctx.args
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dlse = None if dlse is None else dlse.contiguous()
        c = _compute_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=c, device=q.device)
        dkv = torch.zeros((2, *kg.shape), dtype=c, device=q.device)
        for call in ctx.calls:
            dq_i, dk_i, dv_i = _block_bwd(dout, dlse, q, kg, vg, out, lse, call, max_q, max_k, scale, impl)
            dq.add_(dq_i)
            dkv[0].add_(dk_i)
            dkv[1].add_(dv_i)
        cp, T = dist.get_world_size(ctx.group), q.shape[0]
        scattered = torch.zeros((cp * 2 * T, *kg.shape[1:]), dtype=c, device=q.device)
        scattered.index_add_(0, rows, dkv[0]).index_add_(0, rows + T, dkv[1])
        mine = torch.empty((2, T, *kg.shape[1:]), dtype=c, device=q.device)
        dist.reduce_scatter(mine, list(scattered.view(cp, 2, T, *kg.shape[1:]).unbind(0)), group=ctx.group)
        return dq.to(q.dtype), mine[0].to(kg.dtype), mine[1].to(vg.dtype), *([None] * 6)


# ----------------------------------------------------------------------------- public function


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    group: dist.ProcessGroup,
    causal: bool = True,
    mode: str = "ring",
    softmax_scale: float | None = None,
    return_lse: bool = False,
    impl: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-document attention of this rank's zigzag shard against the whole documents of the group.

    Every rank of ``group`` calls it with its shard from ``zigzag_shard`` (same T and the same local
    cu_seqlens on every rank); the result equals rows of ``varlen_attention`` over the unsharded,
    padded documents. Padding sits at each document's end, so with ``causal`` real tokens never see
    it; with ``causal=False`` they do (pad documents to multiples of 2*CP yourself, or mask them).

    Args:
        q: (T, Hq, D) float32/float16/bfloat16/float64, last dim contiguous.
        k: (T, Hkv, D) in q's dtype, packed like q, Hq a multiple of Hkv; v: like k.
        cu_seqlens: (B+1,) int32 local offsets on q's device; document b spans 2*c_b rows (even
            lengths; checked for CPU tensors only). Rows past cu_seqlens[-1] give out 0, lse -inf.
        max_seqlen: host int >= the longest local document (ZigzagShard.max_seqlen).
        group: the context-parallel process group (NCCL on GPU, gloo on CPU).
        causal: per-document causal mask (query sees key iff its global position is not earlier).
        mode: "ring" (KV circulates, overlapped with compute) or "allgather" (one all-gather of KV,
            then local attention; for masks a ring handles poorly).
        softmax_scale: host float multiplying q.k; default 1/sqrt(D).
        return_lse: also return the log-sum-exp over all keys.
        impl: implementation of the local varlen_attention calls ("ref", "auto", ...).

    Returns:
        out (T, Hq, D) in q's dtype and, with return_lse, lse (Hq, T) float32 (float64 for float64).
        Differentiable in q, k, v (through out and lse); dk/dv are this rank's keys' gradients
        summed over every rank's queries. cu_seqlens must be contiguous. Non-finite values follow
        varlen_attention's rule: lse -inf for a row that sees no key (out 0), NaN for a row with a
        NaN or +inf score (out NaN); the fp32 merge keeps both (a NaN block poisons the row).
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        _validate.tensor(name, t)
    device = _validate.same_device({"q": q, "k": k, "v": v, "cu_seqlens": cu_seqlens})
    _check_qkv(q, k, v)
    T = q.shape[0]
    _validate.dim_size("k", k, 0, T, "T: keys packed like the queries of this shard")
    _validate.cu_seqlens("cu_seqlens", cu_seqlens, T)
    max_seqlen = _validate.max_seqlen("max_seqlen", max_seqlen, cu_seqlens)
    if cu_seqlens.device.type == "cpu" and bool(((cu_seqlens[1:] - cu_seqlens[:-1]) % 2).any()):
        raise ValueError(
            "cu_seqlens: expected even local document lengths (two zigzag chunks each, as zigzag_shard "
            f"makes them), got lengths {(cu_seqlens[1:] - cu_seqlens[:-1]).tolist()}"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a torch.distributed ProcessGroup, got {type(group).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(q.shape[2])
    else:
        scale = _validate.host_float("softmax_scale", softmax_scale)
    chosen = _dispatch.resolve(VARLEN_OP, impl, device, q.dtype)
    fn = _RingAttention if mode == "ring" else _AllGatherAttention
    out, lse = fn.apply(q, k, v, cu_seqlens, max_seqlen, group, bool(causal), scale, chosen)
    return (out, lse) if return_lse else out
