"""Time each Triton GEMM of pool_adapter under candidate tiles, and the pooled operand load against
pooling first (a separate mean4 + a plain GEMM). GPU only; one run answers the tuning questions of
profiles/pool_adapter.md.

    python profiles/pool_adapter_tune.py [--tokens 16384] [--hidden 4096] [--dtype bfloat16]

Prints, per launch (F1, F2 forward; B1..B4 backward), the milliseconds and TFLOP/s of every
candidate config (the launcher's pick is marked *), then F1 and B3 with the pooling fused into the
operand load against torch's mean4 followed by the same GEMM on the pooled tensor.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import triton
from triton.testing import do_bench

from bench.model_shapes import SEEDVIT_WIDTH
from seedvl_kernels import pool_adapter_triton as pat
from seedvl_kernels.pool_adapter import mean4

G = pat.GemmConfig
CANDIDATES = {
    "plain": [
        G(128, 128, 64, 8, 8, 3),
        G(128, 256, 64, 8, 8, 3),
        G(128, 256, 64, 8, 8, 4),
        G(256, 128, 64, 8, 8, 3),
    ],
    "pooled": [
        G(128, 128, 32, 8, 8, 3),
        G(128, 128, 32, 8, 8, 4),
        G(128, 256, 32, 8, 8, 3),
        G(64, 256, 32, 8, 8, 4),
    ],
    "dgelu": [G(128, 64, 64, 8, 8, 3), G(128, 128, 64, 8, 8, 3), G(64, 128, 64, 8, 4, 4)],
}


def _time(fn) -> float:
    return do_bench(fn, warmup=25, rep=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=4096, help="F = C_out")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args(argv)
    dtype, dev = getattr(torch, args.dtype), torch.device("cuda")
    T, C, F = args.tokens, SEEDVIT_WIDTH, args.hidden
    N, C_out = T // 4, F
    x = torch.randn(T, C, device=dev, dtype=dtype)
    w1 = torch.randn(C, F, device=dev, dtype=dtype) / C**0.5
    w2 = torch.randn(F, C_out, device=dev, dtype=dtype) / F**0.5
    b1, b2 = torch.zeros(F, device=dev, dtype=dtype), torch.zeros(C_out, device=dev, dtype=dtype)
    dy = torch.randn(N, C_out, device=dev, dtype=dtype)
    h, a, dh = (torch.empty(N, F, device=dev, dtype=dtype) for _ in range(3))
    y = torch.empty(N, C_out, device=dev, dtype=dtype)
    dx, dw1, dw2 = torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2)
    sx = x.stride(0)
    pooled_rows, pooled_cols = (4 * sx, 1), (1, 4 * sx)  # mean4(x) and mean4(x)^T, pooled over 4 rows

    def f1(c):
        pat._gemm(x, pooled_rows, w1, w1.stride(), h, N, F, C, pool_stride=sx, epilogue=pat.BIAS_GELU,
                  out2=a, bias=b1, config=c)  # fmt: skip

    def f2(c):
        pat._gemm(a, a.stride(), w2, w2.stride(), y, N, C_out, F, epilogue=pat.BIAS, bias=b2, config=c)

    def b1_(c):
        tiles = triton.cdiv(N, (c or pat.gemm_config(N, F, False, pat.DGELU, dtype, dev)).block_m)
        sums = (torch.empty(tiles, F, device=dev), torch.empty(tiles, C_out, device=dev))
        pat._gemm(dy, dy.stride(), w2, pat._t(w2), dh, N, F, C_out, epilogue=pat.DGELU, out2=a, aux=h,
                  sums=sums, config=c)  # fmt: skip

    def b2_(c):
        pat._gemm(a, pat._t(a), dy, dy.stride(), dw2, F, C_out, N, config=c)

    def b3(c):
        pat._gemm(x, pooled_cols, dh, dh.stride(), dw1, C, F, N, pool_stride=sx, config=c)

    def b4(c):
        pat._gemm(dh, dh.stride(), w1, pat._t(w1), dx, N, C, F, epilogue=pat.WINDOW, config=c)

    launches = {  # name: (candidates, epilogue, M, N, K, run)
        "F1": ("pooled", pat.BIAS_GELU, N, F, C, f1),
        "F2": ("plain", pat.BIAS, N, C_out, F, f2),
        "B1": ("dgelu", pat.DGELU, N, F, C_out, b1_),
        "B2": ("plain", pat.STORE, F, C_out, N, b2_),
        "B3": ("pooled", pat.STORE, C, F, N, b3),
        "B4": ("plain", pat.WINDOW, N, C, F, b4),
    }
    print(f"{torch.cuda.get_device_name()}, Triton {triton.__version__}, T {T} C {C} F = C_out {F}, {dtype}")
    for name, (kind, epilogue, m, n, k, run) in launches.items():
        pick = pat.gemm_config(m, n, kind == "pooled", epilogue, dtype, dev)
        for cfg in dict.fromkeys([pick, *CANDIDATES[kind]]):
            try:
                ms = _time(functools.partial(run, cfg))
            except Exception as err:  # out of shared memory / registers on this GPU
                print(f"  {name} {cfg}: failed ({type(err).__name__})")
                continue
            mark = "*" if cfg == pick else " "
            print(f"{mark} {name} {m}x{n}x{k} {ms:8.3f} ms {2 * m * n * k / ms / 1e9:7.1f} TFLOP/s  {cfg}")

    print("pooling fused into the operand load vs mean4 first (then the same GEMM, unpooled)")
    p = mean4(x)

    def f1_split():
        pat._gemm(mean4(x), p.stride(), w1, w1.stride(), h, N, F, C, epilogue=pat.BIAS_GELU, out2=a, bias=b1)

    def b3_split():
        pat._gemm(mean4(x), pat._t(p), dh, dh.stride(), dw1, C, F, N)

    for name, fused, split in (("F1", f1, f1_split), ("B3", b3, b3_split)):
        fused_ms = _time(functools.partial(fused, None))
        print(f"  {name}: fused {fused_ms:.3f} ms, mean4 + plain GEMM {_time(split):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
