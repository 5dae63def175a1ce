"""varlen_attention's cpu implementation (PyTorch's CPU flash-attention kernels on buckets) against the
reference: forward, lse and backward (with and without a gradient into lse) over odd sizes, empty
sequences, q/k of different lengths, GQA, RoPE, padding rows, several buckets, non-positive scales;
the non-finite rules; dispatch; opcheck and torch.compile. The reference itself is checked here
against per-sequence SDPA (test_varlen_attention.py's cases, which now run the cpu implementation
by default)."""

import importlib
import math

import pytest
import torch

import seedvl_kernels as sk
from seedvl_kernels import _dispatch
from tests.test_varlen_attention import _cu, _inputs
from tests.utils import assert_close, tol

va = importlib.import_module("seedvl_kernels.varlen_attention")
sk_va = va.varlen_attention
CPU = torch.device("cpu")


def _run(impl, q, k, v, cu, mq, kw, g_out, g_lse):
    """(out, lse, dq, dk, dv) of the op for output gradients g_out and g_lse (None: lse unused, so
    the backward gets no dlse)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = sk_va(*leaves, cu, mq, return_lse=True, impl=impl, **kw)
    loss = (out.double() * g_out).sum()
    if g_lse is not None:
        loss = loss + (lse.double().masked_fill(~lse.isfinite(), 0.0) * g_lse).sum()
    grads = torch.autograd.grad(loss, leaves)
    return (out.detach(), lse.detach(), *grads)


# (query lengths, key lengths or None: keys packed like queries, options)
SHAPES = {
    "causal": ([5, 17, 8], None, dict(causal=True)),
    "noncausal": ([5, 17, 8, 17, 5], None, {}),
    "causal_lq_ne_lk": ([6, 9, 3, 4, 2], [4, 12, 3, 0, 7], dict(causal=True)),
    "noncausal_lq_ne_lk": ([6, 9, 2, 1], [4, 12, 0, 5], {}),
    "empty_first_middle_last": ([0, 7, 0, 5, 0], None, dict(causal=True)),
    "padding_rows": ([6, 3], [5, 8], dict(causal=True, pad_q=5, pad_k=3)),
    "many_buckets": ([1, 2, 3, 5, 8, 13, 21, 34, 55, 1, 40], None, dict(causal=True)),
    "long": ([300, 7, 129], None, dict(causal=True)),  # several kernel blocks per sequence
    "scale_zero_causal": ([13, 6], None, dict(causal=True, scale=0.0)),
    "scale_negative_causal": ([13, 6, 2], [13, 9, 1], dict(causal=True, scale=-0.4)),
    "scale_negative": ([13, 6], None, dict(scale=-0.4)),
    "rope": ([13, 6, 16, 16], None, dict(rope=True)),
    "rope_causal_padding": ([13, 6, 16], None, dict(rope=True, causal=True, pad_q=3)),
    "rope_equal_images": ([16, 16, 16, 16], None, dict(rope=True)),  # one bucket, no gather
}


def _case(name, dtype, hq=4, hkv=2, d=16):
    lens_q, lens_k, opts = SHAPES[name]
    opts = dict(opts)
    pad_q, pad_k = opts.pop("pad_q", 0), opts.pop("pad_k", 0)
    q, k, v, cu_q, cu_k, mq, mk = _inputs(lens_q, lens_k, hq=hq, hkv=hkv, d=d, pad_q=pad_q, pad_k=pad_k)
    if lens_k is None and pad_k == 0:  # keys packed like queries, including the padding rows
        k, v = torch.randn(q.shape[0], hkv, d), torch.randn(q.shape[0], hkv, d)
    kw = dict(causal=opts.get("causal", False))
    if "scale" in opts:
        kw["softmax_scale"] = opts["scale"]
    if lens_k is not None:
        kw.update(cu_seqlens_k=cu_k, max_seqlen_k=mk)
    if opts.get("rope"):
        kw.update(pos_hw=torch.randint(0, 9, (q.shape[0], 2), dtype=torch.int32), rope_theta=100.0)
    return [t.to(dtype) for t in (q, k, v)], cu_q, mq, kw


@pytest.mark.parametrize("dlse", [False, True], ids=["no_dlse", "dlse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_reference(name, dtype, dlse):
    (q, k, v), cu, mq, kw = _case(name, dtype)
    g_out = torch.randn(q.shape, dtype=torch.float64)
    g_lse = torch.randn(q.shape[1], q.shape[0], dtype=torch.float64) if dlse else None  # also on -inf rows
    got = _run("cpu", q, k, v, cu, mq, kw, g_out, g_lse)
    want = _run("ref", q, k, v, cu, mq, kw, g_out, g_lse)
    assert got[0].dtype == q.dtype and got[1].dtype == want[1].dtype
    assert torch.equal(got[1].isneginf(), want[1].isneginf()), f"{name}: lse -inf exactly where no key"
    for label, a, e in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        assert not a.isnan().any(), f"{name} {label}: NaN"
        finite = e.isfinite()
        assert_close(a.masked_fill(~finite, 0), e.masked_fill(~finite, 0), f"{name} {label}", **tol(dtype, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_matches_reference(dtype):
    """fp16/bf16 rows are computed in fp32 like the reference's; the results differ by the rounding
    of out and of the gradients to the input dtype."""
    (q, k, v), cu, mq, kw = _case("rope_causal_padding", dtype)
    g_out, g_lse = torch.randn(q.shape, dtype=torch.float64), torch.randn(q.shape[1], q.shape[0]).double()
    got = _run("cpu", q, k, v, cu, mq, kw, g_out, g_lse)
    want = _run("ref", q, k, v, cu, mq, kw, g_out, g_lse)
    for label, a, e in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        finite = e.isfinite()
        assert_close(
            a.masked_fill(~finite, 0), e.masked_fill(~finite, 0), f"{label} {dtype}", **tol(dtype, 2)
        )


def test_rows_without_keys_and_padding():
    """Causal rows before the first visible key, rows of sequences without keys and padding rows:
    out 0, lse -inf, and zero gradients into them (also with a gradient into lse)."""
    (q, k, v), cu, mq, kw = _case("padding_rows", torch.float32)
    kw = dict(kw, cu_seqlens_k=_cu([2, 0]), max_seqlen_k=2)  # 6 queries see 2 keys; 3 queries see none
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = sk_va(*leaves, cu, mq, return_lse=True, impl="cpu", **kw)
    dead = torch.zeros(q.shape[0], dtype=torch.bool)
    dead[:4] = True  # rows 0..3 of the first sequence (6 queries, 2 keys, bottom-right)
    dead[6:] = True  # the second sequence (no keys) and the padding rows
    assert not out[dead].any() and torch.isneginf(lse[:, dead]).all() and lse[:, ~dead].isfinite().all()
    loss = (out * torch.randn_like(out)).sum() + (
        lse.masked_fill(lse.isneginf(), 0.0) * torch.randn_like(lse)
    ).sum()
    dq, dk, dv = torch.autograd.grad(loss, leaves)
    assert not dq[dead].any() and not dk[2:].any() and not dv[2:].any()
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


def test_nonfinite_rows_follow_the_contract():
    """A NaN query row: out NaN, lse NaN; a row whose scores all overflow to -inf: out 0, lse -inf;
    a NaN key hidden from earlier rows by the causal mask poisons only the rows that see it; every
    other row is bit for bit the clean run's."""
    (q, k, v), cu, mq, kw = _case("causal", torch.float32)
    q_bad, k_bad = q.clone(), k.abs() + 0.5
    q_bad[7, 1, 0] = float("nan")  # sequence 1 (rows 5..21), head 1
    q_bad[9, 0] = -3e38  # every score of row 9, head 0 is -inf
    k_bad[25, 0, 0] = float("nan")  # sequence 2 (rows 22..29), key 3 of KV head 0 (q heads 0, 1)
    clean_out, clean_lse = sk_va(q, k.abs() + 0.5, v, cu, mq, return_lse=True, impl="cpu", **kw)
    out, lse = sk_va(q_bad, k_bad, v, cu, mq, return_lse=True, impl="cpu", **kw)
    assert out[7, 1].isnan().all() and lse[1, 7].isnan()
    assert not out[9, 0].any() and lse[0, 9].isneginf()
    assert out[25:30, :2].isnan().all() and lse[:2, 25:30].isnan().all()
    keep = torch.ones(q.shape[1], q.shape[0], dtype=torch.bool)  # (Hq, T)
    keep[1, 7] = keep[0, 9] = False
    keep[:2, 25:30] = False
    assert torch.equal(out.transpose(0, 1)[keep], clean_out.transpose(0, 1)[keep])
    assert torch.equal(lse[keep], clean_lse[keep])


