"""moe_permute / moe_unpermute: against per-token loops, round trips, determinism, compile."""

import pytest
import torch

import seedvl_kernels as sk
from seedvl_kernels.moe_permute import moe_permute, moe_unpermute
from tests.utils import assert_close, tol


def _ids(T, k, E, *, used=None):
    """(T, k) int32 distinct experts per token, drawn from the first ``used`` experts."""
    used = used or E
    return torch.rand(T, used).argsort(-1)[:, :k].to(torch.int32)


def _loop_permute(x, ids, E):
    """Walk experts, then tokens, then slots: the definition of the grouping, one row at a time."""
    T, k = ids.shape
    rows, src, offsets = [], [], [0]
    for e in range(E):
        for t in range(T):
            for j in range(k):
                if int(ids[t, j]) == e:
                    rows.append(x[t])
                    src.append(t * k + j)
        offsets.append(len(src))
    x_perm = torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])
    return x_perm, torch.tensor(offsets, dtype=torch.int32), torch.tensor(src, dtype=torch.int32)


def _loop_unpermute(y, row_map, w):
    T, k = w.shape
    where = {int(s): r for r, s in enumerate(row_map)}
    out = []
    for t in range(T):
        acc = torch.zeros(y.shape[1], dtype=torch.float64)
        for j in range(k):
            acc = acc + w[t, j].double() * y[where[t * k + j]].double()
        out.append(acc)
    return torch.stack(out) if out else torch.zeros(0, y.shape[1], dtype=torch.float64)


@pytest.mark.parametrize("T,k,E,used", [(1, 1, 4, None), (23, 2, 8, None), (40, 4, 16, 12), (9, 3, 5, 3)])
def test_permute_matches_loop(T, k, E, used):
    x = torch.randn(T, 7)
    ids = _ids(T, k, E, used=used)
    x_perm, offsets, row_map = moe_permute(x, ids, E)
    x_ref, off_ref, map_ref = _loop_permute(x, ids, E)
    assert offsets.dtype == torch.int32 and row_map.dtype == torch.int32 and offsets.shape == (E + 1,)
    assert torch.equal(offsets, off_ref), f"offsets {offsets.tolist()} != {off_ref.tolist()}"
    assert torch.equal(row_map, map_ref)
    assert torch.equal(x_perm, x_ref)
    # The grouping, stated directly: ids along the permuted rows are sorted, stable within a group.
    flat = ids.flatten()[row_map.long()]
    assert bool((flat[1:] >= flat[:-1]).all())
    for e in range(E):
        group = row_map[offsets[e] : offsets[e + 1]]
        assert bool((group[1:] > group[:-1]).all())


