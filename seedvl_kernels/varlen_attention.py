"""Attention over packed variable-length sequences (SeedViT blocks, per-document causal LLM layers).

Math. Sequence b owns query rows [cu_q[b], cu_q[b+1]) and key rows [cu_k[b], cu_k[b+1]), with
lengths Lq and Lk; attention never crosses sequences. Query head h reads key/value head
h // (Hq / Hkv) (grouped-query attention). Per sequence and head, with s = softmax_scale
(default 1/sqrt(D)):

    S_ij = s * q_i . k_j                       masked to -inf where query i may not see key j
    lse_i = log sum_j exp(S_ij)                (-inf for a row that sees no key)
    P_ij = exp(S_ij - lse_i)                   (0 for a row that sees no key)
    o_i  = sum_j P_ij v_j

Causal masks align bottom-right: query i sees key j iff j <= i + Lk - Lq, so with Lq > Lk the
first Lq - Lk queries see nothing and give o = 0, lse = -inf. Rows of q past cu_q[-1] are
padding and give o = 0, lse = -inf; keys past cu_k[-1] are never read. With ``pos_hw`` the op
first rotates q and k by rope_2d (see :mod:`seedvl_kernels.rope_2d`), rounding to the input dtype
as a separately called rope_2d would; this needs q and k to share sequences.

Non-finite values (every implementation). A row that sees no key (padding, an empty sequence, a
causal row before the first visible key) gives o = 0 and lse = -inf, as does a row all of whose
visible scores are -inf. A row with a NaN or +inf score (NaN/inf in q or k, or scores that overflow
fp32 with huge inputs or softmax_scale) gives o = NaN and lse = NaN -- "the row is poisoned", never
-inf, which means "saw no key". NaN/inf in v reach o through its weights, and may reach every row
of the same sequence (a masked key still meets a zero weight, and 0 * inf is NaN); rows of other
sequences are never affected.

Backward, for output gradient dO and a gradient dlse into the log-sum-exp:

    dV = P^T dO                      dP = dO V^T
    D_i = rowsum(dO_i * o_i) - dlse_i          (d lse_i / d S_ij = P_ij folds into D)
    dS = P * (dP - D)                dQ = s * dS K        dK = s * dS^T Q

dK and dV of a KV head sum over the query heads that share it. With ``pos_hw``, the backward
takes the *rotated* q and k (the forward returns them) and gives dq and dk of the unrotated inputs:
the gradients of the rotated tensors rotated back (a rotation's adjoint is its inverse).
The backward takes ``out`` and ``lse`` as arguments instead of recomputing them: P comes from
S and lse in one pass, and ring attention calls it with the *global* out and lse (merged over all
key blocks) to get each key block's share of the gradient.

Shapes: q (T, Hq, D), k and v (Tk, Hkv, D), cu_seqlens (B+1,) int32, pos_hw (T, 2) int32;
out (T, Hq, D) in q's dtype, lse (Hq, T) fp32 (fp64 for fp64 inputs, so that fp64 tests of
the ops built on this one keep full precision). Math in fp32 (fp64 for fp64). The custom ops
(``torch.ops.seedvl.varlen_attention_fwd`` / ``_bwd``) also take ``out_dtype=torch.float32`` to
return out (forward) or dq, dk, dv (backward) unrounded: ring attention sums one such partial result
per key block, and rounding each to bf16 before the sum would make the error grow with the ring.

Saved for backward: q and k as the attention saw them (rotated when ``pos_hw`` is given: the
forward op also returns the rotated q and k, so that the backward kernels never rotate on load and
only rotate dq and dk back where they write them; this holds the rotated copies instead of the
inputs, the same size), v, out and lse (see above), cu_seqlens_q/k and pos_hw. Nothing of size L^2
is saved; the backward recomputes S.

Cost, with N = sum_b Lq*Lk visible (query, key) pairs (N = sum_b Lq*Lk non-causal, about half
of that causal): forward 4*N*Hq*D FLOPs (two matmuls), backward 10*N*Hq*D (S recomputed, then
dV, dP, dQ, dK). A fused kernel moves (2*T*Hq + 2*Tk*Hkv)*D*itemsize + 4*Hq*T bytes forward and
about twice that backward. The reference here is not that kernel: it materialises S and P of
whole sequences (Hq*Lq*Lk elements each), batching sequences of similar lengths left-padded to a
common length, and moves cu_seqlens to the host (``.tolist()``) to form those batches, a device
sync that only the reference may do (and the ``cpu`` implementation, on CPU tensors). Implementations:
``ref``; ``cpu`` (:mod:`seedvl_kernels.varlen_attention_cpu`: PyTorch's fused CPU flash-attention
kernels on buckets of similar lengths; the default for CPU tensors); ``triton``
(:mod:`seedvl_kernels.varlen_attention_triton`: schedule, tiles, RoPE fusion, traffic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _backends, _dispatch, _validate
from . import varlen_attention_cpu as _cpu
from . import varlen_attention_triton as _triton
from .rope_2d import check_theta, rope_2d_ref

OP = "varlen_attention"
DTYPES = _backends.FLOAT_DTYPES  # kernels
REF_DTYPES = (*DTYPES, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- reference


def _sequences(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(q0, q1, k0, k1) of each sequence with at least one query and one key (host sync)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    bounds = zip(cq[:-1], cq[1:], ck[:-1], ck[1:], strict=True)
    return [(q0, q1, k0, k1) for q0, q1, k0, k1 in bounds if q1 > q0 and k1 > k0]


BUCKET_SLACK = 1.25  # a bucket's longest sequence is at most this much longer than its shortest


@dataclass(frozen=True)
class _Bucket:
    """Sequences of similar lengths, left-padded to common lengths Lq and Lk, so that one batched
    matmul serves them all. ``rows_q`` (B, Lq) and ``rows_k`` (B, Lk) index the packed tensors;
    padding slots index row 0 and are False in ``valid_q`` / ``valid_k``.

    Left padding keeps the bottom-right causal rule exact: query i of a sequence (lq, lk) sees key j
    iff j <= i + lk - lq, which at padded positions i' = i + Lq - lq, j' = j + Lk - lk reads
    j' <= i' + Lk - Lq, one mask for the whole bucket."""

    rows_q: torch.Tensor
    rows_k: torch.Tensor
    valid_q: torch.Tensor
    valid_k: torch.Tensor

    @staticmethod
    def _rows(ends: list[int], lengths: list[int], width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        end = torch.tensor(ends, device=device)[:, None]
        n = torch.tensor(lengths, device=device)[:, None]
        offset = torch.arange(width, device=device)[None, :] - width  # -width .. -1
        valid = offset >= -n
        return torch.where(valid, end + offset, 0), valid


def _buckets(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> list[_Bucket]:
    """The non-empty sequences grouped into buckets of similar lengths (host sync). The math per
    sequence is unchanged: padded keys are masked, padded queries dropped."""
    seqs = sorted(_sequences(cu_seqlens_q, cu_seqlens_k), key=lambda b: (b[3] - b[2], b[1] - b[0]))
    groups: list[list[tuple[int, int, int, int]]] = []

    def close(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
        la, lb = (a[1] - a[0], a[3] - a[2]), (b[1] - b[0], b[3] - b[2])
        return all(max(x, y) <= BUCKET_SLACK * min(x, y) for x, y in zip(la, lb, strict=True))

    for seq in seqs:
        if groups and close(seq, groups[-1][0]):
            groups[-1].append(seq)
        else:
            groups.append([seq])
    device = cu_seqlens_q.device
    out = []
    for g in groups:
        lq = [q1 - q0 for q0, q1, _, _ in g]
        lk = [k1 - k0 for _, _, k0, k1 in g]
        rows_q, valid_q = _Bucket._rows([q1 for _, q1, _, _ in g], lq, max(lq), device)
        rows_k, valid_k = _Bucket._rows([k1 for _, _, _, k1 in g], lk, max(lk), device)
        out.append(_Bucket(rows_q, rows_k, valid_q, valid_k))
    return out


def _scores(q: torch.Tensor, k: torch.Tensor, bucket: _Bucket, scale: float, causal: bool) -> torch.Tensor:
    """S of one bucket: q (B, Lq, Hkv, G, D), k (B, Lk, Hkv, D) -> (B, Hkv, G, Lq, Lk), masked to
    -inf (padded keys; causal)."""
    s = torch.einsum("bqhgd,bkhd->bhgqk", q, k).mul_(scale)
    hidden = ~bucket.valid_k[:, None, None, None, :]
    if causal:
        lq, lk = q.shape[1], k.shape[1]
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        hidden = hidden | (j > i + (lk - lq))
    return s.masked_fill_(hidden, float("-inf"))


def _exp_(x: torch.Tensor) -> torch.Tensor:
    """exp(x) in place, minus exp(floor) and clamped at 0, with floor the log of the smallest
    normal number: exactly 0 for -inf (masked scores), and a shift far below the dtype's
    resolution for anything that matters (probabilities are summed against a largest one of at
    least 1/L). CPU exp takes a slow scalar path for arguments whose result is subnormal, about 60x
    slower than the vector one, and masked or far-from-max scores are exactly those."""
    floor = -87.0 if x.dtype == torch.float32 else -708.0
    return x.clamp_(min=floor).exp_().sub_(math.exp(floor)).clamp_(min=0.0)


def _logsumexp(s: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp over the last dim (-inf for an all -inf row, +inf for a row with +inf, NaN
    for a row with NaN), through :func:`_exp_`."""
    m = s.amax(dim=-1, keepdim=True)
    m.masked_fill_(~torch.isfinite(m), 0.0)
    return _exp_(s - m).sum(dim=-1, keepdim=True).log_().add_(m).squeeze(-1)


