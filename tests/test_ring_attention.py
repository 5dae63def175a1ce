"""ring_attention: zigzag sharding (layout, round trip); ring and all-gather modes at CP = 1, 2, 3, 4
against single-process varlen_attention over the unsharded documents (out, lse, dq, dk, dv, with a
gradient into lse; odd, 1-token, empty and padded documents; rows past cu_seqlens[-1]); the Triton
blocks (interpreted) at CP=2; the bf16 error does not grow with CP, and the two ways of making it
grow (a bf16 accumulator; per-step partials rounded to bf16) are caught as negative controls;
argument checks.

The distributed cases run in one spawn of 4 gloo processes (sub-groups of 1, 2, 3 and 4 ranks, the
3-rank group on ranks 1-3 so that group and global ranks differ); each rank writes its errors to a
JSON file and the tests below read the maximum (or the sum, for means) over ranks.
"""

from __future__ import annotations

import importlib
import json
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist

from seedvl_kernels import _dispatch
from tests.dist_utils import init_gloo, spawn
from tests.utils import assert_close

ra = importlib.import_module("seedvl_kernels.ring_attention")  # not exported by the package yet
rat = importlib.import_module("seedvl_kernels.ring_attention_triton")
va = importlib.import_module("seedvl_kernels.varlen_attention")
MERGE_FP32 = ra._merge
PARTIAL_FP32 = ra._partial_dtype

# Under TRITON_INTERPRET=1 (conftest sets it on machines without a GPU) Triton kernels take CPU tensors.
TRITON_ON_CPU = (
    _dispatch.unavailable_reason("varlen_attention", "triton", torch.device("cpu"), torch.float32) is None
)
GROUPS = {1: [0], 2: [0, 1], 3: [1, 2, 3], 4: [0, 1, 2, 3]}
MODES = ("ring", "allgather")
# extra: rows appended past the local cu_seqlens[-1] (static-shape padding of the shard).
CASES = {
    "mixed": dict(lengths=[13, 1, 8, 0, 29], hq=4, hkv=2, d=16, causal=True, extra=0),
    "tail": dict(lengths=[61], hq=2, hkv=2, d=8, causal=True, extra=3),
    "noncausal": dict(lengths=[24, 48], hq=4, hkv=1, d=8, causal=False, extra=0),  # multiples of 2*CP
}
BF16_CASE = dict(lengths=[300, 77, 5], hq=4, hkv=2, d=32, causal=True, extra=0)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
NAMES = ("out", "lse", "dq", "dk", "dv")
# Bound on mean bf16 error(CP=n) / error(CP=1). Measured: out, dq 1.00, dk, dv 0.97-1.00, lse (fp32 merge
# roundoff, 1e-7) up to 1.06; a bf16 accumulator gives out 1.33 at CP=4, bf16 partials about 1.3 at CP=2.
GROWTH = 1.1


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def _data(spec: dict, seed: int) -> dict:
    """fp64 q, k, v, dout, dlse of the unsharded documents."""
    g = torch.Generator().manual_seed(seed)
    T, hq, hkv, d = sum(spec["lengths"]), spec["hq"], spec["hkv"], spec["d"]

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v, dout = randn(T, hq, d), randn(T, hkv, d), randn(T, hkv, d), randn(T, hq, d)
    return dict(q=q, k=k, v=v, dout=dout, dlse=randn(hq, T))


def _full(data: dict, spec: dict, dtype: torch.dtype, compute: torch.dtype) -> dict:
    """Single-process varlen_attention over the whole documents: inputs rounded to ``dtype``, math in
    ``compute``'s reference (fp64 gives the exact answer for the rounded inputs)."""
    q, k, v = (data[n].to(dtype).to(compute).clone().requires_grad_() for n in "qkv")
    cu = _cu(spec["lengths"])
    out, lse = va.varlen_attention(q, k, v, cu, max(spec["lengths"]), causal=spec["causal"], return_lse=True)
    torch.autograd.backward([out, lse], [data["dout"].to(dtype).to(compute), data["dlse"].to(lse.dtype)])
    return dict(out=out.detach(), lse=lse.detach().t(), dq=q.grad, dk=k.grad, dv=v.grad)


