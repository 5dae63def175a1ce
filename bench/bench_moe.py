"""MoE routed-expert layer TFLOP/s at Qwen3 MoE shapes: the whole layer and each grouped GEMM.

Shapes come from the model presets (model/config.py): Qwen3-30B-A3B (hidden 2048, expert FFN 768)
and Qwen3-235B-A22B (hidden 4096, expert FFN 1536), both 128 experts, top-8; 4k and 16k tokens
(issue 6). Routing patterns, fixed seeds, built outside the timed call:

* ``balanced``: slot (t, j) goes to expert (t*k + j) mod E, every expert gets T*k/E rows;
* ``zipf``: k distinct experts per token drawn with probability ~ 1/rank^1.2 (at E = 128, k = 8
  the hottest expert gets ~12% of the slots, 15x the mean, the coldest ~0.1%);
* ``one_hot``: every token picks experts 0..k-1 (the most concentrated routing top-k allows: k
  groups of T rows, E-k empty);
* ``empty``: 1/8 of the experts receive nothing, the rest uniformly at random.

Rows (test ids say which):

* ``test_moe_layer``: moe_ffn, ``fwd`` (the training forward: inputs require grad, so what
  backward needs is kept) and ``fwd_bwd`` (forward plus all four gradients). Useful FLOPs: forward
  6*T*k*D*F, forward + backward three times that.
* ``test_moe_gemm``: each grouped GEMM of the layer (``gate_up``: M=T*k, K=D, N=2F; ``down``: K=F,
  N=D), pass ``fwd`` (a_e @ b[e]), ``dgrad`` (dC_e @ b[e]^T, M-grouped) or ``wgrad`` (a_e^T dC_e,
  K-grouped); 2*T*k*K*N FLOPs each.

Implementations: ``triton``, ``cuda`` and ``ref`` (the ops' own, through ``impl=``; the layer's
``cuda`` row is moe_permute -> CUTLASS grouped GEMM -> SwiGLU -> CUTLASS grouped GEMM ->
moe_unpermute, since moe_ffn has no fused CUDA kernel), and two peers doing the
same work in the same process: ``grouped_mm`` (torch._grouped_mm with the expert weights in the
column-major layout torchtitan passes it, the gather/scatter as index_select) and ``loop`` (a
per-expert torch.matmul loop, the cuBLAS baseline; it reads the group bounds on the host). The
layer peers use the same deterministic slot-order combine as the op; their SwiGLU runs in the
input dtype. The triton and cuda rows' notes give the padded-row fraction: rows computed in partial M-tiles,
sum_e (cdiv(size_e, BLOCK_M) * BLOCK_M - size_e) / (T*k).

Targets (issue 6, H100/H200): layer forward >= 2x grouped_mm and >= 450 TFLOP/s at hidden 4096
balanced; fwd_bwd >= 400; zipf within 10% of balanced. A GPU pass over everything is 2 shapes x 2
token counts x 4 routings x (2 layer + 6 GEMM passes) x 5 implementations; select with -k, e.g.
``pytest bench/bench_moe.py -k "balanced and 16384"``. On a CPU: the tiny preset, zipf routing, the
gate_up GEMM, reference and peers only (they prove the harness).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bench import harness
from model.config import LLM_TINY, QWEN3_30B_A3B, QWEN3_235B_A22B
from seedvl_kernels import grouped_gemm_triton as ggt
from seedvl_kernels.grouped_gemm import grouped_gemm
from seedvl_kernels.moe_ffn import moe_ffn, swiglu
from seedvl_kernels.moe_permute import moe_permute, moe_permute_index, moe_unpermute

ON_GPU = torch.cuda.is_available()
PEERS = ("grouped_mm", "loop")
IMPLS = ("triton", "cuda", "ref", *PEERS)
LAYER_PASSES = ("fwd", "fwd_bwd")
CUTLASS_BLOCK_M = 128  # M tile of the CUTLASS kernels (csrc/grouped_gemm/kernel.cuh)
GEMM_PASSES = ("fwd", "dgrad", "wgrad")
if ON_GPU:
    PRESETS = {"qwen3-30b-a3b": QWEN3_30B_A3B, "qwen3-235b-a22b": QWEN3_235B_A22B}
    TOKENS = (4096, 16384)
    ROUTINGS = ("balanced", "zipf", "one_hot", "empty")
    GEMMS = ("gate_up", "down")
    DTYPE = torch.bfloat16
else:
    PRESETS = {"llm-tiny": LLM_TINY}
    TOKENS = (64,)
    ROUTINGS = ("zipf",)
    GEMMS = ("gate_up",)
    DTYPE = torch.float32


# ----------------------------------------------------------------------------- cases


def _expert_ids(routing: str, T: int, E: int, k: int, g: torch.Generator) -> torch.Tensor:
    if routing == "balanced":
        ids = (torch.arange(T)[:, None] * k + torch.arange(k)) % E
    elif routing == "zipf":
        probs = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
        ids = torch.multinomial(probs.expand(T, E), k, replacement=False, generator=g)
    elif routing == "one_hot":
        ids = torch.arange(k).expand(T, k)
    elif routing == "empty":
        used = torch.randperm(E, generator=g)[: E - max(1, E // 8)]
        ids = used[torch.rand(T, used.numel(), generator=g).argsort(-1)[:, :k]]
    else:
        raise AssertionError(routing)
    return ids.to(torch.int32)


def padded_fraction(offsets: torch.Tensor, block_m: int) -> float:
    """Rows computed in partial M-tiles over useful rows (host-side, outside any timed call)."""
    sizes = (offsets[1:] - offsets[:-1]).long().cpu()
    used = int(sizes.sum())
    padded = int(((sizes + block_m - 1) // block_m * block_m - sizes).sum())
    return padded / max(used, 1)


@functools.lru_cache(maxsize=1)
def _case(preset: str, T: int, routing: str, dtype: torch.dtype, device: torch.device) -> SimpleNamespace:
    """Inputs of one (shape, tokens, routing), shared by its implementations and passes."""
    cfg = PRESETS[preset]
    D, FF, E, k = cfg.hidden, cfg.moe_ffn_dim, cfg.num_experts, cfg.top_k
    g = torch.Generator().manual_seed(0)
    ids = _expert_ids(routing, T, E, k, g).to(device)
    gate = torch.softmax(torch.randn(T, k, generator=g), -1).to(device)
    g_dev = torch.Generator(device=device).manual_seed(0)  # GiBs of weights: draw them on the device

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g_dev, device=device) * scale).to(dtype)

    x = rnd(T, D).requires_grad_()
    w_gate_up = rnd(E, D, 2 * FF, scale=D**-0.5).requires_grad_()
    w_down = rnd(E, FF, D, scale=FF**-0.5).requires_grad_()
    row_map, offsets = moe_permute_index(ids, E)
    inv = torch.empty_like(row_map)
    inv[row_map] = torch.arange(row_map.numel(), device=device)
    return SimpleNamespace(
        D=D, FF=FF, E=E, k=k, T=T, x=x, gate=gate.requires_grad_(), ids=ids,
        w_gate_up=w_gate_up, w_down=w_down,
        # The grouped_mm peer's weights: same values, stored (E, N, K), passed as transposed views.
        w_gate_up_t=w_gate_up.detach().transpose(1, 2).contiguous().requires_grad_(),
        w_down_t=w_down.detach().transpose(1, 2).contiguous().requires_grad_(),
        row_map=row_map, inv=inv, src=torch.div(row_map, k, rounding_mode="floor"), offsets=offsets,
        ends=offsets[1:].contiguous(), dy=rnd(T, D),
    )  # fmt: skip


# ----------------------------------------------------------------------------- layer peers


def _combine(y: torch.Tensor, c: SimpleNamespace) -> torch.Tensor:
    """Slot-order, fixed-order combine (as the op does): y in permuted order, gate-weighted."""
    w_perm = c.gate.reshape(-1).index_select(0, c.row_map).to(y.dtype)
    return (y * w_perm[:, None]).index_select(0, c.inv).view(c.T, c.k, c.D).sum(1)


def _layer_grouped_mm(c: SimpleNamespace) -> torch.Tensor:
    xp = c.x.index_select(0, c.src)
    gate, up = torch._grouped_mm(xp, c.w_gate_up_t.transpose(1, 2), offs=c.ends).chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, c.w_down_t.transpose(1, 2), offs=c.ends)
    return _combine(y, c)


def _layer_loop(c: SimpleNamespace) -> torch.Tensor:
    bounds = c.offsets.tolist()  # the host sync this peer pays
    xp = c.x.index_select(0, c.src)
    parts = []
    for e in range(c.E):
        lo, hi = bounds[e], bounds[e + 1]
        if lo < hi:
            gate, up = (xp[lo:hi] @ c.w_gate_up[e]).chunk(2, dim=-1)
            parts.append((F.silu(gate) * up) @ c.w_down[e])
    return _combine(torch.cat(parts), c)


def _layer_cuda(c: SimpleNamespace) -> torch.Tensor:
    """moe_ffn's composition with the CUTLASS grouped GEMMs (moe_ffn has no fused CUDA kernel)."""
    x_perm, offsets, row_map = moe_permute(c.x, c.ids, c.E)
    h = swiglu(grouped_gemm(x_perm, c.w_gate_up, offsets, impl="cuda"))
    return moe_unpermute(grouped_gemm(h, c.w_down, offsets, impl="cuda"), row_map, c.gate)


