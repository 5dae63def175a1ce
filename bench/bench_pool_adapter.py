"""pool_adapter TFLOP/s at Seed1.5-VL adapter shapes, forward and forward + backward.

Case: T ViT tokens of width C = SEEDVIT_WIDTH pooled to N = T/4, then Linear(C, F) -> GELU ->
Linear(F, C_out) with F = C_out (see bench/model_shapes.py for why). Useful FLOPs: forward
2 * N * F * (C + C_out); forward + backward three times that. "fwd" is the training forward (inputs
require grad, so what backward needs is kept).

Cases: every ADAPTER_TOKENS x LLM_HIDDEN_STANDINS pair, a 64k-token pack at hidden 4096 and a
16k pack at the widest hidden (7168).

Rows per case: the op's cuda (csrc/pool_adapter, mma.sync) and triton
(seedvl_kernels/pool_adapter_triton.py) implementations, ref (fp32 math, through the custom op),
and the unfused PyTorch formulation in the inputs' dtype, eager (``eager_unfused``) and compiled by
Inductor (``torch_compile_unfused``, the peer the fused kernels must beat: issue 7 asks >= 1.3x its
speed on fwd_bwd, and >= 70 % of the matmul peak on the large packs). Every row computes all five
gradients (x, w1, b1, w2, b2) in the fwd_bwd pass. On CPU only ref and the peers run (tiny shape).
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench import harness
from bench.model_shapes import (
    ADAPTER_LARGE_PACK,
    ADAPTER_TOKENS,
    LLM_HIDDEN_STANDINS,
    LLM_HIDDEN_WIDEST,
    SEEDVIT_WIDTH,
    TINY_LLM_HIDDEN,
    TINY_VIT_TOKENS,
    TINY_VIT_WIDTH,
)

pa = importlib.import_module("seedvl_kernels.pool_adapter")

ON_GPU = torch.cuda.is_available()
PEERS = ("eager_unfused", "torch_compile_unfused")
IMPLS = ("cuda", "triton", "ref", *PEERS)
PASSES = ("fwd", "fwd_bwd")
if ON_GPU:
    CASES = [(T, SEEDVIT_WIDTH, hidden, hidden) for T in ADAPTER_TOKENS for hidden in LLM_HIDDEN_STANDINS]
    CASES += [
        (ADAPTER_LARGE_PACK, SEEDVIT_WIDTH, 4096, 4096),
        (16384, SEEDVIT_WIDTH, LLM_HIDDEN_WIDEST, LLM_HIDDEN_WIDEST),
    ]
    DTYPES = (torch.bfloat16,)
else:
    CASES = [(TINY_VIT_TOKENS, TINY_VIT_WIDTH, TINY_LLM_HIDDEN, TINY_LLM_HIDDEN)]
    DTYPES = (torch.float32,)


class UnfusedAdapter(nn.Module):
    """The adapter as plain PyTorch: mean of each 2x2 window -> nn.Linear -> exact GELU -> nn.Linear."""

    def __init__(self, width: int, hidden: int, out: int, device, dtype):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, out, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.unflatten(0, (-1, 4)).mean(dim=1)
        return self.fc2(F.gelu(self.fc1(pooled)))


@functools.lru_cache(maxsize=1)
def _case(T: int, C: int, Fh: int, C_out: int, dtype: torch.dtype, device: torch.device):
    """Weights, inputs and the compiled model of one case, shared by its impls and passes (the tests
    of a case run one after another), so the compiled peer is built once per case. The op gets the
    same weights in the (in, out) row-major layout model/adapter.py stores."""
    model = UnfusedAdapter(C, Fh, C_out, device, dtype)
    compiled = torch.compile(model, dynamic=False, backend="inductor" if ON_GPU else "aot_eager")
    op_weights = [
        t.detach().clone().requires_grad_()
        for t in (
            model.fc1.weight.t().contiguous(),
            model.fc1.bias,
            model.fc2.weight.t().contiguous(),
            model.fc2.bias,
        )
    ]
    x = torch.randn(T, C, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(T // 4, C_out, device=device, dtype=dtype)
    return model, compiled, op_weights, x, dy


def _callable(impl: str, case: tuple, passes: str):
    """A no-argument callable running ``passes`` of ``impl`` on the case's weights and inputs."""
    model, compiled, op_weights, x, dy = case
    if impl == "eager_unfused":
        forward, weights = model, list(model.parameters())
    elif impl == "torch_compile_unfused":
        forward, weights = compiled, list(model.parameters())
    else:

        def forward(x):
            return pa.pool_adapter(x, *op_weights, impl=impl)

        weights = op_weights
    if passes == "fwd":
        return lambda: forward(x)
    inputs = [x, *weights]
    return lambda: torch.autograd.grad(forward(x), inputs, dy)


# Decorators nearest the function vary slowest: a case's impls and passes run back to back.
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("T,C,Fh,C_out", CASES, ids=lambda v: str(v))
def test_pool_adapter(gpu_bench, bench_device, impl, T, C, Fh, C_out, dtype, passes):
    if impl not in PEERS:
        harness.skip_unless_runnable("pool_adapter", impl, bench_device, dtype)
    case = _case(T, C, Fh, C_out, dtype, bench_device)
    forward_flops = 2 * (T // 4) * Fh * (C + C_out)
    peers = {name: _callable(name, case, passes) for name in PEERS}
    fn = peers[impl] if impl in PEERS else _callable(impl, case, passes)
    row = gpu_bench(
        fn,
        impl=impl,
        case={"T": T, "C": C, "F": Fh, "C_out": C_out, "pass": passes},
        dtype=dtype,
        flops=forward_flops * (1 if passes == "fwd" else 3),
        peers=peers,
        notes="" if ON_GPU or impl != "torch_compile_unfused" else "aot_eager backend on CPU",
    )
    assert row["time_ms"] > 0
