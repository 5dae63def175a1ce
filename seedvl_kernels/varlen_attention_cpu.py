"""CPU implementation of varlen_attention: PyTorch's fused CPU flash-attention kernels on padded
buckets (the op, its math and its contract live in :mod:`seedvl_kernels.varlen_attention`;
profiles/varlen_attention_cpu.md has the measurements).

Why. On a CPU a training step is a long chain of small ops, so what an attention call costs is
mostly how many ops it issues. The reference materialises S and P per bucket in ~30 ops per bucket.
Here each bucket is one call of ``aten._scaled_dot_product_flash_attention_for_cpu`` (forward: out
and the log-sum-exp) or ``..._for_cpu_backward`` (dq, dk, dv; it takes out and lse, and computes
D = rowsum(dO * out) itself), whatever the number of heads: those kernels read KV head h // G for
query head h (grouped-query attention) and sum dK, dV over the group.

Plan (host, cached per batch). cu_seqlens are read once per call (``tolist``, a host sync that
only CPU tensors see); the plan for those offsets is cached, since every layer of a step (forward
and backward) sees the same ones. Sequences with at least one query and one key are grouped into
buckets (causal: sorted by key count, a bucket's longest at most BUCKET_SLACK times its shortest, as
the reference groups them; non-causal: one exact (Lq, Lk) per bucket, see "No masks"). All
buckets' rows are gathered with one ``index_select`` per tensor into one buffer whose slices are
the buckets' (B, L, H, D) tensors (the kernels take the (B, H, L, D) view of that layout and
return out and the gradients in it), and the buckets' results go back to packed rows with one
``cat`` and one ``index_select`` per output, through an inverse index whose extra last row (out 0,
lse -inf, gradient 0) serves rows of no bucket: padding past cu_seqlens[-1], empty sequences, and
query rows that see no key. A plan that is the identity (one bucket of every row in packed order,
as a ViT batch of equal images is) skips the gathers.

No masks. The kernels take only additive float masks, and S + (-inf) is NaN where S is NaN, so a
NaN in a key a row may not see would poison the row (the contract keeps such rows as they are).
So no bucket has a mask: non-causal buckets hold sequences of one exact (Lq, Lk) (no padding);
causal ones use the kernels' own top-left causal flag, which fills instead of adding, on square
sequences: a sequence (lq, lk) occupies lk query slots, its queries bottom-aligned in them, so that
top-left in slots is bottom-right in rows (with lq < lk the first lk - lq slots are dummies; with
lq > lk the first lq - lk queries see no key and take no slot), and buckets are right-padded, so
that a real query never sees a padding key. Padding and dummy slots repeat a row of their own
sequence (q, k, v, out). The causal flag masks before it scales (-inf * 0 and -inf * -s are NaN and
+inf there), so with a scale <= 0 q is scaled before the kernels, which then take scale 1.

Backward. Padding and dummy query slots see keys and must add nothing to dK, dV: their lse is +inf,
from a sentinel row, so that P = exp(S - lse) = 0 there; lse -inf (a row whose scores are all -inf)
becomes +inf too, so that its P is 0 as the contract says, not exp(-inf + inf) = NaN. The
gradient into lse (ring attention, callers of return_lse) is folded into the kernel's
D = rowsum(dO * out) exactly: q, k and v get a zero column, out the column -dlse and dO a column of
ones, so that the kernel's D is rowsum(dO * out) - dlse while S, P and dP are unchanged; the extra
columns of the gradients are dropped.

Non-finite scores. For a row whose visible scores are all NaN or -inf the forward kernel returns
out 0 and lse 0, where the contract says NaN, NaN (a NaN score) or 0, -inf. So when some slot's lse
comes back exactly 0 (which finite scores give only in the rare row with lse = 0), the scores of
those rows are recomputed explicitly and the rows set as the contract says; every other row keeps
the kernel's result, bit for bit what it is without the bad value.

Math in fp32 (fp64 for fp64): fp16/bf16 rows are converted after the gather. With RoPE, q and k
are rotated together by rope_2d's reference (one call on their concatenation, bit for bit two calls)
and the rotated copies are the op's q_rot, k_rot outputs; the backward rotates dq and dk back the
same way. Costs as the module docstring of varlen_attention gives for a fused kernel, plus the
padding of each bucket (at most BUCKET_SLACK^2 of its sequences' pairs) and one gather and one
scatter of every tensor.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .rope_2d import rope_2d_ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BUCKET_SLACK = 1.25  # a bucket's longest sequence is at most this much longer than its shortest
_FLASH_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
_PLAN_CACHE: OrderedDict[tuple, _Plan] = OrderedDict()
_PLAN_CACHE_SIZE = 16


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class _Plan:
    """Where each bucket's rows come from and where its results go (see the module docstring).

    ``shapes``: (B, Lq, Lk) per bucket (query and key slots per sequence). ``rows_q`` (Nq,) /
    ``rows_k`` (Nk,): packed row of each slot, bucket after bucket (padding and dummy slots repeat a
    row of their sequence). ``live_q`` (Nq,): like rows_q, but T (a sentinel row: lse +inf) for
    slots that must add nothing to the backward. ``inv_q`` (T,) / ``inv_k`` (Tk,): slot of each
    packed row, Nq / Nk (a sentinel row) for rows in no slot. ``identity``: one bucket of every
    row in packed order (no gathers)."""

    shapes: tuple[tuple[int, int, int], ...]
    rows_q: torch.Tensor
    rows_k: torch.Tensor
    live_q: torch.Tensor
    inv_q: torch.Tensor
    inv_k: torch.Tensor
    identity: bool


def _groups(lq: np.ndarray, lk: np.ndarray, causal: bool) -> list[np.ndarray]:
    """Indices of the sequences with queries and keys, one array per bucket."""
    keep = np.flatnonzero((lq > 0) & (lk > 0))
    if not causal:  # one exact shape per bucket, in order of first appearance
        shapes = {}
        for s in keep.tolist():
            shapes.setdefault((int(lq[s]), int(lk[s])), []).append(s)
        return [np.asarray(g, dtype=np.int64) for g in shapes.values()]
    groups: list[list[int]] = []
    for s in keep[np.argsort(lk[keep], kind="stable")].tolist():
        if groups and lk[s] <= BUCKET_SLACK * lk[groups[-1][0]]:
            groups[-1].append(s)
        else:
            groups.append([s])
    return [np.asarray(g, dtype=np.int64) for g in groups]


def _build_plan(cq: list[int], ck: list[int], T: int, Tk: int, causal: bool) -> _Plan:
    cq_, ck_ = np.asarray(cq, dtype=np.int64), np.asarray(ck, dtype=np.int64)
    lq, lk = np.diff(cq_), np.diff(ck_)
    shapes: list[tuple[int, int, int]] = []
    rows_q, rows_k, live_q = ([np.zeros(0, dtype=np.int64)] for _ in range(3))  # concatenated at the end
    inv_q = np.full(T, -1, dtype=np.int64)
    inv_k = np.full(Tk, -1, dtype=np.int64)
    nq = nk = 0
    for g in _groups(lq, lk, causal):
        gq, gk = lq[g][:, None], lk[g][:, None]  # (B, 1)
        Lk = int(gk.max())
        j = np.arange(Lk)[None, :]
        if causal:  # lk slots per sequence, queries bottom-aligned in them (module docstring)
            Lq = Lk
            i = j - (gk - gq)  # query row of each slot: < 0 dummy, >= lq padding
            live = (i >= 0) & (j < gk)
        else:
            Lq = int(gq.max())
            i = np.arange(Lq)[None, :]
            live = np.ones((len(g), Lq), dtype=bool)
        rq = cq_[g][:, None] + np.clip(i, 0, gq - 1)  # (B, Lq)
        rk = ck_[g][:, None] + np.minimum(j, gk - 1)  # (B, Lk)
        valid_k = j < gk
        shapes.append((len(g), Lq, Lk))
        rows_q.append(rq.ravel())
        rows_k.append(rk.ravel())
        live_q.append(np.where(live, rq, T).ravel())
        inv_q[rq[live]] = nq + np.flatnonzero(live.ravel())
        inv_k[rk[valid_k]] = nk + np.flatnonzero(valid_k.ravel())
        nq, nk = nq + len(g) * Lq, nk + len(g) * Lk
    identity = len(shapes) == 1 and nq == T and nk == Tk and bool((inv_q == np.arange(T)).all())
    identity = identity and bool((inv_k == np.arange(Tk)).all())
    inv_q[inv_q < 0] = nq
    inv_k[inv_k < 0] = nk
    return _Plan(
        tuple(shapes), *(torch.from_numpy(np.concatenate(x)) for x in (rows_q, rows_k, live_q)),
        torch.from_numpy(inv_q), torch.from_numpy(inv_k), identity,
    )  # fmt: skip


def _plan(p, T: int, Tk: int) -> _Plan:
    """The plan for the call's offsets (a host read of cu_seqlens), from the cache when it has it."""
    cq, ck = p.cu_seqlens_q.tolist(), p.cu_seqlens_k.tolist()
    key = (tuple(cq), tuple(ck), T, Tk, p.causal)
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        plan = _PLAN_CACHE[key] = _build_plan(cq, ck, T, Tk, p.causal)
        if len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)
    else:
        _PLAN_CACHE.move_to_end(key)
    return plan


