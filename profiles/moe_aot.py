"""Compile the MoE Triton kernels for sm_90 without a GPU and report their resources.

    python profiles/moe_aot.py [--dtype bfloat16|float16|float32] [--arch 90]

For each kernel of seedvl_kernels.grouped_gemm_triton / moe_ffn_triton, at the Qwen3 MoE shapes
and with the tile configs the launchers pick on a GPU, this lowers the kernel through Triton's real
compiler (TTIR -> TTGIR -> PTX -> cubin with the bundled ptxas) and prints shared memory, registers,
spill stack, and whether the main loop was software-pipelined (cp.async / TMA in the PTX). It
specialises the arguments the way a launch at model shapes would: unit strides as constants, every
other pointer and stride divisible by 16. Lowering errors, shared-memory overflow (> 227 KB on
sm_90) and spills show up here, on a CPU-only machine; timing still needs a GPU.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from model.config import QWEN3_30B_A3B, QWEN3_235B_A22B
from seedvl_kernels import grouped_gemm_triton as ggt
from seedvl_kernels import moe_ffn_triton as mft

UNIT_STRIDES = {"stride_ak", "stride_bn", "stride_on", "stride_cn", "stride_xd", "stride_wf", "stride_gun"}
UNIT_STRIDES |= {"stride_hn", "stride_dd", "stride_dgn"}
NOT_DIVISIBLE = {"M", "T", "TOP_K"}  # token counts: no divisibility assumed
INDEX_PTRS = {"offsets_ptr", "order_ptr", "a_rows_ptr", "c_rows_ptr", "out_rows_ptr", "src_ptr", "slot_ptr"}
FP32_PTRS = {"row_scale_ptr", "c_scale_ptr", "scale_ptr", "part_ptr"}
TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _compile(fn, constexprs: dict, dtype: torch.dtype, num_warps: int, num_stages: int, arch: int):
    names = list(inspect.signature(fn.fn).parameters)
    consts = dict(constexprs)
    consts.update({n: 1 for n in names if n in UNIT_STRIDES})
    signature = {}
    for n in names:
        if n in consts:
            signature[n] = "constexpr"
        elif n in INDEX_PTRS:
            signature[n] = "*i32"
        elif n in FP32_PTRS:
            signature[n] = "*fp32"
        elif n.endswith("_ptr"):
            signature[n] = "*" + TYPE[dtype]
        else:
            signature[n] = "i32"
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(names)
        if signature[n] != "constexpr" and n not in NOT_DIVISIBLE
    }
    src = ASTSource(fn, signature, constexprs={(names.index(n),): v for n, v in consts.items()}, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _resources(kernel) -> str:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    ptx = kernel.asm["ptx"]
    pipelined = "cp.async" in ptx or "cp.async.bulk" in ptx
    mma = "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "fma")
    return (
        f"smem {kernel.metadata.shared / 1024:6.1f} KB  regs {regs.group(1) if regs else '?':>3}  "
        f"spill stack {stack.group(1) if stack else '?':>4} B  {mma:8s} "
        + ("pipelined" if pipelined else "NOT pipelined")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    cuda = torch.device("cuda")
    precision = ggt.dot_precision(dtype)
    print(f"Triton {triton.__version__}, sm_{args.arch}, {args.dtype}")
    for name, cfg in (("qwen3-30b-a3b", QWEN3_30B_A3B), ("qwen3-235b-a22b", QWEN3_235B_A22B)):
        D, FF, E = cfg.hidden, cfg.moe_ffn_dim, cfg.num_experts
        groups = {"NUM_GROUPS": E, "GROUPS_POW2": ggt.groups_pow2(E)}
        rows = []
        for n, k, what in ((2 * FF, D, "gate_up fwd"), (D, FF, "down fwd"), (D, 2 * FF, "gate_up dgrad")):
            c = ggt.m_grouped_config(n, k, dtype, cuda)
            flags = {"GATHER_A": False, "SCATTER_OUT": what == "down fwd", "SCALE_OUT": what == "down fwd"}
            consts = {**groups, **flags, "EVEN_K": k % c.block_k == 0, "DOT_PRECISION": precision}
            consts |= {"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "GROUP_M": c.group_m}
            rows.append((f"_grouped_gemm_fwd_kernel ({what})", ggt._grouped_gemm_fwd_kernel, consts, c))
        for n, k, what, gather in (
            (2 * FF, D, "dW gate_up", (True, False, False)),
            (D, FF, "dW down", (False, True, True)),
        ):
            c = ggt.k_grouped_config(n, k, dtype, cuda)
            consts = dict(zip(("GATHER_A", "GATHER_C", "SCALE_C"), gather, strict=True))
            consts |= {"DOT_PRECISION": precision, "BLOCK_K": c.block_k, "BLOCK_N": c.block_n}
            consts |= {"BLOCK_R": c.block_r, "GROUP_K": c.group_k}
            rows.append((f"_grouped_gemm_dw_kernel ({what})", ggt._grouped_gemm_dw_kernel, consts, c))
        for fn, c, extra in (
            (mft._moe_gate_up_fwd_kernel, mft._swiglu_config(FF, D, dtype, cuda), {"SAVE_GU": True}),
            (mft._moe_down_bwd_kernel, mft._down_bwd_config(FF, D, dtype, cuda), {}),
        ):
            consts = {**groups, **extra, "EVEN_K": D % c.block_k == 0, "DOT_PRECISION": precision}
            consts |= {"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "GROUP_M": c.group_m}
            rows.append((fn.fn.__name__, fn, consts, c))
        print(f"\n{name} (D {D}, F {FF}, E {E})")
        for label, fn, consts, c in rows:
            kernel = _compile(fn, consts, dtype, c.num_warps, c.num_stages, args.arch)
            print(f"  {label:42s} {_resources(kernel)}  {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