def test_dispatch():
    assert _dispatch.resolve("varlen_attention", None, CPU, torch.float32) == "cpu"
    assert _dispatch.resolve("varlen_attention", None, CPU, torch.float64) == "cpu"
    assert _dispatch.resolve("varlen_attention", "ref", CPU, torch.float32) == "ref"
    reason = _dispatch.unavailable_reason("varlen_attention", "cpu", torch.device("meta"), torch.float32)
    assert reason and "CPU tensors" in reason
    assert "has no 'cpu' implementation" in _dispatch.unavailable_reason("rope_2d", "cpu", CPU, torch.float32)
    with pytest.raises(sk.ImplUnavailableError, match="rope_2d: impl='cpu' cannot run this call"):
        sk.rope_2d(torch.randn(3, 1, 8), torch.zeros(3, 2, dtype=torch.int32), impl="cpu")


def test_plan_cache_keys_on_rows():
    """The same offsets with other row counts (padding) or causality get their own plans."""
    q, k, v, cu, _, mq, _ = _inputs([5, 7], pad_q=0, hq=2, hkv=2, d=8)
    for pad, causal in ((0, True), (3, True), (3, False), (0, True)):
        qp, kp, vp = (torch.cat([t, torch.randn(pad, *t.shape[1:])]) for t in (q, k, v))
        got = sk_va(qp, kp, vp, cu, mq, causal=causal, return_lse=True, impl="cpu")
        want = sk_va(qp, kp, vp, cu, mq, causal=causal, return_lse=True, impl="ref")
        for label, a, e in zip(("out", "lse"), got, want, strict=True):
            assert_close(
                a.nan_to_num(neginf=0), e.nan_to_num(neginf=0), f"{label} pad={pad}", **tol(torch.float32)
            )


