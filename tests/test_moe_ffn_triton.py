"""moe_ffn impl="triton" (fused gather/SwiGLU/gate-weight kernels) against the reference, under several
routing patterns (the Triton interpreter on CPU: fp32/fp16 only; bf16 at model shapes on a GPU)."""

import pytest
import torch

import seedvl_kernels as sk
from seedvl_kernels import moe_ffn_triton as mft
from seedvl_kernels.moe_ffn import moe_ffn
from seedvl_kernels.moe_permute import moe_permute_index
from seedvl_kernels.route import route
from tests.utils import assert_close, assert_matches_ref_error, moe_routing, tol

T, D, FF = 40, 24, 20
NAMES = ("out", "dx", "dgate", "dw_gate_up", "dw_down")


EXPERTS = {"balanced": 6, "zipf": 6, "one_hot": 5, "empty_experts": 10}


def _routing(kind, tokens=T, device="cpu"):
    """(gate_weights fp32 (T, k), expert_ids int32 (T, k), E) for a routing pattern."""
    gate, ids = moe_routing(kind, tokens, EXPERTS[kind])
    return gate.to(device), ids.to(device), EXPERTS[kind]


def _weights(E, d=D, ff=FF, dtype=torch.float32, device="cpu"):
    w_gate_up = (torch.randn(E, d, 2 * ff) / d**0.5).to(device=device, dtype=dtype)
    w_down = (torch.randn(E, ff, d) / ff**0.5).to(device=device, dtype=dtype)
    return w_gate_up, w_down


def _inputs(kind, dtype, tokens=T, d=D, ff=FF, device="cpu"):
    gate, ids, E = _routing(kind, tokens, device)
    x = torch.randn(tokens, d, device=device).to(dtype).requires_grad_()
    w_gate_up, w_down = (w.requires_grad_() for w in _weights(E, d, ff, dtype, device))
    return x, gate.requires_grad_(), ids, w_gate_up, w_down


def _run(impl, x, gate, ids, w_gate_up, w_down, g):
    out = moe_ffn(x, gate, ids, w_gate_up, w_down, impl=impl)
    return (out, *torch.autograd.grad(out, (x, gate, w_gate_up, w_down), g))


def _as(dtype, x, gate, ids, w_gate_up, w_down):
    cast = [t.detach().to(dtype).requires_grad_() for t in (x, gate, w_gate_up, w_down)]
    return cast[0], cast[1], ids, cast[2], cast[3]


@pytest.mark.parametrize("kind", ["balanced", "zipf", "one_hot", "empty_experts"])
def test_fp32_forward_and_gradients_match_reference(kind):
    inputs = _inputs(kind, torch.float32)
    g = torch.randn(T, D)
    got = _run("triton", *inputs, g)
    want = _run("ref", *inputs, g)
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_close(a, b, f"{kind} {name}", **tol(torch.float32, 10))
    ids, E = inputs[2], inputs[3].shape[0]
    for e in sorted(set(range(E)) - set(ids.flatten().tolist())):
        assert torch.equal(got[3][e], torch.zeros_like(got[3][e])), f"dw_gate_up[{e}] of an empty expert"
        assert torch.equal(got[4][e], torch.zeros_like(got[4][e])), f"dw_down[{e}] of an empty expert"
    if kind == "empty_experts":
        assert len(set(range(E)) - set(ids.flatten().tolist())) >= E // 10


@pytest.mark.parametrize("kind", ["zipf", "empty_experts"])
def test_fp16_within_the_references_own_error(kind):
    """Error against fp64 on the same rounded inputs stays within 2x the fp16 reference's own."""
    inputs = _inputs(kind, torch.float16)
    g = torch.randn(T, D).to(torch.float16)
    got = _run("triton", *inputs, g)
    ref_lowp = _run("ref", *inputs, g)
    ref_hi = _run("ref", *_as(torch.float64, *inputs), g.double())
    for name, a, lo, hi in zip(NAMES, got, ref_lowp, ref_hi, strict=True):
        assert a.dtype == lo.dtype, name
        assert_matches_ref_error(a, lo, hi, f"{kind} {name} fp16")


@pytest.mark.parametrize(
    "tokens,d,ff,kind", [(7, 17, 13, "zipf"), (1, 33, 9, "empty_experts"), (3, 16, 48, "one_hot")]
)
def test_odd_sizes(tokens, d, ff, kind):
    inputs = _inputs(kind, torch.float32, tokens, d, ff)
    g = torch.randn(tokens, d)
    for name, a, b in zip(NAMES, _run("triton", *inputs, g), _run("ref", *inputs, g), strict=True):
        assert_close(a, b, f"T={tokens} D={d} F={ff} {name}", **tol(torch.float32, 10))


