"""Compile the pool_adapter Triton kernels for sm_90 without a GPU and report their resources.

    python profiles/pool_adapter_aot.py [--dtype bfloat16|float16|float32] [--arch 90]

For each of the six launches of seedvl_kernels.pool_adapter_triton (forward F1, F2; backward
B1..B4), at the Seed-ViT adapter shapes (C = 1280, F = C_out = 4096, T = 16k tokens) and with the
tile configs the launcher picks on a GPU, this lowers the kernel through Triton's real compiler
(TTIR -> TTGIR -> PTX -> cubin with the bundled ptxas) and prints shared memory, registers, spill
stack, the MMA instruction and whether the main loop was software-pipelined. Arguments are
specialised the way a launch with row-major weights would be: the launch's unit strides as
constants, every other pointer and stride divisible by 16. Timing still needs a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import triton

from bench.model_shapes import SEEDVIT_WIDTH
from profiles.moe_aot import _compile, _resources
from seedvl_kernels import pool_adapter_triton as pat
from seedvl_kernels.grouped_gemm_triton import dot_precision

T, C, F, C_OUT = 16384, SEEDVIT_WIDTH, 4096, 4096
N = T // 4

# (label, M, N, K, pooled, epilogue, wgrad (K = tokens), the launch's unit strides, row-major weights)
LAUNCHES = (
    ("F1 h, a = GELU(mean4(x) w1 + b1)", N, F, C, True, pat.BIAS_GELU, False,
     {"stride_ak", "stride_bn", "stride_on", "stride_o2n"}),
    ("F2 y = a w2 + b2", N, C_OUT, F, False, pat.BIAS, False, {"stride_ak", "stride_bn", "stride_on"}),
    ("B1 dh, a, db1, db2 partials", N, F, C_OUT, False, pat.DGELU, False,
     {"stride_ak", "stride_bk", "stride_on", "stride_o2n", "stride_auxn"}),
    ("B2 dw2 = a^T dy", F, C_OUT, N, False, pat.STORE, True, {"stride_am", "stride_bn", "stride_on"}),
    ("B3 dw1 = mean4(x)^T dh", C, F, N, True, pat.STORE, True, {"stride_am", "stride_bn", "stride_on"}),
    ("B4 dx = window(dh w1^T / 4)", N, C, F, False, pat.WINDOW, False,
     {"stride_ak", "stride_bk", "stride_on"}),
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    cuda = torch.device("cuda")
    print(f"Triton {triton.__version__}, sm_{args.arch}, {args.dtype}, T {T} C {C} F {F} C_out {C_OUT}")
    import profiles.moe_aot as aot

    for label, m, n, k, pooled, epilogue, wgrad, unit in LAUNCHES:
        cfg = pat.gemm_config(m, n, pooled, epilogue, dtype, cuda)
        consts = {
            "POOL_A": pooled,
            "EPILOGUE": epilogue.value,
            "EVEN_K": k % cfg.block_k == 0,
            "DOT_PRECISION": dot_precision(dtype),
            "BLOCK_M": cfg.block_m,
            "BLOCK_N": cfg.block_n,
            "BLOCK_K": cfg.block_k,
            "GROUP_M": cfg.group_m,
        }
        aot.UNIT_STRIDES = unit
        aot.FP32_PTRS = {"sum_out_ptr", "sum_a_ptr"}
        aot.NOT_DIVISIBLE = {"K"} if wgrad else {"M"}  # the token count: no divisibility assumed
        kernel = _compile(
            pat._pool_adapter_gemm_kernel, consts, dtype, cfg.num_warps, cfg.num_stages, args.arch
        )
        print(f"  {label:42s} {_resources(kernel)}  {cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
