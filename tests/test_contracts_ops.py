"""Op contracts under generated input (issue 21): no crash, no silent wrong answer.

For every public op and every implementation this machine can run, hypothesis generates shapes,
dtypes, layouts (strided views, non-contiguous last dims, zero-length pieces, empty experts), host
scalars (0, negative, NaN, inf, huge, wrong types) and device placement (meta tensors), and checks:

* bad input raises ValueError/TypeError/ImplUnavailableError whose message starts with the
  argument's name;
* legal input agrees with an independent float64 computation written here (never the package's
  own reference) within a bound derived from the dtype and the magnitude of the terms summed;
* non-finite input follows the NaN/inf semantics the op's docstring states.

Implementations other than the reference run their tests in a child process (``isolated``): a
kernel that reads out of bounds kills that process, which the parent reports as a failure with the
signal, instead of taking down the whole test session.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seedvl_kernels as sk
from seedvl_kernels import _dispatch

ROOT = Path(__file__).resolve().parent.parent
CHILD_ENV = "SEEDVL_CONTRACT_CHILD"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ERRORS = (ValueError, TypeError, sk.ImplUnavailableError)
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Unit roundoff of each dtype: the error of one rounding relative to the value.
EPS = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

# Deterministic runs (CI must not flake), few examples (the interpreter is slow), no deadline.
settings.register_profile(
    "contracts",
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.load_profile("contracts")


def impls(op: str) -> list[str]:
    """Implementations of ``op`` that serve fp32 on DEVICE here."""
    return [
        i
        for i in sk.implementations(op)
        if _dispatch.unavailable_reason(op, i, DEVICE, torch.float32) is None
    ]


def isolated(request: pytest.FixtureRequest, impl: str = "triton", *, always: bool = False) -> bool:
    """True in the parent for a kernel implementation (or ``always``): the test ran in a child
    process (and passed), so the caller returns. False in the child, or for the reference: the
    caller runs the body. Call it first in a test that draws everything inside (``st.data()``):
    the parent then runs one example, which starts one child."""
    if (impl == "ref" and not always) or os.environ.get(CHILD_ENV) == "1":
        return False
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", request.node.nodeid]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, CHILD_ENV: "1"}, capture_output=True, text=True, timeout=600
    )
    died = f" (killed by signal {-proc.returncode})" if proc.returncode < 0 else ""
    assert proc.returncode == 0, (
        f"{request.node.nodeid} failed in its child process, exit code {proc.returncode}{died}:\n"
        + (proc.stdout + proc.stderr)[-6000:]
    )
    return True


def randn(seed: int, shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``t`` in another layout with a contiguous last dim: "contiguous", "padded" (rows
    of a wider buffer: a strided view, as q of a fused qkv) or "transposed" (dims 0 and 1 swapped in
    memory, for 3-D tensors)."""
    if layout == "padded" and t.dim() >= 2:
        buf = torch.zeros((*t.shape[:-1], t.shape[-1] + 3), dtype=t.dtype, device=t.device)
        buf[..., 1 : 1 + t.shape[-1]] = t
        return buf[..., 1 : 1 + t.shape[-1]]
    if layout == "transposed" and t.dim() == 3:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    return t


def strided_last(t: torch.Tensor) -> torch.Tensor:
    """A view with the values of ``t`` whose last dim has stride 2."""
    buf = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
    buf[..., ::2] = t
    return buf[..., ::2]


def strided_vector(t: torch.Tensor) -> torch.Tensor:
    """A stride-2 view with the values of the 1-D ``t``."""
    buf = torch.zeros(2 * max(t.numel(), 1), dtype=t.dtype, device=t.device)
    buf[::2][: t.numel()] = t
    return buf[::2][: t.numel()]


def offsets_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools_accumulate(lengths)], dtype=torch.int32, device=DEVICE)


def itertools_accumulate(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def assert_within(actual, expected, magnitude, dtype, name: str, factor: float = 8.0, terms: int = 1) -> None:
    """|actual - expected| <= factor * (eps(dtype) + terms * eps(fp32)) * magnitude + tiny, elementwise:
    ``magnitude`` is the float64 computation on absolute values (the scale of what was summed), the
    classic bound for rounded sums and products; ``terms`` the length of fp32-accumulated sums."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    m = magnitude.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    compute_eps = EPS[torch.float64] if dtype == torch.float64 else EPS[torch.float32]
    bound = factor * (EPS[dtype] + terms * compute_eps) * m + 1e-30
    err = (a - e).abs()
    bad = ~(err <= bound)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        got, want, lim = (t.flatten()[i].item() for t in (a, e, bound))
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())} of {a.numel()} elements off; max abs err "
            f"{err.max().item():.3e}, mean {err.mean().item():.3e}; first at flat index {i}: got "
            f"{got:.6e}, expected {want:.6e}, bound {lim:.3e}"
        )


def expect_error(fn: Callable[[], object], arg: str, what: str) -> None:
    """``fn()`` raises one of ERRORS whose message names ``arg`` first (an op's name may precede it
    for ImplUnavailableError)."""
    try:
        fn()
    except ERRORS as err:
        msg = str(err)
        assert (
            msg.startswith(f"{arg}:")
            or f" {arg}" in msg.split(":")[0]
            or isinstance(err, sk.ImplUnavailableError)
        ), f"{what}: message does not name {arg!r}: {msg}"
        return
    except Exception as err:  # any other exception type breaks the contract
        raise AssertionError(f"{what}: raised {type(err).__name__}, not ValueError/TypeError: {err}") from err
    raise AssertionError(f"{what}: accepted (expected an error naming {arg!r})")


# Values no host-float argument accepts (None is the default of some, so it is listed per argument).
BAD_SCALARS = [
    (float("nan"), "NaN"),
    (float("inf"), "inf"),
    (float("-inf"), "-inf"),
    ("1e4", "a string"),
    (True, "a bool"),
    (torch.tensor(1.0), "a tensor"),
]
BAD_THETAS = [*BAD_SCALARS, (None, "None"), (0.0, "0"), (-1.0, "negative"), (0.5, "below 1")]


def meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


# ============================================================================= rope_2d


def rope_oracle(x: torch.Tensor, pos: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, magnitude) in float64 from the contract: f_j = fp32(theta^(-j/Q)), angle = fp32 product
    fp32(pos) * f, then the rotation of pairs (i, i + D/2) in exact arithmetic."""
    D = x.shape[-1]
    q = D // 4
    j = torch.arange(q, dtype=torch.float64)
    f = (1.0 / theta ** (j / q)).float().double()
    p = pos.double().cpu()
    angle = torch.cat([p[:, :1] * f, p[:, 1:2] * f], dim=-1).float().double()[:, None, :]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.double().cpu().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    mag = torch.cat([x1.abs() + x2.abs()] * 2, dim=-1)
    return out, mag


@st.composite
def rope_cases(draw, dtypes):
    T = draw(st.integers(0, 20))
    H = draw(st.integers(0, 3))
    D = draw(st.sampled_from([4, 8, 12, 32]))
    dtype = draw(st.sampled_from(dtypes))
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3]))
    x = strided(randn(draw(st.integers(0, 999)), (T, H, D), dtype, scale), draw(st.sampled_from(LAYOUTS)))
    pos = torch.randint(0, draw(st.sampled_from([1, 50, 2000])), (T, 2), dtype=torch.int32).to(DEVICE)
    if draw(st.booleans()):  # a strided (T, 2) view: pos_hw may have any strides
        pos = torch.stack([pos[:, 0], torch.zeros_like(pos[:, 0]), pos[:, 1]], dim=1)[:, ::2]
    theta = draw(st.sampled_from([1.0, 10.0, 10000.0, 1e6, 1e30]))
    return x, pos, theta


