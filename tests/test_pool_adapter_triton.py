"""pool_adapter impl="triton": forward and all five gradients against the float64 oracle (the Triton
interpreter on CPU: fp32/fp16, tiny odd shapes; bf16 at the model's shapes in the GPU tests, for
the Triton and the CUDA kernels), opcheck, torch.compile, dispatch."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import seedvl_kernels as sk
from tests.test_pool_adapter import NAMES, _oracle, _params
from tests.utils import assert_close, assert_matches_ref_error, tol

pa = importlib.import_module("seedvl_kernels.pool_adapter")
pat = importlib.import_module("seedvl_kernels.pool_adapter_triton")

# (T, C, F, C_out): one window; K and N below, at and past the interpreter's 32-wide tiles; several
# M-tiles (N = T/4 > 32); F < C_out so that B1's programs sum several column blocks of dy each.
SHAPES = [(4, 3, 5, 7), (36, 17, 33, 9), (136, 40, 70, 24), (128, 64, 32, 64), (40, 24, 5, 70)]


def _unfused(x, w1, b1, w2, b2):
    """The adapter as unfused PyTorch in the inputs' dtype: every intermediate rounded to it."""
    pooled = x.unflatten(0, (-1, 4)).mean(dim=1)
    return F.linear(F.gelu(F.linear(pooled, w1.t(), b1)), w2.t(), b2)


def _run(fn, x, params, dy):
    leaves = [t.detach().requires_grad_() for t in (x, *params)]  # views keep their strides and offset
    y = fn(*leaves)
    return (y.detach(), *torch.autograd.grad(y, leaves, dy))


