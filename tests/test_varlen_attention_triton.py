"""varlen_attention, Triton implementation (seedvl_kernels/varlen_attention_triton.py) against the
reference: forward, lse, backward with a gradient into lse, fused 2D RoPE, padding, empty and
one-token sequences, one long sequence among many tiny ones, GQA, bottom-right causal with unequal
lengths, the backward with global out/lse (ring attention), the device-built schedule,
determinism, opcheck and torch.compile.

On CPU the kernels run in the Triton interpreter (tests/conftest.py), in fp32 and fp16 with small
shapes and 16-row tiles (several blocks and partial blocks per sequence); bf16 and real sizes are
the `gpu` tests at the end.
"""

from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch

from tests.utils import assert_close, assert_matches_ref_error, tol

va = importlib.import_module("seedvl_kernels.varlen_attention")  # the module, not the function

vat = importlib.import_module("seedvl_kernels.varlen_attention_triton")
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
NEG_INF = float("-inf")


def _cu(lengths: list[int]) -> torch.Tensor:
    offsets = [0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()]
    return torch.tensor(offsets, dtype=torch.int32, device=DEVICE)


def _case(lens_q, lens_k=None, hq=2, hkv=1, d=32, pad_q=0, pad_k=0, rope=False, dtype=torch.float32):
    """Packed inputs (padding rows included) and the call's keyword arguments."""
    shared = lens_k is None
    lens_k_ = lens_q if shared else lens_k
    q = torch.randn(sum(lens_q) + pad_q, hq, d, dtype=dtype, device=DEVICE)
    k = torch.randn(sum(lens_k_) + (pad_q if shared else pad_k), hkv, d, dtype=dtype, device=DEVICE)
    v = torch.randn_like(k)
    kw = {"cu_seqlens": _cu(lens_q), "max_seqlen": max(lens_q, default=0)}
    if not shared:
        kw.update(cu_seqlens_k=_cu(lens_k_), max_seqlen_k=max(lens_k_, default=0))
    if rope:
        kw["pos_hw"] = torch.randint(0, 40, (q.shape[0], 2), dtype=torch.int32, device=DEVICE)
    return q, k, v, kw


def _run(q, k, v, kw, impl, g_out, g_lse):
    """(out, lse, dq, dk, dv) of the public op for output gradients g_out, g_lse."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = va.varlen_attention(*leaves, **kw, impl=impl, return_lse=True)
    grads = torch.autograd.grad([out, lse], leaves, [g_out.to(out.dtype), g_lse.to(lse.dtype)])
    return out.detach(), lse.detach(), *grads


def _compare(q, k, v, kw, scale_tol=4.0, name=""):
    """Triton (in q's dtype) against the reference in float64 on the same values."""
    g_out = torch.randn(q.shape, dtype=torch.float64, device=q.device)
    g_lse = torch.randn(q.shape[1], q.shape[0], dtype=torch.float64, device=q.device)  # also on -inf rows
    got = _run(q, k, v, kw, "triton", g_out, g_lse)
    ref = _run(q.double(), k.double(), v.double(), kw, "ref", g_out, g_lse)
    assert got[0].dtype == q.dtype and got[1].dtype == torch.float32
    for label, a, e in zip(("out", "lse", "dq", "dk", "dv"), got, ref, strict=True):
        assert not a.isnan().any(), f"{name} {label}: NaN"
        assert_close(a, e, f"{name} {label} {q.dtype}", **tol(q.dtype, scale_tol))
    return got


CASES = {
    "noncausal": dict(lens_q=[5, 17, 40]),
    "causal": dict(lens_q=[5, 17, 40], causal=True),
    "causal_lq_ne_lk": dict(lens_q=[6, 9, 3, 20, 4], lens_k=[4, 12, 3, 35, 0], causal=True),
    "noncausal_lq_ne_lk": dict(lens_q=[6, 19, 2], lens_k=[21, 12, 0]),
    "gqa": dict(lens_q=[7, 33], hq=6, hkv=2, causal=True),
    "mqa_scale": dict(lens_q=[9, 20], hq=4, hkv=1, scale=0.3),
    "empty_first_middle_last": dict(lens_q=[0, 7, 0, 18, 0], causal=True),
    "padding": dict(lens_q=[6, 19], lens_k=[21, 8], pad_q=5, pad_k=3, causal=True),
    "long_among_tiny": dict(lens_q=[1] * 6 + [70] + [1, 2] * 2 + [0], causal=True, hq=2, hkv=1),
    "d72_gqa": dict(lens_q=[13, 20], hq=4, hkv=2, d=72),
    "d80_causal": dict(lens_q=[10, 23], d=80, causal=True, hq=2, hkv=2),
    "d8": dict(lens_q=[3, 18], d=8),
    "rope": dict(lens_q=[7, 0, 33], hq=4, hkv=2, rope=True, pad_q=5),
    "rope_causal_d40": dict(lens_q=[7, 26], d=40, rope=True, pad_q=3, causal=True),
}


def _split(case: dict) -> tuple[dict, dict]:
    kw = dict(case)
    call = {"causal": kw.pop("causal", False), "softmax_scale": kw.pop("scale", None)}
    return kw, call


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case):
    inputs, call = _split(CASES[case])
    q, k, v, kw = _case(**inputs)
    out, lse, dq, dk, dv = _compare(q, k, v, {**kw, **call}, name=case)
    end_q = int(kw["cu_seqlens"][-1])
    assert not out[end_q:].any() and torch.isneginf(lse[:, end_q:]).all() and not dq[end_q:].any()
    end_k = int(kw.get("cu_seqlens_k", kw["cu_seqlens"])[-1])
    assert not dk[end_k:].any() and not dv[end_k:].any()


