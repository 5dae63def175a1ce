"""Bitwise determinism across processes: varlen_attention's forward and backward (the ViT's head dim
64 with 2D RoPE, the LLM's 128 causal with GQA) and the MoE grouped GEMM's forward, dgrad and wgrad
give the same bytes in two separate processes under SEEDVL_AUTOTUNE=pinned.

Within one process Triton's autotuner caches its choice, so two calls always agree; across processes
a timing search can pick a different num_warps, which changes the order of the reductions. Pinned
mode compiles one config per shape class (varlen_attention_triton_common), and this test holds two
processes to the same bytes and the same configs.

Run as a script, this file computes the outputs and gradients once and saves them (and the attention
configs the autotuner ran) under OUT_DIR; the tests run it twice and compare:

    SEEDVL_AUTOTUNE=pinned python tests/test_determinism_pinned.py OUT_DIR

On a GPU it runs in bf16 at small model-like shapes; under TRITON_INTERPRET=1 on CPU in fp32 at tiny
ones (the mechanics only: the interpreter has a single config).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
RESULTS, CONFIGS = "results.pt", "configs.json"


# ----------------------------------------------------------------------------- the script


def _cu(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _attention(name, lens, hq, hkv, d, causal, rope, dtype, device) -> dict[str, torch.Tensor]:
    """out, lse, dq, dk, dv of one packed call (inputs drawn on the CPU: the same in every process)."""
    from seedvl_kernels.varlen_attention import varlen_attention

    T = sum(lens) + 3  # 3 padding rows
    q, g_out = (torch.randn(T, hq, d) for _ in range(2))
    k, v = (torch.randn(T, hkv, d) for _ in range(2))
    g_lse = torch.randn(hq, T)
    kw = {"cu_seqlens": _cu(lens, device), "max_seqlen": max(lens), "causal": causal}
    if rope:
        kw["pos_hw"] = torch.randint(0, 64, (T, 2), dtype=torch.int32).to(device)
    leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
    out, lse = varlen_attention(*leaves, **kw, return_lse=True, impl="triton")
    grads = torch.autograd.grad([out, lse], leaves, [g_out.to(device, dtype), g_lse.to(device)])
    names = ("out", "lse", "dq", "dk", "dv")
    return {f"{name} {n}": t.detach() for n, t in zip(names, (out, lse, *grads), strict=True)}


def _grouped_gemm(name, sizes, K, N, trans_b, impl, dtype, device) -> dict[str, torch.Tensor]:
    """out, dA, dB of one grouped GEMM over experts of ``sizes`` rows (some empty)."""
    from seedvl_kernels.grouped_gemm import grouped_gemm

    M = sum(sizes) + 2  # 2 padding rows
    a = torch.randn(M, K).to(device, dtype).requires_grad_()
    b = (torch.randn((len(sizes), N, K) if trans_b else (len(sizes), K, N)) / K**0.5).to(device, dtype)
    b.requires_grad_()
    g = torch.randn(M, N).to(device, dtype)
    out = grouped_gemm(a, b, _cu(sizes, device), trans_b=trans_b, impl=impl)
    da, db = torch.autograd.grad(out, (a, b), g)
    return {f"{name} {n}": t.detach() for n, t in zip(("out", "dA", "dB"), (out, da, db), strict=True)}


def compute() -> dict[str, torch.Tensor]:
    """Every checked output and gradient, on the GPU if there is one (else the interpreter)."""
    from seedvl_kernels import _backends, _dispatch

    torch.manual_seed(0)
    gpu = torch.cuda.is_available() and not _backends.triton_interpret()
    device = torch.device("cuda" if gpu else "cpu")
    results = {}
    if gpu:
        vit = [32 * 32, 16 * 16, 3 * 5, 64 * 48, 1]
        results |= _attention("vit", vit, 16, 16, 64, False, True, torch.bfloat16, device)
        llm = [300, 1, 2048, 0, 77]
        results |= _attention("llm", llm, 16, 4, 128, True, False, torch.bfloat16, device)
        experts = [1500, 700, 300, 0, 120, 60, 17, 3]
        results |= _grouped_gemm("moe gate_up", experts, 1024, 768, False, "triton", torch.bfloat16, device)
        results |= _grouped_gemm("moe down", experts, 384, 1024, True, "triton", torch.bfloat16, device)
        if _dispatch.unavailable_reason("grouped_gemm", "cuda", device, torch.bfloat16) is None:  # CUTLASS
            results |= _grouped_gemm("cutlass", experts, 1024, 768, False, "cuda", torch.bfloat16, device)
    else:
        results |= _attention("vit", [7, 0, 20], 2, 1, 16, False, True, torch.float32, device)
        results |= _attention("llm", [5, 20, 1], 2, 1, 32, True, False, torch.float32, device)
        results |= _grouped_gemm("moe", [27, 0, 9, 5], 33, 17, True, "triton", torch.float32, device)
    return {n: t.cpu() for n, t in results.items()}


def ran_configs() -> dict[str, dict[str, list[int]]]:
    """{kernel: {shape class: [num_warps, num_stages]}} the attention autotuner ran in this process
    (empty under the interpreter, which has a single config)."""
    from seedvl_kernels import varlen_attention_triton as vat
    from seedvl_kernels.varlen_attention_triton_common import TUNE_KEYS, config_tuple, shape_class

    kernels = {
        "fwd": vat._varlen_attention_fwd_kernel,
        "dkdv": vat._varlen_attention_bwd_dkdv_kernel,
        "dq": vat._varlen_attention_bwd_dq_kernel,
    }
    table = {}
    for name, kernel in kernels.items():
        tune_key = TUNE_KEYS[name]
        for key, cfg in getattr(kernel, "cache", {}).items():  # key: the tune key's values, then dtypes
            shape = shape_class(dict(zip(tune_key, key, strict=False)), key[len(tune_key)], tune_key)
            table.setdefault(name, {})[shape] = list(config_tuple(cfg))
    return table


def main(out_dir: Path) -> None:
    sys.path.insert(0, str(ROOT))
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(compute(), out_dir / RESULTS)
    (out_dir / CONFIGS).write_text(json.dumps(ran_configs(), indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- the tests


def _run_twice(tmp_path: Path, env: dict[str, str], timeout: int, parallel: bool) -> list[tuple[dict, dict]]:
    """Run the script in two processes (at once if ``parallel``; one after the other lets the second
    reuse the first's Triton compile cache) and load what each saved."""
    outs = [tmp_path / f"process{i}" for i in range(2)]
    procs = []
    for out in outs:
        with open(tmp_path / f"{out.name}.log", "w") as log:
            cmd = [sys.executable, str(SCRIPT), str(out)]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        if not parallel:
            procs[-1].wait(timeout)
    for out, proc in zip(outs, procs, strict=True):
        proc.wait(timeout)
        log = (tmp_path / f"{out.name}.log").read_text()
        assert proc.returncode == 0, f"{out.name} failed:\n{log[-5000:]}"
    return [(torch.load(out / RESULTS), json.loads((out / CONFIGS).read_text())) for out in outs]


def _assert_same_bytes(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    differ = []
    for name, a in first.items():
        b = second[name]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        if not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
            err = (a.double() - b.double()).abs().nan_to_num(float("inf"))
            differ.append(
                f"{name}: {int((a != b).sum())} elements, max {err.max():.3e} mean {err.mean():.3e}"
            )
    assert not differ, "two processes gave different bytes:\n" + "\n".join(differ)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return env | {"SEEDVL_AUTOTUNE": "pinned"} | extra


@pytest.mark.gpu
def test_gpu_two_processes_give_the_same_bytes(tmp_path):
    """bf16 on the GPU, compiled kernels, one pinned config per shape class (the tuning file's where
    $SEEDVL_AUTOTUNE_FILE names one, else the defaults of varlen_attention_triton_common)."""
    from seedvl_kernels import varlen_attention_triton_common as common

    (first, configs), (second, configs_again) = _run_twice(tmp_path, _env(), 600, parallel=False)
    _assert_same_bytes(first, second)
    assert configs == configs_again, f"the processes ran different configs: {configs} vs {configs_again}"
    assert set(configs) == {"fwd", "dkdv", "dq"}, configs
    if not os.environ.get(common.AUTOTUNE_FILE_ENV):
        for kernel, shapes in configs.items():
            for shape, pair in shapes.items():
                head_dim = int(shape.split()[0].removeprefix("HEAD_DIM="))
                assert tuple(pair) == common.pinned_pair(kernel, "", "", head_dim), (kernel, shape, pair)


def test_two_processes_give_the_same_bytes_interpreted(tmp_path):
    """The same two-process check on CPU under the Triton interpreter (fp32, tiny shapes)."""
    (first, _), (second, _) = _run_twice(
        tmp_path, _env(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES=""), 300, parallel=True
    )
    assert len(first) == 13
    _assert_same_bytes(first, second)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    main(Path(sys.argv[1]))