def _layer_callable(impl: str, c: SimpleNamespace, passes: str):
    if impl == "grouped_mm":
        forward, params = (lambda: _layer_grouped_mm(c)), (c.x, c.gate, c.w_gate_up_t, c.w_down_t)
    elif impl == "cuda":
        forward, params = (lambda: _layer_cuda(c)), (c.x, c.gate, c.w_gate_up, c.w_down)
    elif impl == "loop":
        forward, params = (lambda: _layer_loop(c)), (c.x, c.gate, c.w_gate_up, c.w_down)
    else:

        def forward():
            return moe_ffn(c.x, c.gate, c.ids, c.w_gate_up, c.w_down, impl=impl)

        params = (c.x, c.gate, c.w_gate_up, c.w_down)
    if passes == "fwd":
        return forward
    return lambda: torch.autograd.grad(forward(), params, c.dy)


# ----------------------------------------------------------------------------- GEMM peers


@functools.lru_cache(maxsize=1)
def _gemm_operands(preset: str, T: int, routing: str, gemm: str, dtype: torch.dtype, device: torch.device):
    c = _case(preset, T, routing, dtype, device)
    K, N = (c.D, 2 * c.FF) if gemm == "gate_up" else (c.FF, c.D)
    b = (c.w_gate_up if gemm == "gate_up" else c.w_down).detach()
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(T * c.k, K, generator=g, device=device).to(dtype)
    dc = torch.randn(T * c.k, N, generator=g, device=device).to(dtype)
    return SimpleNamespace(a=a, b=b, b_t=b.transpose(1, 2).contiguous(), dc=dc, K=K, N=N, c=c)


