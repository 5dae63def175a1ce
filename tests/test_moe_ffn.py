"""moe_ffn: against a dense per-expert loop over all tokens, under several routing patterns."""

import pytest
import torch
import torch.nn.functional as F

import seedvl_kernels as sk
from seedvl_kernels.moe_ffn import moe_ffn
from seedvl_kernels.route import route
from tests.utils import assert_close, assert_matches_ref_error, moe_routing, tol

T, D, FF = 48, 16, 12


EXPERTS = {"balanced": 8, "zipf": 8, "one_hot": 6, "empty_experts": 10}


def _routing(kind):
    """(gate_weights fp32 (T, k), expert_ids int32 (T, k), E) for a routing pattern."""
    return (*moe_routing(kind, T, EXPERTS[kind]), EXPERTS[kind])


def _weights(E, dtype=torch.float32):
    w_gate_up = (torch.randn(E, D, 2 * FF) / D**0.5).to(dtype)
    w_down = (torch.randn(E, FF, D) / FF**0.5).to(dtype)
    return w_gate_up, w_down


def _dense(x, gate, ids, w_gate_up, w_down):
    """Every expert on every token, weighted by its combine weight (0 for tokens not routed to it)."""
    out = torch.zeros_like(x)
    for e in range(w_gate_up.shape[0]):
        combine = (gate * (ids == e)).sum(1, keepdim=True).to(x.dtype)  # (T, 1)
        gu = x @ w_gate_up[e]
        h = F.silu(gu[:, :FF]) * gu[:, FF:]
        out = out + combine * (h @ w_down[e])
    return out


@pytest.mark.parametrize("kind", ["balanced", "zipf", "one_hot", "empty_experts"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_and_gradients_match_dense(kind, dtype):
    gate, ids, E = _routing(kind)
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    gate = gate.to(dtype).requires_grad_()
    w_gate_up, w_down = (w.to(dtype).requires_grad_() for w in _weights(E))
    inputs = (x, gate, w_gate_up, w_down)
    out = moe_ffn(x, gate, ids, w_gate_up, w_down)
    assert out.dtype == dtype and out.shape == (T, D)
    hi = [t.detach().double().requires_grad_() for t in inputs]
    ref = _dense(hi[0], hi[1], ids, hi[2], hi[3])
    assert_close(out, ref, f"{kind} forward {dtype}", **tol(dtype, 10))
    g = torch.randn(T, D, dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, g.to(dtype))
    grads_ref = torch.autograd.grad(ref, hi, g)
    for name, a, b in zip(("dx", "dgate", "dw_gate_up", "dw_down"), grads, grads_ref, strict=True):
        assert a.dtype == dtype
        assert_close(a, b, f"{kind} {name} {dtype}", **tol(dtype, 10))
    unused = sorted(set(range(E)) - set(ids.flatten().tolist()))
    for e in unused:
        assert torch.equal(grads[2][e], torch.zeros_like(grads[2][e])), f"dw_gate_up[{e}] of an empty expert"
        assert torch.equal(grads[3][e], torch.zeros_like(grads[3][e])), f"dw_down[{e}] of an empty expert"
    if kind == "empty_experts":
        assert len(unused) >= E // 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_pytorchs_own_error(dtype):
    """Error against fp64 on the same rounded inputs stays within 2x that of the dense loop run
    natively in ``dtype`` (PyTorch's own low-precision error) plus one unit of the dtype."""
    gate, ids, E = _routing("zipf")
    x = torch.randn(T, D).to(dtype)
    w_gate_up, w_down = _weights(E, dtype)
    out = moe_ffn(x, gate, ids, w_gate_up, w_down)
    assert out.dtype == dtype
    ref_hi = _dense(x.double(), gate.double(), ids, w_gate_up.double(), w_down.double())
    ref_lowp = _dense(x, gate, ids, w_gate_up, w_down)
    assert_matches_ref_error(out, ref_lowp, ref_hi, f"forward {dtype}")


def test_matches_hugging_face_qwen3_moe_expert_layout():
    """w_gate_up[e] = cat([gate_proj.weight.T, up_proj.weight.T], -1), w_down[e] = down_proj.weight.T."""
    E, k = 4, 2
    experts = [
        {
            n: torch.nn.Linear(i, o, bias=False)
            for n, i, o in (("gate", D, FF), ("up", D, FF), ("down", FF, D))
        }
        for _ in range(E)
    ]
    w_gate_up = torch.stack(
        [torch.cat([ex["gate"].weight.T, ex["up"].weight.T], -1) for ex in experts]
    ).detach()
    w_down = torch.stack([ex["down"].weight.T for ex in experts]).detach().contiguous()
    x = torch.randn(T, D)
    routed = route(torch.randn(T, E), k)
    with torch.no_grad():
        expected = torch.zeros(T, D)
        for t in range(T):
            for j in range(k):
                ex = experts[int(routed.expert_ids[t, j])]
                expected[t] += routed.gate_weights[t, j] * ex["down"](
                    F.silu(ex["gate"](x[t])) * ex["up"](x[t])
                )
        out = moe_ffn(x, routed.gate_weights, routed.expert_ids, w_gate_up.contiguous(), w_down)
    assert_close(out, expected, "HF Qwen3-MoE expert loop", **tol(torch.float32, 10))


def test_deterministic_bitwise():
    gate, ids, E = _routing("zipf")
    x = torch.randn(T, D, requires_grad=True)
    gate.requires_grad_()
    w_gate_up, w_down = (w.requires_grad_() for w in _weights(E))
    g = torch.randn(T, D)

    def run():
        out = moe_ffn(x, gate, ids, w_gate_up, w_down)
        return (out, *torch.autograd.grad(out, (x, gate, w_gate_up, w_down), g))

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_with_route():
    E, k = 8, 2
    x = torch.randn(T, D, requires_grad=True)
    logits = torch.randn(T, E, requires_grad=True)
    w_gate_up, w_down = (w.requires_grad_() for w in _weights(E))
    params = (x, logits, w_gate_up, w_down)

    def f(x, logits, w_gate_up, w_down):
        r = route(logits, k)
        out = moe_ffn(x, r.gate_weights, r.expert_ids, w_gate_up, w_down)
        return (out * out).mean() + 0.01 * r.load_balancing_loss

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(*params)
    grads = torch.autograd.grad(loss, params)
    loss_ref = f(*params)
    grads_ref = torch.autograd.grad(loss_ref, params)
    assert_close(loss, loss_ref, "compiled loss", **tol(torch.float32))
    for name, a, b in zip(("dx", "dlogits", "dw_gate_up", "dw_down"), grads, grads_ref, strict=True):
        assert_close(a, b, f"compiled {name}", **tol(torch.float32))


def test_no_host_sync_outside_the_grouped_gemm_op():
    """On meta tensors the grouped GEMM runs its fake implementation; the rest must not sync."""
    gate, ids, E = _routing("balanced")
    params = [t.to("meta").requires_grad_() for t in (torch.randn(T, D), gate, *_weights(E))]
    x, gate, w_gate_up, w_down = params
    moe_ffn(x, gate, ids.to("meta"), w_gate_up, w_down).sum().backward()
    assert all(p.grad.shape == p.shape for p in params)


def test_registered_implementations():
    """The Triton path is tested in test_moe_ffn_triton.py; there is no CUDA one yet."""
    assert sk.implementations("moe_ffn") == ["ref", "triton"]
    gate, ids, E = _routing("balanced")
    with pytest.raises(sk.ImplUnavailableError, match="moe_ffn: impl='cuda'"):
        moe_ffn(torch.randn(T, D), gate, ids, *_weights(E), impl="cuda")


X = torch.randn(4, D)
GW = torch.rand(4, 2)
IDS = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]], dtype=torch.int32)
WGU, WD = _weights(3)


