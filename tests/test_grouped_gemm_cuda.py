"""grouped_gemm impl="cuda" (CUTLASS sm_90a, bf16): forward, dgrad and wgrad at Qwen3-MoE shapes
against the fp32 reference, exact zeros for padding rows and empty experts (even with NaN in the
padding rows of A), every element of a pre-poisoned output written, no host sync, CUDA-graph
replay, bitwise determinism, opcheck, misaligned operands, and the shape rule (K, N multiples of 8:
an error naming the argument for impl="cuda", a fallback for "auto").

On a machine without a GPU only the dispatcher's CPU-side behaviour runs (the last tests)."""

import pytest
import torch

from model.config import QWEN3_30B_A3B
from seedvl_kernels import _dispatch, grouped_gemm_cuda
from seedvl_kernels.grouped_gemm import grouped_gemm, grouped_gemm_dw_ref, grouped_gemm_ref
from tests.utils import assert_matches_ref_error

D, FF, E, TOP_K = (
    QWEN3_30B_A3B.hidden,
    QWEN3_30B_A3B.moe_ffn_dim,
    QWEN3_30B_A3B.num_experts,
    QWEN3_30B_A3B.top_k,
)
GEMMS = {"gate_up": (D, 2 * FF), "down": (FF, D)}  # (K, N)
ON_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_sm90 = pytest.mark.skipif(not ON_SM90, reason="the CUTLASS grouped GEMM runs on sm_90 (H100/H200) only")


