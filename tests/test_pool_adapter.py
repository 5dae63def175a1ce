"""pool_adapter: the reference against an independent formulation (avg_pool1d + nn.Linear + GELU),
forward and backward; low precision against fp32; empty input; opcheck; torch.compile; bad input."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seedvl_kernels as sk
from tests.utils import assert_close, tol

# The module, even once the package exports the function under the same name.
pa = importlib.import_module("seedvl_kernels.pool_adapter")


def _params(C: int, Fh: int, C_out: int, dtype=torch.float32):
    """w1 (C, F), b1 (F,), w2 (F, C_out), b2 (C_out,) scaled like nn.Linear's init, so outputs are O(1)."""
    w1 = torch.randn(C, Fh, dtype=torch.float64) / C**0.5
    b1 = torch.randn(Fh, dtype=torch.float64) * 0.1
    w2 = torch.randn(Fh, C_out, dtype=torch.float64) / Fh**0.5
    b2 = torch.randn(C_out, dtype=torch.float64) * 0.1
    return [t.to(dtype) for t in (w1, b1, w2, b2)]


class _Independent(nn.Module):
    """avg_pool1d over tokens (kernel 4, stride 4) + nn.Linear + exact GELU + nn.Linear, in float64."""

    def __init__(self, w1, b1, w2, b2):
        super().__init__()
        self.lin1 = nn.Linear(w1.shape[0], w1.shape[1], dtype=torch.float64)
        self.lin2 = nn.Linear(w2.shape[0], w2.shape[1], dtype=torch.float64)
        with torch.no_grad():
            self.lin1.weight.copy_(w1.t())
            self.lin1.bias.copy_(b1)
            self.lin2.weight.copy_(w2.t())
            self.lin2.bias.copy_(b2)

    def forward(self, x):
        pooled = F.avg_pool1d(x.t().unsqueeze(0), kernel_size=4, stride=4).squeeze(0).t()  # (T/4, C)
        return self.lin2(F.gelu(self.lin1(pooled), approximate="none"))


def _oracle(x, w1, b1, w2, b2, dy):
    """Forward and (dx, dw1, db1, dw2, db2) of the independent module, in float64."""
    model = _Independent(*(t.detach().double() for t in (w1, b1, w2, b2)))
    xd = x.detach().double().requires_grad_()
    y = model(xd)
    y.backward(dy.double())
    grads = (
        xd.grad,
        model.lin1.weight.grad.t(),
        model.lin1.bias.grad,
        model.lin2.weight.grad.t(),
        model.lin2.bias.grad,
    )
    return y.detach(), grads


def _run(x, params, dy, impl="ref"):
    leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
    y = pa.pool_adapter(*leaves, impl=impl)
    grads = torch.autograd.grad(y, leaves, dy)
    return y.detach(), grads


NAMES = ("dx", "dw1", "db1", "dw2", "db2")