@pytest.mark.parametrize("case", ["rope", "gqa"])
def test_matches_reference_fp16(case):
    inputs, call = _split(CASES[case])
    q, k, v, kw = _case(**inputs, dtype=torch.float16)
    _compare(q, k, v, {**kw, **call}, scale_tol=8.0, name=case)


@pytest.mark.parametrize(
    "tiles",
    [vat.Tiles(32, 16, 16, 32, 16, 32), vat.Tiles(16, 32, 32, 16, 32, 16)],
    ids=["wide_m", "wide_n"],
)
def test_unequal_tiles(monkeypatch, tiles):
    """Tiles with BLOCK_M != BLOCK_N: several masked blocks on the causal diagonal, in both kernels."""
    monkeypatch.setattr(vat, "tiles_for", lambda *args: tiles)
    q, k, v, kw = _case([9, 40, 1], [30, 47, 0], hq=4, hkv=2)
    _compare(q, k, v, {**kw, "causal": True}, name=str(tiles))
    q, k, v, kw = _case([9, 40, 1], hq=2, hkv=2, d=24, rope=True, pad_q=2)  # rope over 2 row chunks
    _compare(q, k, v, kw, name=f"rope {tiles}")


@pytest.mark.parametrize(
    "d,rope,pieces",
    [
        ((72, False, (64, 16))), ((80, True, (64, 16))), ((96, False, (64, 32))), ((40, True, (32, 16))),
        ((160, True, (128, 32))), ((64, True, (64, 0))), ((128, False, (128, 0))), ((24, True, (32, 0))),
        ((8, False, (16, 0))),
    ],
)  # fmt: skip
def test_head_dim_split(d, rope, pieces):
    """Head dims between powers of 2 run as two power-of-2 pieces where that is narrower than one
    padded block (72 and 80: 64 + 16 columns, not 128), each piece at least 16 wide (a dot's K)."""
    assert vat.split_d(d, rope) == pieces
    da, db = pieces
    assert da + db >= d and min(da, db or 16) >= 16


# The sm_90 tiles (tiles_for on a CUDA device) under the interpreter, in fp32: BLOCK_M 128 forward,
# 32 x 128 dK/dV at D <= 64, 32-row RoPE chunks, the head-dim split above 64. Sequences past one
# 128-row tile, a partial tile, a one-token and an empty one, padding rows.
GPU_TILE_CASES = {
    "vit_d64_rope": dict(lens_q=[150, 1, 0, 37], hq=2, hkv=2, d=64, rope=True, pad_q=3),
    "llm_d128_causal_gqa": dict(lens_q=[140, 1, 30], hq=4, hkv=2, d=128, causal=True, pad_q=2),
    "d80_rope": dict(lens_q=[131, 9], hq=2, hkv=1, d=80, rope=True, pad_q=1),
    "d72_causal": dict(lens_q=[133, 0, 20], hq=2, hkv=1, d=72, causal=True),
}


