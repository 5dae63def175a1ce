"""The self-check (the README's main job) passes on this machine and catches a wrong implementation."""

import importlib

import torch

from seedvl_kernels import selfcheck

rope_mod = importlib.import_module("seedvl_kernels.rope_2d")


def test_selfcheck_passes_on_cpu(capsys):
    assert selfcheck.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for op in ("rope_2d", "varlen_attention", "pool_adapter", "route", "grouped_gemm", "moe_ffn"):
        assert f"{op} " in out
    assert "all implementations agree" in out


def test_selfcheck_reports_a_mismatch(monkeypatch, capsys):
    def wrong(x, pos_hw, out, theta, inverse):
        out.copy_(rope_mod.rope_2d_ref(x, pos_hw, theta, inverse) * 1.01)

    monkeypatch.setitem(rope_mod._LAUNCH, "triton", wrong)
    assert not selfcheck.check(torch.device("cpu"), torch.float32)
    assert "rope_2d           triton  FAIL" in capsys.readouterr().out
