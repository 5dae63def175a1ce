"""route: against a dense formulation (full scores, torch.topk, manual renorm, losses by hand)."""

import importlib

import pytest
import torch

import seedvl_kernels as sk
from tests.utils import assert_close, tol

route_mod = importlib.import_module("seedvl_kernels.route")
route = route_mod.route


def _dense_route(logits, top_k, score="softmax", bias=None, renormalize=True):
    """Independent fp64 formulation: dense (T, E) gate matrix masked to the chosen experts."""
    lg = logits.double()
    T, E = lg.shape
    if score == "softmax":
        ex = torch.exp(lg - lg.max(-1, keepdim=True).values)
        scores = ex / ex.sum(-1, keepdim=True)
    else:
        scores = 1.0 / (1.0 + torch.exp(-lg))
    select = scores if bias is None else scores + bias.double()
    ids = torch.topk(select, top_k, dim=-1).indices
    mask = torch.zeros(T, E, dtype=torch.float64).scatter(1, ids, 1.0)
    dense = scores * mask
    if renormalize:
        dense = dense / dense.sum(-1, keepdim=True)
    gate = torch.gather(dense, 1, ids)
    counts = mask.sum(0)
    probs = scores if score == "softmax" else scores / scores.sum(-1, keepdim=True)
    lb = E * sum(counts[e] / (T * top_k) * probs[:, e].mean() for e in range(E))
    z = (torch.log(torch.exp(lg).sum(-1)) ** 2).mean()
    return gate, ids, lb, z, counts


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_and_grad_match_dense(score, renormalize, with_bias):
    T, E, k = 37, 16, 4
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    bias = 0.05 * torch.randn(E, dtype=torch.float64) if with_bias else None
    out = route(logits, k, score=score, bias=bias, renormalize=renormalize)
    gate, ids, lb, z, counts = _dense_route(logits, k, score, bias, renormalize)
    assert out.gate_weights.dtype == torch.float32 and out.expert_ids.dtype == torch.int32
    assert out.load_balancing_loss.dtype == torch.float32 and out.load_balancing_loss.shape == ()
    assert out.router_z_loss.dtype == torch.float32 and out.tokens_per_expert.dtype == torch.int32
    assert torch.equal(out.expert_ids.long(), ids)
    assert torch.equal(out.tokens_per_expert, counts.to(torch.int32))
    assert torch.equal(out.tokens_per_expert.long(), torch.bincount(ids.flatten(), minlength=E))
    assert_close(out.gate_weights, gate, "gate_weights", **tol(torch.float32))
    assert_close(out.load_balancing_loss, lb, "load_balancing_loss", **tol(torch.float32))
    assert_close(out.router_z_loss, z, "router_z_loss", **tol(torch.float32))

    g = torch.randn(T, k, dtype=torch.float64)

    def objective(gw, lbl, zl):
        return (gw.double() * g).sum() + 0.3 * lbl.double() + 0.1 * zl.double()

    (grad,) = torch.autograd.grad(
        objective(out.gate_weights, out.load_balancing_loss, out.router_z_loss), logits
    )
    (grad_ref,) = torch.autograd.grad(objective(gate, lb, z), logits)
    assert_close(grad, grad_ref, "d logits", **tol(torch.float32, 10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_logits_route_in_fp32(dtype):
    T, E, k = 64, 8, 2
    logits = torch.randn(T, E).to(dtype).requires_grad_()
    out = route(logits, k)
    gate, ids, lb, z, _ = _dense_route(logits.detach(), k)
    assert out.gate_weights.dtype == torch.float32
    assert torch.equal(out.expert_ids.long(), ids)
    assert_close(out.gate_weights, gate, f"gate_weights {dtype}", **tol(torch.float32, 10))
    assert_close(out.load_balancing_loss, lb, f"lb loss {dtype}", **tol(torch.float32, 10))
    assert_close(out.router_z_loss, z, f"z loss {dtype}", **tol(torch.float32, 10))
    (grad,) = torch.autograd.grad(out.gate_weights.sum() + out.router_z_loss, logits)
    assert grad.dtype == dtype


def test_bias_changes_selection_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 3)
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    plain = route(logits, 1, renormalize=False)
    biased = route(logits, 1, bias=bias, renormalize=False)
    assert plain.expert_ids.flatten().tolist() == [0, 0, 0]
    assert biased.expert_ids.flatten().tolist() == [3, 3, 3]
    probs = torch.softmax(logits, -1)
    assert_close(
        biased.gate_weights, probs[:, 3:], "unbiased weight of the biased choice", **tol(torch.float32)
    )
    assert biased.tokens_per_expert.tolist() == [0, 0, 0, 3]
    assert torch.equal(route(logits, 1, bias=bias).gate_weights, torch.ones(3, 1))


def test_bias_gets_no_gradient_and_sigmoid_underflow_is_finite():
    bias = torch.zeros(6, requires_grad=True)
    logits = torch.randn(5, 6, requires_grad=True)
    out = route(logits, 2, score="sigmoid", bias=bias)
    out.gate_weights.sum().backward()
    assert bias.grad is None or torch.count_nonzero(bias.grad) == 0
    tiny = route(torch.full((2, 4), -200.0), 2, score="sigmoid")
    assert torch.isfinite(tiny.gate_weights).all() and torch.isfinite(tiny.load_balancing_loss)


def test_balanced_routing_gives_unit_balance_loss():
    E, k = 8, 2
    logits = torch.zeros(16, E)  # uniform probabilities
    logits[torch.arange(16)[:, None], (torch.arange(16)[:, None] * k + torch.arange(k)) % E] = 1e-4
    out = route(logits, k)
    assert out.tokens_per_expert.tolist() == [4] * E
    assert_close(out.load_balancing_loss, torch.tensor(1.0), "balanced lb loss", atol=1e-3, rtol=0)


def test_empty_batch():
    out = route(torch.empty(0, 8, requires_grad=True), 3)
    assert out.gate_weights.shape == (0, 3) and out.expert_ids.shape == (0, 3)
    assert out.load_balancing_loss.item() == 0.0 and out.router_z_loss.item() == 0.0
    assert out.tokens_per_expert.tolist() == [0] * 8


def test_update_router_bias_sign_rule():
    bias = torch.tensor([0.5, 0.0, -0.5, 0.25])
    counts = torch.tensor([5, 1, 3, 3], dtype=torch.int32)  # mean 3: overloaded, under, at, at
    new = route_mod.update_router_bias(bias, counts, 0.01)
    assert_close(new, torch.tensor([0.49, 0.01, -0.5, 0.25]), "updated bias", atol=1e-7, rtol=0)
    assert new.dtype == bias.dtype and torch.equal(bias, torch.tensor([0.5, 0.0, -0.5, 0.25]))
    # Feeding the update back makes the over-loaded expert lose tokens.
    logits = torch.zeros(12, 4)
    logits[:, 0] = 1e-3
    b = torch.zeros(4)
    first = route(logits, 1, bias=b).tokens_per_expert
    b = route_mod.update_router_bias(b, first, 0.01)
    assert route(logits, 1, bias=b).tokens_per_expert[0] < first[0]


def test_torch_compile_fullgraph():
    T, E, k = 24, 8, 2
    logits = torch.randn(T, E, requires_grad=True)
    bias = 0.01 * torch.randn(E)

    def f(lg):
        out = route(lg, k, score="sigmoid", bias=bias)
        return out.gate_weights, out.expert_ids, out.load_balancing_loss + 0.1 * out.router_z_loss

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    gw, ids, loss = compiled(logits)
    gw_ref, ids_ref, loss_ref = f(logits)
    assert torch.equal(ids, ids_ref)
    assert_close(gw, gw_ref, "compiled gate_weights", **tol(torch.float32))
    (g,) = torch.autograd.grad((gw * 2).sum() + loss, logits)
    (g_ref,) = torch.autograd.grad((gw_ref * 2).sum() + loss_ref, logits)
    assert_close(g, g_ref, "compiled grad", **tol(torch.float32))


def test_no_host_sync_runs_on_meta_tensors():
    """Meta tensors have no values, so any .item()/.tolist()/bincount on the path would fail."""
    logits = torch.randn(10, 8, device="meta", requires_grad=True)
    out = route(logits, 2, score="sigmoid", bias=torch.zeros(8, device="meta"))
    (out.gate_weights.sum() + out.load_balancing_loss + out.router_z_loss).backward()
    assert logits.grad.shape == (10, 8) and out.tokens_per_expert.shape == (8,)
    assert route_mod.update_router_bias(torch.zeros(8, device="meta"), out.tokens_per_expert, 0.1).shape == (
        8,
    )


def test_only_reference_is_registered():
    assert sk.implementations("route") == ["ref"]
    with pytest.raises(sk.ImplUnavailableError, match="route: impl='triton' cannot run this call"):
        route(torch.randn(4, 4), 2, impl="triton")


L = torch.randn(4, 6)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (([1.0], 2), {}, "logits: expected a torch.Tensor"),
        ((torch.randn(2, 4, 6), 2), {}, "logits: expected 2 dims"),
        ((torch.zeros(4, 6, dtype=torch.int32), 2), {}, "logits: expected dtype"),
        ((torch.randn(4, 0), 1), {}, "logits: expected at least one expert"),
        ((L, 0), {}, "top_k: expected 1 <= top_k <= E = 6"),
        ((L, 7), {}, "top_k: expected 1 <= top_k <= E = 6"),
        ((L, 2.0), {}, "top_k: expected a host int"),
        ((L, True), {}, "top_k: expected a host int"),
        ((L, 2), {"score": "relu"}, "score: expected one of"),
        ((L, 2), {"renormalize": 1}, "renormalize: expected a bool"),
        ((L, 2), {"bias": [0.0] * 6}, "bias: expected a torch.Tensor"),
        ((L, 2), {"bias": torch.zeros(5)}, "bias: expected size 6"),
        ((L, 2), {"bias": torch.zeros(1, 6)}, "bias: expected 1 dims"),
        ((L, 2), {"bias": torch.zeros(6, dtype=torch.int64)}, "bias: expected dtype"),
        ((L, 2), {"bias": torch.zeros(6, device="meta")}, "bias: expected a tensor on cpu"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        route(*args, **kwargs)


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.zeros(2, 2), torch.zeros(2), 0.1), "bias: expected 1 dims"),
        ((torch.zeros(2, dtype=torch.int32), torch.zeros(2), 0.1), "bias: expected dtype"),
        ((torch.zeros(3), torch.zeros(2), 0.1), "tokens_per_expert: expected size 3"),
        (
            (torch.zeros(2), torch.zeros(2, dtype=torch.bool), 0.1),
            "tokens_per_expert: expected an integer or float",
        ),
        ((torch.zeros(2), [1, 2], 0.1), "tokens_per_expert: expected a torch.Tensor"),
        ((torch.zeros(2), torch.zeros(2), -0.1), "rate: expected >= 0"),
        ((torch.zeros(2), torch.zeros(2), torch.tensor(0.1)), "rate: expected a host float"),
    ],
)
def test_update_router_bias_bad_input(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        route_mod.update_router_bias(*args)
