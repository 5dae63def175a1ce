"""Shared test helpers: dtype-derived tolerances and comparisons that report max and mean error."""

from __future__ import annotations

import torch

# Base tolerance per dtype: a few units in the last place of one rounding of an O(1) value.
_EPS = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def tol(dtype: torch.dtype, scale: float = 1.0) -> dict[str, float]:
    """atol/rtol for comparing a result computed in ``dtype`` to an fp32/fp64 reference."""
    eps = _EPS[dtype] * scale
    return {"atol": eps, "rtol": eps}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, name: str, *, atol: float, rtol: float
) -> None:
    """torch.testing.assert_close, comparing in float64 and printing max and mean error on failure."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    err = (a - e).abs()
    msg = (
        f"{name}: max abs err {err.max().item() if err.numel() else 0:.3e}, "
        f"mean abs err {err.mean().item() if err.numel() else 0:.3e} (atol {atol:.1e}, rtol {rtol:.1e})"
    )
    torch.testing.assert_close(a, e, atol=atol, rtol=rtol, equal_nan=False, msg=lambda _: msg)


def assert_close_dtype(actual: torch.Tensor, expected: torch.Tensor, name: str, scale: float = 1.0) -> None:
    """Compare with tolerances derived from ``actual``'s dtype."""
    assert_close(actual, expected, name, **tol(actual.dtype, scale))


def assert_matches_ref_error(
    actual: torch.Tensor, ref_lowp: torch.Tensor, ref_hi: torch.Tensor, name: str, factor: float = 2.0
) -> None:
    """The kernel's error against the high-precision reference stays within ``factor`` times the
    reference's own error when it runs in the low precision (the flash-attention criterion), plus
    one unit of the dtype's tolerance."""
    ref_err = (ref_lowp.double() - ref_hi.double()).abs().max().item()
    floor = _EPS[actual.dtype]
    err = (actual.double() - ref_hi.double()).abs()
    bound = factor * ref_err + floor
    assert err.max().item() <= bound, (
        f"{name}: max abs err {err.max().item():.3e} (mean {err.mean().item():.3e}) exceeds "
        f"{factor} x reference low-precision error {ref_err:.3e} + {floor:.1e}"
    )


def moe_routing(kind: str, tokens: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_weights fp32 (T, k), expert_ids int32 (T, k)) for one routing pattern over E experts.

    balanced: k=2, round robin; zipf: k=2, P(e) ~ 1/(e+1)^1.5; one_hot: k=1, every token on expert
    E-2; empty_experts: k=3 drawn from experts 0..6 only, so E-7 experts get nothing (E=10: 30%).
    """
    if kind == "balanced":
        k = 2
        ids = (torch.arange(tokens)[:, None] * k + torch.arange(k)) % num_experts
    elif kind == "zipf":
        k = 2
        probs = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** 1.5
        ids = torch.multinomial(probs.expand(tokens, num_experts), k, replacement=False)
    elif kind == "one_hot":
        k = 1
        ids = torch.full((tokens, k), num_experts - 2)
    elif kind == "empty_experts":
        k = 3
        ids = torch.rand(tokens, 7).argsort(-1)[:, :k]
    else:
        raise AssertionError(kind)
    gate = torch.softmax(torch.randn(tokens, k), -1)
    return gate, ids.to(torch.int32)