# ----------------------------------------------------------------------------- helpers


def _gather(x: torch.Tensor, rows: torch.Tensor, plan: _Plan, c: torch.dtype) -> torch.Tensor:
    """x[rows] in dtype c, (N, H, D)."""
    return (x if plan.identity else x.index_select(0, rows)).to(c)


def _buckets(x: torch.Tensor, plan: _Plan, side: int) -> list[torch.Tensor]:
    """The (B, H, L, D) views of each bucket in a gathered (N, H, D) buffer (side 1: query slots,
    2: key slots)."""
    views, start = [], 0
    for shape in plan.shapes:
        B, L = shape[0], shape[side]
        views.append(x[start : start + B * L].unflatten(0, (B, L)).transpose(1, 2))
        start += B * L
    return views


def _scatter(parts: list[torch.Tensor], inv: torch.Tensor, fill: float, identity: bool) -> torch.Tensor:
    """Bucket results (each (B, H, L, ...) in (B, L, H, ...) memory) back to packed rows; rows in no
    slot get ``fill``."""
    flat = [p.transpose(1, 2).flatten(0, 1) for p in parts]
    if identity:
        return flat[0]
    sentinel = flat[0].new_full((1, *flat[0].shape[1:]), fill)
    return torch.cat([*flat, sentinel]).index_select(0, inv)