def test_no_tokens():
    x, gate, ids, w_gate_up, w_down = _inputs("balanced", torch.float32, tokens=0)
    out = moe_ffn(x, gate, ids, w_gate_up, w_down, impl="triton")
    assert out.shape == (0, D)
    dx, dgate, dwgu, dwd = torch.autograd.grad(out, (x, gate, w_gate_up, w_down), torch.empty(0, D))
    assert dx.shape == (0, D) and dgate.shape == gate.shape
    assert torch.equal(dwgu, torch.zeros_like(dwgu)) and torch.equal(dwd, torch.zeros_like(dwd))


def test_zero_gate_weight_and_frozen_weights():
    """dgate does not divide by the gate weight; frozen experts skip the weight gradients."""
    x, gate, ids, w_gate_up, w_down = _inputs("zipf", torch.float32)
    gate = gate.detach().clone()
    gate[::3, 0] = 0.0
    gate.requires_grad_()
    w_gate_up.requires_grad_(False)
    w_down.requires_grad_(False)
    g = torch.randn(T, D)
    grads = {}
    for impl in ("triton", "ref"):
        out = moe_ffn(x, gate, ids, w_gate_up, w_down, impl=impl)
        grads[impl] = (out, *torch.autograd.grad(out, (x, gate), g))
    for name, a, b in zip(("out", "dx", "dgate"), grads["triton"], grads["ref"], strict=True):
        assert_close(a, b, f"zero gate {name}", **tol(torch.float32, 10))


def test_inference_saves_nothing():
    x, gate, ids, w_gate_up, w_down = _inputs("balanced", torch.float32)
    row_map, offsets = moe_permute_index(ids, w_gate_up.shape[0])
    args = (x.detach(), gate.detach(), row_map.to(torch.int32), offsets, w_gate_up.detach(), w_down.detach())
    out, gu, h = mft._moe_ffn_fwd_op(*args, False)
    assert gu.shape == (0, 2 * FF) and h.shape == (T * 2, FF)
    with torch.no_grad():
        expected = moe_ffn(x, gate, ids, w_gate_up, w_down, impl="ref")
        assert_close(out, expected, "inference forward", **tol(torch.float32, 10))
        assert torch.equal(moe_ffn(x, gate, ids, w_gate_up, w_down, impl="triton"), out)


def test_deterministic_bitwise():
    inputs = _inputs("zipf", torch.float32)
    g = torch.randn(T, D)
    for a, b in zip(_run("triton", *inputs, g), _run("triton", *inputs, g), strict=True):
        assert torch.equal(a, b)


def test_opcheck():
    x, gate, ids, w_gate_up, w_down = _inputs("empty_experts", torch.float32, tokens=9, d=16, ff=12)
    row_map, offsets = moe_permute_index(ids, w_gate_up.shape[0])
    row_map = row_map.to(torch.int32)
    torch.library.opcheck(
        torch.ops.seedvl.moe_ffn_triton_fwd.default, (x, gate, row_map, offsets, w_gate_up, w_down, True)
    )
    # The backward op has no autograd of its own (no double backward): opcheck it on plain tensors.
    x, gate, w_gate_up, w_down = (t.detach() for t in (x, gate, w_gate_up, w_down))
    _, gu, h = mft._moe_ffn_fwd_op(x, gate, row_map, offsets, w_gate_up, w_down, True)
    args = (torch.randn(9, 16), x, gate, row_map, offsets, w_gate_up, w_down, gu, h)
    torch.library.opcheck(torch.ops.seedvl.moe_ffn_triton_bwd.default, (*args, True, True))
    torch.library.opcheck(torch.ops.seedvl.moe_ffn_triton_bwd.default, (*args, False, False))


def test_torch_compile_fullgraph_with_route():
    E, k = 6, 2
    x = torch.randn(T, D, requires_grad=True)
    logits = torch.randn(T, E, requires_grad=True)
    w_gate_up, w_down = (w.requires_grad_() for w in _weights(E))
    params = (x, logits, w_gate_up, w_down)

    def f(x, logits, w_gate_up, w_down, impl):
        r = route(logits, k)
        out = moe_ffn(x, r.gate_weights, r.expert_ids, w_gate_up, w_down, impl=impl)
        return (out * out).mean() + 0.01 * r.load_balancing_loss

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(*params, "triton")
    grads = torch.autograd.grad(loss, params)
    loss_ref = f(*params, "ref")
    grads_ref = torch.autograd.grad(loss_ref, params)
    assert_close(loss, loss_ref, "compiled loss", **tol(torch.float32, 10))
    for name, a, b in zip(("dx", "dlogits", "dw_gate_up", "dw_down"), grads, grads_ref, strict=True):
        assert_close(a, b, f"compiled {name}", **tol(torch.float32, 10))