def test_duplicate_experts_and_empty_batch():
    x = torch.randn(3, 4)
    ids = torch.tensor([[1, 1], [0, 1], [1, 0]], dtype=torch.int32)
    x_perm, offsets, row_map = moe_permute(x, ids, 3)
    assert offsets.tolist() == [0, 2, 6, 6]
    assert row_map.tolist() == [2, 5, 0, 1, 3, 4]  # flat ids [1, 1, 0, 1, 1, 0]
    assert torch.equal(x_perm, x[row_map.long() // 2])
    empty, off0, map0 = moe_permute(torch.empty(0, 4), torch.empty(0, 2, dtype=torch.int32), 3)
    assert empty.shape == (0, 4) and off0.tolist() == [0, 0, 0, 0] and map0.shape == (0,)
    assert moe_unpermute(empty, map0, torch.empty(0, 2)).shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_unpermute_matches_loop_and_round_trips(dtype):
    T, k, E, D = 31, 3, 8, 10
    x = torch.randn(T, D).to(dtype)
    ids = _ids(T, k, E)
    w = torch.rand(T, k)
    x_perm, _, row_map = moe_permute(x, ids, E)
    y = torch.randn(T * k, D).to(dtype)
    out = moe_unpermute(y, row_map, w)
    assert out.dtype == dtype
    assert_close(out, _loop_unpermute(y, row_map, w), f"unpermute {dtype}", **tol(dtype, 2))
    back = moe_unpermute(x_perm, row_map, w)
    assert_close(back, x.double() * w.double().sum(1, keepdim=True), f"round trip {dtype}", **tol(dtype, 2))


def _per_expert_linear(x_perm, ids, row_map, W):
    """y[r] = x_perm[r] @ W[expert of row r], without grouped_gemm."""
    expert_of_row = ids.flatten().long()[row_map.long()]
    return torch.bmm(x_perm[:, None, :], W[expert_of_row])[:, 0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_match_per_token_loop(dtype):
    T, k, E, D = 19, 2, 6, 8
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    w = torch.rand(T, k, dtype=dtype, requires_grad=True)
    W = torch.randn(E, D, D, dtype=dtype, requires_grad=True)
    ids = _ids(T, k, E, used=5)
    g = torch.randn(T, D, dtype=dtype)

    x_perm, _, row_map = moe_permute(x, ids, E)
    out = moe_unpermute(_per_expert_linear(x_perm, ids, row_map, W), row_map, w)
    grads = torch.autograd.grad((out * g).sum(), (x, w, W))

    xd, wd, Wd = (t.detach().double().requires_grad_() for t in (x, w, W))
    ref = torch.stack([sum(wd[t, j] * (xd[t] @ Wd[int(ids[t, j])]) for j in range(k)) for t in range(T)])
    grads_ref = torch.autograd.grad((ref * g.double()).sum(), (xd, wd, Wd))
    assert_close(out, ref, f"forward {dtype}", **tol(dtype, 10))
    for name, a, b in zip(("dx", "dgate", "dW"), grads, grads_ref, strict=True):
        assert a.dtype == dtype
        assert_close(a, b, f"{name} {dtype}", **tol(dtype, 10))
    assert torch.count_nonzero(grads[2][5]) == 0  # expert 5 received no rows


def test_deterministic_bitwise():
    T, k, E, D = 64, 8, 16, 32
    x = torch.randn(T, D, requires_grad=True)
    w = torch.rand(T, k, requires_grad=True)
    ids = _ids(T, k, E)
    g = torch.randn(T, D)

    def run():
        x_perm, _, row_map = moe_permute(x, ids, E)
        out = moe_unpermute(x_perm * 1.5, row_map, w)
        return (out, *torch.autograd.grad((out * g).sum(), (x, w)))

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph():
    T, k, E, D = 17, 2, 4, 8
    x = torch.randn(T, D, requires_grad=True)
    w = torch.rand(T, k, requires_grad=True)
    ids = _ids(T, k, E)

    def f(x, w, ids):
        x_perm, offsets, row_map = moe_permute(x, ids, E)
        return moe_unpermute(torch.tanh(x_perm), row_map, w), offsets

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, offsets = compiled(x, w, ids)
    out_ref, offsets_ref = f(x, w, ids)
    assert torch.equal(offsets, offsets_ref)
    assert_close(out, out_ref, "compiled forward", **tol(torch.float32))
    grads = torch.autograd.grad(out.sum(), (x, w))
    grads_ref = torch.autograd.grad(out_ref.sum(), (x, w))
    for a, b in zip(grads, grads_ref, strict=True):
        assert_close(a, b, "compiled grad", **tol(torch.float32))


def test_no_host_sync_runs_on_meta_tensors():
    """Meta tensors have no values, so any .item()/.tolist()/bincount on the path would fail."""
    x = torch.randn(10, 4, device="meta", requires_grad=True)
    w = torch.rand(10, 3, device="meta", requires_grad=True)
    ids = torch.zeros(10, 3, dtype=torch.int32, device="meta")
    x_perm, offsets, row_map = moe_permute(x, ids, 8)
    moe_unpermute(x_perm * 2, row_map, w).sum().backward()
    assert offsets.shape == (9,) and row_map.shape == (30,)
    assert x.grad.shape == (10, 4) and w.grad.shape == (10, 3)


def test_only_reference_is_registered():
    assert sk.implementations("moe_permute") == ["ref"]
    assert sk.implementations("moe_unpermute") == ["ref"]
    with pytest.raises(sk.ImplUnavailableError, match="moe_permute: impl='cuda'"):
        moe_permute(torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.int32), 2, impl="cuda")


X = torch.randn(4, 8)
IDS = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]], dtype=torch.int32)


@pytest.mark.parametrize(
    "args,match",
    [
        (([[1.0]], IDS, 4), "x: expected a torch.Tensor"),
        ((torch.randn(4, 2, 4), IDS, 4), "x: expected 2 dims"),
        ((X.to(torch.int32), IDS, 4), "x: expected dtype"),
        ((X, IDS.long(), 4), "expert_ids: expected dtype"),
        ((X, IDS[0], 4), "expert_ids: expected 2 dims"),
        ((X, IDS[:3], 4), "expert_ids: expected size 4 in dim 0"),
        ((X, IDS[:, :0], 4), "expert_ids: expected k >= 1"),
        ((X, IDS, 3), r"expert_ids: expected ids in \[0, 3\)"),
        ((X, IDS - 1, 4), r"expert_ids: expected ids in \[0, 4\).*\[-1, 2\]"),
        ((X, IDS, 0), "num_experts: expected >= 1"),
        ((X, IDS, 4.0), "num_experts: expected a host int"),
        ((X, IDS.to("meta"), 4), "expert_ids: expected a tensor on cpu"),
    ],
)
def test_permute_bad_input_names_the_argument(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        moe_permute(*args)


Y = torch.randn(8, 8)
MAP = torch.tensor([0, 7, 2, 5, 4, 3, 6, 1], dtype=torch.int32)
W = torch.rand(4, 2)


@pytest.mark.parametrize(
    "args,match",
    [
        ((Y[:, None], MAP, W), "y: expected 2 dims"),
        ((Y.to(torch.int64), MAP, W), "y: expected dtype"),
        ((Y[:6], MAP, W), r"y: expected size 8 in dim 0 \(T\*k = 4\*2"),
        ((Y, MAP.long(), W), "row_map: expected dtype"),
        ((Y, MAP[:6], W), "row_map: expected size 8"),
        ((Y, MAP[:, None], W), "row_map: expected 1 dims"),
        ((Y, torch.zeros(8, dtype=torch.int32), W), "row_map: expected a permutation of 0..7"),
        ((Y, MAP, W.flatten()), "gate_weights: expected 2 dims"),
        ((Y, MAP, W.to(torch.int32)), "gate_weights: expected dtype"),
        ((Y, MAP, W[:, :0]), "gate_weights: expected k >= 1"),
        ((Y, MAP, W.to("meta")), "gate_weights: expected a tensor on cpu"),
        ((Y, "rows", W), "row_map: expected a torch.Tensor"),
    ],
)
def test_unpermute_bad_input_names_the_argument(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        moe_unpermute(*args)