@pytest.mark.parametrize("case", list(GPU_TILE_CASES))
def test_matches_reference_at_the_gpu_tiles(monkeypatch, case):
    inputs, call = _split(GPU_TILE_CASES[case])
    gpu = vat.tiles_for(torch.device("cuda"), inputs["d"], 256, 256)
    assert gpu.fwd_m == 128 and gpu.rope_rows == 32, gpu
    monkeypatch.setattr(vat, "tiles_for", lambda *args: gpu)
    q, k, v, kw = _case(**inputs)
    _compare(q, k, v, {**kw, **call}, name=f"{case} at {gpu}")


@pytest.mark.parametrize("case", ["vit_d64_rope", "d72_causal"])
def test_forward_with_128_key_blocks_at_the_gpu_tiles(monkeypatch, case):
    """BLOCK_N 128, the forward's other key block on a GPU (an autotune dimension there; here the
    launcher passes the tiles' fwd_n): full and partial 128-key blocks, causal diagonal crossings."""
    inputs, call = _split(GPU_TILE_CASES[case])
    gpu = dataclasses.replace(vat.tiles_for(torch.device("cuda"), inputs["d"], 256, 256), fwd_n=128)
    monkeypatch.setattr(vat, "tiles_for", lambda *args: gpu)
    q, k, v, kw = _case(**inputs)
    _compare(q, k, v, {**kw, **call}, name=f"{case} at {gpu}")


def _spy_ws(monkeypatch) -> list[int]:
    """Select the warp-specialized forward ($SEEDVL_ATTENTION_WS=1) and count its launches."""
    monkeypatch.setenv(vat.WS_ENV, "1")
    launched, launch = [], vat._launch_fwd_ws
    monkeypatch.setattr(vat, "_launch_fwd_ws", lambda *a, **k: launched.append(1) or launch(*a, **k))
    return launched


WS_CASES = [
    "noncausal", "causal_lq_ne_lk", "gqa", "empty_first_middle_last", "padding", "long_among_tiny",
    "d72_gqa", "rope", "rope_causal_d40",
]  # fmt: skip


@pytest.mark.parametrize("case", WS_CASES)
def test_warp_specialized_forward_matches_reference(monkeypatch, case):
    """The warp-specialized forward (one masked key loop over TMA descriptors, q rotated before the
    launch, padding rows from its own kernel) against the reference, with the usual backward."""
    launched = _spy_ws(monkeypatch)
    inputs, call = _split(CASES[case])
    q, k, v, kw = _case(**inputs)
    out, lse, dq, _, _ = _compare(q, k, v, {**kw, **call}, name=f"ws {case}")
    assert launched == [1]
    end_q = int(kw["cu_seqlens"][-1])
    assert not out[end_q:].any() and torch.isneginf(lse[:, end_q:]).all() and not dq[end_q:].any()


@pytest.mark.parametrize("case", list(GPU_TILE_CASES))
def test_warp_specialized_forward_at_the_gpu_tiles(monkeypatch, case):
    """At the sm_90 tiles (128 x 64): descriptors of 128 query rows over sequences shorter and longer
    than one tile, the head-dim split (64 + 16 columns, the second piece read at column 64)."""
    launched = _spy_ws(monkeypatch)
    inputs, call = _split(GPU_TILE_CASES[case])
    gpu = vat.tiles_for(torch.device("cuda"), inputs["d"], 256, 256)
    monkeypatch.setattr(vat, "tiles_for", lambda *args: gpu)
    q, k, v, kw = _case(**inputs)
    _compare(q, k, v, {**kw, **call}, name=f"ws {case} at {gpu}")
    assert launched == [1]