def _ring(
    data: dict, spec: dict, dtype: torch.dtype, group, mode: str, impl: str | None = None
) -> tuple[dict, torch.Tensor, int]:
    """This rank's ring_attention results (lse transposed to (T, Hq)) and the global row of each local
    row (-1 for padding)."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    lengths, extra = spec["lengths"], spec["extra"]
    cu = _cu(lengths)
    rows = torch.arange(sum(lengths))
    tensors = [data[n].to(dtype) for n in ("q", "k", "v", "dout")] + [data["dlse"].t(), rows]
    shard = ra.zigzag_shard(tensors, cu, cp, rank, pad_values=[0, 0, 0, 0, 0, -1])
    q, k, v, dout, dlse = (torch.cat([t, t.new_zeros(extra, *t.shape[1:])]) for t in shard.tensors[:5])
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = ra.ring_attention(
        q,
        k,
        v,
        shard.cu_seqlens,
        shard.max_seqlen,
        group=group,
        causal=spec["causal"],
        mode=mode,
        return_lse=True,
        impl=impl,
    )
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    torch.autograd.backward([out, lse], [dout, dlse.t().to(lse_dtype).contiguous()])
    got = dict(out=out.detach(), lse=lse.detach().t(), dq=q.grad, dk=k.grad, dv=v.grad)
    return got, shard.tensors[5], extra


def _errors(got: dict, want: dict, rows: torch.Tensor, extra: int, tol: float) -> dict:
    """Max abs error and max error / (tol + tol * |expected|) per tensor on real rows; the tail
    rows (padding added here) must be exactly out 0, lse -inf, gradients 0."""
    real = rows >= 0
    n = rows.numel()
    result = {}
    for name in NAMES:
        a = got[name].double()
        padded = torch.cat([want[name].double(), want[name].new_zeros(1, *want[name].shape[1:]).double()])
        e = padded[rows.clamp(min=0).where(real, padded.shape[0] - 1)]  # pad rows expect 0
        check = real if name in ("out", "lse", "dq") else torch.ones_like(real)  # padding keys: grad 0
        err = (a[:n][check] - e[check]).abs()
        result[name] = err.max().item() if err.numel() else 0.0
        result[name + "_sum"], result[name + "_count"] = err.sum().item(), err.numel()
        result[name + "_ratio"] = (err / (tol + tol * e[check].abs())).max().item() if err.numel() else 0.0
        tail = a[n:]
        expect_tail = float("-inf") if name == "lse" else 0.0
        result["tail_bad"] = result.get("tail_bad", 0) + int((tail != expect_tail).sum())
        result["nan"] = result.get("nan", 0) + int(a.isnan().sum())
    return result


def _merge_bf16_accumulator(out, lse, blk_out, blk_lse, impl):
    MERGE_FP32(out, lse, blk_out, blk_lse, impl)
    out.copy_(out.bfloat16())


def _worker(rank: int, world_size: int, port: int, outdir: str) -> None:
    init_gloo(rank, world_size, port)
    groups = {ws: dist.new_group(ranks) for ws, ranks in GROUPS.items()}
    results: dict[str, dict] = {}
    cases = {name: (spec, _data(spec, seed)) for seed, (name, spec) in enumerate(CASES.items())}
    bf16 = _data(BF16_CASE, 99)
    refs = {
        (name, dt): _full(data, spec, dt, dt)
        for name, (spec, data) in cases.items()
        for dt in (torch.float64, torch.float32)
    }
    truth_bf16 = _full(bf16, BF16_CASE, torch.bfloat16, torch.float64)
    single_bf16 = _full(bf16, BF16_CASE, torch.bfloat16, torch.bfloat16)
    for ws, ranks in GROUPS.items():
        if rank not in ranks:
            continue
        group = groups[ws]
        for mode in MODES:
            for name, (spec, data) in cases.items():
                for dt, tol in TOL.items():
                    got, rows, extra = _ring(data, spec, dt, group, mode)
                    key = f"{mode}/{name}/{str(dt)[6:]}/{ws}"
                    results[key] = _errors(got, refs[name, dt], rows, extra, tol)
                    if dt == torch.float64:  # zigzag_unshard of the gathered outputs is the full output
                        outs = [torch.empty_like(got["out"]) for _ in range(ws)]
                        dist.all_gather(outs, got["out"], group=group)
                        full = ra.zigzag_unshard(outs, _cu(spec["lengths"]))
                        results[key]["unshard"] = (full - refs[name, dt]["out"]).abs().max().item()
            got, rows, _ = _ring(bf16, BF16_CASE, torch.bfloat16, group, mode)
            results[f"{mode}/bf16/{ws}"] = _errors(got, truth_bf16, rows, 0, 1.0)
            if ws == 2 and TRITON_ON_CPU:  # the Triton kernels on the one-sided steps' empty sequences
                spec, data = cases["mixed"]
                got, rows, extra = _ring(data, spec, torch.float32, group, mode, impl="triton")
                key = f"{mode}/mixed-triton/float32/2"
                results[key] = _errors(got, refs["mixed", torch.float32], rows, extra, 1e-5)
        # Negative controls: the traps that the fp32 merge and the fp32 partials avoid.
        ra._merge = _merge_bf16_accumulator
        got, rows, _ = _ring(bf16, BF16_CASE, torch.bfloat16, group, "ring")
        results[f"bf16acc/bf16/{ws}"] = _errors(got, truth_bf16, rows, 0, 1.0)
        ra._merge = MERGE_FP32
        ra._partial_dtype = lambda dtype: dtype  # each step's out, dq, dk, dv rounded to bf16
        got, rows, _ = _ring(bf16, BF16_CASE, torch.bfloat16, group, "ring")
        results[f"bf16partials/bf16/{ws}"] = _errors(got, truth_bf16, rows, 0, 1.0)
        ra._partial_dtype = PARTIAL_FP32
    if rank == 0:
        rows = torch.arange(sum(BF16_CASE["lengths"]))
        results["single/bf16"] = _errors(single_bf16, truth_bf16, rows, 0, 1.0)
    with open(f"{outdir}/rank{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory) -> dict[str, dict]:
    outdir = tmp_path_factory.mktemp("ring_attention")
    spawn(_worker, 4, str(outdir))
    merged: dict[str, dict] = {}
    for rank in range(4):
        for key, metrics in json.loads((outdir / f"rank{rank}.json").read_text()).items():
            for m, value in metrics.items():
                old = merged.setdefault(key, {}).get(m)
                combine = (lambda a, b: a + b) if m.endswith(("_sum", "_count")) else max
                merged[key][m] = value if old is None else combine(old, value)
    return merged


@pytest.mark.dist
@pytest.mark.parametrize("ws", sorted(GROUPS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_single_process(dist_results, case, dtype, mode, ws):
    r = dist_results[f"{mode}/{case}/{dtype}/{ws}"]
    summary = ", ".join(f"{n} {r[n]:.2e}" for n in NAMES)
    assert r["nan"] == 0, f"NaN in results ({summary})"
    assert r["tail_bad"] == 0, "rows past cu_seqlens[-1] must give out 0, lse -inf and zero gradients"
    for n in NAMES:
        tol = TOL[getattr(torch, dtype)]
        assert r[n + "_ratio"] <= 1.0, f"{n}: max abs err {r[n]:.3e} beyond tol {tol} ({summary})"
    if dtype == "float64":
        assert r["unshard"] <= 1e-10, f"zigzag_unshard(all_gather(out)) vs full out: {r['unshard']:.3e}"


@pytest.mark.dist
@pytest.mark.parametrize("mode", MODES)
def test_triton_blocks_at_cp2(dist_results, mode):
    if not TRITON_ON_CPU:
        pytest.skip("Triton cannot take CPU tensors here (TRITON_INTERPRET is not set)")
    r = dist_results[f"{mode}/mixed-triton/float32/2"]
    summary = ", ".join(f"{n} {r[n]:.2e}" for n in NAMES)
    assert r["nan"] == 0, f"NaN in results ({summary})"
    for n in NAMES:
        assert r[n + "_ratio"] <= 1.0, f"{n}: max abs err {r[n]:.3e} beyond tol 1e-5 ({summary})"


def _mean(r: dict, name: str) -> float:
    return r[name + "_sum"] / max(r[name + "_count"], 1)


def _bf16_table(results: dict, mode: str) -> str:
    rows = [("single", results["single/bf16"])]
    rows += [(f"CP={ws}", results[f"{mode}/bf16/{ws}"]) for ws in GROUPS]
    return "; ".join(f"{label}: " + " ".join(f"{n} {_mean(r, n):.2e}" for n in NAMES) for label, r in rows)


@pytest.mark.dist
@pytest.mark.parametrize("mode", MODES)
def test_bf16_error_flat_in_cp(dist_results, mode):
    """bf16 error against the fp64 answer for the same (bf16) inputs. Every partial result comes back
    from varlen_attention in fp32 and every sum runs in fp32, so out, dq, dk, dv are rounded to bf16
    once, as in a single-process call: the mean error at CP=2..4 stays within GROWTH of CP=1's, CP=1's
    is single-process's, and the max error stays within 1.5x single-process's."""
    single = dist_results["single/bf16"]
    by_ws = {ws: dist_results[f"{mode}/bf16/{ws}"] for ws in GROUPS}
    table = _bf16_table(dist_results, mode)
    for n in NAMES:
        assert _mean(by_ws[1], n) <= 1.02 * _mean(single, n), f"{n} at CP=1 ({table})"
        for ws, r in by_ws.items():
            assert _mean(r, n) <= GROWTH * _mean(by_ws[1], n), f"{n} grows with CP: CP={ws} ({table})"
            assert r[n] <= 1.5 * single[n], f"{n} max err {r[n]:.3e} at CP={ws}, single {single[n]:.3e}"


@pytest.mark.dist
@pytest.mark.parametrize(
    "control,ws",
    [("bf16acc", 4), ("bf16partials", 2)],
    ids=["bf16-accumulator", "bf16-partials"],
)
def test_bf16_growth_check_has_teeth(dist_results, control, ws):
    """Negative controls: the same ring with its running output rounded to bf16 after every merge
    (what ring users complain of), or with each step's partial results rounded to bf16, fails the
    growth bound above, so that bound can see either at CP <= 4."""
    by_ws = {w: dist_results[f"{control}/bf16/{w}"] for w in GROUPS}
    grown = _mean(by_ws[ws], "out") / _mean(by_ws[1], "out")
    assert grown > GROWTH, (
        f"{control}: out error x{grown:.2f} at CP={ws} ({_bf16_table(dist_results, control)})"
    )


# ----------------------------------------------------------------------------- single process


def test_zigzag_shard_layout():
    """Lengths 5 and 2 at CP=2: padded to 8 (chunks of 2) and 4 (chunks of 1); rank 0 keeps chunks
    0 and 3, rank 1 chunks 1 and 2; positions stay global, padding labels are -100."""
    cu = _cu([5, 2])
    ids = torch.arange(10, 17)
    pos = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    shards = [ra.zigzag_shard([ids, pos, ids], cu, 2, r, pad_values=[0, 0, -100]) for r in range(2)]
    assert shards[0].tensors[0].tolist() == [10, 11, 0, 0, 15, 0]
    assert shards[0].tensors[1].tolist() == [0, 1, 0, 0, 0, 0]
    assert shards[0].tensors[2].tolist() == [10, 11, -100, -100, 15, -100]
    assert shards[1].tensors[0].tolist() == [12, 13, 14, 0, 16, 0]
    assert shards[1].tensors[1].tolist() == [2, 3, 4, 0, 1, 0]
    for s in shards:
        assert s.cu_seqlens.dtype == torch.int32 and s.cu_seqlens.tolist() == [0, 4, 6]
        assert s.max_seqlen == 4


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_zigzag_round_trip(cp):
    lengths = [13, 1, 8, 0, 29, 2]
    x = torch.randn(sum(lengths) + 2, 3, 5)  # two packer padding rows past cu_seqlens[-1]: dropped
    cu = _cu(lengths)
    shards = [ra.zigzag_shard([x], cu, cp, r) for r in range(cp)]
    assert len({s.tensors[0].shape for s in shards}) == 1
    assert all(torch.equal(s.cu_seqlens, shards[0].cu_seqlens) for s in shards)
    assert torch.equal(ra.zigzag_unshard([s.tensors[0] for s in shards], cu), x[: sum(lengths)])


@pytest.fixture(scope="module")
def one_rank_group():
    """A 1-rank gloo group in this process (CP=1), torn down after the module."""
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", MODES)
def test_cp1_equals_varlen_attention(one_rank_group, mode):
    lengths = [6, 2, 10]  # even: CP=1 shards need no padding
    q = torch.randn(18, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(18, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(18, 2, 8, dtype=torch.float64, requires_grad=True)
    cu = _cu(lengths)
    out, lse = ra.ring_attention(q, k, v, cu, 10, group=one_rank_group, mode=mode, return_lse=True)
    (out.sum() + lse.sum()).backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref_out, ref_lse = va.varlen_attention(q, k, v, cu, 10, causal=True, return_lse=True)
    (ref_out.sum() + ref_lse.sum()).backward()
    for name, a, e in zip(NAMES, (out, lse, *grads), (ref_out, ref_lse, q.grad, k.grad, v.grad), strict=True):
        assert_close(a, e, name, atol=1e-12, rtol=1e-12)


def test_argument_checks(one_rank_group):
    q, k, v = torch.randn(6, 2, 4), torch.randn(6, 1, 4), torch.randn(6, 1, 4)
    cu, g = _cu([4, 2]), one_rank_group
    with pytest.raises(ValueError, match="q: expected 3 dims"):
        ra.ring_attention(q[0], k, v, cu, 4, group=g)
    with pytest.raises(ValueError, match="k: expected size 6 in dim 0"):
        ra.ring_attention(q, k[:4], v[:4], cu, 4, group=g)
    with pytest.raises(ValueError, match="even local document lengths"):
        ra.ring_attention(q, k, v, _cu([3, 3]), 4, group=g)
    with pytest.raises(TypeError, match="cu_seqlens: expected int32"):
        ra.ring_attention(q, k, v, cu.long(), 4, group=g)
    with pytest.raises(ValueError, match="max_seqlen: 2 is smaller"):
        ra.ring_attention(q, k, v, cu, 2, group=g)
    with pytest.raises(TypeError, match=r"group: expected a torch\.distributed ProcessGroup"):
        ra.ring_attention(q, k, v, cu, 4, group=None)
    with pytest.raises(ValueError, match="mode: expected one of"):
        ra.ring_attention(q, k, v, cu, 4, group=g, mode="ulysses")
    with pytest.raises(TypeError, match="softmax_scale: expected a host float"):
        ra.ring_attention(q, k, v, cu, 4, group=g, softmax_scale=torch.tensor(0.5))
    with pytest.raises(ValueError, match="rank: expected an int in"):
        ra.zigzag_shard([q], cu, 2, 2)
    with pytest.raises(ValueError, match="cp_size: expected a positive int"):
        ra.zigzag_shard([q], cu, 0, 0)
    with pytest.raises(ValueError, match="pad_values: expected one value or 2"):
        ra.zigzag_shard([q, k], cu, 2, 0, pad_values=[0])
    with pytest.raises(ValueError, match=r"tensors\[0\]: expected \(T, ...\) with T >= cu_seqlens\[-1\] = 7"):
        ra.zigzag_shard([q], _cu([5, 2]), 2, 0)
    with pytest.raises(ValueError, match="shards: expected one tensor per"):
        ra.zigzag_unshard([], cu)
    with pytest.raises(ValueError, match=r"shards\[1\]: expected \(4, 2, 4\) rows"):
        ra.zigzag_unshard([torch.zeros(4, 2, 4), torch.zeros(3, 2, 4)], cu)


def _partials(T: int, H: int, D: int, seed: int) -> tuple[torch.Tensor, ...]:
    """A running (out, lse) and a block's (blk_out, blk_lse), fp32, with rows that have seen no key
    yet (-inf) on either side, on both sides, and scores spread over +-30 (weights far from 1/2)."""
    g = torch.Generator().manual_seed(seed)
    out, blk = (torch.randn(T, H, D, generator=g) for _ in range(2))
    lse, blk_lse = (30 * torch.randn(H, T, generator=g) for _ in range(2))
    lse[:, ::5] = float("-inf")
    blk_lse[:, 1::3] = float("-inf")
    out[::5] = 0.0  # what the ring holds for a row before its first key
    return out, lse, blk, blk_lse


@pytest.mark.parametrize("T, H, D", [(130, 3, 24), (5, 2, 128), (64, 1, 64), (0, 2, 16)])
def test_fused_merge_matches_reference(T, H, D):
    """The one-kernel merge (interpreted on CPU) against the eager reference, in place, at the GPU
    launch's tiles (rows a program: 64 at D = 24, so T = 130 is two full programs and a partial one,
    with masked columns; 32 at D = 64; 16 at D = 128)."""
    if rat.merge_unavailable(torch.empty(0), torch.empty(0)) is not None:
        pytest.skip(rat.merge_unavailable(torch.empty(0), torch.empty(0)))
    out, lse, blk, blk_lse = _partials(T, H, D, seed=T + D)
    want_out, want_lse = out.clone(), lse.clone()
    ra._merge_ref(want_out, want_lse, blk, blk_lse)
    rat.merge_(out, lse, blk, blk_lse)
    assert_close(out, want_out, "out", atol=1e-6, rtol=1e-5)
    assert_close(lse, want_lse, "lse", atol=1e-5, rtol=1e-6)
    both_empty = torch.isneginf(want_lse)
    assert torch.isneginf(lse[both_empty]).all() and not lse.isnan().any()
    assert (out.transpose(0, 1)[both_empty] == 0).all()


def test_fused_merge_serves_only_fp32_partials():
    out, lse, blk, blk_lse = _partials(8, 2, 16, seed=1)
    assert "float32" in rat.merge_unavailable(out.double(), blk.double())
    with pytest.raises(ValueError, match="out: the fused merge handles float32"):
        rat.merge_(out.double(), lse.double(), blk.double(), blk_lse.double())
    if rat.merge_unavailable(out, blk) is None:
        with pytest.raises(ValueError, match="blk_out, lse, blk_lse: expected shapes"):
            rat.merge_(out, lse[:, :4], blk, blk_lse)
        with pytest.raises(ValueError, match="lse: expected unit stride"):
            rat.merge_(out, lse.t().contiguous().t(), blk, blk_lse)


class _P2POp(NamedTuple):
    op: object
    tensor: torch.Tensor
    peer: int
    group: object = None
    tag: int = 0


class _Recorder:
    """Stands in for torch.distributed's point-to-point calls: records what a hop posts."""

    def __init__(self) -> None:
        self.calls: list = []

    def isend(self, tensor, dst, group=None, tag=0):
        self.calls.append(("isend", dst, tag))
        return "work"

    def irecv(self, tensor, src, group=None, tag=0):
        self.calls.append(("irecv", src, tag))
        return "work"

    def batch_isend_irecv(self, ops):
        self.calls.append(("batch", [(op.op.__name__, op.peer, op.tag) for op in ops]))
        return ["work"]


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
@pytest.mark.parametrize("rank", [0, 1])
def test_hop_is_one_batched_call_under_nccl_and_parity_ordered_otherwise(monkeypatch, backend, rank):
    rec = _Recorder()
    monkeypatch.setattr(dist, "get_rank", lambda group: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda group: 3)
    monkeypatch.setattr(dist, "get_global_rank", lambda group, r: 10 + r)
    monkeypatch.setattr(dist, "get_backend", lambda group: backend)
    for name in ("isend", "irecv", "batch_isend_irecv"):
        monkeypatch.setattr(dist, name, getattr(rec, name))
    monkeypatch.setattr(dist, "P2POp", _P2POp)
    ring = ra._Ring(group=None)
    works = ring.exchange(torch.zeros(2), torch.zeros(2), tag=7)
    nxt, prev = 10 + (rank + 1) % 3, 10 + (rank - 1) % 3
    if backend == "nccl":
        assert rec.calls == [("batch", [("isend", nxt, 7), ("irecv", prev, 7)])] and works == ["work"]
    else:
        pair = [("isend", nxt, 7), ("irecv", prev, 7)]
        assert rec.calls == (pair if rank % 2 == 0 else pair[::-1]) and len(works) == 2
