"""Implementation choice: keyword > use_impl context > SEEDVL_IMPL_<OP> > SEEDVL_IMPL > auto."""

import pytest
import torch

import seedvl_kernels as sk
from seedvl_kernels import _dispatch

CPU = torch.device("cpu")


def test_auto_on_cpu_is_the_reference():
    assert _dispatch.resolve("rope_2d", None, CPU, torch.float32) == "ref"


def test_precedence(monkeypatch):
    monkeypatch.setenv("SEEDVL_IMPL", "ref")
    monkeypatch.setenv("SEEDVL_IMPL_ROPE_2D", "triton")
    assert _dispatch.requested("rope_2d") == "triton"  # per-op env beats global env
    with sk.use_impl("ref"):
        assert _dispatch.requested("rope_2d") == "ref"  # context beats env
        with sk.use_impl(rope_2d="auto"):
            assert _dispatch.requested("rope_2d") == "auto"  # inner context beats outer
        assert _dispatch.requested("rope_2d", "triton") == "triton"  # keyword beats context
    monkeypatch.delenv("SEEDVL_IMPL_ROPE_2D")
    assert _dispatch.requested("rope_2d") == "ref"


def test_context_per_op_beats_global_in_same_frame():
    with sk.use_impl("ref", rope_2d="triton"):
        assert _dispatch.requested("rope_2d") == "triton"


def test_keyword_is_used_by_the_op(monkeypatch):
    calls = []
    original = _dispatch.resolve

    def spy(op, impl, device, dtype):
        chosen = original(op, impl, device, dtype)
        calls.append(chosen)
        return chosen

    monkeypatch.setattr(_dispatch, "resolve", spy)
    x = torch.randn(3, 1, 8)
    pos = torch.zeros(3, 2, dtype=torch.int32)
    sk.rope_2d(x, pos, impl="triton")
    with sk.use_impl("ref"):
        sk.rope_2d(x, pos)
    assert calls == ["triton", "ref"]


@pytest.mark.parametrize("bad", ["fast", "CUDA", ""])
def test_bad_names_are_errors(bad, monkeypatch):
    with pytest.raises(ValueError, match="impl: expected one of"):
        _dispatch.requested("rope_2d", bad)
    with pytest.raises(ValueError, match="default: expected one of"):
        with sk.use_impl(bad or "x"):
            pass
    if bad:
        monkeypatch.setenv("SEEDVL_IMPL", bad)
        with pytest.raises(ValueError, match="SEEDVL_IMPL: expected one of"):
            _dispatch.requested("rope_2d")


def test_unknown_op_in_context_is_an_error():
    with pytest.raises(ValueError, match="not_an_op: unknown op"):
        with sk.use_impl(not_an_op="ref"):
            pass


def test_explicit_unavailable_choice_raises_with_reason(monkeypatch):
    x = torch.randn(3, 1, 8)
    pos = torch.zeros(3, 2, dtype=torch.int32)
    with pytest.raises(sk.ImplUnavailableError, match="rope_2d: impl='cuda' cannot run this call"):
        sk.rope_2d(x, pos, impl="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(sk.ImplUnavailableError, match="Triton runs on CUDA tensors"):
        sk.rope_2d(x, pos, impl="triton")


def test_every_op_has_a_reference():
    assert "rope_2d" in sk.ops()
    for op in sk.ops():
        assert "ref" in sk.implementations(op), op