def test_warp_specialized_forward_fp16_and_rotated_q(monkeypatch):
    """fp16, and the rotated q the op returns equals the plain kernel's (both round as rope_2d)."""
    q, k, v, kw = _case([7, 0, 33], hq=4, hkv=2, rope=True, pad_q=5, dtype=torch.float16)
    args = (q, k, v, kw["cu_seqlens"], kw["cu_seqlens"], 33, 33, False, 0.25, kw["pos_hw"], 1e4, "triton")
    plain = torch.ops.seedvl.varlen_attention_fwd(*args)
    launched = _spy_ws(monkeypatch)
    ws = torch.ops.seedvl.varlen_attention_fwd(*args)
    assert launched == [1]
    assert torch.equal(ws[2], plain[2]) and torch.equal(ws[3], plain[3])  # q_rot, k_rot
    assert_close(ws[0], plain[0], "out", **tol(torch.float16, 4))
    _compare(q, k, v, kw, scale_tol=8.0, name="ws fp16 rope")


def test_warp_specialized_forward_falls_back_and_validates(monkeypatch):
    """Inputs TMA cannot address (a head stride of 17 fp32 elements, not a multiple of 16 bytes) run
    the plain kernel; the switch takes 0 or 1 only."""
    q, k, v, kw = _case([5, 20], hq=2, hkv=2, d=16)
    q17 = torch.zeros(q.shape[0], 2, 17, device=DEVICE)[..., :16].copy_(q)
    assert not vat.tma_compatible(q17) and vat.tma_compatible(q)
    args = (k, v, kw["cu_seqlens"], kw["cu_seqlens"], 20, 20, False, 0.25, None, 1e4, "triton")
    expected = torch.ops.seedvl.varlen_attention_fwd(q, *args)
    launched = _spy_ws(monkeypatch)
    got = torch.ops.seedvl.varlen_attention_fwd(q17, *args)
    assert launched == []
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    monkeypatch.setenv(vat.WS_ENV, "yes")
    with pytest.raises(ValueError, match="SEEDVL_ATTENTION_WS"):
        va.varlen_attention(q, k, v, **kw, impl="triton")


def test_dkdv_splits_rule():
    # 2k tokens, 4 KV heads, 64-row key tiles on 132 SMs: 128 programs -> 256 -> 512 (>= 2 per SM)
    assert vat.dkdv_splits(32, 4, 8, 132) == 4
    assert vat.dkdv_splits(224, 4, 8, 132) == 1  # the 14k-token LLM pack already fills the GPU
    assert vat.dkdv_splits(1, 1, 6, 132) == 2  # a split always divides the group
    assert vat.dkdv_splits(1, 4, 1, 132) == 1  # no GQA: nothing to split
    assert vat.dkdv_splits(1, 1, 8, 0) == 1  # the interpreter


# The GQA split of dK/dV (dkdv_splits > 1: fp32 partials per part of each group, summed by the
# launcher) at the sm_90 tiles, with the SM count of an H100 so that the rule splits (4 parts).
GQA_SPLIT_CASES = {
    "d128_causal": dict(lens_q=[140, 1, 30], hq=8, hkv=2, d=128, causal=True, pad_q=2),
    "d64_rope": dict(lens_q=[150, 1, 0, 37], hq=4, hkv=1, d=64, rope=True, pad_q=3),
}


@pytest.mark.parametrize("case", list(GQA_SPLIT_CASES))
def test_gqa_split_dkdv_at_the_gpu_tiles(monkeypatch, case):
    inputs, call = _split(GQA_SPLIT_CASES[case])
    gpu = vat.tiles_for(torch.device("cuda"), inputs["d"], 256, 256)
    monkeypatch.setattr(vat, "tiles_for", lambda *args: gpu)
    monkeypatch.setattr(vat, "_num_sms", lambda device: 132)
    chosen, rule = [], vat.dkdv_splits
    monkeypatch.setattr(vat, "dkdv_splits", lambda *args: chosen.append(rule(*args)) or chosen[-1])
    q, k, v, kw = _case(**inputs)
    _compare(q, k, v, {**kw, **call}, name=f"{case} at {gpu}")
    assert chosen == [4], chosen


