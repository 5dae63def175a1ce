"""Top-k expert routing for an MoE layer, with the balance losses and auxiliary-loss-free bias.

Math, all in fp32 (fp64 for fp64 logits). For router logits l of shape (T, E):

    s = softmax(l, -1)                 score="softmax"  (Switch, Mixtral, Qwen3-MoE)
    s = sigmoid(l)                     score="sigmoid"  (DeepSeek-V3)
    ids = topk(s + bias, k)            selection only: bias shifts which experts win ...
    w = s[ids]                         ... but the gate weights are the unbiased scores
    w = w / sum_j w                    if renormalize (the sum clamped at the smallest normal
                                       float, so all-underflowed sigmoid scores give 0, not NaN)

Balance losses (both averaged over the counted tokens; with none they are 0). Every token is
routed; a ``token_mask`` (padding rows False) only decides which tokens the statistics count:

    N       = #{t : mask[t]}                           counted tokens (T without a mask)
    count_e = #{(t, j) : mask[t], ids[t, j] = e}       tokens_per_expert, int32, not differentiable
    f_e     = count_e / (N * k)                        fraction of routed slots that go to e
    p       = s for softmax, s / sum_e s for sigmoid   (DeepSeek-V3's normalised affinities)
    P_e     = sum_{t counted} p[t, e] / N
    load_balancing_loss = E * sum_e f_e * P_e          1.0 at perfect balance (Switch/GShard)
    router_z_loss       = sum_{t counted} logsumexp(l[t])^2 / N     (ST-MoE)

Over a process ``group`` (the ranks that hold pieces of one batch, e.g. context-parallel shards),
N and count_e are summed over the group (one all_reduce of E+1 counts, outside autograd) and each
rank returns its share: the sums over t above run over its own tokens only. Both losses are linear
in those sums for fixed f and N, so the shares add up over the group to the losses of the whole
batch, and summing the ranks' gradients (as data parallelism does) gives the whole batch's
gradient. ``tokens_per_expert`` stays this rank's.

Auxiliary-loss-free balancing (DeepSeek-V3, sec. 2.1.2): after each step the caller updates the
selection bias by the sign rule ``bias_e += rate * sign(mean_e' count_e' - count_e)`` (overloaded
experts become less attractive), see :func:`update_router_bias`. Sum ``tokens_per_expert`` over
micro-batches and data-parallel ranks before updating so that every rank keeps the same bias.

Backward: plain autograd. Gradients reach the logits through the gathered gate weights (and their
renormalisation), through P in the balance loss (f is a constant) and through the z-loss; the
top-k selection and the bias receive none. Saved for backward: the fp32 scores (T, E) and the
selected indices (T, k), plus what autograd keeps for softmax/sigmoid and logsumexp.

Shapes: logits (T, E) -> gate_weights (T, k) fp32, expert_ids (T, k) int32, two scalar fp32 losses,
tokens_per_expert (E,) int32.

Cost: O(T * E) elementwise work plus a top-k; bytes ~ T * E * (itemsize + a few fp32 passes).
Negligible next to the expert GEMMs (the router GEMM producing the logits is not part of this op).

No host synchronisation (no ``.item()``, ``.tolist()`` or ``bincount``; counting is a scatter_add
into zeros), so the op is plain differentiable PyTorch and ``torch.compile(fullgraph=True)``
traces it natively; no custom op is needed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from . import _backends, _dispatch, _validate

OP = "route"
DTYPES = (*_backends.FLOAT_DTYPES, torch.float64)
SCORES = ("softmax", "sigmoid")


class RouteOutput(NamedTuple):
    """What :func:`route` returns."""

    gate_weights: torch.Tensor  # (T, k) fp32, unbiased (optionally renormalised) scores
    expert_ids: torch.Tensor  # (T, k) int32, in descending order of the (biased) selection score
    load_balancing_loss: torch.Tensor  # () fp32
    router_z_loss: torch.Tensor  # () fp32
    tokens_per_expert: torch.Tensor  # (E,) int32


# ----------------------------------------------------------------------------- reference


def route_ref(
    logits: torch.Tensor,
    top_k: int,
    score: str = "softmax",
    bias: torch.Tensor | None = None,
    renormalize: bool = True,
    token_mask: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> RouteOutput:
    """Pure-PyTorch route (the spec). See the module docstring for the math."""
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    T, E = logits.shape
    lg = logits.to(compute)
    scores = torch.softmax(lg, dim=-1) if score == "softmax" else torch.sigmoid(lg)
    select = scores if bias is None else scores + bias.to(compute)
    idx = torch.topk(select, top_k, dim=-1, sorted=True).indices  # (T, k) int64
    weights = scores.gather(-1, idx)
    if renormalize:
        denom = weights.sum(-1, keepdim=True).clamp_min(torch.finfo(compute).tiny)
        weights = weights / denom

    ones = torch.ones_like(idx, dtype=torch.int32)
    if token_mask is not None:
        ones = ones * token_mask.to(torch.int32).unsqueeze(-1)
    counts = torch.zeros(E, dtype=torch.int32, device=logits.device)
    counts.scatter_add_(0, idx.reshape(-1), ones.reshape(-1))

    if score == "softmax":
        probs = scores
    else:
        probs = scores / scores.sum(-1, keepdim=True).clamp_min(torch.finfo(compute).tiny)
    z = torch.logsumexp(lg, dim=-1).square()
    if token_mask is None and group is None:
        frac = counts.to(compute) / max(T * top_k, 1)
        mean_prob = probs.sum(0) / max(T, 1)
        z_loss = z.sum() / max(T, 1)
    else:
        if token_mask is not None:
            keep = token_mask.unsqueeze(-1)
            probs, z = probs.where(keep, 0.0), z.where(token_mask, 0.0)
        stats = torch.cat([counts, ones[:, 0].sum().view(1)])  # (E+1,): counts and N
        if group is not None:
            dist.all_reduce(stats, group=group)  # counts are not differentiable: no autograd here
        n = stats[E].to(compute).clamp_min(1)
        frac = stats[:E].to(compute) / (n * top_k)
        mean_prob = probs.sum(0) / n
        z_loss = z.sum() / n
    lb_loss = E * (frac * mean_prob).sum()
    return RouteOutput(
        weights.to(torch.float32),
        idx.to(torch.int32),
        lb_loss.to(torch.float32),
        z_loss.to(torch.float32),
        counts,
    )


_dispatch.register(OP, "ref", _backends.ref_support)


# ----------------------------------------------------------------------------- public functions


def route(
    logits: torch.Tensor,
    top_k: int,
    *,
    score: str = "softmax",
    bias: torch.Tensor | None = None,
    renormalize: bool = True,
    token_mask: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    impl: str | None = None,
) -> RouteOutput:
    """Pick ``top_k`` experts per token and return their gate weights and the balance statistics.

    Args:
        logits: (T, E) router logits, float32/float16/bfloat16/float64; math runs in fp32
            (fp64 for fp64 logits).
        top_k: experts per token, a host int with 1 <= top_k <= E.
        score: "softmax" (probabilities over experts) or "sigmoid" (independent affinities).
        bias: optional (E,) float selection bias on logits' device (auxiliary-loss-free
            balancing); it changes which experts are chosen, never the gate weights, and gets no
            gradient.
        renormalize: divide the k gate weights of each token by their sum.
        token_mask: optional (T,) bool on logits' device: the tokens the balance statistics and
            ``tokens_per_expert`` count (padding rows False). Every token is routed either way.
        group: optional process group whose ranks hold pieces of one batch: the statistics cover
            the counted tokens of every rank and the losses returned are this rank's share (they
            sum over the group to the whole batch's losses). A collective: every rank of the group
            calls it. No host synchronisation.
        impl: "ref" or "auto" (only the reference exists; see seedvl_kernels._dispatch).

    Returns:
        :class:`RouteOutput` (gate_weights (T, k) fp32, expert_ids (T, k) int32,
        load_balancing_loss () fp32, router_z_loss () fp32, tokens_per_expert (E,) int32).
        gate_weights and both losses are differentiable in logits.

    Layout: logits, bias and token_mask may have any strides (plain PyTorch ops read them).
    Non-finite values: a token whose logits hold a NaN gets NaN gate weights and k distinct but
    unspecified experts (top-k orders NaN above every number), and makes both losses NaN if it is
    counted (mask it out to keep them finite); +inf logits behave the same under softmax. Finite
    logits of any size are safe: the math is a stable softmax / sigmoid in fp32.
    """
    _validate.tensor("logits", logits)
    _validate.ndim("logits", logits, 2, "(T, E)")
    _validate.dtype("logits", logits, DTYPES)
    num_experts = logits.shape[1]
    if num_experts < 1:
        raise ValueError(f"logits: expected at least one expert (E >= 1), got shape {tuple(logits.shape)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k: expected a host int, got {type(top_k).__name__}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected 1 <= top_k <= E = {num_experts} (logits' dim 1), got {top_k}")
    if score not in SCORES:
        raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize: expected a bool, got {type(renormalize).__name__}")
    if bias is not None:
        _validate.tensor("bias", bias)
        _validate.ndim("bias", bias, 1, "(E,)")
        _validate.dim_size("bias", bias, 0, num_experts, "E, the experts of logits")
        _validate.dtype("bias", bias, DTYPES)
    if token_mask is not None:
        _validate.tensor("token_mask", token_mask)
        _validate.ndim("token_mask", token_mask, 1, "(T,)")
        _validate.dim_size("token_mask", token_mask, 0, logits.shape[0], "T, the tokens of logits")
        if token_mask.dtype != torch.bool:
            raise TypeError(f"token_mask: expected a bool tensor, got {token_mask.dtype}")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a torch.distributed ProcessGroup, got {type(group).__name__}")
    device = _validate.same_device({"logits": logits, "bias": bias, "token_mask": token_mask})
    _dispatch.resolve(OP, impl, device, logits.dtype)
    return route_ref(logits, top_k, score, bias, renormalize, token_mask, group)


def update_router_bias(bias: torch.Tensor, tokens_per_expert: torch.Tensor, rate: float) -> torch.Tensor:
    """The auxiliary-loss-free balancing step: ``bias + rate * sign(mean(load) - load)``.

    Experts that received more than the mean number of routed slots have their selection bias
    lowered by ``rate``, those below the mean raised, those exactly at the mean left alone.

    Args:
        bias: (E,) float selection bias (as passed to :func:`route`).
        tokens_per_expert: (E,) int or float counts on bias's device, typically
            :attr:`RouteOutput.tokens_per_expert` summed over micro-batches and ranks.
        rate: the update speed (DeepSeek-V3 uses 0.001), a host float >= 0.

    Returns:
        The new (E,) bias in bias's dtype (a new tensor, outside autograd; copy it into the
        router's buffer with ``bias.copy_(...)``). No host synchronisation.
    """
    _validate.tensor("bias", bias)
    _validate.ndim("bias", bias, 1, "(E,)")
    _validate.dtype("bias", bias, DTYPES)
    _validate.tensor("tokens_per_expert", tokens_per_expert)
    _validate.ndim("tokens_per_expert", tokens_per_expert, 1, "(E,)")
    _validate.dim_size("tokens_per_expert", tokens_per_expert, 0, bias.shape[0], "E, the experts of bias")
    if tokens_per_expert.dtype.is_complex or tokens_per_expert.dtype == torch.bool:
        raise TypeError(
            f"tokens_per_expert: expected an integer or float dtype, got {tokens_per_expert.dtype}"
        )
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise TypeError(f"rate: expected a host float, got {type(rate).__name__}")
    if rate < 0:
        raise ValueError(f"rate: expected >= 0, got {rate}")
    _validate.same_device({"bias": bias, "tokens_per_expert": tokens_per_expert})
    with torch.no_grad():
        load = tokens_per_expert.to(torch.float64 if bias.dtype == torch.float64 else torch.float32)
        step = torch.sign(load.mean() - load) * float(rate)
        return (bias.detach().to(load.dtype) + step).to(bias.dtype)
