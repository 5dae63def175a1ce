"""grouped_gemm impl="triton": forward, dgrad and wgrad against the reference (the Triton interpreter
on CPU: fp32/fp16 only, tiny shapes; bf16 at model shapes in the GPU tests)."""

from dataclasses import replace

import pytest
import torch

import seedvl_kernels as sk
from seedvl_kernels import grouped_gemm_triton as ggt
from seedvl_kernels.grouped_gemm import grouped_gemm, grouped_gemm_dw_ref, grouped_gemm_ref
from tests.utils import assert_close, assert_matches_ref_error, tol

# Group sizes per routing pattern (E = 6 unless stated).
PATTERNS = {
    "balanced": [8, 8, 8, 8, 8, 8],
    "zipf": [27, 13, 9, 7, 5, 4],  # ~ 1/rank^1.1
    "one_hot": [0, 0, 0, 41, 0, 0],
    "empty_experts": [3, 0, 11, 1, 0, 7, 0, 5, 2, 9],  # 3 of 10 empty
}
# (K, N, padding rows): K a multiple of the interpreter's BLOCK_K (32) and not; odd N.
SHAPES = {"balanced": (32, 48, 0), "zipf": (33, 17, 3), "one_hot": (48, 40, 2), "empty_experts": (16, 24, 5)}


def _offsets(sizes, device="cpu"):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _operands(sizes, K, N, dtype, trans_b, pad=0, device="cpu"):
    M = sum(sizes) + pad
    a = torch.randn(M, K, device=device).to(dtype).requires_grad_()
    shape = (len(sizes), N, K) if trans_b else (len(sizes), K, N)
    b = (torch.randn(shape, device=device) / K**0.5).to(dtype).requires_grad_()
    return a, b, _offsets(sizes, device)