def _loop_gemm(passes: str, o: SimpleNamespace):
    offsets, E = o.c.offsets, o.c.E
    if passes == "wgrad":
        out = torch.empty_like(o.b)

        def run():
            bounds = offsets.tolist()
            for e in range(E):
                lo, hi = bounds[e], bounds[e + 1]
                if lo < hi:
                    torch.matmul(o.a[lo:hi].T, o.dc[lo:hi], out=out[e])
                else:
                    out[e].zero_()
            return out

        return run
    src, rows_out = (o.a, o.N) if passes == "fwd" else (o.dc, o.K)
    out = torch.empty(src.shape[0], rows_out, device=src.device, dtype=src.dtype)

    def run():
        bounds = offsets.tolist()
        for e in range(E):
            lo, hi = bounds[e], bounds[e + 1]
            if lo < hi:
                torch.matmul(src[lo:hi], o.b[e] if passes == "fwd" else o.b[e].T, out=out[lo:hi])
        return out

    return run


def _gemm_callable(impl: str, o: SimpleNamespace, passes: str):
    offsets, ends = o.c.offsets, o.c.ends
    if impl == "loop":
        return _loop_gemm(passes, o)
    if impl == "grouped_mm":
        if passes == "fwd":
            return lambda: torch._grouped_mm(o.a, o.b_t.transpose(1, 2), offs=ends)
        if passes == "dgrad":
            return lambda: torch._grouped_mm(o.dc, o.b.transpose(1, 2), offs=ends)
        return lambda: torch._grouped_mm(o.a.T, o.dc, offs=ends)
    if passes == "fwd":
        return lambda: grouped_gemm(o.a, o.b, offsets, impl=impl)
    if passes == "dgrad":
        return lambda: grouped_gemm(o.dc, o.b, offsets, trans_b=True, impl=impl)
    return lambda: torch.ops.seedvl.grouped_gemm_dw(o.a, o.dc, offsets, False, impl)