def _rope_pair(q: torch.Tensor, k: torch.Tensor, pos_hw, theta: float, inverse: bool = False):
    """rope_2d_ref of q and k in one call on their concatenation along heads."""
    qk = rope_2d_ref(torch.cat([q, k], dim=1), pos_hw, theta, inverse=inverse)
    return qk[:, : q.shape[1]], qk[:, q.shape[1] :]


def _kernel_scale(scale: float) -> float:
    """The scale the kernels take: 1 when q is scaled before them (scale <= 0, module docstring)."""
    return scale if scale > 0 else 1.0


def _repair(o: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float):
    """Rows of one bucket whose lse came back exactly 0: NaN, NaN if a visible score is NaN; 0, -inf
    if all are -inf (the contract's rule, which the kernel reports as 0, 0). In place; q is already
    scaled with a kernel scale of 1."""
    suspect = lse == 0
    if not bool(suspect.any()):
        return
    G = q.shape[1] // k.shape[1]
    s = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(G, dim=1)) * scale
    if causal:
        hidden = torch.ones(s.shape[-2:], dtype=torch.bool).triu_(1)
        s = s.masked_fill(hidden, float("-inf"))
    nan = suspect & s.isnan().any(-1)
    empty = suspect & ~nan & s.isneginf().all(-1)
    lse.masked_fill_(nan, float("nan")).masked_fill_(empty, float("-inf"))
    o.masked_fill_(nan[..., None], float("nan"))


# ----------------------------------------------------------------------------- launchers