def test_fwd_op_returns_rotated_q_and_k():
    q, k, v, kw = _case([5, 21], hq=2, hkv=1, d=16, pad_q=3, rope=True)
    args = (q, k, v, kw["cu_seqlens"], kw["cu_seqlens"], 21, 21, False, 0.25, kw["pos_hw"], 1e4)
    fwd = torch.ops.seedvl.varlen_attention_fwd
    got, ref = fwd(*args, "triton"), fwd(*args, "ref")
    for label, a, e in zip(("out", "lse", "q_rot", "k_rot"), got, ref, strict=True):
        assert_close(a, e, label, **tol(torch.float32, 4))
    assert not got[2][26:].any()
    no_rope = fwd(*args[:9], None, 1e4, "triton")
    assert no_rope[2].shape == (0,) and no_rope[3].shape == (0,)


def test_backward_takes_global_out_and_lse():
    """Ring attention: each key block's backward with the merged out/lse sums to the full gradient;
    also dlse=None."""
    lens_q, lens_k, cuts = [5, 20], [23, 9], [14, 4]
    q, k, v, kw = _case(lens_q, lens_k, hq=4, hkv=2, d=16)
    cu_q, cu_k = kw["cu_seqlens"], kw["cu_seqlens_k"]
    starts = cu_k[:-1].tolist()
    bounds = list(zip(cuts, lens_k, starts, strict=True))
    idx = [
        torch.cat([torch.arange(s, s + c, device=DEVICE) for c, _, s in bounds]),  # keys [0, cut)
        torch.cat([torch.arange(s + c, s + n, device=DEVICE) for c, n, s in bounds]),  # keys [cut, n)
    ]
    cus = [_cu(cuts), _cu([n - c for n, c in zip(lens_k, cuts, strict=True)])]
    fwd, bwd = torch.ops.seedvl.varlen_attention_fwd, torch.ops.seedvl.varlen_attention_bwd
    parts = [
        fwd(q, k[i], v[i], cu_q, c, 20, 23, False, 0.25, None, 1e4, "triton")
        for i, c in zip(idx, cus, strict=True)
    ]
    lse = torch.logaddexp(parts[0][1], parts[1][1])
    out = sum(torch.exp(part[1] - lse).T[..., None] * part[0] for part in parts)
    dout = torch.randn_like(q)
    for dlse in (torch.randn_like(lse), None):
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for i, c in zip(idx, cus, strict=True):
            gq, gk, gv = bwd(
                dout, dlse, q, k[i], v[i], out, lse, cu_q, c, 20, 23, False, 0.25, None, 1e4, "triton"
            )
            dq += gq
            dk[i], dv[i] = gk, gv
        full = va.varlen_attention_bwd_ref(dout, dlse, q, k, v, out, lse, cu_q, cu_k, False, 0.25)
        for label, a, e in zip(("dq", "dk", "dv"), (dq, dk, dv), full, strict=True):
            assert_close(
                a, e, f"split-key {label} dlse={'None' if dlse is None else 'given'}", **tol(torch.float32, 4)
            )


# Inputs rounded to half precision: fp16 in the interpreter (its bf16 dot products are wrong), bf16 on a GPU.
HALF = torch.bfloat16 if ON_GPU else torch.float16


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no_rope"])
@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_ops_out_dtype_fp32_keeps_partials_unrounded(impl, rope):
    """out_dtype=float32 (ring attention's per-block partials): out, dq, dk, dv come back in fp32, not
    already rounded, and rounding them gives exactly the default outputs; the rope and padding rows
    too. Autograd through an fp32 out works (its gradients differ from the default path's only in
    rowsum(dO * O), which sees the unrounded O)."""
    q, k, v, kw = _case([9, 30], hq=4, hkv=2, d=16, pad_q=3, rope=rope, dtype=HALF)
    cu, pos = kw["cu_seqlens"], kw.get("pos_hw")
    fwd, bwd = torch.ops.seedvl.varlen_attention_fwd, torch.ops.seedvl.varlen_attention_bwd
    args = (cu, cu, 30, 30, True, 0.25, pos, 1e4, impl)
    rounded, full = fwd(q, k, v, *args), fwd(q, k, v, *args, torch.float32)
    assert full[0].dtype == torch.float32 and full[2].dtype == HALF  # rotated q, k (or empties): q's dtype
    assert torch.equal(full[0].to(HALF), rounded[0]) and (full[0] != rounded[0].float()).any()
    for a, b in zip(rounded[1:], full[1:], strict=True):
        assert torch.equal(a, b)
    out, lse, qr, kr = rounded
    qr, kr = (qr, kr) if rope else (q, k)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    g_rounded = bwd(dout, dlse, qr, kr, v, out, lse, *args)
    g_full = bwd(dout, dlse, qr, kr, v, out, lse, *args, torch.float32)
    for label, a, b in zip(("dq", "dk", "dv"), g_rounded, g_full, strict=True):
        assert b.dtype == torch.float32, label
        assert torch.equal(b.to(HALF), a) and (b != a.float()).any(), label
    grads = []
    for out_dtype in (None, torch.float32):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o, *_ = fwd(*leaves, *args, out_dtype)
        grads.append(torch.autograd.grad(o, leaves, dout.to(o.dtype)))
    for label, a, b in zip(("dq", "dk", "dv"), *grads, strict=True):
        assert_close(b, a, f"autograd through an fp32 out: {label}", **tol(HALF))


