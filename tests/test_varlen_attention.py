"""varlen_attention: the reference against per-sequence SDPA (forward, lse, backward incl. a gradient
into lse), fused rope against rope_2d then attention, the backward with global out/lse, opcheck,
torch.compile and argument checks."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import seedvl_kernels as sk
from tests.utils import assert_close, tol

va = importlib.import_module("seedvl_kernels.varlen_attention")  # not exported by the package yet
sk_va = va.varlen_attention
NEG_INF = float("-inf")


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def _inputs(lens_q, lens_k=None, hq=4, hkv=4, d=64, pad_q=0, pad_k=0, dtype=torch.float32):
    """Packed q, k, v (with padding rows) and their offsets; k shares q's offsets if lens_k is None."""
    lens_k_ = lens_q if lens_k is None else lens_k
    q = torch.randn(sum(lens_q) + pad_q, hq, d, dtype=dtype)
    k = torch.randn(sum(lens_k_) + pad_k, hkv, d, dtype=dtype)
    v = torch.randn(sum(lens_k_) + pad_k, hkv, d, dtype=dtype)
    return q, k, v, _cu(lens_q), _cu(lens_k_), max(lens_q, default=0), max(lens_k_, default=0)


def _sdpa_attention(q, k, v, cu_q, cu_k, causal, scale):
    """Independent formulation: SDPA per sequence (KV heads repeated for GQA, explicit bottom-right
    mask), lse from torch.logsumexp of explicit scores; rows seeing no key and padding rows are
    out 0, lse -inf."""
    T, hq, d = q.shape
    group = hq // k.shape[1]
    outs, lses = [], []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for q0, q1, k0, k1 in zip(cq[:-1], cq[1:], ck[:-1], ck[1:], strict=True):
        lq, lk = q1 - q0, k1 - k0
        first = lq if lk == 0 else (max(0, lq - lk) if causal else 0)  # first query seeing a key
        outs.append(q.new_zeros(first, hq, d))
        lses.append(q.new_full((hq, first), NEG_INF))
        if first == lq:
            continue
        qs = q[q0 + first : q1].transpose(0, 1)  # (Hq, n, D)
        ks = k[k0:k1].repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[k0:k1].repeat_interleave(group, dim=1).transpose(0, 1)
        i = torch.arange(first, lq)[:, None]
        mask = (
            torch.arange(lk)[None, :] <= i + lk - lq
            if causal
            else torch.ones(lq - first, lk, dtype=torch.bool)
        )
        outs.append(
            F.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=mask, scale=scale)[
                0
            ].transpose(0, 1)
        )
        lses.append(torch.logsumexp((qs @ ks.transpose(1, 2) * scale).masked_fill(~mask, NEG_INF), dim=-1))
    pad = T - cq[-1]
    outs.append(q.new_zeros(pad, hq, d))
    lses.append(q.new_full((hq, pad), NEG_INF))
    return torch.cat(outs), torch.cat(lses, dim=1)