@pytest.mark.parametrize(
    "args,match",
    [
        ((X[None], GW, IDS, WGU, WD), "x: expected 2 dims"),
        ((X.to(torch.int32), GW, IDS, WGU, WD), "x: expected dtype"),
        ((X.T.contiguous().T, GW, IDS, WGU, WD), "x: last dim must be contiguous"),
        ((X, GW, IDS, WGU[0], WD), r"w_gate_up: expected 3 dims \(E, D, 2F\)"),
        ((X, GW, IDS, WGU.double(), WD), "w_gate_up: expected the dtype of x"),
        ((X, GW, IDS, WGU[:, :-1], WD), r"w_gate_up: expected size 16 in dim 1 \(D"),
        ((X, GW, IDS, WGU[..., :-1].contiguous(), WD), "w_gate_up: expected an even last dim"),
        ((X, GW, IDS, WGU[:0], WD[:0]), "w_gate_up: expected at least one expert"),
        ((X, GW, IDS, WGU.transpose(1, 2).contiguous().transpose(1, 2), WD), "w_gate_up: last dim must be"),
        ((X, GW, IDS, WGU, "w"), "w_down: expected a torch.Tensor"),
        ((X, GW, IDS, WGU, WD.half()), "w_down: expected the dtype of x"),
        ((X, GW, IDS, WGU, WD[:2]), r"w_down: expected size 3 in dim 0 \(E"),
        ((X, GW, IDS, WGU, WD[:, :-1]), r"w_down: expected size 12 in dim 1 \(F"),
        ((X, GW, IDS, WGU, WD[..., :-1]), r"w_down: expected size 16 in dim 2 \(D"),
        ((X, GW, IDS.long(), WGU, WD), "expert_ids: expected dtype"),
        ((X, GW, IDS[:3], WGU, WD), "expert_ids: expected size 4 in dim 0"),
        ((X, GW, IDS + 1, WGU, WD), r"expert_ids: expected ids in \[0, 3\)"),
        ((X, GW[:, :1], IDS, WGU, WD), r"gate_weights: expected the shape of expert_ids \(4, 2\)"),
        ((X, GW.long(), IDS, WGU, WD), "gate_weights: expected dtype"),
        ((X, GW.to("meta"), IDS, WGU, WD), "gate_weights: expected a tensor on cpu"),
    ],
)
def test_bad_input_names_the_argument(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        moe_ffn(*args)
