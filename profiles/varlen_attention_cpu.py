"""Per-call time of varlen_attention's ``ref`` and ``cpu`` implementations at the tiny preset's shapes,
interleaved in one process (the machine is shared, so ratios of neighbouring calls are what to read).

    OMP_NUM_THREADS=1 python profiles/varlen_attention_cpu.py [ROUNDS]

Shapes: the LLM's per-document causal GQA attention (4 q heads, 2 KV heads, head dim 16) over a
2048-token micro-batch of documents of 30-72 tokens; the ViT's non-causal attention with 2D RoPE
(4 heads, head dim 16) over 112x112 images (8x8 patches), 16 and 40 images (the SFT micro-batch
holds ~40). Forward: the custom op; backward: the backward op on the forward's saved tensors.
Results: profiles/varlen_attention_cpu.md.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import seedvl_kernels  # noqa: F401  (registers the ops)

FWD, BWD = torch.ops.seedvl.varlen_attention_fwd, torch.ops.seedvl.varlen_attention_bwd


def llm_case(gen: torch.Generator) -> tuple[str, tuple]:
    lens: list[int] = []
    while sum(lens) < 2048 - 72:
        lens.append(int(torch.randint(30, 73, (1,), generator=gen)))
    lens.append(2048 - sum(lens))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = torch.randn(2048, 4, 16), torch.randn(2048, 2, 16), torch.randn(2048, 2, 16)
    name = f"LLM causal GQA 4/2, T=2048 in {len(lens)} docs of {min(lens)}-{max(lens)}"
    return name, (q, k, v, cu, cu, max(lens), max(lens), True, 0.25, None, 1e4)


def vit_case(images: int) -> tuple[str, tuple]:
    T = images * 64
    cu = torch.arange(0, T + 1, 64, dtype=torch.int32)
    q, k, v = torch.randn(T, 3, 4, 16).unbind(1)  # views of one fused qkv, as the ViT block makes
    grid = torch.stack(torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij"), -1)
    pos = grid.reshape(64, 2).repeat(images, 1).to(torch.int32)
    args = (q, k, v, cu, cu, 64, 64, False, 0.25, pos, 1e4)
    return f"ViT non-causal RoPE, {images} images x 64 patches", args


def clock(f, n: int = 3) -> float:
    f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n * 1e3


def main(rounds: int) -> None:
    torch.manual_seed(0)
    cases = [llm_case(torch.Generator().manual_seed(0)), vit_case(16), vit_case(40)]
    for name, args in cases:
        q, k, v, cu_q, cu_k, mq, mk, causal, scale, pos, theta = args
        saved = {}
        for impl in ("ref", "cpu"):
            out, lse, q_rot, k_rot = FWD(*args, impl)
            qs, ks = (q_rot, k_rot) if pos is not None else (q, k)
            dout = torch.randn_like(out)
            rest = (cu_q, cu_k, mq, mk, causal, scale, pos, theta, impl)
            saved[impl] = (dout, None, qs, ks, v, out, lse, *rest)
        times: dict[str, list[float]] = {f"{i} {w}": [] for i in ("ref", "cpu") for w in ("fwd", "bwd")}
        for _ in range(rounds):
            for impl in ("ref", "cpu"):
                fwd_args, bwd_args = (*args, impl), saved[impl]
                times[f"{impl} fwd"].append(clock(lambda a=fwd_args: FWD(*a)))
                times[f"{impl} bwd"].append(clock(lambda a=bwd_args: BWD(*a)))
        print(name)
        for what in ("fwd", "bwd"):
            ref, cpu = times[f"ref {what}"], times[f"cpu {what}"]
            pairs = sorted(r / c for r, c in zip(ref, cpu, strict=True))
            print(
                f"  {what}: ref {statistics.median(ref):6.2f} ms  cpu {statistics.median(cpu):6.2f} ms  "
                f"ratio of neighbouring calls: median {statistics.median(pairs):.1f}x "
                f"(min {pairs[0]:.1f}x, max {pairs[-1]:.1f}x)"
            )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