def launch_fwd(
    q, k, v, p, out: torch.Tensor, lse: torch.Tensor, q_rot: torch.Tensor, k_rot: torch.Tensor
) -> None:
    """out, lse and (with p.pos_hw) the rotated q and k, written in place. ``p``: varlen_attention._Params."""
    c = _compute_dtype(q.dtype)
    if p.pos_hw is not None:
        qr, kr = _rope_pair(q, k, p.pos_hw, p.rope_theta)
        q_rot.copy_(qr)
        q_rot[int(p.cu_seqlens_q[-1]) :].zero_()  # padding rows, as the reference leaves them
        k_rot.copy_(kr)
        q, k = q_rot, k_rot
    plan = _plan(p, q.shape[0], k.shape[0])
    if not plan.shapes:
        out.zero_()
        lse.fill_(float("-inf"))
        return
    scale = _kernel_scale(p.softmax_scale)
    qg = _gather(q, plan.rows_q, plan, c)
    if scale != p.softmax_scale:
        qg = qg * p.softmax_scale
    qs, ks, vs = (
        _buckets(qg, plan, 1),
        _buckets(_gather(k, plan.rows_k, plan, c), plan, 2),
        _buckets(_gather(v, plan.rows_k, plan, c), plan, 2),
    )
    outs, lses = [], []
    for qb, kb, vb in zip(qs, ks, vs, strict=True):
        o, row_lse = _FLASH_FWD(qb, kb, vb, 0.0, p.causal, scale=scale)
        _repair(o, row_lse, qb, kb, p.causal, scale)
        outs.append(o)
        lses.append(row_lse[..., None])
    out.copy_(_scatter(outs, plan.inv_q, 0.0, plan.identity))
    lse.copy_(_scatter(lses, plan.inv_q, float("-inf"), plan.identity)[..., 0].t())


def launch_bwd(
    dout, dlse, q, k, v, out, lse, p, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor
) -> None:
    """dq, dk, dv written in place; q and k are the rotated ones when p.pos_hw is given."""
    T, Hq, D = q.shape
    c = _compute_dtype(q.dtype)
    plan = _plan(p, T, k.shape[0])
    if not plan.shapes:
        for g in (dq, dk, dv):
            g.zero_()
        return
    if dlse is not None:  # fold dlse into the kernel's D = rowsum(dO * out) (module docstring)
        q, k, v = (F.pad(t.to(c), (0, 1)) for t in (q, k, v))
        out = torch.cat([out.to(c), -dlse.t().to(c)[..., None]], dim=-1)
        dout = torch.cat([dout.to(c), dout.new_ones((T, Hq, 1), dtype=c)], dim=-1)
    # lse +inf (so P = 0) for slots that must add nothing, from a sentinel row T, and for lse -inf.
    lse_ext = torch.cat([lse.t().to(c), lse.new_full((1, Hq), float("inf"), dtype=c)])
    lse_ext.masked_fill_(lse_ext.isneginf(), float("inf"))
    scale = _kernel_scale(p.softmax_scale)
    qg = _gather(q, plan.rows_q, plan, c)
    if scale != p.softmax_scale:
        qg = qg * p.softmax_scale
    buckets = (
        _buckets(_gather(dout, plan.rows_q, plan, c), plan, 1),
        _buckets(qg, plan, 1),
        _buckets(_gather(k, plan.rows_k, plan, c), plan, 2),
        _buckets(_gather(v, plan.rows_k, plan, c), plan, 2),
        _buckets(_gather(out, plan.rows_q, plan, c), plan, 1),
        _buckets(lse_ext.index_select(0, plan.live_q)[..., None], plan, 1),
    )
    grads: tuple[list[torch.Tensor], ...] = ([], [], [])
    for dob, qb, kb, vb, ob, lb in zip(*buckets, strict=True):
        g = _FLASH_BWD(dob, qb, kb, vb, ob, lb[..., 0], 0.0, p.causal, scale=scale)
        for acc, t in zip(grads, g, strict=True):
            acc.append(t)
    gq = _scatter(grads[0], plan.inv_q, 0.0, plan.identity)[..., :D]
    gk = _scatter(grads[1], plan.inv_k, 0.0, plan.identity)[..., :D]
    dv.copy_(_scatter(grads[2], plan.inv_k, 0.0, plan.identity)[..., :D])
    if scale != p.softmax_scale:
        gq = gq * p.softmax_scale
    if p.pos_hw is not None:
        gq, gk = _rope_pair(gq, gk, p.pos_hw, p.rope_theta, inverse=True)
    dq.copy_(gq)
    dk.copy_(gk)