def _sizes(routing: str, tokens: int, g: torch.Generator) -> list[int]:
    """Rows per expert for T tokens x top-k (host-side test setup)."""
    rows = tokens * TOP_K
    if routing == "balanced":
        return [rows // E + (e < rows % E) for e in range(E)]
    if routing == "one_hot":  # k experts hold everything, the rest are empty
        return [tokens if e < TOP_K else 0 for e in range(E)]
    probs = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2  # zipf, 1/8 of experts empty
    counts = torch.bincount(torch.multinomial(probs, rows, replacement=True, generator=g), minlength=E)
    counts[torch.randperm(E, generator=g)[: E // 8]] = 0
    return counts.tolist()


def _case(routing: str, gemm: str, trans_b: bool, tokens: int = 4096, pad: int = 40):
    g = torch.Generator().manual_seed(0)
    sizes = _sizes(routing, tokens, g)
    K, N = GEMMS[gemm]
    dev = torch.device("cuda")
    a = torch.randn(sum(sizes) + pad, K, generator=g).to(dev, torch.bfloat16)
    a[sum(sizes) :] = float("nan")  # padding rows must never be read into a real output
    shape = (E, N, K) if trans_b else (E, K, N)
    b = (torch.randn(shape, generator=g) * K**-0.5).to(dev, torch.bfloat16)
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    dc = torch.randn(a.shape[0], N, generator=g).to(dev, torch.bfloat16)
    return sizes, a, b, offsets, dc


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("gemm", list(GEMMS))
@pytest.mark.parametrize("routing", ["balanced", "zipf", "one_hot"])
def test_matches_reference_at_model_shape(routing, gemm, trans_b):
    sizes, a, b, offsets, dc = _case(routing, gemm, trans_b)
    used = sum(sizes)
    a_req, b_req = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = grouped_gemm(a_req, b_req, offsets, trans_b=trans_b, impl="cuda")
    da, db = torch.autograd.grad(out, (a_req, b_req), dc)
    assert out.dtype == da.dtype == db.dtype == torch.bfloat16

    a_clean = a.clone()
    a_clean[used:] = 0  # the fp32 reference would turn NaN padding into NaN dB
    a32, b32, dc32 = a_clean.float(), b.float(), dc.float()
    ref = grouped_gemm_ref(a32, b32, offsets, trans_b)
    assert_matches_ref_error(
        out[:used], grouped_gemm_ref(a_clean, b, offsets, trans_b)[:used], ref[:used], "out"
    )
    da_ref = grouped_gemm_ref(dc32, b32, offsets, not trans_b)
    da_lowp = grouped_gemm_ref(dc, b, offsets, not trans_b)
    assert_matches_ref_error(da[:used], da_lowp[:used], da_ref[:used], "dA")
    db_ref = grouped_gemm_dw_ref(a32, dc32, offsets, trans_b)
    assert_matches_ref_error(db, grouped_gemm_dw_ref(a_clean, dc, offsets, trans_b), db_ref, "dB")

    assert torch.equal(out[used:], torch.zeros_like(out[used:])), "padding rows of out must be zero"
    assert torch.equal(da[used:], torch.zeros_like(da[used:])), "padding rows of dA must be zero"
    for e, size in enumerate(sizes):
        if size == 0:
            assert torch.equal(db[e], torch.zeros_like(db[e])), f"dB[{e}] of an empty expert must be zero"


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("trans_b", [False, True])
def test_launchers_write_every_element(trans_b):
    """Outputs pre-filled with NaN come back NaN-free: padding rows and empty experts are written."""
    sizes, a, b, offsets, dc = _case("zipf", "down", trans_b, tokens=512)
    used = sum(sizes)
    a[used:] = 0
    out = torch.full((a.shape[0], dc.shape[1]), float("nan"), dtype=torch.bfloat16, device="cuda")
    grouped_gemm_cuda.launch_grouped_gemm(a, b, offsets, out, trans_b)
    dw = torch.full(b.shape, float("nan"), dtype=torch.bfloat16, device="cuda")
    grouped_gemm_cuda.launch_grouped_gemm_dw(a, dc, offsets, dw, trans_b)
    assert not out.isnan().any() and not dw.isnan().any()
    assert torch.equal(out[used:], torch.zeros_like(out[used:]))


@pytest.mark.gpu
@needs_sm90
def test_sync_free_graph_capturable_and_deterministic():
    sizes, a, b, offsets, dc = _case("zipf", "gate_up", False)
    a[sum(sizes) :] = 0
    a.requires_grad_()
    b.requires_grad_()

    def run():
        out = grouped_gemm(a, b, offsets, impl="cuda")
        return (out, *torch.autograd.grad(out, (a, b), dc))

    first = run()  # warm-up outside the checks (workspace size query, kernel attributes)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        second = run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y), "two runs differ: the kernels must be bitwise deterministic"

    fwd = lambda: torch.ops.seedvl.grouped_gemm(a.detach(), b.detach(), offsets, False, "cuda")
    dw = lambda: torch.ops.seedvl.grouped_gemm_dw(a.detach(), dc, offsets, False, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fwd(), dw()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, dw_g = fwd(), dw()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out_g, first[0]) and torch.equal(dw_g, first[2]), "CUDA-graph replay differs"


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("trans_b", [False, True])
def test_opcheck(trans_b):
    _, a, b, offsets, dc = _case("zipf", "down", trans_b, tokens=256, pad=0)
    torch.library.opcheck(torch.ops.seedvl.grouped_gemm.default, (a, b, offsets, trans_b, "cuda"))
    torch.library.opcheck(torch.ops.seedvl.grouped_gemm_dw.default, (a, dc, offsets, trans_b, "cuda"))


@pytest.mark.gpu
@needs_sm90
def test_misaligned_operands_are_copied_not_misread():
    """A view at an odd element offset (base not 16-byte aligned) goes through the slow copy path."""
    _, a, b, offsets, _ = _case("balanced", "down", False, tokens=256, pad=0)
    buf = torch.empty(a.numel() + 1, dtype=a.dtype, device=a.device)
    a_odd = buf[1:].view_as(a)
    a_odd.copy_(a)
    out = grouped_gemm(a_odd, b, offsets, impl="cuda")
    assert torch.equal(out, grouped_gemm(a, b, offsets, impl="cuda"))


@pytest.mark.gpu
@needs_sm90
def test_shape_rule_names_the_argument_and_auto_falls_back():
    a = torch.randn(20, 12, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(2, 12, 16, device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([0, 7, 20], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match=r"a: impl='cuda' needs K \(a.shape\[1\]\) to be a multiple of 8"):
        grouped_gemm(a, b, offsets, impl="cuda")
    with pytest.raises(ValueError, match="b: impl='cuda' needs N"):
        grouped_gemm(a[:, :8].contiguous(), b[:, :8, :12].contiguous(), offsets, impl="cuda")
    out = grouped_gemm(a, b, offsets)  # auto: the Triton kernels take it
    assert torch.allclose(out.float(), grouped_gemm_ref(a.float(), b.float(), offsets), atol=5e-2, rtol=2e-2)


@pytest.mark.gpu
def test_other_gpus_decline_with_a_reason():
    if ON_SM90:
        pytest.skip("this GPU is sm_90")
    reason = _dispatch.unavailable_reason("grouped_gemm", "cuda", torch.device("cuda"), torch.bfloat16)
    assert reason is not None and ("sm_90" in reason or "not built" in reason or "no grouped_gemm" in reason)


def test_cpu_and_non_bf16_calls_decline_with_a_reason():
    reason = _dispatch.unavailable_reason("grouped_gemm", "cuda", torch.device("cpu"), torch.bfloat16)
    assert reason is not None
    assert (
        _dispatch.unavailable_reason("grouped_gemm", "cuda", torch.device("cpu"), torch.float32) is not None
    )


def test_shape_rule_messages():
    assert grouped_gemm_cuda.shape_reason(16, 24) is None
    assert grouped_gemm_cuda.shape_reason(12, 24).startswith("a: ")
    assert grouped_gemm_cuda.shape_reason(16, 20).startswith("b: ")