def test_opcheck():
    fwd, bwd = torch.ops.seedvl.varlen_attention_fwd.default, torch.ops.seedvl.varlen_attention_bwd.default
    q, k, v, cu_q, cu_k, mq, mk = _inputs([3, 0, 5], [4, 2, 5], hq=4, hkv=2, d=8, pad_q=2)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    params = (cu_q, cu_k, mq, mk, True, 0.3, None, 1e4, "cpu")
    torch.library.opcheck(fwd, (*leaves, *params))
    out, lse, *_ = fwd(q, k, v, *params)
    torch.library.opcheck(bwd, (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, *params))
    kr, vr = torch.randn(q.shape[0], 2, 8), torch.randn(q.shape[0], 2, 8)
    pos = torch.randint(0, 9, (q.shape[0], 2), dtype=torch.int32)
    rope = (cu_q, cu_q, mq, mq, False, 0.3, pos, 1e4, "cpu")
    torch.library.opcheck(fwd, (*[t.clone().requires_grad_() for t in (q, kr, vr)], *rope))
    out, lse, qr, kr_ = fwd(q, kr, vr, *rope)
    torch.library.opcheck(bwd, (torch.randn_like(out), None, qr, kr_, vr, out, lse, *rope))


def test_scale_matches_default():
    """softmax_scale None is 1/sqrt(D) on this path too."""
    q, k, v, cu, *_ = _inputs([6, 11], hq=2, hkv=1, d=16)
    a = sk_va(q, k, v, cu, 11, causal=True, impl="cpu")
    b = sk_va(q, k, v, cu, 11, causal=True, softmax_scale=1 / math.sqrt(16), impl="cpu")
    assert torch.equal(a, b)