# ----------------------------------------------------------------------------- benchmarks


def _preflight(impl: str, fn) -> None:
    """A peer this torch build cannot run (e.g. _grouped_mm without a backward) is skipped with the
    reason; the op's own implementations must run."""
    if impl in PEERS:
        try:
            fn()
        except Exception as err:
            pytest.skip(f"{impl}: {type(err).__name__}: {err}"[:300])


def _notes(impl: str, offsets: torch.Tensor, n: int, k: int) -> str:
    if impl == "cuda":
        block_m = CUTLASS_BLOCK_M
    elif impl == "triton":
        block_m = ggt.m_grouped_config(n, k, DTYPE, offsets.device).block_m
    else:
        return ""
    return f"padded rows {100 * padded_fraction(offsets, block_m):.1f}% at BLOCK_M={block_m}"


# Decorators nearest the function vary slowest: a case's impls and passes run back to back.
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("passes", LAYER_PASSES)
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_moe_layer(gpu_bench, bench_device, preset, T, routing, passes, impl):
    if impl not in PEERS:  # the "cuda" layer is a composition around the CUTLASS grouped GEMMs
        op = "grouped_gemm" if impl == "cuda" else "moe_ffn"
        harness.skip_unless_runnable(op, impl, bench_device, DTYPE)
    c = _case(preset, T, routing, DTYPE, bench_device)
    peers = {name: _layer_callable(name, c, passes) for name in PEERS}
    fn = peers[impl] if impl in PEERS else _layer_callable(impl, c, passes)
    _preflight(impl, fn)
    forward_flops = 6 * T * c.k * c.D * c.FF
    row = gpu_bench(
        fn,
        impl=impl,
        case={"model": preset, "T": T, "routing": routing, "pass": passes},
        dtype=DTYPE,
        flops=forward_flops * (1 if passes == "fwd" else 3),
        peers=peers,
        notes=_notes(impl, c.offsets, c.FF, c.D),
    )
    assert row["time_ms"] > 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("passes", GEMM_PASSES)
@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_moe_gemm(gpu_bench, bench_device, preset, T, routing, gemm, passes, impl):
    if impl not in PEERS:
        harness.skip_unless_runnable("grouped_gemm", impl, bench_device, DTYPE)
    o = _gemm_operands(preset, T, routing, gemm, DTYPE, bench_device)
    peers = {name: _gemm_callable(name, o, passes) for name in PEERS}
    fn = peers[impl] if impl in PEERS else _gemm_callable(impl, o, passes)
    _preflight(impl, fn)
    row = gpu_bench(
        fn,
        impl=impl,
        case={"model": preset, "T": T, "routing": routing, "gemm": gemm, "pass": passes},
        dtype=DTYPE,
        flops=2 * T * o.c.k * o.K * o.N,
        peers=peers,
        notes=_notes(impl, o.c.offsets, o.N, o.K) if passes != "wgrad" else "",
    )
    assert row["time_ms"] > 0
