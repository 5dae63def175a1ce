"""Op contracts under generated input (issue 21) for the distributed ops and their data helpers:
zigzag_shard / zigzag_unshard, ring_attention (CP=1, every implementation) and ep_dispatch /
ep_combine / ep_moe_ffn (EP=1), plus the interpreter's capability rule.

The collective ops run in a child process each (``isolated``): it owns its 1-rank gloo group, and a
crash there is reported as a failure instead of ending the session.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

import seedvl_kernels as sk
from seedvl_kernels import _backends, _dispatch
from tests.test_contracts_ops import (
    BAD_SCALARS,
    FLOATS,
    assert_within,
    attention_oracle,
    expect_error,
    impls,
    isolated,
    meta_like,
    moe_cases,
    moe_oracle,
    offsets_of,
    randn,
    strided_vector,
)


def one_rank_group() -> dist.ProcessGroup:
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dist.group.WORLD


# ============================================================================= zigzag helpers


@given(case=st.data())
def test_zigzag_round_trip_and_bad_input(case):
    lengths = [case.draw(st.integers(0, 9)) for _ in range(case.draw(st.integers(0, 4)))]
    cp = case.draw(st.integers(1, 4))
    cu = offsets_of(lengths).cpu()
    T = sum(lengths) + case.draw(st.sampled_from([0, 2]))
    x = randn(case.draw(st.integers(0, 99)), (T, 3), case.draw(st.sampled_from(FLOATS))).cpu()
    labels = torch.arange(T, dtype=torch.int64)
    shards = [sk.zigzag_shard([x, labels], cu, cp, r, pad_values=[0.5, -100]) for r in range(cp)]
    local = shards[0].cu_seqlens
    for s in shards:
        assert torch.equal(s.cu_seqlens, local) and s.max_seqlen == max(local.diff().tolist(), default=0)
        pad = s.tensors[1] == -100
        assert (s.tensors[0][pad] == 0.5).all()
    assert torch.equal(sk.zigzag_unshard([s.tensors[0] for s in shards], cu), x[: sum(lengths)])
    assert torch.equal(sk.zigzag_unshard([s.tensors[1] for s in shards], cu), labels[: sum(lengths)])

    def shard(tensors=(x, labels), cu=cu, pad=0):
        return sk.zigzag_shard(
            list(tensors) if isinstance(tensors, tuple) else tensors, cu, cp, 0, pad_values=pad
        )

    expect_error(lambda: shard(tensors=x), "tensors", "a bare tensor")
    expect_error(lambda: shard(tensors=[x, x.tolist()]), "tensors[1]", "a list among the tensors")
    expect_error(lambda: shard(cu=meta_like(cu)), "cu_seqlens", "meta cu_seqlens")
    expect_error(lambda: shard(cu=cu.long()), "cu_seqlens", "int64 cu_seqlens")
    if cu.numel() > 1:
        expect_error(lambda: shard(cu=strided_vector(cu)), "cu_seqlens", "strided cu_seqlens")
    expect_error(lambda: shard(pad=0.5), "pad_values", "0.5 into an int64 tensor")
    expect_error(lambda: shard(pad=[0, 2**70]), "pad_values[1]", "out of int64 range")
    expect_error(lambda: shard(pad="x"), "pad_values", "a string")
    expect_error(lambda: shard(pad=[0]), "pad_values", "one value for two tensors")
    expect_error(lambda: shard(pad=[0, torch.tensor(1)]), "pad_values[1]", "a tensor pad value")
    expect_error(lambda: sk.zigzag_shard([x], cu, 0, 0), "cp_size", "cp_size 0")
    expect_error(lambda: sk.zigzag_shard([x], cu, cp, cp), "rank", "rank = cp_size")
    parts = [s.tensors[0] for s in shards]
    expect_error(lambda: sk.zigzag_unshard(parts[0], cu), "shards", "a bare tensor")
    if cp > 1:
        other = torch.float16 if parts[-1].dtype != torch.float16 else torch.float32
        last = f"shards[{cp - 1}]"
        expect_error(lambda: sk.zigzag_unshard([*parts[:-1], parts[-1].to(other)], cu), last, "mixed dtypes")
        expect_error(
            lambda: sk.zigzag_unshard([*parts[:-1], meta_like(parts[-1])], cu), last, "mixed devices"
        )
    expect_error(lambda: sk.zigzag_unshard(parts, meta_like(cu)), "cu_seqlens", "meta cu_seqlens")


# ============================================================================= ring_attention


@pytest.mark.parametrize("impl", impls("varlen_attention"))
@pytest.mark.parametrize("mode", ["ring", "allgather"])
@given(case=st.data())
def test_ring_attention_cp1(request, impl, mode, case):
    """At CP=1 ring attention is per-document causal attention: against the float64 oracle."""
    if isolated(request, impl, always=True):  # the child owns the process group
        return
    group = one_rank_group()
    lengths = [2 * case.draw(st.integers(0, 7)) for _ in range(case.draw(st.integers(0, 3)))]
    T = sum(lengths) + case.draw(st.sampled_from([0, 2]))
    hkv = case.draw(st.sampled_from([1, 2]))
    hq, D = hkv * case.draw(st.sampled_from([1, 2])), case.draw(st.sampled_from([4, 8, 12]))
    dtype = case.draw(st.sampled_from((torch.float32, torch.float64) if impl == "ref" else (torch.float32,)))
    seed = case.draw(st.integers(0, 999))
    q, k, v = (randn(seed + i, (T, h, D), dtype) for i, h in enumerate((hq, hkv, hkv)))
    cu = offsets_of(lengths)
    max_len = max(lengths, default=0)
    scale = case.draw(st.sampled_from([None, 0.0, 0.7]))
    out, lse = sk.ring_attention(
        q, k, v, cu, max_len, group=group, mode=mode, softmax_scale=scale, return_lse=True, impl=impl
    )
    s = 1.0 / math.sqrt(D) if scale is None else scale
    exp_out, exp_lse, mag, _ = attention_oracle(q, k, v, cu.cpu(), cu.cpu(), True, s)
    assert_within(out, exp_out, mag.expand_as(exp_out), dtype, f"ring_attention[{impl}, {mode}] out", terms=D)
    assert torch.equal(lse.isneginf().cpu(), exp_lse.isneginf())
    finite = exp_lse.isfinite()
    lse_mag = exp_lse.abs().masked_fill(~finite, 0) + mag[..., 0].t()
    got = lse.cpu().masked_fill(~finite, 0)
    assert_within(got, exp_lse.masked_fill(~finite, 0), lse_mag, dtype, "ring_attention lse", terms=D)

    def run(cu=cu, scale=None):
        return sk.ring_attention(q, k, v, cu, max_len, group=group, mode=mode, softmax_scale=scale, impl=impl)

    for value, what in BAD_SCALARS:
        expect_error(lambda value=value: run(scale=value), "softmax_scale", f"softmax_scale {what}")
    if cu.numel() > 1:
        expect_error(lambda: run(cu=strided_vector(cu)), "cu_seqlens", "strided cu_seqlens")
    expect_error(lambda: run(cu=meta_like(cu)), "cu_seqlens", "meta cu_seqlens")


# ============================================================================= expert parallel


@given(case=st.data())
def test_ep_moe_ffn_ep1(request, case):
    """At EP=1 the expert-parallel layer is moe_ffn: against the float64 oracle; argument errors."""
    if isolated(request, always=True):
        return
    group = one_rank_group()
    x, gate, ids, w_gu, w_d = case.draw(moe_cases((torch.float32, torch.float64)))
    out = sk.ep_moe_ffn(x, gate, ids, w_gu, w_d, group=group, impl="ref")
    expected, mag = moe_oracle(x, gate, ids, w_gu, w_d)
    assert_within(out, expected, mag, x.dtype, "ep_moe_ffn", terms=x.shape[1] + w_d.shape[1])
    E = w_gu.shape[0]
    d = sk.ep_dispatch(x, ids, gate, E, group)
    back = sk.ep_combine(d.x_local, d.state)
    mag = _weighted_copy(x.abs(), gate.abs())
    assert_within(back, _weighted_copy(x, gate), mag, x.dtype, "ep round trip", terms=ids.shape[1])
    expect_error(lambda: sk.ep_dispatch(x, ids, gate, 0, group), "num_experts", "no experts")
    expect_error(lambda: sk.ep_dispatch(x, ids.long(), gate, E, group), "expert_ids", "int64 ids")
    expect_error(lambda: sk.ep_dispatch(x, ids, gate, E, None), "group", "no group")
    if ids.numel():
        expect_error(lambda: sk.ep_dispatch(x, ids + E, gate, E, group), "expert_ids", "ids >= E")
    expect_error(lambda: sk.ep_combine(d.x_local[:, None], d.state), "y", "3-D y")
    expect_error(lambda: sk.ep_combine(d.x_local, None), "state", "no state")
    expect_error(lambda: sk.ep_moe_ffn(x, gate, ids, w_gu[..., :-1], w_d, group=group), "w_gate_up", "odd 2F")


def _weighted_copy(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """sum_j gate[t, j] * x[t]: what dispatch then combine of unchanged rows gives, in float64."""
    return x.double().cpu() * gate.double().cpu().sum(1, keepdim=True)


# ============================================================================= capability rule


def test_interpreter_refuses_bf16_dot_kernels(monkeypatch):
    """Under TRITON_INTERPRET=1 the tl.dot kernels refuse bf16 with the reason; auto falls back to
    the reference (varlen_attention: to its cpu implementation); rope_2d (elementwise) keeps serving
    bf16."""
    if _backends.triton_version() is None:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    for op in ("varlen_attention", "grouped_gemm", "pool_adapter", "moe_ffn"):
        reason = _dispatch.unavailable_reason(op, "triton", cpu, torch.bfloat16)
        assert reason is not None and "interpreter" in reason, (op, reason)
        fallback = "cpu" if op == "varlen_attention" else "ref"
        assert _dispatch.resolve(op, "auto", cpu, torch.bfloat16) == fallback
        assert _dispatch.unavailable_reason(op, "triton", cpu, torch.float16) is None
    assert _dispatch.unavailable_reason("rope_2d", "triton", cpu, torch.bfloat16) is None
    a, b = torch.randn(4, 8).bfloat16(), torch.randn(1, 8, 8).bfloat16()
    offsets = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(
        sk.ImplUnavailableError, match="grouped_gemm: impl='triton' cannot run this call: under"
    ):
        sk.grouped_gemm(a, b, offsets, impl="triton")
