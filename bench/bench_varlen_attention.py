"""varlen_attention TFLOP/s on Seed-ViT packs, forward and backward, beside the attention peers.

Cases: 16k-token packs (SEEDVIT_TOKENS[1]) of Seed-ViT attention (20 heads, head dim 64, 2D RoPE,
bf16): uniform 1k-, 4k- and 16k-token images, a realistic mix of native-resolution images, and
64-token windows; the 1k-image pack at Qwen2-VL's ViT shape (16 heads, head dim 80: the split head
dim); plus one causal GQA LLM pack (head dim 128). Useful FLOPs: forward
4 * N * H * D with N = sum of visible (query, key) pairs (sum_b L_b^2 non-causal), backward 2.5x that
(recomputation not counted). "bwd" times the backward alone (the forward's graph is kept).

Rows per (case, pass): ``triton`` (RoPE fused: what the ViT runs), ``triton_no_rope`` (the same
kernels without pos_hw: the RoPE cost is the ratio of the two, target <= 5%), ``ref`` (skipped
where it would materialise more than REF_MAX_SCORES scores per sequence) and the peers, each timed
once per case in the same process, attention only (they do not rotate):
``flex`` FlexAttention with a document mask (block mask built outside the timed call), compiled;
``torch_varlen`` torch.nn.attention.varlen.varlen_attn (FlashAttention, where this torch has it);
``sdpa_per_image`` scaled_dot_product_attention called once per image (a host loop, as naive
model code would). Targets on H100/H200: ratio_to_peer["flex"] >= 1.2 forward and >= 1.1 backward;
>= 400 TFLOP/s forward on the uniform 1k/4k/16k packs.

On a CPU: one tiny pack, fp32, the reference and the peers (flex eager), to prove the harness runs.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from bench import harness
from bench.model_shapes import (
    SEEDVIT_HEAD_DIM,
    SEEDVIT_HEADS,
    SEEDVIT_ROPE_THETA,
    SEEDVIT_TOKENS,
    TINY_VIT_HEAD_DIM,
    TINY_VIT_HEADS,
)

va = importlib.import_module("seedvl_kernels.varlen_attention")

ON_GPU = torch.cuda.is_available()
PEERS = ("flex", "torch_varlen", "sdpa_per_image")
IMPLS = ("triton", "triton_no_rope", "ref", *PEERS)
PASSES = ("fwd", "bwd")
REF_MAX_SCORES = 1 << 29  # per sequence, heads included: the reference keeps S and P in fp32

# Image grids (rows, cols) in 14-px patches. The mix: native-resolution images of a VLM batch
# (for example 896x672 px -> 64x48 patches), 15,896 tokens.
_MIX = [(64, 48), (96, 54), (32, 32), (16, 16), (24, 36), (40, 30), (56, 42), (20, 28), (8, 8), (8, 8)]
_MIX += [(8, 8), (28, 22), (18, 32)]
_PACK = SEEDVIT_TOKENS[1]  # 16k tokens
if ON_GPU:
    VIT_CASES = {
        "1k_images": [(32, 32)] * (_PACK // 1024),
        "4k_images": [(64, 64)] * (_PACK // 4096),
        "16k_image": [(128, 128)],
        "mix": _MIX,
        "64_token_windows": [(8, 8)] * (_PACK // 64),
        "1k_images_d80": [(32, 32)] * (_PACK // 1024),
    }
    LLM_CASES = {"llm_causal_gqa": ([2048] * 6 + [1024, 512, 256, 256], 32, 4, 128)}  # docs, Hq, Hkv, D
    DTYPE = torch.bfloat16
else:
    VIT_CASES = {"tiny_mix": [(4, 4), (2, 3), (1, 1), (5, 2)]}
    LLM_CASES = {"tiny_causal": ([9, 3, 14], 2, 1, TINY_VIT_HEAD_DIM)}
    DTYPE = torch.float32
# (heads, head dim) of the ViT cases that are not Seed-ViT's: Qwen2-VL's ViT, 16 heads x 80 (width
# 1280), a head dim between powers of 2 that the kernels split into 64 + 16 columns.
VIT_HEAD_SHAPES = {"1k_images_d80": (16, 80)}
CASES = [*VIT_CASES, *LLM_CASES]


@functools.lru_cache(maxsize=1)
def _pack(case: str, device: torch.device):
    """Inputs of one case, shared by its impls and passes (their tests run back to back)."""
    if case in VIT_CASES:
        sizes = VIT_CASES[case]
        lengths = [h * w for h, w in sizes]
        heads = SEEDVIT_HEADS if ON_GPU else TINY_VIT_HEADS
        heads, d = VIT_HEAD_SHAPES.get(case, (heads, SEEDVIT_HEAD_DIM if ON_GPU else TINY_VIT_HEAD_DIM))
        hq, hkv, causal = heads, heads, False
        grids = [
            torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1) for h, w in sizes
        ]
        pos = torch.cat([g.reshape(-1, 2) for g in grids]).to(device=device, dtype=torch.int32)
    else:
        lengths, hq, hkv, d = LLM_CASES[case]
        causal, pos = True, None
    T = sum(lengths)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(T, h, d, device=device, dtype=DTYPE, generator=g).requires_grad_() for h in (hq, hkv, hkv)
    )
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    visible = sum(n * (n + 1) // 2 if causal else n * n for n in lengths)
    return dict(
        q=q, k=k, v=v, cu=cu, lengths=lengths, pos=pos, causal=causal, max_len=max(lengths),
        flops_fwd=4 * visible * hq * d, dout=torch.randn(T, hq, d, device=device, dtype=DTYPE, generator=g),
    )  # fmt: skip


def _op(p: dict, impl: str, rope: bool):
    def run():
        return va.varlen_attention(
            p["q"], p["k"], p["v"], p["cu"], p["max_len"], causal=p["causal"], impl=impl,
            pos_hw=p["pos"] if rope else None, rope_theta=SEEDVIT_ROPE_THETA,
        )  # fmt: skip

    return run


def _flex(p: dict, pass_: str):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    device = p["q"].device
    doc = torch.repeat_interleave(
        torch.arange(len(p["lengths"]), device=device), torch.tensor(p["lengths"], device=device)
    )
    causal = p["causal"]

    def mask_mod(b, h, q_idx, kv_idx):
        same = doc[q_idx] == doc[kv_idx]
        return same & (kv_idx <= q_idx) if causal else same

    T = doc.numel()
    block_mask = create_block_mask(mask_mod, None, None, T, T, device=device)
    fn = torch.compile(flex_attention, dynamic=False) if ON_GPU else flex_attention
    grad = pass_ == "bwd" or ON_GPU  # CPU flex has no backward, and refuses inputs that need one
    q, k, v = (
        t.detach().transpose(0, 1).unsqueeze(0).contiguous().requires_grad_(grad)
        for t in (p["q"], p["k"], p["v"])
    )
    gqa = q.shape[1] != k.shape[1]
    return lambda: fn(q, k, v, block_mask=block_mask, enable_gqa=gqa), (q, k, v)


def _torch_varlen(p: dict, pass_: str):
    from torch.nn.attention.varlen import varlen_attn  # absent before torch 2.10: the peer errors

    params = inspect.signature(varlen_attn).parameters  # its keywords changed between torch releases
    kw = {}
    if p["causal"]:
        kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    q, k, v = p["q"], p["k"], p["v"]
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:  # repeat KV heads outside the timed call
            group = q.shape[1] // k.shape[1]
            k, v = (t.detach().repeat_interleave(group, dim=1).requires_grad_() for t in (k, v))
    m = p["max_len"]
    return lambda: varlen_attn(q, k, v, p["cu"], p["cu"], m, m, **kw), (q, k, v)


def _sdpa_per_image(p: dict, pass_: str):
    bounds = torch.tensor([0, *p["lengths"]]).cumsum(0).tolist()
    group = p["q"].shape[1] // p["k"].shape[1]

    def run():
        outs = []
        for a, b in itertools.pairwise(bounds):
            q, k, v = (t[a:b].transpose(0, 1)[None] for t in (p["q"], p["k"], p["v"]))
            outs.append(
                F.scaled_dot_product_attention(q, k, v, is_causal=p["causal"], enable_gqa=group > 1)[
                    0
                ].transpose(0, 1)
            )
        return torch.cat(outs)

    return run, None


def _timed(make, p: dict, pass_: str):
    """The callable to time: the forward, or the backward of a forward run once here."""
    built = make(p, pass_)
    fwd, leaves = built if isinstance(built, tuple) else (built, None)
    if pass_ == "fwd":
        return fwd
    leaves = leaves or (p["q"], p["k"], p["v"])
    out = fwd()
    dout = p["dout"] if out.shape == p["dout"].shape else torch.randn_like(out)
    return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)


_PEER_MAKERS = {"flex": _flex, "torch_varlen": _torch_varlen, "sdpa_per_image": _sdpa_per_image}


def _peer_unavailable(name: str, pass_: str) -> str | None:
    if name == "torch_varlen" and importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if name == "torch_varlen" and not ON_GPU:
        return "torch.nn.attention.varlen runs FlashAttention on CUDA only"
    if name == "flex" and pass_ == "bwd" and not ON_GPU:
        return "FlexAttention has no backward on CPU"
    return None


# Decorators nearest the function vary slowest: a case's impls run back to back.
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("case", CASES)
def test_varlen_attention(gpu_bench, bench_device, impl, pass_, case):
    if impl not in PEERS:
        harness.skip_unless_runnable("varlen_attention", impl.removesuffix("_no_rope"), bench_device, DTYPE)
    elif (reason := _peer_unavailable(impl, pass_)) is not None:
        pytest.skip(f"peer {impl}: {reason}")
    p = _pack(case, bench_device)
    longest = max(p["lengths"])
    if impl == "ref" and p["q"].shape[1] * longest * longest > REF_MAX_SCORES:
        pytest.skip(
            f"ref materialises Hq x L^2 = {p['q'].shape[1] * longest**2} scores for the longest sequence"
        )
    rope = p["pos"] is not None and impl != "triton_no_rope"
    makers = {
        "triton": lambda p_, _: _op(p_, "triton", rope),
        "triton_no_rope": lambda p_, _: _op(p_, "triton", False),
        "ref": lambda p_, _: _op(p_, "ref", rope),
    }
    peers = {
        name: _lazy(_PEER_MAKERS[name], p, pass_) for name in PEERS if _peer_unavailable(name, pass_) is None
    }
    fn = _timed(makers[impl], p, pass_) if impl not in PEERS else peers[impl]
    flops = p["flops_fwd"] * (1.0 if pass_ == "fwd" else 2.5)
    cpu_note = "" if ON_GPU else "CPU: flex runs eagerly"
    row = gpu_bench(
        fn,
        impl=impl,
        case={"pack": case, "T": p["q"].shape[0], "H": p["q"].shape[1], "D": p["q"].shape[2], "pass": pass_},
        dtype=DTYPE,
        flops=flops,
        peers=peers,
        notes=f"rope={'fused' if rope else 'none'}" + (f"; {cpu_note}" if cpu_note else ""),
    )
    assert row["time_ms"] > 0 and math.isfinite(row["time_ms"])


def _lazy(make, p: dict, pass_: str):
    """A peer callable that builds itself on first use, so a failing peer (missing API, compile
    error) is recorded by the harness as that peer's error instead of failing every row."""
    state: dict = {}

    def run():
        if "fn" not in state:
            state["fn"] = _timed(make, p, pass_)
        return state["fn"]()

    return run