def test_row_with_all_scores_neginf_has_zero_gradient():
    """A row whose scores all overflow to -inf (lse -inf) adds nothing to the backward, as in the
    reference (P = 0, not exp(-inf + inf))."""
    (q, k, v), cu, mq, kw = _case("causal_lq_ne_lk", torch.float32)
    q, k = q.clone(), k.abs() + 0.5
    q[8, 2] = -3e38  # sequence 1 (rows 6..14), query head 2
    g_out, g_lse = torch.randn(q.shape, dtype=torch.float64), torch.randn(q.shape[1], q.shape[0]).double()
    got = _run("cpu", q, k, v, cu, mq, kw, g_out, g_lse)
    want = _run("ref", q, k, v, cu, mq, kw, g_out, g_lse)
    assert got[1][2, 8].isneginf() and not got[2][8, 2].any()
    for label, a, e in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        assert torch.isfinite(a.masked_fill(e.isneginf(), 0)).all(), f"{label}: not finite"
        finite = e.isfinite()
        a, e = a.masked_fill(~finite, 0), e.masked_fill(~finite, 0)
        assert_close(a, e, label, **tol(torch.float32, 4))


@pytest.mark.parametrize("causal", [True, False])
def test_bad_values_stay_in_their_sequence(causal):
    """Padding slots of a bucket repeat rows of their own sequence: NaN in the first row (q, k, v)
    of a sequence that follows a shorter one in the same bucket leaves every other sequence, and the
    backward into it, bit for bit as without it."""
    lens = [5, 6, 6, 5]  # one bucket (causal: padded to 6; non-causal: two buckets of one shape each)
    q, k, v, cu, *_ = _inputs(lens, hq=4, hkv=2, d=8)
    g_out = torch.randn(q.shape, dtype=torch.float64)
    clean = _run("cpu", q, k, v, cu, 6, dict(causal=causal), g_out, None)
    for t in (q, k, v):
        t[5] = float("nan")  # sequence 1 starts at row 5
    bad = _run("cpu", q, k, v, cu, 6, dict(causal=causal), g_out, None)
    others = torch.ones(q.shape[0], dtype=torch.bool)
    others[5:11] = False
    for label, a, e in zip(("out", "lse", "dq", "dk", "dv"), bad, clean, strict=True):
        rows = others if label != "lse" else (slice(None), others)
        assert torch.equal(a[rows], e[rows]), f"{label}: NaN left its sequence"
    assert bad[0][5:11].isnan().any()


def test_rotated_q_and_k_are_the_references():
    """The forward op's rotated q, k (saved for the backward) equal the reference's bit for bit,
    padding rows of q zero."""
    fwd = torch.ops.seedvl.varlen_attention_fwd
    q, k, v, cu, _, mq, _ = _inputs([7, 0, 4], hq=4, hkv=2, d=16, pad_q=3, pad_k=3)
    pos = torch.randint(0, 9, (q.shape[0], 2), dtype=torch.int32)
    params = (cu, cu, mq, mq, True, 0.25, pos, 500.0)
    got, want = fwd(q, k, v, *params, "cpu"), fwd(q, k, v, *params, "ref")
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3]) and not got[2][11:].any()


@pytest.mark.parametrize("causal", [False, True])
def test_views_of_a_fused_qkv(causal):
    """q, k, v as the ViT block passes them (strided views of one (T, 3, H, D) tensor): equal
    images (the plan that reads them in place) and unequal ones (gathered); out, lse and the
    gradient of the fused tensor."""
    for lens in ([16, 16, 16], [16, 9, 16]):
        cu, T = _cu(lens), sum(lens)
        qkv = torch.randn(T, 3, 4, 16)
        pos = torch.randint(0, 9, (T, 2), dtype=torch.int32)
        g_out, g_lse = torch.randn(T, 4, 16), torch.randn(4, T)
        results = []
        for impl in ("cpu", "ref"):
            leaf = qkv.clone().requires_grad_()
            q, k, v = leaf.unbind(1)
            assert q.stride() == (3 * 4 * 16, 16, 1)
            out, lse = sk_va(q, k, v, cu, 16, causal=causal, pos_hw=pos, return_lse=True, impl=impl)
            (grad,) = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), leaf)
            results.append((out, lse, grad))
        for label, a, e in zip(("out", "lse", "dqkv"), *results, strict=True):
            assert_close(a, e, f"{lens} {label}", **tol(torch.float32, 4))