LAYOUTS = ["contiguous", "padded", "transposed"]


@pytest.mark.parametrize("impl", impls("rope_2d"))
@given(case=st.data())
def test_rope_2d_legal(request, impl, case):
    if isolated(request, impl):
        return
    x, pos, theta = case.draw(rope_cases((torch.float32, torch.float16, torch.bfloat16)))
    inverse = case.draw(st.booleans())
    got = sk.rope_2d(x, pos, theta, inverse=inverse, impl=impl)
    expected, mag = rope_oracle(x, pos, theta)
    if inverse:
        expected, _ = rope_oracle(x, -pos.long(), theta)
    # fp32 sin/cos of an angle a: error ~ eps32 * max(1, |a|) after range reduction; plus the rotation.
    assert_within(got, expected, mag, x.dtype, f"rope_2d[{impl}]", factor=8.0)
    assert got.shape == x.shape and got.dtype == x.dtype


@pytest.mark.parametrize("impl", impls("rope_2d"))
@given(case=st.data())
def test_rope_2d_nonfinite_stays_local(request, impl, case):
    if isolated(request, impl):
        return
    x, pos, theta = case.draw(rope_cases((torch.float32, torch.float16)))
    T, H, D = x.shape
    if x.numel() == 0:
        return
    t, h, i = (case.draw(st.integers(0, n - 1)) for n in (T, H, D))
    bad = x.clone()
    bad[t, h, i] = case.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    got = sk.rope_2d(bad, pos, theta, impl=impl)
    clean = sk.rope_2d(x, pos, theta, impl=impl)
    hit = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    hit[t, h, i % (D // 2)] = hit[t, h, i % (D // 2) + D // 2] = True
    assert not got[hit].isfinite().any(), "rope_2d: a non-finite input must reach both dims of its pair"
    assert torch.equal(got[~hit], clean[~hit]), "rope_2d: a non-finite input leaked out of its pair"


@pytest.mark.parametrize("impl", impls("rope_2d"))
@given(case=st.data())
def test_rope_2d_bad_input(request, impl, case):
    if isolated(request, impl):
        return
    x, pos, _ = case.draw(rope_cases((torch.float32,)))
    call = lambda **kw: sk.rope_2d(kw.get("x", x), kw.get("pos_hw", pos), kw.get("theta", 10.0), impl=impl)
    for value, what in BAD_THETAS:
        expect_error(lambda value=value: call(theta=value), "theta", f"theta {what}")
    T, H, D = x.shape
    expect_error(lambda: call(x=x.double().float().long()), "x", "integer x")
    expect_error(lambda: call(x=x[..., :2] if D > 4 else x[..., :3]), "x", "D not a multiple of 4")
    expect_error(lambda: call(x=x.reshape(T, H * D)), "x", "2-D x")
    if T * H > 0:
        expect_error(lambda: call(x=strided_last(x)), "x", "strided last dim")
    expect_error(lambda: call(pos_hw=pos.long()), "pos_hw", "int64 pos_hw")
    expect_error(lambda: call(pos_hw=pos[:, :1]), "pos_hw", "pos_hw with one column")
    expect_error(
        lambda: call(pos_hw=torch.zeros(T + 1, 2, dtype=torch.int32)), "pos_hw", "pos_hw of T+1 rows"
    )
    expect_error(lambda: call(pos_hw=meta_like(pos)), "pos_hw", "pos_hw on another device")
    expect_error(lambda: call(x=x.tolist()), "x", "a list")


def test_rope_2d_meta_is_shape_only():
    x = torch.empty(5, 2, 8, device="meta")
    out = sk.rope_2d(x, torch.empty(5, 2, dtype=torch.int32, device="meta"))
    assert out.device.type == "meta" and out.shape == x.shape


# ============================================================================= varlen_attention


def attention_oracle(q, k, v, cu_q, cu_k, causal, scale, theta=None, pos=None):
    """float64 (out, lse, magnitude, visible) by the contract: ``visible`` (T, Tk) marks the keys each
    query row sees; rows that see none give out 0, lse -inf; with ``pos`` q and k are rotated and
    rounded to their dtype first. ``magnitude`` (T, Hq, 1) bounds what the row's error scales with:
    max |v| times (2 + the row's largest |score|)."""
    dtype = q.dtype
    q, k, v = (t.double().cpu() for t in (q, k, v))
    if pos is not None:
        q, k = (rope_oracle(t, pos, theta)[0].to(dtype).double() for t in (q, k))
    T, Hq, _ = q.shape
    Tk, Hkv, _ = k.shape
    g = Hq // Hkv
    vis = torch.zeros(T, Tk, dtype=torch.bool)
    for b in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        i = torch.arange(q1 - q0)[:, None]
        j = torch.arange(k1 - k0)[None, :]
        see = (j <= i + (k1 - k0) - (q1 - q0)) if causal else torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
        vis[q0:q1, k0:k1] = see
    kx = k.repeat_interleave(g, dim=1)  # (Tk, Hq, D)
    vx = v.repeat_interleave(g, dim=1)
    s = torch.einsum("thd,khd->htk", q, kx) * scale
    s = s.masked_fill(~vis[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (Hq, T)
    p = torch.exp(s - lse[..., None].masked_fill(torch.isneginf(lse)[..., None], 0.0))
    p = p.masked_fill(~vis[None], 0.0)
    out = torch.einsum("htk,khd->thd", p, vx)
    s_abs = (torch.einsum("thd,khd->htk", q.abs(), kx.abs()) * abs(scale)).masked_fill(~vis[None], 0.0)
    v_max = vx.abs().amax(dim=(0, 2)) if Tk else torch.zeros(Hq, dtype=torch.float64)  # (Hq,)
    s_max = s_abs.amax(dim=-1) if Tk else torch.zeros(Hq, T, dtype=torch.float64)
    mag = (v_max[:, None] * (2.0 + s_max)).t()[..., None]  # (T, Hq, 1)
    return out, lse, mag, vis


@st.composite
def attention_cases(draw, dtypes, rope_ok=True):
    dtype = draw(st.sampled_from(dtypes))
    B = draw(st.integers(0, 4))
    lengths = [draw(st.sampled_from([0, 1, 2, 5, 17])) for _ in range(B)]
    separate_k = draw(st.booleans())
    lengths_k = [draw(st.sampled_from([0, 1, 3, 9])) for _ in range(B)] if separate_k else lengths
    pad_q = draw(st.sampled_from([0, 0, 3]))
    T, Tk = sum(lengths) + pad_q, sum(lengths_k) + (draw(st.sampled_from([0, 2])) if separate_k else pad_q)
    hkv = draw(st.sampled_from([1, 2]))
    hq = hkv * draw(st.sampled_from([1, 2]))
    D = draw(st.sampled_from([4, 8, 12, 16]))
    seed = draw(st.integers(0, 999))
    layout = draw(st.sampled_from(LAYOUTS))
    q = strided(randn(seed, (T, hq, D), dtype), layout)
    k = strided(randn(seed + 1, (Tk, hkv, D), dtype), layout)
    v = strided(randn(seed + 2, (Tk, hkv, D), dtype), layout)
    rope = rope_ok and not separate_k and draw(st.booleans())
    pos = torch.randint(0, 40, (T, 2), dtype=torch.int32).to(DEVICE) if rope else None
    return dict(
        q=q,
        k=k,
        v=v,
        cu=offsets_of(lengths),
        cu_k=offsets_of(lengths_k) if separate_k else None,
        max_q=max(lengths, default=0) + draw(st.sampled_from([0, 4])),
        max_k=max(lengths_k, default=0),
        causal=draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.0, 0.3, 2.0])),
        pos=pos,
        theta=draw(st.sampled_from([1.0, 10000.0, 1e30])),
    )


def run_attention(c: dict, impl: str, **overrides):
    c = {**c, **overrides}
    kwargs = dict(
        causal=c["causal"], softmax_scale=c["scale"], rope_theta=c["theta"], return_lse=True, impl=impl
    )
    if c["cu_k"] is not None:
        kwargs.update(cu_seqlens_k=c["cu_k"], max_seqlen_k=c["max_k"])
    if c["pos"] is not None:
        kwargs.update(pos_hw=c["pos"])
    return sk.varlen_attention(c["q"], c["k"], c["v"], c["cu"], c["max_q"], **kwargs)


def check_attention(c: dict, out, lse, name: str) -> None:
    q = c["q"]
    scale = 1.0 / math.sqrt(q.shape[-1]) if c["scale"] is None else c["scale"]
    cu_k = c["cu"] if c["cu_k"] is None else c["cu_k"]
    exp_out, exp_lse, mag, _ = attention_oracle(
        q, c["k"], c["v"], c["cu"].cpu(), cu_k.cpu(), c["causal"], scale, c["theta"], c["pos"]
    )
    # Scores carry the rounding of q and k (and of their rotation) times |score|; P is rounded to
    # v's dtype before P @ V in low precision.
    assert_within(out, exp_out, mag.expand_as(exp_out), q.dtype, f"{name} out", terms=q.shape[-1])
    finite = exp_lse.isfinite()
    assert torch.equal(lse.isneginf().cpu(), exp_lse.isneginf()), f"{name}: lse -inf exactly where no key"
    lse_mag = exp_lse.abs().masked_fill(~finite, 0) + mag[..., 0].t()
    got = lse.masked_fill(~finite.to(lse.device), 0)
    assert_within(got, exp_lse.masked_fill(~finite, 0), lse_mag, q.dtype, f"{name} lse", terms=q.shape[-1])


@pytest.mark.parametrize("impl", impls("varlen_attention"))
@given(case=st.data())
def test_varlen_attention_legal(request, impl, case):
    if isolated(request, impl):
        return
    dtypes = (torch.float32, torch.float16) + ((torch.float64,) if impl == "ref" else ())
    c = case.draw(attention_cases(dtypes))
    out, lse = run_attention(c, impl)
    assert out.dtype == c["q"].dtype and out.shape == c["q"].shape
    check_attention(c, out, lse, f"varlen_attention[{impl}]")
    if c["scale"] != 0.0 and case.draw(st.booleans()):  # gradients against float64 autograd
        check_attention_grads(c, impl)


def check_attention_grads(c: dict, impl: str) -> None:
    if c["pos"] is not None or c["q"].dtype != torch.float32:
        return
    leaves = [t.detach().clone().requires_grad_() for t in (c["q"], c["k"], c["v"])]
    out, lse = run_attention({**c, "q": leaves[0], "k": leaves[1], "v": leaves[2]}, impl)
    g = randn(7, out.shape, torch.float64)
    finite = lse.isfinite()
    (out.double() * g).sum().add((lse.double().masked_fill(~finite, 0)).sum()).backward()
    ref = [t.detach().double().cpu().requires_grad_() for t in (c["q"], c["k"], c["v"])]
    scale = 1.0 / math.sqrt(ref[0].shape[-1]) if c["scale"] is None else c["scale"]
    cu_k = c["cu"] if c["cu_k"] is None else c["cu_k"]
    e_out, e_lse, _, _ = attention_oracle_autograd(*ref, c["cu"].cpu(), cu_k.cpu(), c["causal"], scale)
    (e_out * g.cpu()).sum().add(e_lse.masked_fill(~e_lse.isfinite(), 0).sum()).backward()
    for name, a, e in zip("qkv", leaves, ref, strict=True):
        mag = (e.grad.abs().amax() if e.grad.numel() else e.grad.new_zeros(())) + 1.0  # T = 0 is legal
        assert_within(
            a.grad, e.grad, mag.expand_as(e.grad), torch.float32, f"d{name}[{impl}]", factor=64, terms=64
        )


def attention_oracle_autograd(q, k, v, cu_q, cu_k, causal, scale):
    """attention_oracle through differentiable float64 ops (rows with no key contribute nothing)."""
    Hq = q.shape[1]
    g = Hq // k.shape[1]
    vis = attention_oracle(q.detach(), k.detach(), v.detach(), cu_q, cu_k, causal, scale)[3]
    s = torch.einsum("thd,khd->htk", q, k.repeat_interleave(g, dim=1)) * scale
    s = s.masked_fill(~vis[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isneginf(lse)[..., None]
    p = torch.exp(s - lse.masked_fill(empty[..., 0], 0.0)[..., None]).masked_fill(~vis[None] | empty, 0.0)
    return torch.einsum("htk,khd->thd", p, v.repeat_interleave(g, dim=1)), lse, None, vis


@pytest.mark.parametrize("impl", impls("varlen_attention"))
@given(case=st.data())
def test_varlen_attention_nonfinite_semantics(request, impl, case):
    """NaN score rows: out NaN, lse NaN; +inf score rows the same; rows whose visible scores are all
    -inf: out 0, lse -inf; NaN in v never leaves its sequence; other rows are unchanged."""
    if isolated(request, impl):
        return
    c = case.draw(attention_cases((torch.float32,), rope_ok=False))
    q, k, v = (t.clone() for t in (c["q"], c["k"], c["v"]))
    T, Hq, D = q.shape
    Tk, Hkv = k.shape[:2]
    if T == 0 or Tk == 0:
        return
    kind = case.draw(st.sampled_from(["nan_q", "nan_k", "nan_v", "inf_v", "posinf_score", "neginf_score"]))
    row, head = case.draw(st.integers(0, T - 1)), case.draw(st.integers(0, Hq - 1))
    key = case.draw(st.integers(0, Tk - 1))
    kh = head // (Hq // Hkv)
    scale = 1.0 / math.sqrt(D) if c["scale"] is None else c["scale"]
    cu_k = c["cu"] if c["cu_k"] is None else c["cu_k"]
    vis = attention_oracle(q, k, v, c["cu"].cpu(), cu_k.cpu(), c["causal"], scale)[3]  # (T, Tk)
    heads = torch.zeros(Hq, dtype=torch.bool)
    poisoned = torch.zeros(Hq, T, dtype=torch.bool)  # rows that must be out NaN, lse NaN
    silenced = torch.zeros(Hq, T, dtype=torch.bool)  # rows that must be out 0, lse -inf
    touched = torch.zeros(Hq, T, dtype=torch.bool)  # rows whose out may change
    if kind == "nan_q":  # NaN * 0 is NaN: poisoned at any scale
        q[row, head, 0] = float("nan")
        poisoned[head, row] = vis[row].any()
    elif kind == "nan_k":
        k[key, kh, 0] = float("nan")
        heads[kh * (Hq // Hkv) : (kh + 1) * (Hq // Hkv)] = True
        poisoned[heads] = vis[:, key][None].expand(int(heads.sum()), T)
    elif kind in ("nan_v", "inf_v"):
        v[key, kh, 0] = float("nan") if kind == "nan_v" else float("inf")
        heads[kh * (Hq // Hkv) : (kh + 1) * (Hq // Hkv)] = True
        seq = _same_sequence(c["cu"].cpu(), cu_k.cpu(), key, T)
        touched[heads] = seq[None].expand(int(heads.sum()), T)
    else:
        if scale == 0.0:
            return
        sign = 1.0 if kind == "posinf_score" else -1.0
        q[row, head] = sign * 3e38  # q.k >= 3e38 * 0.5 * D: overflows fp32
        seq = _same_sequence(c["cu"].cpu(), cu_k.cpu(), -1, T, query_row=row)
        k0, k1 = seq
        k[k0:k1, kh] = k[k0:k1, kh].abs() + 0.5  # every visible score of the row is sign * inf
        if sign > 0:
            poisoned[head, row] = vis[row].any()
        else:
            silenced[head, row] = True
    out, lse = run_attention({**c, "q": q, "k": k, "v": v}, impl)
    clean_out, clean_lse = run_attention(
        {**c, "q": c["q"], "k": k if kind.endswith("score") else c["k"]}, impl
    )
    lse, out, clean_out, clean_lse = lse.cpu(), out.cpu(), clean_out.cpu(), clean_lse.cpu()
    o = out.permute(1, 0, 2)  # (Hq, T, D)
    assert o[poisoned].isnan().all() and lse[poisoned].isnan().all(), f"{kind}: poisoned rows must be NaN"
    assert (o[silenced] == 0).all() and lse[silenced].isneginf().all(), (
        f"{kind}: silenced rows: out 0, lse -inf"
    )
    assert not lse.isposinf().any(), f"{kind}: lse is never +inf"
    if kind in ("nan_v", "inf_v"):
        assert torch.equal(lse, clean_lse), f"{kind}: NaN/inf in v must not change lse"
        keep = ~touched
    else:
        keep = ~(poisoned | silenced)
        if kind in ("posinf_score", "neginf_score"):
            keep[head, row] = False
    co = clean_out.permute(1, 0, 2)
    assert torch.equal(o[keep], co[keep]), f"{kind}: rows that neither see nor share the bad value changed"
    assert torch.equal(lse[keep].isnan(), clean_lse[keep].isnan())


def _same_sequence(cu_q, cu_k, key, T, query_row=None):
    """Query rows of the sequence holding key ``key`` (bool (T,)), or the key range of the sequence
    holding ``query_row`` ((k0, k1))."""
    for b in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if query_row is not None and q0 <= query_row < q1:
            return k0, k1
        if query_row is None and k0 <= key < k1:
            rows = torch.zeros(T, dtype=torch.bool)
            rows[q0:q1] = True
            return rows
    return (0, 0) if query_row is not None else torch.zeros(T, dtype=torch.bool)


@pytest.mark.parametrize("impl", impls("varlen_attention"))
@given(case=st.data())
def test_varlen_attention_bad_input(request, impl, case):
    if isolated(request, impl):
        return
    c = case.draw(attention_cases((torch.float32,)))
    c["pos"] = None
    c["cu_k"] = None
    c["k"], c["v"] = c["k"][: c["q"].shape[0]], c["v"][: c["q"].shape[0]]
    if c["k"].shape[0] != c["q"].shape[0]:
        return
    run = lambda **kw: run_attention(c, impl, **kw)
    for value, what in BAD_SCALARS:
        expect_error(lambda value=value: run(scale=value), "softmax_scale", f"softmax_scale {what}")
    for value, what in BAD_THETAS:
        expect_error(lambda value=value: run(theta=value), "rope_theta", f"rope_theta {what}")
    cu = c["cu"]
    expect_error(
        lambda: run(cu=strided_vector(cu)) if cu.numel() > 1 else run(cu=cu.long()),
        "cu_seqlens",
        "strided cu",
    )
    expect_error(lambda: run(cu=cu.long()), "cu_seqlens", "int64 cu_seqlens")
    expect_error(lambda: run(cu=cu[None]), "cu_seqlens", "2-D cu_seqlens")
    expect_error(lambda: run(cu=cu + 1), "cu_seqlens", "cu_seqlens not starting at 0")
    expect_error(lambda: run(cu=meta_like(cu)), "cu_seqlens", "cu_seqlens on another device")
    if int(cu[-1]) > 0:
        expect_error(lambda: run(cu=cu.flip(0) - cu[-1]), "cu_seqlens", "decreasing cu_seqlens")
    expect_error(lambda: run(cu=torch.cat([cu, cu[-1:] + 1000])), "cu_seqlens", "past the rows")
    expect_error(lambda: run(max_q=-1), "max_seqlen", "negative max_seqlen")
    expect_error(lambda: run(max_q=float(c["max_q"])), "max_seqlen", "float max_seqlen")
    if max(cu.diff().tolist(), default=0) > 1:
        expect_error(lambda: run(max_q=1), "max_seqlen", "max_seqlen too small")
    q = c["q"]
    expect_error(lambda: run(k=c["k"].double()), "k", "k of another dtype")
    expect_error(lambda: run(q=q.int()), "q", "integer q")
    expect_error(lambda: run(v=c["v"][:, :, :-1]), "v", "v of another shape")
    expect_error(lambda: run(k=meta_like(c["k"])), "k", "k on another device")
    if q.shape[0] > 0 and q.shape[-1] > 1:
        expect_error(lambda: run(q=strided_last(q)), "q", "strided last dim")
    expect_error(lambda: run(pos=torch.zeros(q.shape[0], 3, dtype=torch.int32)), "pos_hw", "pos_hw (T, 3)")


def test_varlen_attention_meta_is_shape_only():
    q = torch.empty(6, 2, 8, device="meta")
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    out, lse = sk.varlen_attention(q, q, q, cu, 6, return_lse=True)
    assert out.device.type == "meta" and out.shape == q.shape and lse.shape == (2, 6)


# ============================================================================= pool_adapter


def pool_oracle(x, w1, b1, w2, b2):
    """float64 (y, magnitude): GELU(mean4(x) @ w1 + b1) @ w2 + b2; magnitude propagates |terms|
    (|GELU'| <= 1.13) so that roundings of p, h and a in the input dtype are covered."""
    x, w1, b1, w2, b2 = (t.double().cpu() for t in (x, w1, b1, w2, b2))
    p = x.unflatten(0, (-1, 4)).mean(1)
    h = p @ w1 + b1
    a = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    mag_h = p.abs() @ w1.abs() + b1.abs()
    mag_y = (a.abs() + 1.13 * mag_h) @ w2.abs() + b2.abs()
    return a @ w2 + b2, mag_y


@st.composite
def pool_cases(draw, dtypes):
    dtype = draw(st.sampled_from(dtypes))
    N, C, Fh, Co = (draw(st.integers(lo, 9)) for lo in (0, 1, 1, 1))
    seed = draw(st.integers(0, 999))
    scale = draw(st.sampled_from([1.0, 0.01, 10.0]))
    x = strided(randn(seed, (4 * N, C), dtype, scale), draw(st.sampled_from(["contiguous", "padded"])))
    w1 = randn(seed + 1, (C, Fh), dtype, C**-0.5)
    w2 = randn(seed + 2, (Fh, Co), dtype, Fh**-0.5)
    if draw(st.booleans()):  # column-major weights, as nn.Linear(...).weight.t()
        w1 = w1.t().contiguous().t()
    if draw(st.booleans()):
        w2 = w2.t().contiguous().t()
    return x, w1, randn(seed + 3, (Fh,), dtype), w2, randn(seed + 4, (Co,), dtype)


@pytest.mark.parametrize("impl", impls("pool_adapter"))
@given(case=st.data())
def test_pool_adapter_legal(request, impl, case):
    if isolated(request, impl):
        return
    dtypes = (torch.float32, torch.float16) + ((torch.float64,) if impl == "ref" else ())
    x, w1, b1, w2, b2 = case.draw(pool_cases(dtypes))
    y = sk.pool_adapter(x, w1, b1, w2, b2, impl=impl)
    expected, mag = pool_oracle(x, w1, b1, w2, b2)
    assert_within(y, expected, mag, x.dtype, f"pool_adapter[{impl}]", terms=x.shape[1] + w1.shape[1])
    if x.numel() and case.draw(st.booleans()):  # a NaN in one window poisons exactly that output row
        n = case.draw(st.integers(0, x.shape[0] // 4 - 1))
        bad = x.clone()
        bad[4 * n + case.draw(st.integers(0, 3)), case.draw(st.integers(0, x.shape[1] - 1))] = float("nan")
        y_bad = sk.pool_adapter(bad, w1, b1, w2, b2, impl=impl)
        assert y_bad[n].isnan().all(), "pool_adapter: a NaN in a window must poison its row"
        keep = torch.ones(y.shape[0], dtype=torch.bool)
        keep[n] = False
        assert torch.equal(y_bad[keep], y[keep]), "pool_adapter: a NaN leaked into other windows' rows"


@pytest.mark.parametrize("impl", impls("pool_adapter"))
@given(case=st.data())
def test_pool_adapter_bad_input(request, impl, case):
    if isolated(request, impl):
        return
    args = dict(zip(("x", "w1", "b1", "w2", "b2"), case.draw(pool_cases((torch.float32,))), strict=True))
    run = lambda **kw: sk.pool_adapter(**{**args, **kw}, impl=impl)
    x, w1, b1, w2, b2 = args.values()
    expect_error(
        lambda: run(b1=strided_vector(b1)) if b1.numel() > 1 else run(b1=b1[None]), "b1", "strided b1"
    )
    expect_error(
        lambda: run(b2=strided_vector(b2)) if b2.numel() > 1 else run(b2=b2.double()), "b2", "strided b2"
    )
    expect_error(lambda: run(b1=torch.cat([b1, b1])), "b1", "b1 of 2F")
    expect_error(lambda: run(b2=b2.double()), "b2", "b2 of another dtype")
    expect_error(lambda: run(b1=meta_like(b1)), "b1", "b1 on another device")
    expect_error(
        lambda: run(x=torch.cat([x, x[:1] if x.shape[0] else torch.zeros(1, x.shape[1])])), "x", "T % 4"
    )
    expect_error(lambda: run(x=x.int()), "x", "integer x")
    if x.shape[0] and x.shape[1] > 1:
        expect_error(lambda: run(x=strided_last(x)), "x", "strided last dim")
    if w1.shape[0] > 1 and w1.shape[1] > 1:
        expect_error(lambda: run(w1=strided_last(w1)), "w1", "w1 without a unit stride")
    expect_error(
        lambda: run(w2=w2[:-1] if w2.shape[0] > 1 else w2[:, :0]),
        "w2" if w2.shape[0] > 1 else "b2",
        "w2 rows",
    )
    expect_error(lambda: run(w1=w1.tolist()), "w1", "a list")


def test_pool_adapter_meta_is_shape_only():
    x = torch.empty(8, 6, device="meta")
    y = sk.pool_adapter(x, *(torch.empty(s, device="meta") for s in ((6, 5), (5,), (5, 3), (3,))))
    assert y.device.type == "meta" and y.shape == (2, 3)


# ============================================================================= grouped_gemm


@st.composite
def gemm_cases(draw, dtypes):
    dtype = draw(st.sampled_from(dtypes))
    E = draw(st.integers(1, 4))
    sizes = [draw(st.sampled_from([0, 0, 1, 3, 9])) for _ in range(E)]  # empty experts are common
    K, N = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    trans_b = draw(st.booleans())
    seed = draw(st.integers(0, 999))
    M = sum(sizes) + draw(st.sampled_from([0, 2]))  # padding rows past offsets[-1]
    a = strided(randn(seed, (M, K), dtype), draw(st.sampled_from(["contiguous", "padded"])))
    b = strided(randn(seed + 1, (E, N, K) if trans_b else (E, K, N), dtype), draw(st.sampled_from(LAYOUTS)))
    return a, b, offsets_of(sizes), trans_b


def gemm_oracle(a, b, offsets, trans_b):
    a, b = a.double().cpu(), b.double().cpu()
    bounds = offsets.tolist()
    n = b.shape[1] if trans_b else b.shape[2]
    out, mag = (
        torch.zeros(a.shape[0], n, dtype=torch.float64),
        torch.zeros(a.shape[0], n, dtype=torch.float64),
    )
    for e in range(b.shape[0]):
        be = b[e].t() if trans_b else b[e]
        rows = slice(bounds[e], bounds[e + 1])
        out[rows], mag[rows] = a[rows] @ be, a[rows].abs() @ be.abs()
    return out, mag


@pytest.mark.parametrize("impl", impls("grouped_gemm"))
@given(case=st.data())
def test_grouped_gemm_legal(request, impl, case):
    if isolated(request, impl):
        return
    dtypes = (torch.float32, torch.float16) + ((torch.float64,) if impl == "ref" else ())
    a, b, offsets, trans_b = case.draw(gemm_cases(dtypes))
    out = sk.grouped_gemm(a, b, offsets, trans_b=trans_b, impl=impl)
    expected, mag = gemm_oracle(a, b, offsets, trans_b)
    assert_within(out, expected, mag, a.dtype, f"grouped_gemm[{impl}]", terms=a.shape[1])
    if a.dtype == torch.float32 and a.shape[0] and case.draw(st.booleans()):  # gradients, empty groups: 0
        a_ = a.detach().clone().requires_grad_()
        b_ = b.detach().clone().requires_grad_()
        g = randn(5, out.shape, torch.float32)
        sk.grouped_gemm(a_, b_, offsets, trans_b=trans_b, impl=impl).backward(g)
        a64, b64 = a.double().cpu().requires_grad_(), b.double().cpu().requires_grad_()
        gemm_oracle_grad = torch.zeros_like(b64)
        bounds = offsets.tolist()
        da = torch.zeros_like(a64)
        for e in range(b.shape[0]):
            rows = slice(bounds[e], bounds[e + 1])
            ge = g.double().cpu()[rows]
            be = b64[e].detach()
            da[rows] = ge @ (be if trans_b else be.t())
            gemm_oracle_grad[e] = (ge.t() @ a64[rows].detach()) if trans_b else (a64[rows].detach().t() @ ge)
        scale_a = (
            g.abs().double().cpu() @ (b64.abs().amax(0).t() if not trans_b else b64.abs().amax(0))
        ).clamp_min(1)
        assert_within(a_.grad, da, scale_a.amax().expand_as(da), torch.float32, "dA", terms=64)
        assert_within(
            b_.grad,
            gemm_oracle_grad,
            (gemm_oracle_grad.abs().amax() + 1).expand_as(b64),
            torch.float32,
            "dB",
            terms=64,
        )


@pytest.mark.parametrize("impl", impls("grouped_gemm"))
@given(case=st.data())
def test_grouped_gemm_bad_input(request, impl, case):
    if isolated(request, impl):
        return
    a, b, offsets, trans_b = case.draw(gemm_cases((torch.float32,)))
    args = dict(a=a, b=b, offsets=offsets, trans_b=trans_b)
    run = lambda **kw: sk.grouped_gemm(**{**args, **kw}, impl=impl)
    expect_error(lambda: run(offsets=strided_vector(offsets)), "offsets", "strided offsets")
    expect_error(lambda: run(offsets=offsets.long()), "offsets", "int64 offsets")
    expect_error(
        lambda: run(offsets=offsets[:-1] if offsets.numel() > 1 else offsets), "offsets", "E offsets"
    )
    expect_error(lambda: run(offsets=offsets + 1), "offsets", "offsets not from 0")
    expect_error(lambda: run(offsets=torch.cat([offsets[:-1], offsets[-1:] + 99])), "offsets", "past M")
    expect_error(lambda: run(offsets=meta_like(offsets)), "offsets", "offsets on another device")
    expect_error(lambda: run(b=b.double()), "b", "b of another dtype")
    expect_error(lambda: run(trans_b=1), "trans_b", "an int trans_b")
    expect_error(lambda: run(a=a[:, :0] if a.shape[1] > 1 else torch.zeros(a.shape[0], 2)), "b", "K mismatch")
    if a.shape[0] and a.shape[1] > 1:
        expect_error(lambda: run(a=strided_last(a)), "a", "strided last dim")


# ============================================================================= MoE: permute, ffn, route


@st.composite
def moe_cases(draw, dtypes):
    dtype = draw(st.sampled_from(dtypes))
    T, D, Fh = draw(st.integers(0, 12)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
    E, k = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    used = draw(st.integers(1, E))  # experts >= used get no token: empty experts
    seed = draw(st.integers(0, 999))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, used, (T, k), generator=g, dtype=torch.int32).to(DEVICE)
    gate = torch.rand((T, k), generator=g).to(DEVICE)
    x = strided(randn(seed, (T, D), dtype), draw(st.sampled_from(["contiguous", "padded"])))
    w_gu = randn(seed + 1, (E, D, 2 * Fh), dtype, D**-0.5)
    w_d = randn(seed + 2, (E, Fh, D), dtype, Fh**-0.5)
    if draw(st.booleans()):  # non-contiguous index and gate tensors: (T, k) views of wider buffers
        ids = torch.cat([ids, ids], dim=1)[:, ::2]
        gate = torch.cat([gate, gate], dim=1)[:, ::2]
    return x, gate, ids, w_gu, w_d


def moe_oracle(x, gate, ids, w_gu, w_d):
    x, gate, w_gu, w_d = (t.double().cpu() for t in (x, gate, w_gu, w_d))
    out, mag = torch.zeros_like(x), torch.zeros_like(x)
    Fh = w_d.shape[1]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gu, gu_mag = x[t] @ w_gu[e], x[t].abs() @ w_gu[e].abs()
            h = F.silu(gu[:Fh]) * gu[Fh:]
            h_mag = 2.2 * gu_mag[:Fh] * gu_mag[Fh:] + h.abs()
            out[t] += gate[t, j] * (h @ w_d[e])
            mag[t] += gate[t, j].abs() * (h_mag @ w_d[e].abs())
    return out, mag


@pytest.mark.parametrize("impl", impls("moe_ffn"))
@given(case=st.data())
def test_moe_ffn_legal(request, impl, case):
    if isolated(request, impl):
        return
    dtypes = (torch.float32, torch.float16) + ((torch.float64,) if impl == "ref" else ())
    x, gate, ids, w_gu, w_d = case.draw(moe_cases(dtypes))
    out = sk.moe_ffn(x, gate, ids, w_gu, w_d, impl=impl)
    expected, mag = moe_oracle(x, gate, ids, w_gu, w_d)
    assert_within(out, expected, mag, x.dtype, f"moe_ffn[{impl}]", terms=x.shape[1] + w_d.shape[1])


@pytest.mark.parametrize("impl", impls("moe_ffn"))
@given(case=st.data())
def test_moe_ffn_bad_input(request, impl, case):
    if isolated(request, impl):
        return
    x, gate, ids, w_gu, w_d = case.draw(moe_cases((torch.float32,)))
    args = dict(x=x, gate_weights=gate, expert_ids=ids, w_gate_up=w_gu, w_down=w_d)
    run = lambda **kw: sk.moe_ffn(**{**args, **kw}, impl=impl)
    E = w_gu.shape[0]
    expect_error(lambda: run(expert_ids=ids.long()), "expert_ids", "int64 ids")
    if ids.numel():
        expect_error(lambda: run(expert_ids=ids + E), "expert_ids", "ids >= E")
        expect_error(lambda: run(expert_ids=ids - E), "expert_ids", "negative ids")
    expect_error(lambda: run(expert_ids=ids[:, :0]), "expert_ids", "k = 0")
    expect_error(
        lambda: run(gate_weights=gate[:, :1] if gate.shape[1] > 1 else gate.t()[:0]),
        "gate_weights",
        "gate shape",
    )
    expect_error(lambda: run(w_gate_up=w_gu[..., :-1]), "w_gate_up", "odd 2F")
    expect_error(lambda: run(w_down=w_d[:, :, :0] if w_d.shape[2] else w_d), "w_down", "w_down D")
    expect_error(lambda: run(w_gate_up=w_gu[:0]), "w_gate_up", "no experts")
    expect_error(lambda: run(w_down=w_d.double()), "w_down", "w_down dtype")
    expect_error(lambda: run(gate_weights=meta_like(gate)), "gate_weights", "gate on another device")
    expect_error(lambda: run(x=x.int()), "x", "integer x")


@given(case=moe_cases(FLOATS))
def test_moe_permute_unpermute(case):
    x, gate, ids, w_gu, _ = case
    E = w_gu.shape[0]
    x_perm, offsets, row_map = sk.moe_permute(x, ids, E)
    k = ids.shape[1]
    flat = ids.reshape(-1).long().cpu()
    assert offsets.tolist() == [0, *itertools_accumulate([int((flat == e).sum()) for e in range(E)])]
    assert torch.equal(flat[row_map.long().cpu()], flat.sort(stable=True).values), "rows grouped by expert"
    assert torch.equal(x_perm.cpu(), x.cpu()[row_map.long().cpu() // k])
    y = randn(3, x_perm.shape, x.dtype)
    out = sk.moe_unpermute(y, row_map, gate)
    expected = torch.zeros(x.shape, dtype=torch.float64)
    mag = torch.zeros(x.shape, dtype=torch.float64)
    for r, slot in enumerate(row_map.tolist()):
        expected[slot // k] += gate.double().cpu().reshape(-1)[slot] * y.double().cpu()[r]
        mag[slot // k] += gate.double().cpu().reshape(-1)[slot].abs() * y.double().cpu()[r].abs()
    assert_within(out, expected, mag, x.dtype, "moe_unpermute", terms=k)
    expect_error(lambda: sk.moe_permute(x, ids, 0), "num_experts", "no experts")
    expect_error(lambda: sk.moe_permute(x, ids, float(E)), "num_experts", "a float num_experts")
    expect_error(lambda: sk.moe_unpermute(y, row_map.long(), gate), "row_map", "int64 row_map")
    if row_map.numel() > 1:
        expect_error(
            lambda: sk.moe_unpermute(y, torch.zeros_like(row_map), gate), "row_map", "not a permutation"
        )
    expect_error(lambda: sk.moe_unpermute(y[:, None], row_map, gate), "y", "3-D y")


@given(case=st.data())
def test_route(case):
    T, E = case.draw(st.integers(0, 10)), case.draw(st.integers(1, 6))
    k = case.draw(st.integers(1, E))
    score = case.draw(st.sampled_from(["softmax", "sigmoid"]))
    dtype = case.draw(st.sampled_from(FLOATS))
    logits = randn(case.draw(st.integers(0, 999)), (T, E), dtype, case.draw(st.sampled_from([1.0, 30.0])))
    bias = randn(1, (E,), torch.float32, 0.1) if case.draw(st.booleans()) else None
    r = sk.route(logits, k, score=score, bias=bias)
    lg = logits.double().cpu()
    s = torch.softmax(lg, -1) if score == "softmax" else torch.sigmoid(lg)
    ids = r.expert_ids.long().cpu()
    chosen = s.gather(-1, ids) if T else torch.zeros(0, k, dtype=torch.float64)
    w = chosen / chosen.sum(-1, keepdim=True).clamp_min(1e-300)
    assert_within(r.gate_weights, w, torch.ones_like(w), torch.float32, "route gate_weights", terms=E)
    sel = s + (0 if bias is None else bias.double().cpu())
    picked = torch.zeros(T, E, dtype=torch.bool)
    picked.scatter_(1, ids, True)
    if T and k < E:  # every chosen expert scores at least every other (ties in either order)
        low = sel.masked_fill(~picked, float("inf")).amin(-1)
        high = sel.masked_fill(picked, float("-inf")).amax(-1)
        assert (low >= high - 1e-6).all(), "route: a better expert was left out"
    assert torch.equal(r.tokens_per_expert.cpu(), torch.bincount(ids.flatten(), minlength=E).int())
    for value, what in [(0, "0"), (E + 1, "> E"), (1.0, "a float"), (True, "a bool")]:
        expect_error(lambda value=value: sk.route(logits, value), "top_k", f"top_k {what}")
    expect_error(lambda: sk.route(logits, k, score="relu"), "score", "unknown score")
    expect_error(lambda: sk.route(logits, k, bias=torch.zeros(E + 1)), "bias", "bias of E+1")
    expect_error(lambda: sk.route(logits, k, bias=torch.zeros(E, device="meta")), "bias", "bias on meta")
    expect_error(lambda: sk.route(logits.int(), k), "logits", "integer logits")
