"""grouped_gemm: forward and backward against a per-group loop of torch.matmul (and its autograd)."""

import pytest
import torch

import seedvl_kernels as sk
from seedvl_kernels.grouped_gemm import grouped_gemm
from tests.utils import assert_close, tol

# Group sizes: empty groups (>= 10% of them), a one-row group, a large one.
SIZES = [3, 0, 11, 1, 0, 7, 0, 5, 2, 9]


def _offsets(sizes):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32)


def _operands(sizes, K, N, dtype, trans_b, pad=0):
    M = sum(sizes) + pad
    a = torch.randn(M, K).to(dtype).requires_grad_()
    shape = (len(sizes), N, K) if trans_b else (len(sizes), K, N)
    b = (torch.randn(shape) / K**0.5).to(dtype).requires_grad_()
    return a, b, _offsets(sizes)


def _loop(a, b, offsets, trans_b):
    """Per-group torch.matmul, differentiable; padding rows are zero."""
    bounds = offsets.tolist()
    n = b.shape[1] if trans_b else b.shape[2]
    parts = []
    for e in range(b.shape[0]):
        be = b[e].T if trans_b else b[e]
        parts.append(torch.matmul(a[bounds[e] : bounds[e + 1]], be))
    parts.append(a.new_zeros(a.shape[0] - bounds[-1], n))
    return torch.cat(parts)


def _double(*ts):
    return [t.detach().double().requires_grad_() for t in ts]


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("K,N,pad", [(33, 17, 0), (16, 24, 5), (1, 3, 2)])
def test_forward_backward_match_loop_fp64(trans_b, K, N, pad):
    a, b, offsets = _operands(SIZES, K, N, torch.float64, trans_b, pad)
    out = grouped_gemm(a, b, offsets, trans_b=trans_b)
    ref = _loop(a, b, offsets, trans_b)
    assert_close(out, ref, "forward", **tol(torch.float64, 10))
    g = torch.randn_like(out)
    da, db = torch.autograd.grad(out, (a, b), g)
    da_ref, db_ref = torch.autograd.grad(ref, (a, b), g)
    assert_close(da, da_ref, "dA", **tol(torch.float64, 10))
    assert_close(db, db_ref, "dB", **tol(torch.float64, 10))
    for e, size in enumerate(SIZES):
        if size == 0:
            assert torch.equal(db[e], torch.zeros_like(db[e])), f"dB[{e}] of an empty group is not zero"
    M_used = sum(SIZES)
    assert torch.equal(out[M_used:], torch.zeros_like(out[M_used:])), "padding rows of out are not zero"
    assert torch.equal(da[M_used:], torch.zeros_like(da[M_used:])), "padding rows of dA are not zero"


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_against_fp32(dtype, trans_b):
    """The inputs are rounded to ``dtype`` once; the fp32 loop on those same values is the reference,
    so the only error left is the final rounding (fp32 accumulation), within the dtype's tolerance."""
    a, b, offsets = _operands(SIZES, 33, 17, dtype, trans_b, pad=3)
    out = grouped_gemm(a, b, offsets, trans_b=trans_b)
    assert out.dtype == dtype
    a32, b32 = (t.detach().float().requires_grad_() for t in (a, b))
    ref = _loop(a32, b32, offsets, trans_b)
    assert_close(out, ref, f"forward {dtype}", **tol(dtype, 2))
    g = torch.randn(out.shape).to(dtype)
    da, db = torch.autograd.grad(out, (a, b), g)
    da_ref, db_ref = torch.autograd.grad(ref, (a32, b32), g.float())
    assert da.dtype == dtype and db.dtype == dtype
    assert_close(da, da_ref, f"dA {dtype}", **tol(dtype, 2))
    assert_close(db, db_ref, f"dB {dtype}", **tol(dtype, 2))


def test_all_groups_empty_and_no_rows():
    a, b, offsets = _operands([0, 0, 0], 5, 4, torch.float32, False, pad=4)
    out = grouped_gemm(a, b, offsets)
    da, db = torch.autograd.grad(out, (a, b), torch.randn_like(out))
    assert torch.equal(out, torch.zeros(4, 4)) and torch.equal(da, torch.zeros_like(a))
    assert torch.equal(db, torch.zeros_like(b))
    empty = grouped_gemm(torch.empty(0, 5), torch.randn(2, 5, 3), torch.zeros(3, dtype=torch.int32))
    assert empty.shape == (0, 3)


def test_double_backward():
    a, b, offsets = _operands([2, 0, 3, 1], 4, 3, torch.float64, False, pad=1)
    assert torch.autograd.gradgradcheck(lambda a, b: grouped_gemm(a, b, offsets), (a, b))
    assert torch.autograd.gradgradcheck(
        lambda a, b: grouped_gemm(a, b, offsets, trans_b=True),
        (a, b.detach().transpose(1, 2).contiguous().requires_grad_()),
    )