def test_empty_pack_and_all_padding():
    q, k, v, kw = _case([0, 0], hq=2, hkv=1, d=16, pad_q=6)
    g_out, g_lse = torch.randn(q.shape, device=DEVICE), torch.randn(2, q.shape[0], device=DEVICE)
    out, lse, dq, dk, dv = _run(q, k, v, kw, "triton", g_out, g_lse)
    assert not out.any() and torch.isneginf(lse).all() and not dq.any() and not dk.any() and not dv.any()
    q, k, v, kw = _case([], hq=2, hkv=1, d=16)
    g_out, g_lse = torch.randn(q.shape, device=DEVICE), torch.randn(2, 0, device=DEVICE)
    out, lse, dq, dk, dv = _run(q, k, v, kw, "triton", g_out, g_lse)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0) and dq.shape == q.shape


def test_rows_without_keys_are_zero_with_zero_grads():
    q, k, v, kw = _case([19], [3], d=16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = va.varlen_attention(q, k, v, **kw, causal=True, return_lse=True, impl="triton")
    assert not out[:16].any() and torch.isneginf(lse[:, :16]).all() and torch.isfinite(lse[:, 16:]).all()
    dq, dk, dv = torch.autograd.grad(out.sum() + lse[:, 16:].sum(), (q, k, v))
    assert not dq[:16].any() and all(torch.isfinite(g).all() for g in (dq, dk, dv))


def test_gradient_through_lse_only():
    """Only lse used: autograd passes no output gradient (the backward runs with dO = 0)."""
    q, k, v, kw = _case([5, 12], hq=2, hkv=1, d=16, rope=True)
    grads = {}
    for impl in ("triton", "ref"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        _, lse = va.varlen_attention(*leaves, **kw, return_lse=True, impl=impl)
        grads[impl] = torch.autograd.grad(lse.sum(), leaves)
    for label, a, e in zip(("dq", "dk", "dv"), grads["triton"], grads["ref"], strict=True):
        assert_close(a, e, f"lse-only {label}", **tol(torch.float32, 4))


def test_backward_is_deterministic():
    q, k, v, kw = _case([33, 6], hq=4, hkv=1, d=16, rope=True)
    g_out, g_lse = torch.randn(q.shape, device=DEVICE), torch.randn(4, q.shape[0], device=DEVICE)
    first = _run(q, k, v, {**kw, "causal": True}, "triton", g_out, g_lse)
    second = _run(q, k, v, {**kw, "causal": True}, "triton", g_out, g_lse)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_schedule_longest_first_and_table():
    lens = [3, 0, 40, 17, 40, 1]
    cu = _cu(lens)
    block = 16
    n = vat.max_tiles(int(cu[-1]) + 7, len(lens), max(lens), block)
    (sched,) = vat._schedules([(cu, cu, int(cu[-1]) + 7, max(lens), block)])
    first, count, start, length, *_, end = sched.records.tolist()
    assert length == [40, 40, 17, 3, 1, 0] and start[:2] == [3, 60]  # longest first, stable on ties
    assert count == [math.ceil(x / block) for x in length]
    assert first == [e - c for e, c in zip(end, count, strict=True)]
    table = sched.table[:n].tolist()
    expected = [i for i, c in enumerate(count) for _ in range(c)]
    assert table[: len(expected)] == expected and all(t == len(lens) for t in table[len(expected) :])


@pytest.mark.parametrize("seed", range(20))
def test_tile_bound_holds(seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, 300, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
    for block in (16, 64, 128):
        real = sum(math.ceil(x / block) for x in lens)
        pad = int(torch.randint(0, 100, (1,), generator=g))
        assert real <= vat.max_tiles(sum(lens) + pad, len(lens), max(lens), block)


def test_opcheck_fwd_and_bwd():
    fwd, bwd = torch.ops.seedvl.varlen_attention_fwd.default, torch.ops.seedvl.varlen_attention_bwd.default
    q, k, v, kw = _case([3, 0, 17], hq=2, hkv=1, d=16, pad_q=2, rope=True)
    cu, pos = kw["cu_seqlens"], kw["pos_hw"]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(fwd, (*leaves, cu, cu, 17, 17, True, 0.3, pos, 1e4, "triton"))
    out, lse, qr, kr = fwd(q, k, v, cu, cu, 17, 17, True, 0.3, pos, 1e4, "triton")
    args = (torch.randn_like(out), torch.randn_like(lse), qr, kr, v, out, lse, cu, cu, 17, 17, True, 0.3)
    torch.library.opcheck(bwd, (*args, pos, 1e4, "triton"))


def test_torch_compile_fullgraph():
    q, k, v, kw = _case([4, 0, 19], hq=2, hkv=1, d=16, pad_q=1, rope=True)

    def f(q, k, v, cu, pos):
        out, lse = va.varlen_attention(
            q, k, v, cu, 19, causal=True, pos_hw=pos, return_lse=True, impl="triton"
        )
        return (out * 2).sum() + lse[:, :23].sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    loss = compiled(*leaves, kw["cu_seqlens"], kw["pos_hw"])
    grads = torch.autograd.grad(loss, leaves)
    leaves_e = [t.clone().requires_grad_() for t in (q, k, v)]
    loss_e = f(*leaves_e, kw["cu_seqlens"], kw["pos_hw"])
    expected = (loss_e, *torch.autograd.grad(loss_e, leaves_e))
    for label, a, e in zip(("loss", "dq", "dk", "dv"), (loss, *grads), expected, strict=True):
        assert_close(a, e, f"compiled {label}", **tol(torch.float32))


def test_limits_are_errors():
    q, k, v, kw = _case([3], d=272)
    with pytest.raises(ValueError, match="head dims up to 256"):
        va.varlen_attention(q, k, v, **kw, impl="triton")
    q, k, v, kw = _case([3], d=16)
    with pytest.raises(ValueError, match="softmax_scale: the Triton kernels need a scale >= 0"):
        va.varlen_attention(q, k, v, **kw, softmax_scale=-0.5, impl="triton")


# ----------------------------------------------------------------------------- GPU (real sizes, bf16)


def _vit_pack(sizes: list[tuple[int, int]], heads: int = 20, d: int = 64, dtype=torch.bfloat16):
    """Seed-ViT-like pack: images of (rows, cols) patches, positions per image."""
    lengths = [h * w for h, w in sizes]
    pos = torch.cat(
        [
            torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
            for h, w in sizes
        ]
    ).to(torch.int32)
    T = sum(lengths)
    q, k, v = (torch.randn(T, heads, d, device="cuda", dtype=dtype) for _ in range(3))
    kw = {"cu_seqlens": _cu(lengths), "max_seqlen": max(lengths), "pos_hw": pos.cuda()}
    return q, k, v, kw


def _gpu_compare(q, k, v, kw, factor=3.0):
    """bf16/fp16 kernel vs the fp32 reference: the kernel's error stays within ``factor`` x the
    reference's own error when run in the low precision, plus a floor (see tests/utils.py). The
    factor is 3, not flash-attention's 2: this reference computes in fp32 internally and rounds only
    its inputs and outputs, while the kernel also rounds P and dS for the tensor cores."""
    g_out = torch.randn(q.shape, device=q.device)
    g_lse = torch.randn(q.shape[1], q.shape[0], device=q.device)
    got = _run(q, k, v, kw, "triton", g_out, g_lse)
    low = _run(q, k, v, kw, "ref", g_out, g_lse)
    hi = _run(q.float(), k.float(), v.float(), kw, "ref", g_out, g_lse)
    for label, a, lo, h in zip(("out", "lse", "dq", "dk", "dv"), got, low, hi, strict=True):
        finite = torch.isfinite(h)
        assert torch.equal(torch.isfinite(a), finite), f"{label}: finite entries differ"
        assert_matches_ref_error(a[finite].float(), lo[finite].float(), h[finite], label, factor)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,d",
    [(torch.bfloat16, 64), (torch.float16, 64), (torch.bfloat16, 80), (torch.bfloat16, 72)],
    ids=["bf16-d64", "fp16-d64", "bf16-d80", "bf16-d72"],
)
def test_gpu_vit_pack_with_rope(dtype, d):
    sizes = [(32, 32), (64, 64), (16, 40), (1, 1), (46, 28), (8, 8)]  # 1k, 4k, 640, 1, 1288, 64 tokens
    _gpu_compare(*_vit_pack(sizes, d=d, dtype=dtype))


@pytest.mark.gpu
def test_gpu_windows_and_one_huge_image():
    _gpu_compare(*_vit_pack([(8, 8)] * 64))
    _gpu_compare(*_vit_pack([(64, 96)] + [(2, 2)] * 50 + [(1, 3)] * 7))  # the reference holds L^2 x H


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 72, 80, 128])
def test_gpu_causal_gqa_unequal_lengths(d):
    lens_q, lens_k = [300, 1, 2048, 0, 77], [900, 1, 2048, 5, 70]
    q = torch.randn(sum(lens_q) + 5, 16, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(lens_k) + 3, 4, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kw = dict(cu_seqlens=_cu(lens_q), max_seqlen=2048, cu_seqlens_k=_cu(lens_k), max_seqlen_k=2048)
    _gpu_compare(q, k, v, {**kw, "causal": True})


@pytest.mark.gpu
def test_gpu_warp_specialized_forward(monkeypatch):
    """$SEEDVL_ATTENTION_WS=1 on the GPU: the TMA + warp-specialized forward really runs (sm_90+)
    and holds the bf16 bound on a ViT pack with RoPE (d64, d80 split) and a causal GQA LLM pack."""
    launched = _spy_ws(monkeypatch)
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the warp-specialized forward needs TMA (sm_90+)")
    _gpu_compare(*_vit_pack([(32, 32), (64, 64), (16, 40), (1, 1), (46, 28)]))
    _gpu_compare(*_vit_pack([(32, 32), (7, 9)], d=80))
    lens_q, lens_k = [300, 1, 2048, 0, 77], [900, 1, 2048, 5, 70]
    q = torch.randn(sum(lens_q) + 5, 16, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(lens_k) + 3, 4, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kw = dict(cu_seqlens=_cu(lens_q), max_seqlen=2048, cu_seqlens_k=_cu(lens_k), max_seqlen_k=2048)
    _gpu_compare(q, k, v, {**kw, "causal": True})
    assert launched == [1, 1, 1]


@pytest.mark.gpu
def test_gpu_deterministic_and_opcheck():
    q, k, v, kw = _vit_pack([(32, 32), (16, 16), (3, 5)])
    g_out, g_lse = torch.randn(q.shape, device="cuda"), torch.randn(20, q.shape[0], device="cuda")
    first = _run(q, k, v, kw, "triton", g_out, g_lse)
    second = _run(q, k, v, kw, "triton", g_out, g_lse)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    cu, pos = kw["cu_seqlens"], kw["pos_hw"]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    args = (*leaves, cu, cu, 1024, 1024, False, 0.125, pos, 1e4, "triton")
    torch.library.opcheck(torch.ops.seedvl.varlen_attention_fwd.default, args)