def _grads(fn, q, k, v, g_out, g_lse):
    """(out, lse, dq, dk, dv) of fn(q, k, v) -> (out, lse) for output gradients g_out, g_lse."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves)
    grads = torch.autograd.grad(
        [out, lse], leaves, [g_out.to(out.dtype), g_lse.to(lse.dtype)], allow_unused=True
    )
    return (
        out.detach(),
        lse.detach(),
        *(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)),
    )


def _compare(q, k, v, cu_q, cu_k, mq, mk, causal=False, scale=None, shared=False, scale_tol=4.0, name=""):
    """Op (in q's dtype) against SDPA in fp64 on the same values: out, lse, dq, dk, dv."""
    g_out = torch.randn(q.shape, dtype=torch.float64)
    g_lse = torch.randn(q.shape[1], q.shape[0], dtype=torch.float64)  # nonzero also on -inf rows
    kw = {} if shared else {"cu_seqlens_k": cu_k, "max_seqlen_k": mk}

    def op(q_, k_, v_):
        return sk_va(q_, k_, v_, cu_q, mq, causal=causal, softmax_scale=scale, return_lse=True, **kw)

    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    got = _grads(op, q, k, v, g_out, g_lse)
    ref = _grads(
        lambda *t: _sdpa_attention(*t, cu_q, cu_k, causal, s),
        q.double(),
        k.double(),
        v.double(),
        g_out,
        g_lse,
    )
    assert got[0].dtype == q.dtype and got[1].dtype == (
        torch.float64 if q.dtype == torch.float64 else torch.float32
    )
    assert got[1].shape == (q.shape[1], q.shape[0])
    for label, a, e in zip(("out", "lse", "dq", "dk", "dv"), got, ref, strict=True):
        assert not a.isnan().any(), f"{name} {label}: NaN"
        assert_close(a, e, f"{name} {label} {q.dtype}", **tol(q.dtype, scale_tol))
    return got


CASES = {
    "noncausal": dict(lens_q=[5, 17, 8]),
    "causal": dict(lens_q=[5, 17, 8], causal=True),
    "causal_lq_ne_lk": dict(lens_q=[6, 9, 3, 4], lens_k=[4, 12, 3, 0], causal=True),
    "noncausal_lq_ne_lk": dict(lens_q=[6, 9, 2], lens_k=[4, 12, 0]),
    "gqa": dict(lens_q=[7, 11], hq=6, hkv=2, causal=True),
    "mqa_scale": dict(lens_q=[9, 4], hq=4, hkv=1, scale=0.3),
    "empty_first_middle_last": dict(lens_q=[0, 7, 0, 5, 0], causal=True),
    "padding": dict(lens_q=[6, 3], lens_k=[5, 8], pad_q=5, pad_k=3, causal=True),
    "long_among_ones": dict(lens_q=[1] * 12 + [40] + [1] * 5, causal=True, hq=2, hkv=1),
    "d72_gqa": dict(lens_q=[13, 6], hq=4, hkv=2, d=72),
    "d80_causal": dict(lens_q=[10, 3], d=80, causal=True, hq=2, hkv=2),
}


# "auto" is the cpu implementation on a CPU, so the reference gets its own pass.
@pytest.mark.parametrize("impl", ["auto", "ref"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_sdpa_fp32(case, impl):
    kw = dict(CASES[case])
    causal, scale = kw.pop("causal", False), kw.pop("scale", None)
    shared = "lens_k" not in kw and "pad_k" not in kw
    q, k, v, cu_q, cu_k, mq, mk = _inputs(**kw)
    with sk.use_impl(varlen_attention=impl):
        got = _compare(q, k, v, cu_q, cu_k, mq, mk, causal, scale, shared=shared, name=f"{impl} {case}")
    if case == "padding":
        out, lse, dq, dk, dv = got
        end_q, end_k = int(cu_q[-1]), int(cu_k[-1])
        assert (
            torch.equal(out[end_q:], torch.zeros_like(out[end_q:])) and torch.isneginf(lse[:, end_q:]).all()
        )
        assert not dq[end_q:].any() and not dk[end_k:].any() and not dv[end_k:].any()


def test_matches_sdpa_fp64():
    q, k, v, cu_q, cu_k, mq, mk = _inputs(
        [0, 9, 4], [3, 7, 6], hq=4, hkv=2, d=16, pad_q=2, dtype=torch.float64
    )
    _compare(q, k, v, cu_q, cu_k, mq, mk, causal=True, scale_tol=10.0, name="fp64")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_against_fp32_reference(dtype):
    q, k, v, cu_q, cu_k, mq, mk = _inputs([9, 0, 21], hq=4, hkv=2, d=64, pad_q=3, pad_k=3, dtype=dtype)
    _compare(q, k, v, cu_q, cu_k, mq, mk, causal=True, shared=True, scale_tol=2.0, name=str(dtype))


def test_causal_rows_without_keys_are_zero_with_zero_grads():
    q, k, v, cu_q, cu_k, mq, mk = _inputs([6], [2], d=16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = sk_va(q, k, v, cu_q, mq, cu_seqlens_k=cu_k, max_seqlen_k=mk, causal=True, return_lse=True)
    assert not out[:4].any() and torch.isneginf(lse[:, :4]).all() and torch.isfinite(lse[:, 4:]).all()
    dq, dk, dv = torch.autograd.grad((out.sum() + lse[:, 4:].sum()), (q, k, v))
    assert not dq[:4].any() and all(torch.isfinite(g).all() for g in (dq, dk, dv))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_rope_equals_rope_2d_then_attention(dtype):
    q, k, v, cu, _, mq, _ = _inputs([8, 0, 15], hq=4, hkv=2, d=32, pad_q=2, pad_k=2, dtype=dtype)
    pos = torch.randint(0, 40, (q.shape[0], 2), dtype=torch.int32)
    g_out, g_lse = torch.randn(q.shape, dtype=dtype), torch.randn(4, q.shape[0], dtype=dtype)

    def fused(q_, k_, v_):
        return sk_va(q_, k_, v_, cu, mq, causal=True, pos_hw=pos, rope_theta=500.0, return_lse=True)

    def unfused(q_, k_, v_):
        return sk_va(
            sk.rope_2d(q_, pos, 500.0), sk.rope_2d(k_, pos, 500.0), v_, cu, mq, causal=True, return_lse=True
        )

    got, expected = _grads(fused, q, k, v, g_out, g_lse), _grads(unfused, q, k, v, g_out, g_lse)
    for label, a, e in zip(("out", "lse", "dq", "dk", "dv"), got, expected, strict=True):
        assert_close(a, e, f"fused rope {label}", **tol(dtype, 10))


def test_backward_takes_global_out_and_lse():
    """Ring-attention use: split each sequence's keys in two blocks, merge the partial results through
    the lse, run the backward op per block with the global out/lse: the sum is the full gradient."""
    lens_q, lens_k = [5, 7], [6, 9]
    q, k, v, cu_q, cu_k, mq, mk = _inputs(lens_q, lens_k, hq=4, hkv=2, d=16, dtype=torch.float64)
    cuts = [3, 4]  # keys [0, cut) of each sequence go to block 0
    idx0 = torch.cat([torch.arange(c) + s for c, s in zip(cuts, cu_k[:-1].tolist(), strict=True)])
    idx1 = torch.cat(
        [torch.arange(c, n) + s for c, n, s in zip(cuts, lens_k, cu_k[:-1].tolist(), strict=True)]
    )
    blocks = [(idx0, _cu(cuts)), (idx1, _cu([n - c for n, c in zip(lens_k, cuts, strict=True)]))]
    fwd, bwd = torch.ops.seedvl.varlen_attention_fwd, torch.ops.seedvl.varlen_attention_bwd
    scale = 0.25
    parts = [fwd(q, k[i], v[i], cu_q, cu_b, mq, mk, False, scale, None, 1e4, "ref") for i, cu_b in blocks]
    lse = torch.logaddexp(parts[0][1], parts[1][1])
    out = sum(torch.exp(part_lse - lse).T[..., None] * o for o, part_lse, *_ in parts)
    dout, dlse = torch.randn_like(q), torch.randn_like(lse)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i, cu_b in blocks:
        gq, gk, gv = bwd(
            dout, dlse, q, k[i], v[i], out, lse, cu_q, cu_b, mq, mk, False, scale, None, 1e4, "ref"
        )
        dq += gq
        dk[i], dv[i] = gk, gv
    full = _grads(lambda *t: _sdpa_attention(*t, cu_q, cu_k, False, scale), q, k, v, dout, dlse)
    for label, a, e in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), full, strict=True):
        assert_close(a, e, f"split-key {label}", **tol(torch.float64, 100))


def test_ops_out_dtype_opcheck_and_errors():
    """The ops' out_dtype (fp32 partials for ring attention): opcheck in bf16; a dtype other than the
    input's or the compute dtype is refused naming out_dtype."""
    fwd, bwd = torch.ops.seedvl.varlen_attention_fwd.default, torch.ops.seedvl.varlen_attention_bwd.default
    q, k, v, cu_q, cu_k, mq, mk = _inputs(
        [3, 0, 5], [4, 2, 5], hq=4, hkv=2, d=8, pad_q=2, dtype=torch.bfloat16
    )
    params = (cu_q, cu_k, mq, mk, True, 0.3, None, 1e4, "ref")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(fwd, (*leaves, *params, torch.float32))
    out, lse, *_ = fwd(q, k, v, *params)
    torch.library.opcheck(bwd, (torch.randn_like(out), None, q, k, v, out, lse, *params, torch.float32))
    expected = r"out_dtype: expected None, torch\.bfloat16 or the compute dtype"
    for bad in (torch.float16, torch.float64):
        with pytest.raises(ValueError, match=expected):
            fwd(q, k, v, *params, bad)
        with pytest.raises(ValueError, match="out_dtype: expected None"):
            bwd(torch.randn_like(out), None, q, k, v, out, lse, *params, bad)


def test_opcheck_fwd_and_bwd():
    fwd, bwd = torch.ops.seedvl.varlen_attention_fwd.default, torch.ops.seedvl.varlen_attention_bwd.default
    q, k, v, cu_q, cu_k, mq, mk = _inputs([3, 0, 5], [4, 2, 5], hq=4, hkv=2, d=8, pad_q=2)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(fwd, (*leaves, cu_q, cu_k, mq, mk, True, 0.3, None, 1e4, "ref"))
    # Fused rope: k packed like q.
    kr, vr = torch.randn(q.shape[0], 2, 8), torch.randn(q.shape[0], 2, 8)
    pos = torch.randint(0, 9, (q.shape[0], 2), dtype=torch.int32)
    leaves = [t.clone().requires_grad_() for t in (q, kr, vr)]
    torch.library.opcheck(fwd, (*leaves, cu_q, cu_q, mq, mq, False, 0.3, pos, 1e4, "ref"))
    out, lse, *_ = fwd(q, k, v, cu_q, cu_k, mq, mk, True, 0.3, None, 1e4, "ref")
    for dlse in (torch.randn_like(lse), None):
        args = (
            torch.randn_like(out),
            dlse,
            q,
            k,
            v,
            out,
            lse,
            cu_q,
            cu_k,
            mq,
            mk,
            True,
            0.3,
            None,
            1e4,
            "ref",
        )
        torch.library.opcheck(bwd, args)
    out, lse, qr, kr = fwd(q, kr, vr, cu_q, cu_q, mq, mq, False, 0.3, pos, 1e4, "ref")
    args = (
        torch.randn_like(out),
        torch.randn_like(lse),
        qr,
        kr,
        vr,
        out,
        lse,
        cu_q,
        cu_q,
        mq,
        mq,
        False,
        0.3,
        pos,
        1e4,
        "ref",
    )
    torch.library.opcheck(bwd, args)


def test_torch_compile_fullgraph():
    q, k, v, cu, *_ = _inputs([4, 0, 9], hq=4, hkv=2, d=16, pad_q=1, pad_k=1)
    pos = torch.randint(0, 9, (q.shape[0], 2), dtype=torch.int32)

    def f(q, k, v, cu, pos, impl="auto"):
        out, lse = sk_va(q, k, v, cu, 9, causal=True, pos_hw=pos, return_lse=True, impl=impl)
        return (out * 2).sum() + lse[:, :13].sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    loss = compiled(*leaves, cu, pos)
    grads = torch.autograd.grad(loss, leaves)
    # The compiled op (auto: the cpu implementation on a CPU) against the same op eager, and
    # against the eager reference (another summation order: 4x the fp32 tolerance).
    for impl, factor in (("auto", 1), ("ref", 4)):
        leaves_e = [t.clone().requires_grad_() for t in (q, k, v)]
        loss_e = f(*leaves_e, cu, pos, impl=impl)
        expected = (loss_e, *torch.autograd.grad(loss_e, leaves_e))
        for label, a, e in zip(("loss", "dq", "dk", "dv"), (loss, *grads), expected, strict=True):
            assert_close(a, e, f"compiled {label} vs eager {impl}", **tol(torch.float32, factor))


def test_dispatch_has_ref_and_triton():
    assert sk.implementations("varlen_attention") == ["ref", "cpu", "triton"]
    q, k, v, cu, _, mq, _ = _inputs([3], d=8)
    with pytest.raises(sk.ImplUnavailableError, match="Triton kernel handles"):
        sk_va(q.double(), k.double(), v.double(), cu, mq, impl="triton")
    with sk.use_impl(varlen_attention="ref"):
        assert sk_va(q, k, v, cu, mq).shape == q.shape


def _bad(**over):
    """Valid arguments (T=6, Hq=4, Hkv=2, D=8, sequences [2, 4]) with some replaced."""
    args = dict(
        q=torch.randn(6, 4, 8),
        k=torch.randn(6, 2, 8),
        v=torch.randn(6, 2, 8),
        cu_seqlens=_cu([2, 4]),
        max_seqlen=4,
    )
    args.update(over)
    return args


I32 = torch.int32
BAD = [
    (_bad(q=[1.0]), "q: expected a torch.Tensor"),
    (_bad(cu_seqlens=[0, 2, 6]), "cu_seqlens: expected a torch.Tensor"),
    (_bad(q=torch.randn(6, 32)), "q: expected 3 dims"),
    (_bad(k=torch.randn(6, 16)), "k: expected 3 dims"),
    (_bad(v=torch.randn(6, 2, 8, 1)), "v: expected 3 dims"),
    (_bad(q=torch.zeros(6, 4, 8, dtype=I32)), "q: expected dtype"),
    (_bad(k=torch.randn(6, 2, 8).half()), "k: expected the dtype of q"),
    (_bad(v=torch.randn(6, 2, 8).double()), "v: expected the dtype of q"),
    (_bad(k=torch.randn(6, 3, 8), v=torch.randn(6, 3, 8)), "k: expected a number of heads Hkv dividing Hq=4"),
    (_bad(k=torch.randn(6, 2, 16), v=torch.randn(6, 2, 16)), "k: expected size 8 in dim 2"),
    (_bad(v=torch.randn(5, 2, 8)), "v: expected the shape of k"),
    (_bad(q=torch.randn(6, 8, 4).transpose(1, 2)), "q: last dim must be contiguous"),
    (_bad(k=torch.randn(6, 2, 8, device="meta")), "k: expected a tensor on cpu"),
    (_bad(cu_seqlens=torch.tensor([0, 2, 6])), "cu_seqlens: expected int32"),
    (_bad(cu_seqlens=torch.zeros(2, 2, dtype=I32)), r"cu_seqlens: expected shape \(B\+1,\)"),
    (_bad(cu_seqlens=torch.tensor([1, 2, 6], dtype=I32)), "cu_seqlens: must start at 0"),
    (_bad(cu_seqlens=torch.tensor([0, 4, 2], dtype=I32)), "cu_seqlens: must be non-decreasing"),
    (_bad(cu_seqlens=torch.tensor([0, 2, 7], dtype=I32), max_seqlen=5), "cu_seqlens: last offset 7 exceeds"),
    (
        _bad(k=torch.randn(4, 2, 8), v=torch.randn(4, 2, 8)),
        r"cu_seqlens \(shared by k\): last offset 6 exceeds",
    ),
    (_bad(max_seqlen=torch.tensor(4)), "max_seqlen: expected a host int"),
    (_bad(max_seqlen=3), r"max_seqlen: 3 is smaller than the longest sequence \(4\)"),
    (_bad(max_seqlen_k=4), "max_seqlen_k: given without cu_seqlens_k"),
    (_bad(cu_seqlens_k=_cu([3, 3])), "max_seqlen_k: required with cu_seqlens_k"),
    (_bad(cu_seqlens_k=_cu([3, 3]), max_seqlen_k=2), "max_seqlen_k: 2 is smaller"),
    (_bad(cu_seqlens_k=_cu([3, 4]), max_seqlen_k=4), "cu_seqlens_k: last offset 7 exceeds the 6"),
    (_bad(cu_seqlens_k=_cu([3, 2, 1]), max_seqlen_k=3), "cu_seqlens_k: expected the shape of cu_seqlens"),
    (_bad(cu_seqlens_k=torch.tensor([0, 3, 6]), max_seqlen_k=3), "cu_seqlens_k: expected int32"),
    (_bad(pos_hw=torch.zeros(6, 2)), "pos_hw: expected dtype"),
    (_bad(pos_hw=torch.zeros(6, dtype=I32)), "pos_hw: expected 2 dims"),
    (_bad(pos_hw=torch.zeros(5, 2, dtype=I32)), "pos_hw: expected size 6 in dim 0"),
    (_bad(pos_hw=torch.zeros(6, 3, dtype=I32)), "pos_hw: expected size 2 in dim 1"),
    (
        _bad(pos_hw=torch.zeros(6, 2, dtype=I32), cu_seqlens_k=_cu([2, 4]), max_seqlen_k=4),
        "pos_hw: fused rope needs k packed like q",
    ),
    (
        _bad(pos_hw=torch.zeros(6, 2, dtype=I32), k=torch.randn(7, 2, 8), v=torch.randn(7, 2, 8)),
        "pos_hw: fused rope needs k packed like q",
    ),
    (
        _bad(
            q=torch.randn(6, 4, 6),
            k=torch.randn(6, 2, 6),
            v=torch.randn(6, 2, 6),
            pos_hw=torch.zeros(6, 2, dtype=I32),
        ),
        "pos_hw: rope_2d needs the head dim D to be a multiple of 4",
    ),
    (_bad(softmax_scale=torch.tensor(0.5)), "softmax_scale: expected a host float"),
    (_bad(impl="fast"), "impl: expected one of"),
]


@pytest.mark.parametrize("args,match", BAD, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(BAD)])
def test_bad_input_names_the_argument(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sk_va(**args)