def test_deterministic_bitwise():
    a, b, offsets = _operands(SIZES, 33, 17, torch.float32, True, pad=2)
    g = torch.randn(a.shape[0], 17)

    def run():
        out = grouped_gemm(a, b, offsets, trans_b=True)
        return (out, *torch.autograd.grad(out, (a, b), g))

    for x, y in zip(run(), run(), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("trans_b", [False, True])
def test_opcheck(trans_b):
    a, b, offsets = _operands([2, 0, 3, 1], 5, 3, torch.float32, trans_b, pad=2)
    torch.library.opcheck(torch.ops.seedvl.grouped_gemm.default, (a, b, offsets, trans_b, "ref"))
    g = torch.randn(a.shape[0], 3, requires_grad=True)
    torch.library.opcheck(torch.ops.seedvl.grouped_gemm_dw.default, (a, g, offsets, trans_b, "ref"))


def test_torch_compile_fullgraph():
    a, b, offsets = _operands([4, 0, 6, 3], 9, 7, torch.float32, False, pad=2)

    def f(a, b, offsets):
        return torch.relu(grouped_gemm(a, b, offsets)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(a, b, offsets)
    grads = torch.autograd.grad(loss, (a, b))
    loss_ref = f(a, b, offsets)
    grads_ref = torch.autograd.grad(loss_ref, (a, b))
    assert_close(loss, loss_ref, "compiled loss", **tol(torch.float32))
    for x, y in zip(grads, grads_ref, strict=True):
        assert_close(x, y, "compiled grad", **tol(torch.float32))


def test_registered_implementations():
    """The Triton kernels are tested in test_grouped_gemm_triton.py, the CUTLASS ones (bf16, sm_90)
    in test_grouped_gemm_cuda.py; on CPU tensors impl="cuda" raises with the reason."""
    assert sk.implementations("grouped_gemm") == ["ref", "triton", "cuda"]
    a, b, offsets = _operands([1, 1], 4, 4, torch.float32, False)
    with pytest.raises(sk.ImplUnavailableError, match="grouped_gemm: impl='cuda'"):
        grouped_gemm(a, b, offsets, impl="cuda")


A = torch.randn(6, 4)
B = torch.randn(2, 4, 3)
OFF = torch.tensor([0, 2, 5], dtype=torch.int32)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (([[1.0]], B, OFF), {}, "a: expected a torch.Tensor"),
        ((A, "b", OFF), {}, "b: expected a torch.Tensor"),
        ((A[None], B, OFF), {}, "a: expected 2 dims"),
        ((A.to(torch.int32), B, OFF), {}, "a: expected dtype"),
        ((A, B[0], OFF), {}, r"b: expected 3 dims \(E, K, N\)"),
        ((A, B[0], OFF), {"trans_b": True}, r"b: expected 3 dims \(E, N, K\)"),
        ((A, B.double(), OFF), {}, "b: expected the dtype of a"),
        ((A, torch.randn(2, 5, 3), OFF), {}, r"b: expected size 4 in dim 1 \(K"),
        ((A, B, OFF), {"trans_b": True}, r"b: expected size 4 in dim 2 \(K"),
        ((A, B, OFF), {"trans_b": 1}, "trans_b: expected a bool"),
        ((A.T.contiguous().T, B, OFF), {}, "a: last dim must be contiguous"),
        ((A, B.transpose(1, 2).contiguous().transpose(1, 2), OFF), {}, "b: last dim must be contiguous"),
        ((A, B, [0, 2, 5]), {}, "offsets: expected a torch.Tensor"),
        ((A, B, OFF.long()), {}, "offsets: expected int32"),
        ((A, B, OFF[None]), {}, "offsets: expected shape"),
        ((A, B, OFF[:2]), {}, r"offsets: expected size 3 in dim 0 \(E\+1"),
        ((A, B, torch.tensor([1, 2, 5], dtype=torch.int32)), {}, "offsets: must start at 0"),
        ((A, B, torch.tensor([0, 4, 2], dtype=torch.int32)), {}, "offsets: must be non-decreasing"),
        ((A, B, torch.tensor([0, 4, 7], dtype=torch.int32)), {}, "offsets: last offset 7 exceeds the 6"),
        ((A, B, OFF.to("meta")), {}, "offsets: expected a tensor on cpu"),
        ((A, B.to("meta"), OFF), {}, "b: expected a tensor on cpu"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        grouped_gemm(*args, **kwargs)