@pytest.mark.parametrize("T,C,Fh,C_out", [(4, 1, 1, 1), (8, 3, 5, 7), (36, 17, 33, 9), (64, 40, 96, 24)])
def test_forward_backward_against_independent_formulation(T, C, Fh, C_out):
    x = torch.randn(T, C)
    params = _params(C, Fh, C_out)
    dy = torch.randn(T // 4, C_out)
    y, grads = _run(x, params, dy)
    y_ref, grads_ref = _oracle(x, *params, dy)
    assert y.shape == (T // 4, C_out) and y.dtype == torch.float32
    assert_close(y, y_ref, "forward", **tol(torch.float32, 4))
    for name, g, g_ref in zip(NAMES, grads, grads_ref, strict=True):
        assert g.dtype == torch.float32
        assert_close(g, g_ref, f"backward {name}", **tol(torch.float32, 4))


def test_float64_reference_is_tight():
    x = torch.randn(20, 6, dtype=torch.float64)
    params = _params(6, 11, 5, torch.float64)
    dy = torch.randn(5, 5, dtype=torch.float64)
    y, grads = _run(x, params, dy)
    y_ref, grads_ref = _oracle(x, *params, dy)
    assert_close(y, y_ref, "fp64 forward", atol=1e-12, rtol=1e-12)
    for name, g, g_ref in zip(NAMES, grads, grads_ref, strict=True):
        assert_close(g, g_ref, f"fp64 {name}", atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_against_fp32(dtype):
    # Inputs are rounded to the dtype first, so the oracle sees exactly the same values; what remains
    # is the op's own error: fp32 math, rounding of y and the gradients once, and h saved in the dtype.
    T, C, Fh, C_out = 48, 24, 40, 16
    x = torch.randn(T, C).to(dtype)
    params = _params(C, Fh, C_out, dtype)
    dy = torch.randn(T // 4, C_out).to(dtype)
    y, grads = _run(x, params, dy)
    y32, grads32 = _run(x.float(), [p.float() for p in params], dy.float())
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close(y, y32, f"{dtype} forward vs fp32", **tol(dtype, 2))
    for name, g, g32 in zip(NAMES, grads, grads32, strict=True):
        assert_close(g, g32, f"{dtype} {name} vs fp32", **tol(dtype, 2))


def test_nn_linear_weight_views_are_accepted():
    """An nn.Linear stores (out, in); its .t() is a column-major (in, out) view that needs no copy."""
    lin1, lin2 = nn.Linear(12, 20), nn.Linear(20, 8)
    x = torch.randn(16, 12)
    y = pa.pool_adapter(x, lin1.weight.t(), lin1.bias, lin2.weight.t(), lin2.bias)
    expected = lin2(F.gelu(lin1(x.view(4, 4, 12).mean(1))))
    assert_close(y, expected, "nn.Linear views", **tol(torch.float32, 4))
    w1, w2 = lin1.weight.t().contiguous(), lin2.weight.t().contiguous()
    contiguous = pa.pool_adapter(x, w1, lin1.bias, w2, lin2.bias)
    assert_close(y, contiguous, "row-major vs column-major weights", **tol(torch.float32))


def test_empty_input_is_legal():
    params = _params(8, 6, 5)
    y, grads = _run(torch.empty(0, 8), params, torch.empty(0, 5))
    assert y.shape == (0, 5)
    assert grads[0].shape == (0, 8)
    for name, g, p in zip(NAMES[1:], grads[1:], params, strict=True):
        assert g.shape == p.shape and not g.any(), f"{name} must be zeros for T = 0"


def test_each_window_is_pooled_on_its_own():
    """Permuting rows inside a window changes nothing; moving a row to another window does."""
    x = torch.randn(12, 5)
    params = _params(5, 7, 3)
    y = pa.pool_adapter(x, *params)
    inside = x[[3, 1, 0, 2, 4, 5, 6, 7, 11, 10, 9, 8]]
    assert_close(pa.pool_adapter(inside, *params), y, "permuted inside windows", **tol(torch.float32))
    across = x[[4, 1, 2, 3, 0, 5, 6, 7, 8, 9, 10, 11]]
    assert not torch.allclose(pa.pool_adapter(across, *params), y)


def test_opcheck_forward_and_backward_ops():
    x = torch.randn(16, 6, requires_grad=True)
    w1, b1, w2, b2 = (p.requires_grad_() for p in _params(6, 10, 7))
    torch.library.opcheck(torch.ops.seedvl.pool_adapter_fwd.default, (x, w1, b1, w2, b2, "ref"))
    x, w1, b1, w2, b2 = (t.detach() for t in (x, w1, b1, w2, b2))
    _, h = torch.ops.seedvl.pool_adapter_fwd(x, w1, b1, w2, b2, "ref")
    dy = torch.randn(4, 7)
    torch.library.opcheck(torch.ops.seedvl.pool_adapter_bwd.default, (dy, x, w1, w2, h, "ref"))


def test_torch_compile_fullgraph():
    x = torch.randn(24, 10, requires_grad=True)
    params = [p.requires_grad_() for p in _params(10, 14, 6)]

    def f(x, w1, b1, w2, b2):
        return (pa.pool_adapter(x, w1, b1, w2, b2) ** 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, *params)
    grads = torch.autograd.grad(loss, [x, *params])
    loss_ref = f(x, *params)
    grads_ref = torch.autograd.grad(loss_ref, [x, *params])
    assert_close(loss, loss_ref, "compiled loss", **tol(torch.float32))
    for name, g, g_ref in zip(NAMES, grads, grads_ref, strict=True):
        assert_close(g, g_ref, f"compiled {name}", **tol(torch.float32))


def test_dispatch_has_the_reference_and_refuses_unavailable_kernels():
    assert "pool_adapter" in sk.ops()
    assert "ref" in sk.implementations("pool_adapter")
    params = _params(8, 8, 8)
    with pytest.raises(sk.ImplUnavailableError, match="pool_adapter: impl='cuda' cannot run this call"):
        pa.pool_adapter(torch.randn(8, 8), *params, impl="cuda")


def _bad(**changes):
    args = {
        "x": torch.randn(8, 6),
        "w1": torch.randn(6, 10),
        "b1": torch.randn(10),
        "w2": torch.randn(10, 3),
        "b2": torch.randn(3),
    }
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "args,match",
    [
        (_bad(x=torch.randn(6, 6)), r"x: the number of tokens T must be a multiple of 4 .* got T=6"),
        (_bad(x=[1.0]), "x: expected a torch.Tensor"),
        (_bad(b2=None), "b2: expected a torch.Tensor"),
        (_bad(x=torch.randn(2, 4, 6)), r"x: expected 2 dims \(T, C\)"),
        (_bad(x=torch.zeros(8, 6, dtype=torch.int32)), "x: expected dtype"),
        (_bad(x=torch.randn(6, 8).t()), "x: last dim must be contiguous"),
        (_bad(w1=torch.randn(5, 10)), r"w1: expected size 6 in dim 0 \(C, the channels of x\)"),
        (_bad(w1=torch.randn(6, 10, 1)), r"w1: expected 2 dims \(C, F\)"),
        (_bad(b1=torch.randn(9)), r"b1: expected size 10 in dim 0 \(F, the columns of w1\)"),
        (_bad(w2=torch.randn(9, 3)), r"w2: expected size 10 in dim 0 \(F, the columns of w1\)"),
        (_bad(b2=torch.randn(4)), r"b2: expected size 3 in dim 0 \(C_out, the columns of w2\)"),
        (_bad(b2=torch.randn(3, 1)), r"b2: expected 1 dims \(C_out,\)"),
        (_bad(w2=torch.randn(10, 3, dtype=torch.float64)), "w2: expected the dtype of x"),
        (_bad(w1=torch.randn(6, 20)[:, ::2]), "w1: expected a row-major or column-major matrix"),
        (_bad(b1=torch.randn(10, device="meta")), "b1: expected a tensor on cpu"),
    ],
)
def test_bad_input_names_the_argument(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pa.pool_adapter(**args)