def _check_against_oracle(x, params, dy, impl, label):
    """fp32: within a few ulps of the float64 oracle. Low precision: the kernel's error stays within
    twice the error of the unfused PyTorch adapter run in the same dtype (the flash-attention
    criterion: intermediates rounded to the dtype are the reference's own low-precision error)."""
    got = _run(lambda *t: pa.pool_adapter(*t, impl=impl), x, params, dy)
    y64, grads64 = _oracle(x, *params, dy)
    truth = (y64, *grads64)
    if x.dtype == torch.float32:
        for name, g, t in zip(("y", *NAMES), got, truth, strict=True):
            assert g.dtype == x.dtype
            assert_close(g, t, f"{label} {name}", **tol(torch.float32, 8))
        return
    lowp = _run(_unfused, x, params, dy)
    for name, g, lo, t in zip(("y", *NAMES), got, lowp, truth, strict=True):
        assert g.dtype == x.dtype
        assert_matches_ref_error(g, lo, t, f"{label} {name}", factor=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("T,C,Fh,C_out", SHAPES, ids=str)
def test_forward_and_gradients_match_oracle(T, C, Fh, C_out, dtype):
    x = torch.randn(T, C).to(dtype)
    params = _params(C, Fh, C_out, dtype)
    dy = torch.randn(T // 4, C_out).to(dtype)
    _check_against_oracle(x, params, dy, "triton", f"{dtype} T={T}")


@pytest.mark.parametrize("layout", ["col_major_w1", "col_major_w2", "strided_x"])
def test_weight_layouts_and_strided_x(layout):
    """nn.Linear's weight.t() views (column-major) and a row-strided x with an odd storage offset."""
    T, C, Fh, C_out = 72, 20, 36, 28
    x = torch.randn(T, C)
    w1, b1, w2, b2 = _params(C, Fh, C_out)
    if layout == "col_major_w1":
        w1 = w1.t().contiguous().t()
    elif layout == "col_major_w2":
        w2 = w2.t().contiguous().t()
    else:
        x = torch.randn(T * (C + 3) + 1)[1:].view(T, C + 3)[:, :C]
        assert x.stride(0) == C + 3 and x.storage_offset() == 1
    dy = torch.randn(T // 4, C_out)
    _check_against_oracle(x, (w1, b1, w2, b2), dy, "triton", layout)


def test_empty_input_gives_empty_output_and_zero_gradients():
    params = _params(8, 6, 5)
    y, *grads = _run(
        lambda *t: pa.pool_adapter(*t, impl="triton"), torch.empty(0, 8), params, torch.empty(0, 5)
    )
    assert y.shape == (0, 5) and grads[0].shape == (0, 8)
    for name, g, p in zip(NAMES[1:], grads[1:], params, strict=True):
        assert g.shape == p.shape and not g.any(), f"{name} must be zeros for T = 0"


def test_dx_is_the_pooled_gradient_on_each_window_row():
    """dx rows 4n..4n+3 are the same row (dp_n / 4): the window epilogue writes one computed row 4x."""
    x = torch.randn(44, 12)
    params = _params(12, 40, 9)
    _, dx, *_ = _run(lambda *t: pa.pool_adapter(*t, impl="triton"), x, params, torch.randn(11, 9))
    windows = dx.unflatten(0, (-1, 4))
    assert torch.equal(windows, windows[:, :1].expand_as(windows))


def test_tokens_not_a_multiple_of_4_raise():
    with pytest.raises(ValueError, match=r"x: the number of tokens T must be a multiple of 4 .* got T=10"):
        pa.pool_adapter(torch.randn(10, 6), *_params(6, 8, 4), impl="triton")


def test_opcheck_forward_and_backward_ops():
    x = torch.randn(40, 6, requires_grad=True)
    w1, b1, w2, b2 = (p.requires_grad_() for p in _params(6, 10, 7))
    torch.library.opcheck(torch.ops.seedvl.pool_adapter_fwd.default, (x, w1, b1, w2, b2, "triton"))
    x, w1, b1, w2, b2 = (t.detach() for t in (x, w1, b1, w2, b2))
    _, h = torch.ops.seedvl.pool_adapter_fwd(x, w1, b1, w2, b2, "triton")
    dy = torch.randn(10, 7)
    torch.library.opcheck(torch.ops.seedvl.pool_adapter_bwd.default, (dy, x, w1, w2, h, "triton"))


def test_torch_compile_fullgraph():
    x = torch.randn(24, 10, requires_grad=True)
    params = [p.requires_grad_() for p in _params(10, 14, 6)]

    def f(x, w1, b1, w2, b2):
        return (pa.pool_adapter(x, w1, b1, w2, b2, impl="triton") ** 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, *params)
    grads = torch.autograd.grad(loss, [x, *params])
    loss_ref = f(x, *params)
    grads_ref = torch.autograd.grad(loss_ref, [x, *params])
    assert_close(loss, loss_ref, "compiled loss", **tol(torch.float32))
    for name, g, g_ref in zip(NAMES, grads, grads_ref, strict=True):
        assert_close(g, g_ref, f"compiled {name}", **tol(torch.float32))


def test_dispatch():
    assert sk.implementations("pool_adapter") == ["ref", "triton", "cuda"]
    params = _params(8, 8, 8, torch.float64)
    with pytest.raises(sk.ImplUnavailableError, match=r"pool_adapter: impl='triton'.*float64"):
        pa.pool_adapter(torch.randn(8, 8, dtype=torch.float64), *params, impl="triton")
    with pytest.raises(sk.ImplUnavailableError, match=r"pool_adapter: impl='cuda' cannot run this call"):
        pa.pool_adapter(torch.randn(8, 8), *_params(8, 8, 8), impl="cuda")
    assert sk.resolve("pool_adapter", None, torch.device("cpu"), torch.float32) == "ref"


def test_cuda_shape_rules_and_fallback():
    """The CUDA kernels move 16-byte vectors; auto passes over them for other shapes, an explicit
    impl="cuda" raises (decided from metadata, so it also holds under torch.compile)."""
    x, w1, w2 = torch.empty(8, 1280), torch.empty(1280, 4096), torch.empty(4096, 2048)
    assert pa.cuda_shape_reason(x, w1, w2) is None
    assert pa.cuda_shape_reason(x, w1.t().contiguous().t(), w2) is None
    assert "F=4092" in pa.cuda_shape_reason(x, torch.empty(1280, 4092), torch.empty(4092, 2048))
    assert "x=1283" in pa.cuda_shape_reason(torch.empty(8, 1283)[:, :1280], w1, w2)
    assert pa._fall_back_from_cuda(None, torch.device("cpu"), torch.float32, "why") == "triton"
    with pytest.raises(sk.ImplUnavailableError, match="impl='cuda' cannot run this call: why"):
        pa._fall_back_from_cuda("cuda", torch.device("cpu"), torch.float32, "why")


@pytest.mark.parametrize(("capability", "expected"), [((8, 0), "cuda"), ((8, 9), "cuda"), ((9, 0), "triton")])
def test_auto_picks_triton_on_hopper(monkeypatch, capability, expected):
    """auto's rule by architecture (decided from metadata, no GPU needed): Triton over the CUDA kernel
    from sm_90 on, where only Triton's kernel uses wgmma; explicit choices and the other picks stay."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda, half = torch.device("cuda"), torch.float16  # float16: the interpreter serves it (not bfloat16)
    assert pa._auto_by_architecture(None, "cuda", cuda, half) == expected
    assert pa._auto_by_architecture("cuda", "cuda", cuda, half) == "cuda"
    assert pa._auto_by_architecture(None, "ref", cuda, half) == "ref"
    with sk.use_impl(pool_adapter="cuda"):
        assert pa._auto_by_architecture(None, "cuda", cuda, half) == "cuda"


# ----------------------------------------------------------------------------- GPU, bf16, model shapes

# Seed-ViT width 1280 into a 4096-wide adapter (F = C_out), a 16k-token pack; then odd sizes.
GPU_SHAPES = [(16384, 1280, 4096, 4096), (4 * 1001, 1280, 2048, 2048), (4 * 37, 64, 200, 72)]


def _gpu_case(T, C, Fh, C_out, dtype=torch.bfloat16):
    x = torch.randn(T, C, device="cuda").to(dtype)
    params = [p.cuda() for p in _params(C, Fh, C_out, dtype)]
    dy = torch.randn(T // 4, C_out, device="cuda").to(dtype)
    return x, params, dy


def _gpu_check(impl, x, params, dy, label):
    """bf16 kernel vs the fp32 reference (on the same rounded inputs) within twice the unfused bf16
    PyTorch adapter's own error."""
    got = _run(lambda *t: pa.pool_adapter(*t, impl=impl), x, params, dy)
    truth = _run(
        lambda *t: pa.pool_adapter(*t, impl="ref"), x.float(), [p.float() for p in params], dy.float()
    )
    lowp = _run(_unfused, x, params, dy)
    for name, g, lo, t in zip(("y", *NAMES), got, lowp, truth, strict=True):
        assert g.dtype == x.dtype and torch.isfinite(g).all(), f"{label} {name}"
        assert_matches_ref_error(g.float(), lo.float(), t, f"{label} {name}", factor=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("T,C,Fh,C_out", GPU_SHAPES, ids=str)
def test_gpu_bf16_matches_reference(impl, T, C, Fh, C_out):
    _gpu_check(impl, *_gpu_case(T, C, Fh, C_out), f"{impl} T={T}")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_gpu_fp16_and_nn_linear_layouts(impl):
    """fp16, and column-major weights (nn.Linear's weight.t()): the B operands' other layout."""
    x, (w1, b1, w2, b2), dy = _gpu_case(4 * 515, 1280, 1024, 2048, torch.float16)
    w1, w2 = w1.t().contiguous().t(), w2.t().contiguous().t()
    _gpu_check(impl, x, (w1, b1, w2, b2), dy, f"{impl} fp16 column-major")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_gpu_empty_and_misaligned(impl):
    x, params, dy = _gpu_case(0, 64, 96, 40)
    y, *grads = _run(lambda *t: pa.pool_adapter(*t, impl=impl), x, params, dy)
    assert y.shape == (0, 40) and all(not g.any() for g in grads[1:])
    # An x 2 bytes past 16-byte alignment: Triton takes it as is, the CUDA launcher copies it.
    x = torch.randn(4 * 33 * 64 + 8, device="cuda").to(torch.bfloat16)[1:-7].view(4 * 33, 64)
    _, params, dy = _gpu_case(4 * 33, 64, 96, 40)
    _gpu_check(impl, x, params, dy, f"{impl} offset x")


@pytest.mark.gpu
def test_gpu_auto_passes_over_cuda_for_odd_widths():
    x, params, dy = _gpu_case(64, 36, 52, 20)  # C, F, C_out not multiples of 8
    assert sk.resolve("pool_adapter", None, x.device, x.dtype) in ("cuda", "triton")
    _gpu_check(None, x, params, dy, "auto odd widths")
    with pytest.raises(sk.ImplUnavailableError, match="multiples of 8"):
        pa.pool_adapter(x, *params, impl="cuda")
