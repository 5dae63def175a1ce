"""End-to-end self-check: ``python -m seedvl_kernels.selfcheck [--device cuda] [--dtype bfloat16]``.

Builds one small packed batch shaped like a step of the model (three images of different sizes
through the ViT ops, then the MoE ops on their pooled tokens), runs every op forward and backward
with every implementation that can serve it here, and compares outputs and gradients with the
reference computed in float64. Exits 1 if any implementation disagrees, 0 otherwise.

``--size small`` (default) runs in seconds anywhere; ``--size real`` uses the model's dimensions
(Seed-ViT heads, head dim and width, a 4k-token image pack, 128 experts, top-8, Qwen3-30B-A3B's
hidden and expert widths) and is meant for a GPU (scripts/gpu_pass.sh's first stage). ``--jsonl
PATH`` appends one JSON line per (op, impl) as it is checked, so a run cut off midway keeps its
results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import seedvl_kernels as sk

from . import _dispatch


@dataclass(frozen=True)
class Case:
    op: str
    inputs: dict[str, torch.Tensor]  # differentiable inputs first; all float tensors get gradients
    call: Callable[..., torch.Tensor]  # call(impl=..., **inputs) -> one tensor to backpropagate from


def _pack(sizes: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """cu_seqlens, per-token (row, col) and max_seqlen for images of (rows, cols) patches."""
    lengths = [h * w for h, w in sizes]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    pos = torch.cat(
        [
            torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
            for h, w in sizes
        ]
    ).to(torch.int32)
    return cu, pos.to(device), max(lengths)


@dataclass(frozen=True)
class Sizes:
    """Dimensions of one self-check batch; ``images`` are (rows, cols) patch grids, 4 | total tokens."""

    heads: int
    head_dim: int
    width: int
    hidden: int
    ffn: int
    experts: int
    top_k: int
    images: tuple[tuple[int, int], ...]


SIZES = {
    "small": Sizes(4, 64, 128, 96, 64, 8, 2, ((4, 6), (2, 2), (8, 8))),  # 92 tokens
    # Seed-ViT (20 heads of 64, width 1280) on a pack of 3072 + 1024 + 256 + 64 + 4 = 4420 tokens, one
    # image of 1 x 4; its 1105 pooled tokens through Qwen3-30B-A3B-sized experts (2048 -> 768, 128, top 8).
    "real": Sizes(20, 64, 1280, 2048, 768, 128, 8, ((64, 48), (32, 32), (16, 16), (8, 8), (1, 4))),
}


def build_cases(device: torch.device, dtype: torch.dtype, size: str = "small") -> list[Case]:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    z = SIZES[size]
    heads, head_dim, width, hidden, ffn, experts, top_k = (
        z.heads, z.head_dim, z.width, z.hidden, z.ffn, z.experts, z.top_k,
    )  # fmt: skip
    cu, pos, max_len = _pack(list(z.images), device)  # no padding rows
    T = int(cu[-1])
    cases = [
        Case("rope_2d", {"x": rnd(T, heads, head_dim)}, lambda impl, x: sk.rope_2d(x, pos, impl=impl)),
        Case(
            "varlen_attention",
            {
                "q": rnd(T, heads, head_dim),
                "k": rnd(T, heads // 2, head_dim),
                "v": rnd(T, heads // 2, head_dim),
            },
            lambda impl, q, k, v: sk.varlen_attention(q, k, v, cu, max_len, pos_hw=pos, impl=impl),
        ),
        Case(
            "pool_adapter",
            {
                "x": rnd(T, width),
                "w1": rnd(width, hidden, scale=width**-0.5),
                "b1": rnd(hidden, scale=0.1),
                "w2": rnd(hidden, hidden, scale=hidden**-0.5),
                "b2": rnd(hidden, scale=0.1),
            },
            lambda impl, x, w1, b1, w2, b2: sk.pool_adapter(x, w1, b1, w2, b2, impl=impl),
        ),
    ]
    tokens = T // 4
    logits = torch.randn(tokens, experts, generator=g).to(device)
    routed = sk.route(logits, top_k, impl="ref")
    offsets = sk.moe_permute(logits, routed.expert_ids, experts, impl="ref")[1]  # rows grouped by expert
    cases += [
        Case("route", {"logits": logits.clone()}, lambda impl, logits: _route_loss(logits, top_k, impl)),
        Case(
            "grouped_gemm",
            {"a": rnd(tokens * top_k, hidden), "b": rnd(experts, hidden, ffn, scale=hidden**-0.5)},
            lambda impl, a, b: sk.grouped_gemm(a, b, offsets, impl=impl),
        ),
        Case(
            "moe_ffn",
            {
                "x": rnd(tokens, hidden),
                "w_gate_up": rnd(experts, hidden, 2 * ffn, scale=hidden**-0.5),
                "w_down": rnd(experts, ffn, hidden, scale=ffn**-0.5),
            },
            lambda impl, x, w_gate_up, w_down: sk.moe_ffn(
                x, routed.gate_weights, routed.expert_ids, w_gate_up, w_down, impl=impl
            ),
        ),
    ]
    return cases


def _route_loss(logits: torch.Tensor, top_k: int, impl: str) -> torch.Tensor:
    out = sk.route(logits, top_k, impl=impl)
    return out.gate_weights.sum(-1) + out.load_balancing_loss + out.router_z_loss


def _run(
    case: Case, impl: str, dtype: torch.dtype | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    inputs = {n: t.detach().clone() for n, t in case.inputs.items()}
    if dtype is not None:
        inputs = {n: t.to(dtype) for n, t in inputs.items()}
    for t in inputs.values():
        t.requires_grad_(t.is_floating_point())
    start = time.perf_counter()
    out = case.call(impl=impl, **inputs)
    grad_out = (
        torch.ones_like(out) if out.dim() == 0 else torch.cos(torch.arange(out.numel(), device=out.device))
    )
    out.backward(grad_out.reshape(out.shape).to(out.dtype))
    if out.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return out.detach(), {n: t.grad for n, t in inputs.items() if t.grad is not None}, elapsed


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) if b.numel() else 0.0


_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def check(device: torch.device, dtype: torch.dtype, size: str = "small", jsonl: str | None = None) -> bool:
    ok = True
    dtype_name = str(dtype).replace("torch.", "")
    print(
        f"seedvl self-check on {device} {dtype_name}, {size} sizes (max error relative to the output's max)"
    )

    def record(op: str, impl: str, status: str, **extra) -> None:
        if jsonl:
            line = {"kind": "selfcheck", "op": op, "impl": impl, "status": status, "size": size}
            line |= {"dtype": dtype_name, "device": str(device), **extra}
            with open(jsonl, "a") as f:
                f.write(json.dumps(line) + "\n")

    for case in build_cases(device, dtype, size):
        want_out, want_grads, _ = _run(case, "ref", torch.float64)
        for impl in _dispatch.implementations(case.op):
            reason = _dispatch.unavailable_reason(case.op, impl, device, dtype)
            if reason is not None:
                print(f"  {case.op:<17} {impl:<7} skipped: {reason}")
                record(case.op, impl, "skipped", reason=reason)
                continue
            out, grads, elapsed = _run(case, impl, None)
            errors = {"out": _rel_err(out, want_out)} | {
                f"d{n}": _rel_err(grads[n], want_grads[n]) for n in want_grads
            }
            worst = max(errors.values())
            passed = worst <= _TOL[dtype] and all(torch.isfinite(v).all() for v in [out, *grads.values()])
            ok &= passed
            detail = ", ".join(f"{n} {e:.1e}" for n, e in errors.items())
            print(
                f"  {case.op:<17} {impl:<7} {'ok  ' if passed else 'FAIL'} {elapsed * 1e3:7.1f} ms  {detail}"
            )
            record(
                case.op, impl, "ok" if passed else "FAIL", errors=errors, tol=_TOL[dtype], ms=elapsed * 1e3
            )
    print("all implementations agree with the reference" if ok else "MISMATCH: see FAIL rows above")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m seedvl_kernels.selfcheck", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", default=None, help="float32, float16 or bfloat16 (default: bf16 on GPU, fp32 on CPU)"
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="small (default) or real")
    parser.add_argument("--jsonl", default=None, help="append one JSON line per (op, impl) to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    if dtype not in _TOL:
        parser.error(f"--dtype: expected float32, float16, bfloat16 or float64, got {args.dtype}")
    return 0 if check(device, dtype, args.size, args.jsonl) else 1


if __name__ == "__main__":
    sys.exit(main())