def _fp32(*ts):
    return [t.detach().float().requires_grad_() for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_forward_dgrad_wgrad_match_reference(pattern, trans_b, dtype):
    """The reference runs in fp32 on the same (rounded) inputs: only the final rounding differs."""
    sizes = PATTERNS[pattern]
    K, N, pad = SHAPES[pattern]
    a, b, offsets = _operands(sizes, K, N, dtype, trans_b, pad)
    out = grouped_gemm(a, b, offsets, trans_b=trans_b, impl="triton")
    a32, b32 = _fp32(a, b)
    ref = grouped_gemm(a32, b32, offsets, trans_b=trans_b, impl="ref")
    assert out.dtype == dtype
    assert_close(out, ref, f"{pattern} forward", **tol(dtype, 4))
    g = torch.randn(out.shape).to(dtype)
    da, db = torch.autograd.grad(out, (a, b), g)
    da_ref, db_ref = torch.autograd.grad(ref, (a32, b32), g.float())
    assert_close(da, da_ref, f"{pattern} dA", **tol(dtype, 4))
    assert_close(db, db_ref, f"{pattern} dB", **tol(dtype, 4))
    M_used = sum(sizes)
    assert torch.equal(out[M_used:], torch.zeros_like(out[M_used:])), "padding rows of out are not zero"
    assert torch.equal(da[M_used:], torch.zeros_like(da[M_used:])), "padding rows of dA are not zero"
    for e, size in enumerate(sizes):
        if size == 0:
            assert torch.equal(db[e], torch.zeros_like(db[e])), f"dB[{e}] of an empty group is not zero"


@pytest.mark.parametrize("trans_b", [False, True])
def test_small_tiles_many_m_tiles_per_group(trans_b):
    """16-row tiles: groups span several M-tiles and swizzle bands; every output row is written
    (the output starts as NaN) and surplus programs write nothing out of place."""
    sizes = [37, 0, 5, 16, 0, 50]
    K, N = 40, 36
    a, b, offsets = _operands(sizes, K, N, torch.float32, trans_b, pad=7)
    a, b = a.detach(), b.detach()
    out = torch.full((a.shape[0], N), float("nan"))
    cfg = ggt.MGroupedConfig(16, 16, 16, 3, 4, 1)
    ggt.launch_m_grouped(a, b, offsets, out, trans_b, config=cfg)
    assert_close(
        out, grouped_gemm_ref(a, b, offsets, trans_b), "forward, 16x16x16 tiles", **tol(torch.float32, 4)
    )
    g = torch.randn(a.shape[0], N)
    dw = torch.full(b.shape, float("nan"))
    ggt.launch_k_grouped(a, g, offsets, dw, trans_b, config=ggt.KGroupedConfig(16, 16, 16, 2, 4, 1))
    assert_close(
        dw, grouped_gemm_dw_ref(a, g, offsets, trans_b), "dB, 16x16x16 tiles", **tol(torch.float32, 4)
    )


def test_row_gather_scatter_and_scale():
    """The indirections moe_ffn uses: A rows gathered, output rows scattered, rows scaled."""
    sizes = [6, 0, 9, 4]
    M, K, N, T = sum(sizes), 24, 20, 11
    x = torch.randn(T, K)
    b = torch.randn(len(sizes), K, N)
    offsets = _offsets(sizes)
    a_rows = torch.randint(0, T, (M,), dtype=torch.int32)
    out_rows = torch.randperm(M).to(torch.int32)
    scale = torch.rand(M)
    out = torch.full((M, N), float("nan"))
    ggt.launch_m_grouped(x, b, offsets, out, False, a_rows=a_rows, out_rows=out_rows, row_scale=scale)
    expected = torch.empty(M, N)
    expected[out_rows.long()] = grouped_gemm_ref(x[a_rows.long()], b, offsets) * scale[:, None]
    assert_close(out, expected, "gather/scatter/scale forward", **tol(torch.float32, 4))

    c = torch.randn(T, N)
    c_rows = torch.randint(0, T, (M,), dtype=torch.int32)
    dw = torch.empty(len(sizes), K, N)
    ggt.launch_k_grouped(x, c, offsets, dw, False, a_rows=a_rows, c_rows=c_rows, c_scale=scale)
    c_perm = c[c_rows.long()] * scale[:, None]
    expected_dw = grouped_gemm_dw_ref(x[a_rows.long()], c_perm, offsets)
    assert_close(dw, expected_dw, "gather/scale dW", **tol(torch.float32, 4))
    assert torch.equal(dw[1], torch.zeros(K, N))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_scaled_wgrad_at_the_gpu_tiles(dtype):
    """moe_ffn's dW_down (rows of dC gathered, each row's product scaled by its gate weight) at the
    sm_90 bf16 config of the wgrad kernel (BLOCK_K x BLOCK_N x BLOCK_R = 128 x 128 x 64): groups of
    0, 1, 64 and 150 rows (no step, a partial step, one full step, two full and a partial), K and N
    past one tile. The scale sits on the A tile in the kernel; the reference scales dC: the same
    sum, rounded once per operand in fp16, so fp16 is held to fp16 rounding of one operand."""
    cfg = ggt.k_grouped_config(136, 130, torch.bfloat16, torch.device("cuda"))
    assert (cfg.block_k, cfg.block_n, cfg.block_r) == (128, 128, 64), cfg
    sizes = [0, 150, 1, 64]
    M, K, N, T = sum(sizes), 130, 136, 97
    x = torch.randn(M, K).to(dtype)
    c = torch.randn(T, N).to(dtype)
    c_rows = torch.randint(0, T, (M,), dtype=torch.int32)
    scale = torch.rand(M)
    offsets = _offsets(sizes)
    dw = torch.full((len(sizes), K, N), float("nan"), dtype=dtype)
    ggt.launch_k_grouped(x, c, offsets, dw, False, c_rows=c_rows, c_scale=scale, config=cfg)
    expected = grouped_gemm_dw_ref(x.double(), c[c_rows.long()].double() * scale[:, None].double(), offsets)
    rel = 1e-5 if dtype == torch.float32 else 2e-3  # fp16: the scaled operand rounded, 150 terms
    assert_close(dw.double(), expected, f"scaled dW at the GPU tiles ({dtype})", atol=rel * 4, rtol=rel)
    assert torch.equal(dw[0], torch.zeros(K, N, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("n", [136, 2056], ids=["N136", "N2056"])
def test_persistent_at_the_gpu_tiles(n, dtype):
    """The persistent M-grouped kernel at the sm_90 bf16 configs (128 x 128 x 64 below N = 2048,
    128 x 256 x 64 from it), with moe_ffn's indirections (A rows gathered, out rows scattered, rows
    scaled): groups of 0, 1, 130 and 257 rows (none, a partial tile, a full tile and a partial, two
    and a partial), 6 padding rows, K past one step and not a multiple of BLOCK_K. The interpreter's
    grid is 3 x ctas_per_sm programs, so each program loops over several tiles. It matches the fp64
    reference, and the one-program-per-tile kernel bit for bit (the same tile code)."""
    cfg = ggt.m_grouped_config(n, 130, torch.bfloat16, torch.device("cuda"))
    assert (cfg.block_m, cfg.block_n, cfg.block_k) == (128, 128 if n < 2048 else 256, 64), cfg
    assert not cfg.persistent, "the dispatch default is one program per tile"
    sizes, pad, K, T = [0, 1, 130, 257], 6, 130, 211
    M = sum(sizes) + pad
    x = torch.randn(T, K).to(dtype)
    b = (torch.randn(len(sizes), K, n) / K**0.5).to(dtype)
    offsets = _offsets(sizes)
    a_rows = torch.randint(0, T, (M,), dtype=torch.int32)
    out_rows = torch.randperm(M).to(torch.int32)
    scale = torch.rand(M)
    outs = {}
    for persistent in (True, False):
        out = torch.full((M, n), float("nan"), dtype=dtype)
        run = replace(cfg, persistent=persistent)
        ggt.launch_m_grouped(
            x, b, offsets, out, False, a_rows=a_rows, out_rows=out_rows, row_scale=scale, config=run
        )
        outs[persistent] = out
    expected = torch.zeros(M, n, dtype=torch.float64)
    used = sum(sizes)
    rows = grouped_gemm_ref(x[a_rows[:used].long()].double(), b.double(), offsets)
    expected[out_rows[:used].long()] = rows * scale[:used, None].double()
    rel = 1e-5 if dtype == torch.float32 else 2e-3  # fp16: the output rounded once, 130 terms
    assert_close(
        outs[True].double(), expected, f"persistent at the GPU tiles ({dtype})", atol=rel * 4, rtol=rel
    )
    assert torch.equal(outs[True], outs[False]), "persistent and per-tile kernels differ"


def test_persistent_empty_experts_and_zero_tokens():
    """Empty experts, padding rows only, no rows at all, K = 0: legal, zeros where they belong."""
    cfg = replace(ggt.MGroupedConfig(16, 16, 16, 2, 4, 1), persistent=True, ctas_per_sm=1)
    a, b, offsets = _operands([0, 0, 0], 8, 12, torch.float32, False, pad=21)
    out = torch.full((21, 12), float("nan"))
    ggt.launch_m_grouped(a.detach(), b.detach(), offsets, out, False, config=cfg)
    assert torch.equal(out, torch.zeros(21, 12)), "padding rows of a grid of empty experts are not zero"
    none = torch.empty(0, 12)
    ggt.launch_m_grouped(
        torch.empty(0, 8), b.detach(), torch.zeros(4, dtype=torch.int32), none, False, config=cfg
    )
    sizes = [3, 0, 18]
    a, b, offsets = _operands(sizes, 0, 5, torch.float32, True, pad=2)
    out = torch.full((23, 5), float("nan"))
    ggt.launch_m_grouped(a.detach(), b.detach(), offsets, out, True, config=cfg)
    assert torch.equal(out, torch.zeros(23, 5)), "K = 0 did not give exact zeros"


def test_persistent_selected_by_environment(monkeypatch):
    """$SEEDVL_GROUPED_GEMM_PERSISTENT=1 runs the whole op (forward and dgrad) on the persistent
    kernel, with the same bits; a value other than 0/1 is an error naming the variable."""
    sizes = PATTERNS["empty_experts"]
    a, b, offsets = _operands(sizes, 33, 17, torch.float32, False, pad=3)
    g = torch.randn(a.shape[0], 17)
    launched = []
    kernel = ggt._grouped_gemm_fwd_persistent_kernel
    results = {}
    for value in ("0", "1"):
        monkeypatch.setenv(ggt.PERSISTENT_ENV, value)
        monkeypatch.setattr(ggt, "_grouped_gemm_fwd_persistent_kernel", _Recorder(kernel, launched))
        out = grouped_gemm(a, b, offsets, impl="triton")
        results[value] = (out, *torch.autograd.grad(out, (a, b), g))
    assert len(launched) == 2, f"expected the forward and dgrad on the persistent kernel, got {len(launched)}"
    for x, y in zip(results["0"], results["1"], strict=True):
        assert torch.equal(x, y)
    monkeypatch.setenv(ggt.PERSISTENT_ENV, "yes")
    with pytest.raises(ValueError, match=ggt.PERSISTENT_ENV):
        grouped_gemm(a, b, offsets, impl="triton")


@pytest.mark.parametrize("kind", ["m_grouped", "k_grouped"])
def test_search_candidates_at_the_gpu_tiles(kind):
    """Every config $SEEDVL_AUTOTUNE=search may pick on a GPU, run under the interpreter in fp16 with
    moe_ffn's indirections against the fp64 reference: groups of 0, 1, 130 and 70 rows, K past two
    BLOCK_K steps and not a multiple of them, N past one 128-wide tile."""
    sizes, K, N, T = [0, 1, 130, 70], 130, 136, 97
    M = sum(sizes)
    offsets = _offsets(sizes)
    x = torch.randn(T, K).to(torch.float16)
    rows = torch.randint(0, T, (M,), dtype=torch.int32)
    scale = torch.rand(M)
    if kind == "m_grouped":
        b = (torch.randn(len(sizes), K, N) / K**0.5).to(torch.float16)
        out_rows = torch.randperm(M).to(torch.int32)
        expected = torch.empty(M, N, dtype=torch.float64)
        product = grouped_gemm_ref(x[rows.long()].double(), b.double(), offsets)
        expected[out_rows.long()] = product * scale[:, None].double()
        for cfg in ggt.M_CANDIDATES:
            out = torch.full((M, N), float("nan"), dtype=torch.float16)
            ggt.launch_m_grouped(
                x, b, offsets, out, False, a_rows=rows, out_rows=out_rows, row_scale=scale, config=cfg
            )
            assert_close(out.double(), expected, f"M-grouped {cfg}", atol=8e-3, rtol=2e-3)
    else:
        c = torch.randn(T, N).to(torch.float16)
        expected = grouped_gemm_dw_ref(
            x[rows.long()].double(), c[rows.long()].double() * scale[:, None].double(), offsets
        )
        for cfg in ggt.K_CANDIDATES:
            dw = torch.full((len(sizes), K, N), float("nan"), dtype=torch.float16)
            ggt.launch_k_grouped(
                x, c, offsets, dw, False, a_rows=rows, c_rows=rows, c_scale=scale, config=cfg
            )
            assert_close(dw.double(), expected, f"K-grouped {cfg}", atol=8e-3, rtol=2e-3)
            assert torch.equal(dw[0], torch.zeros(K, N, dtype=torch.float16))


@pytest.fixture
def _searching(monkeypatch):
    """The search path on CPU: a "GPU" where every launch may be searched, with a fake clock that
    hands out the next of a list of times without running the candidate (each candidate's numerics
    are tested above). Yields the list of timings taken."""
    from seedvl_kernels import grouped_gemm_tune

    timed, clock = [], iter([])

    def fake_time(fn):
        timed.append(fn)
        return next(clock)

    def set_clock(times):
        nonlocal clock
        clock = iter(times)

    monkeypatch.setenv(grouped_gemm_tune.AUTOTUNE_ENV, "search")
    monkeypatch.setattr(grouped_gemm_tune, "_searchable", lambda device: True)
    monkeypatch.setattr(grouped_gemm_tune, "_time_ms", fake_time)
    grouped_gemm_tune.forget()
    yield timed, set_clock
    grouped_gemm_tune.forget()


def test_search_is_keyed_on_n_k_and_dtype_not_m(_searching, monkeypatch):
    """The first launch of an (N, K, dtype) key times each candidate and keeps the fastest; later
    launches with other row counts reuse it without timing; a new N searches again; an empty first
    launch neither times nor records; "pinned" never times; a bad mode names the variable."""
    from seedvl_kernels import grouped_gemm_tune

    timed, set_clock = _searching
    grids = []
    monkeypatch.setattr(ggt, "_grouped_gemm_fwd_kernel", _Recorder(ggt._grouped_gemm_fwd_kernel, grids))
    K, N, E = 64, 136, 3
    b = (torch.randn(E, K, N) / K**0.5).to(torch.float16)
    heuristic = ggt.m_grouped_config(N, K, torch.float16, torch.device("cpu"))  # the launch's device
    candidates = ggt.search_candidates(heuristic, torch.float16)
    assert candidates == [heuristic, *ggt.M_CANDIDATES]
    winner = candidates.index(ggt.MGroupedConfig(64, 128, 64, 8, 4, 4))

    def launch(sizes, n=N):
        a = torch.randn(sum(sizes), K).to(torch.float16)
        out = torch.empty(sum(sizes), n, dtype=torch.float16)
        ggt.launch_m_grouped(a, b[..., :n], _offsets(sizes), out, False)
        return a, out

    launch([0, 0, 0])  # no rows: nothing to time, nothing recorded
    assert not timed and not grouped_gemm_tune.chosen()
    set_clock([3.0 if i != winner else 1.0 for i in range(len(candidates))])
    launch([5, 0, 12])
    assert len(timed) == len(candidates)
    assert list(grouped_gemm_tune.chosen().values()) == [candidates[winner]]
    grids.clear()
    sizes = [40, 3, 77]
    a, out = launch(sizes)  # another M: the same key
    assert len(timed) == len(candidates), "a new row count searched again"
    assert grids == [((triton_cdiv(sum(sizes), 64) + E) * triton_cdiv(N, 128),)], grids
    assert_close(
        out,
        grouped_gemm_ref(a.double(), b.double(), _offsets(sizes)),
        "with the winner",
        **tol(torch.float16, 4),
    )
    set_clock([1.0] * len(candidates))
    launch([5, 0, 12], n=72)  # another N: a new key
    assert len(timed) == 2 * len(candidates) and len(grouped_gemm_tune.chosen()) == 2
    monkeypatch.setenv(grouped_gemm_tune.AUTOTUNE_ENV, "pinned")
    grouped_gemm_tune.forget()
    launch([5, 0, 12])
    assert len(timed) == 2 * len(candidates) and not grouped_gemm_tune.chosen()
    monkeypatch.setenv(grouped_gemm_tune.AUTOTUNE_ENV, "fast")
    with pytest.raises(ValueError, match=grouped_gemm_tune.AUTOTUNE_ENV):
        launch([5, 0, 12])


def test_search_covers_the_wgrad_and_skips_fp32(_searching):
    """The K-grouped (wgrad) launch searches its own candidates once per key; fp32 is not searched."""
    from seedvl_kernels import grouped_gemm_tune

    timed, set_clock = _searching
    sizes, K, N = [9, 0, 14], 40, 24
    g = torch.randn(sum(sizes), N).to(torch.float16)
    a = torch.randn(sum(sizes), K).to(torch.float16)
    heuristic = ggt.k_grouped_config(N, K, torch.float16, torch.device("cpu"))
    candidates = ggt.search_candidates(heuristic, torch.float16)
    assert candidates == [heuristic, *ggt.K_CANDIDATES]
    set_clock([2.0, 3.0, 1.0, 3.0])
    dw = torch.empty(len(sizes), K, N, dtype=torch.float16)
    ggt.launch_k_grouped(a, g, _offsets(sizes), dw, False)
    assert len(timed) == len(candidates)
    (choice,) = grouped_gemm_tune.chosen().values()
    assert choice == candidates[2]
    assert_close(
        dw,
        grouped_gemm_dw_ref(a.double(), g.double(), _offsets(sizes)),
        "wgrad, winner",
        **tol(torch.float16, 4),
    )
    ggt.launch_k_grouped(a.float(), g.float(), _offsets(sizes), dw.float(), False)
    assert len(timed) == len(candidates), "fp32 was searched"


def triton_cdiv(x: int, y: int) -> int:
    return -(-x // y)


class _Recorder:
    """A kernel stand-in that records each launch and forwards it."""

    def __init__(self, kernel, launched: list):
        self.kernel, self.launched = kernel, launched

    def __getitem__(self, grid):
        self.launched.append(grid)
        return self.kernel[grid]


def test_all_groups_empty_and_no_rows():
    a, b, offsets = _operands([0, 0, 0], 5, 4, torch.float32, False, pad=4)
    out = grouped_gemm(a, b, offsets, impl="triton")
    da, db = torch.autograd.grad(out, (a, b), torch.randn_like(out))
    assert torch.equal(out, torch.zeros(4, 4)) and torch.equal(da, torch.zeros_like(a))
    assert torch.equal(db, torch.zeros_like(b))
    b2 = torch.randn(2, 5, 3, requires_grad=True)
    a2 = torch.empty(0, 5, requires_grad=True)
    empty = grouped_gemm(a2, b2, torch.zeros(3, dtype=torch.int32), impl="triton")
    assert empty.shape == (0, 3)
    (db2,) = torch.autograd.grad(empty, b2, torch.empty(0, 3))
    assert torch.equal(db2, torch.zeros_like(b2))


def test_strided_and_unaligned_inputs():
    """No alignment requirement: a row-strided view with an odd storage offset and a strided b."""
    sizes = [5, 0, 7]
    base = torch.randn(sum(sizes) * 21 + 1)
    a = base[1:].view(sum(sizes), 21)[:, :19]  # row stride 21, storage offset 1 element
    b = torch.randn(3, 30, 19)[:, 2:27]  # (E, N=25, K=19) with a row stride of 19 and offset
    offsets = _offsets(sizes)
    out = grouped_gemm(a, b, offsets, trans_b=True, impl="triton")
    assert_close(out, grouped_gemm_ref(a, b, offsets, True), "strided forward", **tol(torch.float32, 4))


def test_double_backward_matches_reference():
    a, b, offsets = _operands([2, 0, 3, 1], 17, 9, torch.float32, False, pad=1)
    grads = {}
    for impl in ("triton", "ref"):
        out = grouped_gemm(a, b, offsets, impl=impl)
        da, db = torch.autograd.grad(out, (a, b), torch.ones_like(out), create_graph=True)
        grads[impl] = torch.autograd.grad((da * da).sum() + (db * db).sum(), (a, b))
    for x, y, name in zip(grads["triton"], grads["ref"], ("a", "b"), strict=True):
        assert_close(x, y, f"double backward d{name}", **tol(torch.float32, 10))


def test_deterministic_bitwise():
    sizes = PATTERNS["zipf"]
    a, b, offsets = _operands(sizes, 33, 17, torch.float32, True, pad=2)
    g = torch.randn(a.shape[0], 17)

    def run():
        out = grouped_gemm(a, b, offsets, trans_b=True, impl="triton")
        return (out, *torch.autograd.grad(out, (a, b), g))

    for x, y in zip(run(), run(), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("trans_b", [False, True])
def test_opcheck(trans_b):
    a, b, offsets = _operands([2, 0, 3, 1], 5, 3, torch.float32, trans_b, pad=2)
    torch.library.opcheck(torch.ops.seedvl.grouped_gemm.default, (a, b, offsets, trans_b, "triton"))
    g = torch.randn(a.shape[0], 3, requires_grad=True)
    torch.library.opcheck(torch.ops.seedvl.grouped_gemm_dw.default, (a, g, offsets, trans_b, "triton"))


def test_torch_compile_fullgraph():
    a, b, offsets = _operands([4, 0, 6, 3], 9, 7, torch.float32, False, pad=2)

    def f(a, b, offsets):
        return torch.relu(grouped_gemm(a, b, offsets, impl="triton")).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(a, b, offsets)
    grads = torch.autograd.grad(loss, (a, b))
    loss_ref = f(a, b, offsets)
    grads_ref = torch.autograd.grad(loss_ref, (a, b))
    assert_close(loss, loss_ref, "compiled loss", **tol(torch.float32))
    for x, y in zip(grads, grads_ref, strict=True):
        assert_close(x, y, "compiled grad", **tol(torch.float32))


def test_dispatch():
    assert sk.implementations("grouped_gemm") == ["ref", "triton", "cuda"]
    a, b, offsets = _operands([1, 1], 4, 4, torch.float64, False)
    with pytest.raises(sk.ImplUnavailableError, match=r"grouped_gemm: impl='triton'.*float64"):
        grouped_gemm(a, b, offsets, impl="triton")
    assert sk.resolve("grouped_gemm", None, torch.device("cpu"), torch.float32) == "ref"


# ----------------------------------------------------------------------------- GPU, bf16, model shapes


def _zipf_sizes(rows: int, experts: int) -> list[int]:
    probs = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** 1.2
    ids = torch.multinomial(probs, rows, replacement=True)
    counts = torch.bincount(ids, minlength=experts)  # test setup on the host, not the op under test
    counts[torch.randperm(experts)[: experts // 8]] = 0  # >= 10% empty experts
    return counts.tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("K,N", [(2048, 1536), (768, 2048)], ids=["gate_up_30b", "down_30b"])
def test_gpu_bf16_model_shape(K, N, trans_b):
    device = torch.device("cuda")
    sizes = _zipf_sizes(4096 * 8, 128)
    a, b, offsets = _operands(sizes, K, N, torch.bfloat16, trans_b, pad=64, device=device)
    out = grouped_gemm(a, b, offsets, trans_b=trans_b, impl="triton")
    g = torch.randn(out.shape, device=device).to(torch.bfloat16)
    da, db = torch.autograd.grad(out, (a, b), g)
    a32, b32 = _fp32(a, b)
    ref = grouped_gemm(a32, b32, offsets, trans_b=trans_b, impl="ref")
    da_ref, db_ref = torch.autograd.grad(ref, (a32, b32), g.float())
    ref_lowp = grouped_gemm(a.detach(), b.detach(), offsets, trans_b=trans_b, impl="ref")
    assert_matches_ref_error(out, ref_lowp, ref, "forward bf16")
    # The bf16 reference rounds once like the kernel: compare gradients at 2x its own error too.
    da_lowp = grouped_gemm(g, b.detach(), offsets, trans_b=not trans_b, impl="ref")
    assert_matches_ref_error(da, da_lowp, da_ref, "dA bf16")
    db_lowp = grouped_gemm_dw_ref(a.detach(), g, offsets, trans_b)
    assert_matches_ref_error(db, db_lowp, db_ref, "dB bf16")
    for e, size in enumerate(sizes):
        if size == 0:
            assert torch.equal(db[e], torch.zeros_like(db[e]))
    assert torch.equal(out[sum(sizes) :], torch.zeros_like(out[sum(sizes) :]))


@pytest.mark.gpu
def test_gpu_sync_free_and_bitwise_deterministic():
    device = torch.device("cuda")
    sizes = _zipf_sizes(4096 * 8, 128)
    a, b, offsets = _operands(sizes, 2048, 1536, torch.bfloat16, False, device=device)
    g = torch.randn(a.shape[0], 1536, device=device).to(torch.bfloat16)

    def run():
        out = grouped_gemm(a, b, offsets, impl="triton")
        return (out, *torch.autograd.grad(out, (a, b), g))

    first = run()  # compiles outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        second = run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)
