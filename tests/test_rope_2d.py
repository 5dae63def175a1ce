"""rope_2d: the reference against independent formulations; Triton and CUDA against the reference."""

import importlib

import pytest
import torch

import seedvl_kernels as sk
from tests.utils import assert_close, tol

rope_mod = importlib.import_module("seedvl_kernels.rope_2d")  # the module; the package exports the function


def _positions(T: int, max_pos: int = 60) -> torch.Tensor:
    return torch.randint(0, max_pos, (T, 2), dtype=torch.int32)


def _complex_rotation(x: torch.Tensor, pos_hw: torch.Tensor, theta: float) -> torch.Tensor:
    """Independent formulation in float64: pair (i, i + D/2) is a complex number times e^(i*angle)."""
    D = x.shape[-1]
    q = D // 4
    j = torch.arange(q, dtype=torch.float64)
    f = (theta ** (-j / q)).float().double()  # the spec rounds the frequencies to fp32 once
    angle = torch.cat([pos_hw[:, :1].double() * f, pos_hw[:, 1:].double() * f], dim=-1)  # (T, D/2)
    xd = x.double()
    z = (
        torch.complex(xd[..., : D // 2], xd[..., D // 2 :])
        * torch.polar(torch.ones_like(angle), angle)[:, None]
    )
    return torch.cat([z.real, z.imag], dim=-1)


def _qwen2_vl_rotation(x: torch.Tensor, pos_hw: torch.Tensor, theta: float) -> torch.Tensor:
    """The Qwen2-VL vision RoPE recipe (inv_freq over dim = D/2, table indexed by (row, col), rotate_half)."""
    D = x.shape[-1]
    dim = D // 2
    inv = (1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)).double()  # fp32, as Qwen2-VL
    table = torch.outer(torch.arange(int(pos_hw.max()) + 1, dtype=torch.float64), inv)
    freqs = table[pos_hw.long()].flatten(1)  # (T, D/2): row freqs then col freqs
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    xd = x.double()
    rotated = torch.cat([-xd[..., D // 2 :], xd[..., : D // 2]], dim=-1)
    return xd * emb.cos() + rotated * emb.sin()


@pytest.mark.parametrize("T,H,D", [(1, 1, 4), (37, 3, 16), (50, 2, 64), (9, 4, 72)])
def test_ref_matches_complex_rotation(T, H, D):
    x = torch.randn(T, H, D, dtype=torch.float64)
    pos = _positions(T)
    expected = _complex_rotation(x, pos, 10000.0)
    assert_close(rope_mod.rope_2d_ref(x, pos), expected, "rope_2d_ref fp64", atol=1e-6, rtol=1e-6)
    assert_close(rope_mod.rope_2d_ref(x.float(), pos), expected, "rope_2d_ref fp32", **tol(torch.float32, 10))


def test_ref_matches_qwen2_vl_convention():
    x = torch.randn(41, 2, 80, dtype=torch.float64)
    pos = _positions(41, 200)
    # Both round the frequencies to fp32 (Qwen2-VL via an fp32 pow, one ulp apart at most): the angles
    # then differ by up to max_pos * 2^-23 rad.
    bound = 200 * 2.0**-23 * 4 * float(x.abs().max())
    assert_close(
        rope_mod.rope_2d_ref(x, pos, 10000.0),
        _qwen2_vl_rotation(x, pos, 10000.0),
        "vs Qwen2-VL",
        atol=bound,
        rtol=0,
    )


def test_theta_changes_result():
    x = torch.randn(8, 1, 16)
    pos = _positions(8) + 1
    assert not torch.allclose(sk.rope_2d(x, pos, 10000.0), sk.rope_2d(x, pos, 100.0))


def test_inverse_undoes_rotation_and_zero_position_is_identity():
    x = torch.randn(20, 3, 32, dtype=torch.float64)
    pos = _positions(20)
    y = sk.rope_2d(x, pos)
    assert_close(sk.rope_2d(y, pos, inverse=True), x, "inverse(rope(x))", atol=1e-12, rtol=1e-12)
    zero = torch.zeros(20, 2, dtype=torch.int32)
    assert torch.equal(sk.rope_2d(x, zero), x)


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_backward_against_complex_rotation(impl, dtype):
    T, H, D = 29, 3, 32
    x = torch.randn(T, H, D, dtype=dtype, requires_grad=True)
    pos = _positions(T)
    y = sk.rope_2d(x, pos, impl=impl)
    assert y.dtype == dtype and y.is_contiguous()
    assert_close(y, _complex_rotation(x.detach(), pos, 10000.0), f"{impl} forward {dtype}", **tol(dtype, 2))
    g = torch.randn(T, H, D, dtype=dtype)
    (dx,) = torch.autograd.grad(y, x, g)
    xd = x.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(_complex_rotation(xd, pos, 10000.0), xd, g.double())
    assert_close(dx, expected, f"{impl} backward {dtype}", **tol(dtype, 2))


def test_triton_matches_ref_on_strided_view_and_empty():
    qkv = torch.randn(33, 3, 4, 16)  # (T, 3, H, D): q is a strided view
    pos = _positions(33)
    q = qkv[:, 0]
    assert not q.is_contiguous()
    assert_close(
        sk.rope_2d(q, pos, impl="triton"),
        sk.rope_2d(q.contiguous(), pos, impl="ref"),
        "strided q",
        **tol(torch.float32),
    )
    empty = torch.empty(0, 4, 16)
    for impl in ("ref", "triton"):
        assert sk.rope_2d(empty, torch.empty(0, 2, dtype=torch.int32), impl=impl).shape == (0, 4, 16)


@pytest.mark.parametrize("D", [16, 72])
def test_cos_sin_table_alone_and_beside_the_rotation(D):
    """The (T, 2, D/2) table varlen_attention reads: cos, sin of each token's angles (to fp32
    rounding of the accurate functions: values of magnitude <= 1); written alone (no heads) or by
    the launch that rotates x, which still rotates x as rope_2d does. D=72: D/2 is not a power of 2."""
    T = 37  # three 16-token programs, the last partial
    pos = _positions(T, 300)
    expected = rope_mod.cos_sin_table_ref(pos, D, 1e4)
    assert expected.shape == (T, 2, D // 2)
    alone = rope_mod.cos_sin_table(pos, D, 1e4)
    assert_close(alone, expected, f"cos/sin table D={D}", atol=2e-7, rtol=0)
    x = torch.randn(T, 3, D)
    out = torch.full_like(x, float("nan"))
    beside = rope_mod.cos_sin_table(pos, D, 1e4, x=x, out=out)
    assert torch.equal(beside, alone)
    assert_close(
        out, rope_mod.rope_2d_ref(x, pos, 1e4), f"rotation beside the table D={D}", **tol(torch.float32)
    )
    assert rope_mod.cos_sin_table(pos[:0], D, 1e4).shape == (0, 2, D // 2)


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_opcheck(impl):
    x = torch.randn(11, 2, 16, requires_grad=True)
    pos = _positions(11)
    torch.library.opcheck(torch.ops.seedvl.rope_2d.default, (x, pos, 10000.0, False, impl))


def test_torch_compile_fullgraph():
    x = torch.randn(13, 2, 16, requires_grad=True)
    pos = _positions(13)

    def f(x, pos):
        return (sk.rope_2d(x, pos) * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, pos)
    (g,) = torch.autograd.grad(loss, x)
    (g_ref,) = torch.autograd.grad(f(x, pos), x)
    assert_close(loss, f(x, pos), "compiled loss", **tol(torch.float32))
    assert_close(g, g_ref, "compiled grad", **tol(torch.float32))


@pytest.mark.parametrize(
    "x,pos,match",
    [
        ([1.0], torch.zeros(1, 2, dtype=torch.int32), "x: expected a torch.Tensor"),
        (torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.int32), r"x: expected 3 dims"),
        (
            torch.randn(4, 1, 6),
            torch.zeros(4, 2, dtype=torch.int32),
            "x: head dim D must be a positive multiple of 4",
        ),
        (torch.randn(4, 1, 8).to(torch.int32), torch.zeros(4, 2, dtype=torch.int32), "x: expected dtype"),
        (torch.randn(4, 1, 8), torch.zeros(4, 2, dtype=torch.int64), "pos_hw: expected dtype"),
        (torch.randn(4, 1, 8), torch.zeros(5, 2, dtype=torch.int32), "pos_hw: expected size 4"),
        (torch.randn(4, 1, 8), torch.zeros(4, 3, dtype=torch.int32), "pos_hw: expected size 2"),
        (
            torch.randn(4, 1, 16)[..., ::2],
            torch.zeros(4, 2, dtype=torch.int32),
            "x: last dim must be contiguous",
        ),
    ],
)
def test_bad_input_names_the_argument(x, pos, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sk.rope_2d(x, pos)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_gpu_matches_reference_at_vit_sizes(impl, dtype):
    if sk.resolve("rope_2d", "auto", torch.device("cuda"), dtype) != "cuda" and impl == "cuda":
        pytest.skip("seedvl_kernels._C is not built")
    T, H, D = 16384 + 7, 20, 64
    x = torch.randn(T, H, D, device="cuda", dtype=dtype, requires_grad=True)
    pos = torch.randint(0, 450, (T, 2), device="cuda", dtype=torch.int32)
    y = sk.rope_2d(x, pos, impl=impl)
    expected = rope_mod.rope_2d_ref(x.detach().double(), pos)
    assert_close(y, expected, f"{impl} forward {dtype}", **tol(dtype, 4))
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    assert_close(
        dx, rope_mod.rope_2d_ref(g.double(), pos, inverse=True), f"{impl} backward {dtype}", **tol(dtype, 4)
    )
    # A strided q of a fused qkv, and D = 128.
    qkv = torch.randn(4099, 3, 8, 128, device="cuda", dtype=dtype)
    pos = torch.randint(0, 450, (4099, 2), device="cuda", dtype=torch.int32)
    assert_close(
        sk.rope_2d(qkv[:, 1], pos, impl=impl),
        rope_mod.rope_2d_ref(qkv[:, 1].double(), pos),
        f"{impl} strided {dtype}",
        **tol(dtype, 4),
    )


@pytest.mark.gpu
def test_gpu_cuda_follows_current_stream_and_compiles():
    if sk.resolve("rope_2d", "auto", torch.device("cuda"), torch.bfloat16) != "cuda":
        pytest.skip("seedvl_kernels._C is not built")
    x = torch.randn(4096, 20, 64, device="cuda", dtype=torch.bfloat16)
    pos = torch.randint(0, 100, (4096, 2), device="cuda", dtype=torch.int32)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        y = sk.rope_2d(x, pos, impl="cuda")
    side.synchronize()
    assert_close(y, rope_mod.rope_2d_ref(x.double(), pos), "side stream", **tol(torch.bfloat16, 4))
    torch.library.opcheck(torch.ops.seedvl.rope_2d.default, (x[:64], pos[:64], 10000.0, False, "cuda"))
    compiled = torch.compile(lambda a, p: sk.rope_2d(a, p, impl="cuda"), fullgraph=True)
    assert torch.equal(compiled(x, pos), y)