def test_dispatch():
    assert sk.implementations("moe_ffn") == ["ref", "triton"]
    x, gate, ids, w_gate_up, w_down = _inputs("balanced", torch.float64)
    with pytest.raises(sk.ImplUnavailableError, match=r"moe_ffn: impl='triton'.*float64"):
        moe_ffn(x, gate, ids, w_gate_up, w_down, impl="triton")


# ----------------------------------------------------------------------------- GPU, bf16, model shapes

# Qwen3-30B-A3B: hidden 2048, expert FFN 768, 128 experts, top-8.
GPU_T, GPU_D, GPU_FF, GPU_E, GPU_K = 4096, 2048, 768, 128, 8


def _gpu_inputs(kind):
    device = torch.device("cuda")
    logits = torch.randn(GPU_T, GPU_E, device=device)
    if kind == "zipf":  # skewed: expert e's logit shifted by -1.2 * log(e + 1), 16 experts never chosen
        logits = logits - 1.2 * torch.log1p(torch.arange(GPU_E, device=device, dtype=torch.float32))
        logits[:, GPU_E - 16 :] = -1e4
    r = route(logits, GPU_K)
    x = torch.randn(GPU_T, GPU_D, device=device).to(torch.bfloat16).requires_grad_()
    w_gate_up, w_down = (w.requires_grad_() for w in _weights(GPU_E, GPU_D, GPU_FF, torch.bfloat16, device))
    return x, r.gate_weights.detach().requires_grad_(), r.expert_ids, w_gate_up, w_down


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["balanced", "zipf"])
def test_gpu_bf16_model_shape_within_the_references_own_error(kind):
    inputs = _gpu_inputs(kind)
    g = torch.randn(GPU_T, GPU_D, device="cuda").to(torch.bfloat16)
    got = _run("triton", *inputs, g)
    ref_lowp = _run("ref", *inputs, g)
    ref_hi = _run("ref", *_as(torch.float32, *inputs), g.float())
    for name, a, lo, hi in zip(NAMES, got, ref_lowp, ref_hi, strict=True):
        assert_matches_ref_error(a, lo, hi, f"{kind} {name} bf16")
    if kind == "zipf":
        assert torch.equal(got[3][GPU_E - 16 :], torch.zeros_like(got[3][GPU_E - 16 :]))
        assert torch.equal(got[4][GPU_E - 16 :], torch.zeros_like(got[4][GPU_E - 16 :]))


@pytest.mark.gpu
def test_gpu_sync_free_and_bitwise_deterministic():
    inputs = _gpu_inputs("zipf")
    g = torch.randn(GPU_T, GPU_D, device="cuda").to(torch.bfloat16)
    first = _run("triton", *inputs, g)  # compiles outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        second = _run("triton", *inputs, g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor():
    x, gate, ids, w_gate_up, w_down = _gpu_inputs("balanced")

    def f(x, gate, w_gate_up, w_down):
        return moe_ffn(x, gate, ids, w_gate_up, w_down, impl="triton").float().square().mean()

    compiled = torch.compile(f, fullgraph=True)
    params = (x, gate, w_gate_up, w_down)
    grads = torch.autograd.grad(compiled(*params), params)
    grads_eager = torch.autograd.grad(f(*params), params)
    for name, a, b in zip(("dx", "dgate", "dw_gate_up", "dw_down"), grads, grads_eager, strict=True):
        assert_close(a, b, f"inductor {name}", **tol(torch.bfloat16, 2))


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """No host sync anywhere on the path: the whole forward and backward capture into one CUDA graph."""
    inputs = _gpu_inputs("zipf")
    g = torch.randn(GPU_T, GPU_D, device="cuda").to(torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = _run("triton", *inputs, g)  # warm-up (compiles) on a side stream, as capture requires
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _run("triton", *inputs, g)
    graph.replay()
    torch.cuda.synchronize()
    for name, a, b in zip(NAMES, captured, eager, strict=True):
        assert torch.equal(a, b), f"graph replay differs in {name}"