def _probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """P = exp(S - lse), exactly 0 (never NaN) on rows whose lse is -inf."""
    empty = torch.isneginf(lse)[..., None]
    return _exp_(s - lse[..., None].masked_fill(empty, 0.0)).masked_fill_(empty, 0.0)


def _gather(x: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, c: torch.dtype) -> torch.Tensor:
    """x[rows] in dtype c with padding slots zeroed: (T, ...) -> (B, L, ...)."""
    g = x[rows].to(c)
    return g.masked_fill(~valid.view(*valid.shape, *(1,) * (g.dim() - 2)), 0.0)


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    pos_hw: torch.Tensor | None = None,
    rope_theta: float = 10000.0,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch forward (the spec): returns out (T, Hq, D) in ``out_dtype`` (default q's dtype)
    and lse (Hq, T). Sequences of similar lengths go through one batched matmul (:func:`_buckets`)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    c = _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    if pos_hw is not None:
        q, k = rope_2d_ref(q, pos_hw, rope_theta), rope_2d_ref(k, pos_hw, rope_theta)
    out = torch.zeros(T, Hq, D, dtype=c, device=q.device)
    lse = torch.full((T, Hq), float("-inf"), dtype=c, device=q.device)
    for b in _buckets(cu_seqlens_q, cu_seqlens_k):
        qs = _gather(q, b.rows_q, b.valid_q, c).unflatten(2, (Hkv, Hq // Hkv))
        s = _scores(qs, _gather(k, b.rows_k, b.valid_k, c), b, scale, causal)
        row_lse = _logsumexp(s)  # (B, Hkv, G, Lq); -inf where no key is visible
        # A +inf score (fp32 overflow) makes P = inf/inf = NaN: the row's lse is NaN too, like a
        # NaN score's (the non-finite rule in the module docstring).
        row_lse = row_lse.masked_fill(torch.isposinf(row_lse), float("nan"))
        o = torch.einsum("bhgqk,bkhd->bqhgd", _probs(s, row_lse), _gather(v, b.rows_k, b.valid_k, c))
        rows = b.rows_q[b.valid_q]
        out[rows] = o.flatten(2, 3)[b.valid_q]
        lse[rows] = row_lse.flatten(1, 2).transpose(1, 2)[b.valid_q]
    return out.to(out_dtype or q.dtype), lse.t().contiguous()


def varlen_attention_bwd_ref(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    pos_hw: torch.Tensor | None = None,
    rope_theta: float = 10000.0,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch backward (explicit; custom ops cannot use autograd inside): dq, dk, dv, in
    ``out_dtype`` (default the dtypes of q, k, v).

    ``out`` and ``lse`` may be global results of which this call's keys are one part (ring
    attention); P is always exp(S - lse) with the lse given. With ``pos_hw``, ``q`` and ``k`` are
    the rotated ones (as the forward op returns them) and dq, dk are rotated back.
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    c = _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    dq = torch.zeros(T, Hq, D, dtype=c, device=q.device)
    dk = torch.zeros(k.shape, dtype=c, device=k.device)
    dv = torch.zeros(v.shape, dtype=c, device=v.device)
    lse_t = lse.t()
    dlse_t = None if dlse is None else dlse.t()
    for b in _buckets(cu_seqlens_q, cu_seqlens_k):
        qs = _gather(q, b.rows_q, b.valid_q, c).unflatten(2, (Hkv, G))
        ks, vs = _gather(k, b.rows_k, b.valid_k, c), _gather(v, b.rows_k, b.valid_k, c)
        do = _gather(dout, b.rows_q, b.valid_q, c).unflatten(2, (Hkv, G))
        # Padded query rows get lse = -inf, so their P is 0 and they add nothing to dK, dV.
        row_lse = _gather(lse_t, b.rows_q, b.valid_q, c).masked_fill(~b.valid_q[..., None], float("-inf"))
        row_lse = row_lse.unflatten(2, (Hkv, G)).permute(0, 2, 3, 1)  # (B, Hkv, G, Lq)
        p = _probs(_scores(qs, ks, b, scale, causal), row_lse)
        o = _gather(out, b.rows_q, b.valid_q, c).unflatten(2, (Hkv, G))
        delta = (do * o).sum(-1).permute(0, 2, 3, 1)  # (B, Hkv, G, Lq)
        if dlse_t is not None:
            delta = delta - _gather(dlse_t, b.rows_q, b.valid_q, c).unflatten(2, (Hkv, G)).permute(0, 2, 3, 1)
        ds = p * (torch.einsum("bqhgd,bkhd->bhgqk", do, vs) - delta[..., None])
        rows_q, rows_k = b.rows_q[b.valid_q], b.rows_k[b.valid_k]
        dv[rows_k] = torch.einsum("bhgqk,bqhgd->bkhd", p, do)[b.valid_k]
        dq[rows_q] = (scale * torch.einsum("bhgqk,bkhd->bqhgd", ds, ks)).flatten(2, 3)[b.valid_q]
        dk[rows_k] = (scale * torch.einsum("bhgqk,bqhgd->bkhd", ds, qs))[b.valid_k]
    if pos_hw is not None:
        dq = rope_2d_ref(dq, pos_hw, rope_theta, inverse=True)
        dk = rope_2d_ref(dk, pos_hw, rope_theta, inverse=True)
    return dq.to(out_dtype or q.dtype), dk.to(out_dtype or k.dtype), dv.to(out_dtype or v.dtype)


# ----------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class _Params:
    """The custom ops' non-data arguments, as every launcher takes them."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool
    softmax_scale: float
    pos_hw: torch.Tensor | None
    rope_theta: float

    def ref_args(self) -> tuple:
        return (
            self.cu_seqlens_q,
            self.cu_seqlens_k,
            self.causal,
            self.softmax_scale,
            self.pos_hw,
            self.rope_theta,
        )


def _launch_fwd_ref(q, k, v, p: _Params, out, lse, q_rot, k_rot) -> None:
    result = varlen_attention_ref(q, k, v, *p.ref_args(), out_dtype=out.dtype)
    out.copy_(result[0])
    lse.copy_(result[1])
    if p.pos_hw is not None:
        q_rot.copy_(rope_2d_ref(q, p.pos_hw, p.rope_theta))
        q_rot[int(p.cu_seqlens_q[-1]) :].zero_()  # padding rows, as the kernels leave them
        k_rot.copy_(rope_2d_ref(k, p.pos_hw, p.rope_theta))


def _launch_bwd_ref(dout, dlse, q, k, v, out, lse, p: _Params, dq, dk, dv) -> None:
    grads = varlen_attention_bwd_ref(dout, dlse, q, k, v, out, lse, *p.ref_args(), out_dtype=dq.dtype)
    for dst, src in zip((dq, dk, dv), grads, strict=True):
        dst.copy_(src)


_LAUNCH_FWD = {"ref": _launch_fwd_ref, "cpu": _cpu.launch_fwd, "triton": _triton.launch_fwd}
_LAUNCH_BWD = {"ref": _launch_bwd_ref, "cpu": _cpu.launch_bwd, "triton": _triton.launch_bwd}
_dispatch.register(OP, "ref", _backends.ref_support)
_dispatch.register(OP, "cpu", _backends.cpu_support_for(_cpu.DTYPES))
_dispatch.register(OP, "triton", _backends.triton_support_for(DTYPES))


# ----------------------------------------------------------------------------- custom ops + autograd


def _out_dtype(t: torch.Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    """The ops' ``out_dtype``: None is the input's dtype; otherwise it must be the compute dtype
    (fp32, fp64 for fp64), which keeps partial results unrounded for callers that sum them."""
    if out_dtype is None or out_dtype == t.dtype:
        return t.dtype
    if out_dtype != _compute_dtype(t.dtype):
        raise ValueError(
            f"out_dtype: expected None, {t.dtype} or the compute dtype {_compute_dtype(t.dtype)}, "
            f"got {out_dtype}"
        )
    return out_dtype


def _empty_fwd(
    q: torch.Tensor, k: torch.Tensor, rope: bool, out_dtype: torch.dtype | None
) -> tuple[torch.Tensor, ...]:
    """out, lse and the rotated q and k (empty (0,) tensors without rope)."""
    T, Hq, _ = q.shape
    out = torch.empty(q.shape, dtype=_out_dtype(q, out_dtype), device=q.device)
    lse = torch.empty((Hq, T), dtype=_compute_dtype(q.dtype), device=q.device)
    rot = [torch.empty(t.shape if rope else (0,), dtype=t.dtype, device=t.device) for t in (q, k)]
    return out, lse, *rot


def _empty_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_dtype: torch.dtype | None
) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty(t.shape, dtype=_out_dtype(t, out_dtype), device=t.device) for t in (q, k, v))


@torch.library.custom_op("seedvl::varlen_attention_fwd", mutates_args=())
def _varlen_attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    pos_hw: torch.Tensor | None,
    rope_theta: float,
    impl: str,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """out (T, Hq, D), lse (Hq, T), and with pos_hw the rotated q and k that the attention used
    (saved for the backward in place of q and k; padding rows of the rotated q are 0); without
    pos_hw those two are empty (0,). out is in q's dtype, or in fp32 with ``out_dtype=torch.float32``
    (a partial result that the caller merges: ring attention)."""
    out, lse, q_rot, k_rot = _empty_fwd(q, k, pos_hw is not None, out_dtype)
    p = _Params(
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, pos_hw, rope_theta
    )
    _LAUNCH_FWD[impl](q, k, v, p, out, lse, q_rot, k_rot)
    return out, lse, q_rot, k_rot


@_varlen_attention_fwd_op.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, pos_hw, theta, impl, out_dtype=None):
    return _empty_fwd(q, k, pos_hw is not None, out_dtype)


@torch.library.custom_op("seedvl::varlen_attention_bwd", mutates_args=())
def _varlen_attention_bwd_op(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    pos_hw: torch.Tensor | None,
    rope_theta: float,
    impl: str,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv in the dtypes of q, k, v, or in fp32 with ``out_dtype=torch.float32``. dout is in
    q's dtype."""
    dq, dk, dv = _empty_bwd(q, k, v, out_dtype)
    p = _Params(
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, pos_hw, rope_theta
    )
    _LAUNCH_BWD[impl](dout, dlse, q, k, v, out, lse, p, dq, dk, dv)
    return dq, dk, dv


@_varlen_attention_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, pos_hw, theta, impl,
      out_dtype=None):  # fmt: skip
    return _empty_bwd(q, k, v, out_dtype)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, pos_hw, theta, impl, *_out_dtype = inputs
    out, lse, q_rot, k_rot = output
    ctx.mark_non_differentiable(q_rot, k_rot)  # internal: the public function drops them
    ctx.set_materialize_grads(False)  # so that no zero gradients are allocated for them
    if pos_hw is not None:  # the backward works on the rotated q, k (see the module docstring)
        q, k = q_rot, k_rot
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, pos_hw)
    ctx.args = (max_q, max_k, causal, scale)
    ctx.theta, ctx.impl = theta, impl


def _backward(ctx, dout: torch.Tensor, dlse: torch.Tensor | None, _dq_rot, _dk_rot):
    # dlse is None when lse is unused (and so may be for other callers, e.g. ring attention).
    q, k, v, out, lse, cu_q, cu_k, pos_hw = ctx.saved_tensors
    if dout is None:  # only lse was used
        dout = torch.zeros_like(q)
    dq, dk, dv = _varlen_attention_bwd_op(
        _validate.with_last_dim_contiguous(dout.to(q.dtype)),
        None if dlse is None else _validate.with_last_dim_contiguous(dlse),
        q,
        k,
        v,
        out,
        lse,
        cu_q,
        cu_k,
        *ctx.args,
        pos_hw,
        ctx.theta,
        ctx.impl,
    )
    return dq, dk, dv, *([None] * 10)


_varlen_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public function


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _validate.ndim(name, t, 3, "(T, Hq, D)" if name == "q" else "(Tk, Hkv, D)")
    _validate.dtype("q", q, REF_DTYPES)
    _validate.same_dtype("k", k, "q", q)
    _validate.same_dtype("v", v, "q", q)
    Hq, D = q.shape[1:]
    if D == 0 or Hq == 0:
        raise ValueError(f"q: expected at least one head and a positive head dim, got shape {tuple(q.shape)}")
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(
            f"k: expected a number of heads Hkv dividing Hq={Hq} of q (GQA), got shape {tuple(k.shape)}"
        )
    _validate.dim_size("k", k, 2, D, "D, the head dim of q")
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _validate.last_dim_contiguous(name, t)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    pos_hw: torch.Tensor | None = None,
    rope_theta: float = 10000.0,
    return_lse: bool = False,
    impl: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention within each packed sequence (no attention across sequence boundaries).

    Args:
        q: (T, Hq, D) float32/float16/bfloat16 (float64: reference only), last dim contiguous
            (a strided view such as q of a fused qkv is fine).
        k: (Tk, Hkv, D) in q's dtype, Hq a multiple of Hkv (query head h reads KV head
            h // (Hq / Hkv)), last dim contiguous.
        v: (Tk, Hkv, D), like k.
        cu_seqlens: (B+1,) int32 on q's device, contiguous (a strided view raises), query
            offsets: starts at 0, non-decreasing, cu_seqlens[-1] <= T (values checked for CPU
            tensors only); rows past it are padding and come back as zeros (lse -inf).
            Zero-length sequences are legal. Also the key offsets unless cu_seqlens_k is given.
        max_seqlen: host int >= the longest query sequence (computed once per batch by the
            packer; the op never reads it back from the device). Also for keys unless
            cu_seqlens_k is given.
        cu_seqlens_k: (B+1,) int32 contiguous key offsets (cu_seqlens_k[-1] <= Tk), when keys are packed
            differently from queries; needs max_seqlen_k.
        max_seqlen_k: host int >= the longest key sequence; only with cu_seqlens_k.
        causal: mask aligned bottom-right: query i of a sequence with Lq queries and Lk keys sees
            key j iff j <= i + Lk - Lq. Queries that see no key give out 0 and lse -inf.
        softmax_scale: finite host float multiplying q.k; default 1/sqrt(D).
        pos_hw: (T, 2) int32 (row, col) of each token, any strides: applies rope_2d to q and k
            inside the op. Needs keys packed like queries (no cu_seqlens_k, Tk == T) and D a
            multiple of 4.
        rope_theta: RoPE base for pos_hw, a finite host float >= 1 (checked with or without pos_hw).
        return_lse: also return the log-sum-exp of the scaled scores.
        impl: "ref", "cpu", "triton" or "auto" (see seedvl_kernels._dispatch; auto is "cpu" for CPU
            tensors). The Triton kernels take float32/float16/bfloat16, head dims up to 256 and
            softmax_scale >= 0; "cpu" takes CPU tensors of every dtype the op takes.

    Returns:
        out (T, Hq, D) in q's dtype and, with return_lse, lse (Hq, T) float32 (float64 for
        float64 inputs). Differentiable in q, k, v, through out and lse. lse is -inf for a row
        that sees no key (out 0 there) and NaN for a row with a NaN or +inf score (out NaN there);
        see "Non-finite values" in the module docstring.

    Raises:
        TypeError/ValueError naming the argument for bad input; ImplUnavailableError for an explicit
        ``impl`` that cannot serve the call.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        _validate.tensor(name, t)
    if cu_seqlens_k is not None:
        _validate.tensor("cu_seqlens_k", cu_seqlens_k)
    if pos_hw is not None:
        _validate.tensor("pos_hw", pos_hw)
    device = _validate.same_device(
        {"q": q, "k": k, "v": v, "cu_seqlens": cu_seqlens, "cu_seqlens_k": cu_seqlens_k, "pos_hw": pos_hw}
    )
    _check_qkv(q, k, v)
    T, Tk, D = q.shape[0], k.shape[0], q.shape[2]
    _validate.cu_seqlens("cu_seqlens", cu_seqlens, T)
    max_seqlen = _validate.max_seqlen("max_seqlen", max_seqlen, cu_seqlens)
    if cu_seqlens_k is None:
        if max_seqlen_k is not None:
            raise ValueError(
                "max_seqlen_k: given without cu_seqlens_k (keys then share cu_seqlens and max_seqlen)"
            )
        cu_k, max_k = cu_seqlens, max_seqlen
        _validate.cu_seqlens("cu_seqlens (shared by k)", cu_k, Tk)
    else:
        _validate.cu_seqlens("cu_seqlens_k", cu_seqlens_k, Tk)
        if cu_seqlens_k.shape != cu_seqlens.shape:
            raise ValueError(
                f"cu_seqlens_k: expected the shape of cu_seqlens {tuple(cu_seqlens.shape)} (one entry per "
                f"sequence), got {tuple(cu_seqlens_k.shape)}"
            )
        if max_seqlen_k is None:
            raise ValueError(
                "max_seqlen_k: required with cu_seqlens_k (a host int >= the longest key sequence)"
            )
        cu_k, max_k = cu_seqlens_k, _validate.max_seqlen("max_seqlen_k", max_seqlen_k, cu_seqlens_k)
    if pos_hw is not None:
        _validate.ndim("pos_hw", pos_hw, 2, "(T, 2)")
        _validate.dtype("pos_hw", pos_hw, (torch.int32,))
        _validate.dim_size("pos_hw", pos_hw, 0, T, "T, the tokens of q")
        _validate.dim_size("pos_hw", pos_hw, 1, 2, "(row, col)")
        if cu_k is not cu_seqlens or Tk != T:
            raise ValueError(
                "pos_hw: fused rope needs k packed like q (pass no cu_seqlens_k, and k with the T rows "
                f"of q); got cu_seqlens_k={'given' if cu_k is not cu_seqlens else 'None'}, Tk={Tk}, T={T}"
            )
        if D % 4 != 0:
            raise ValueError(f"pos_hw: rope_2d needs the head dim D to be a multiple of 4, got {D}")
    scale = (
        1.0 / math.sqrt(D) if softmax_scale is None else _validate.host_float("softmax_scale", softmax_scale)
    )
    rope_theta = check_theta("rope_theta", rope_theta)
    chosen = _dispatch.resolve(OP, impl, device, q.dtype)
    out, lse, _, _ = _varlen_attention_fwd_op(
        q,
        k,
        v,
        cu_seqlens,
        cu_k,
        max_seqlen,
        max_k,
        bool(causal),
        scale,
        pos_hw,
        rope_theta,
        chosen,
    )
    return (out, lse) if return_lse else out
