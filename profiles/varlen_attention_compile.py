"""Compile the varlen_attention Triton kernels for a GPU target on any machine (no GPU needed) and
report what ptxas made of them: registers, spill stack, shared memory, and whether the main loops
are software-pipelined (async copies in the TTGIR). A static check to run before spending GPU time;
see profiles/varlen_attention.md.

    python profiles/varlen_attention_compile.py                 # sm_90, bf16, head dims 64 and 128
    python profiles/varlen_attention_compile.py --arch 80 --head-dim 64 80 --dtype fp16

Arguments are typed as the launcher passes them, with the 16-byte divisibility the JIT infers at run
time for pointers and strides (without it Triton does not pipeline the loads). Uses the ptxas and
cuobjdump bundled with Triton.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # kernels must be real JIT functions
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import triton
from triton.backends.compiler import GPUTarget

vat = importlib.import_module("seedvl_kernels.varlen_attention_triton")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INT_PTRS = ("rec_", "table_", "cu_", "pos_")
F32_PTRS = ("lse_", "lse2_", "delta_", "inv_freq_", "dlse_")
UNALIGNED = ("stride_pos", "stride_lse", "stride_dlse")


def _signature(fn, consts: dict, dtype: str) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            sig[name] = (
                "*i32" if name.startswith(INT_PTRS) else "*fp32" if name.startswith(F32_PTRS) else f"*{dtype}"
            )
        else:
            sig[name] = "fp32" if name.endswith("scale") else "i32"
        if name.endswith("_ptr") or (name.startswith("stride_") and not name.startswith(UNALIGNED)):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_report(kernel, consts: dict, dtype: str, arch: int, warps: int, stages: int) -> str:
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # autotuned kernels wrap the JIT function
    sig, attrs = _signature(fn, consts, dtype)
    src = triton.compiler.ASTSource(fn, sig, consts, attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages}
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    copies = compiled.asm["ttgir"].count("async_copy_global_to_local")
    return (
        f"regs {regs.group(1) if regs else '?':>3}  stack {stack.group(1) if stack else '?':>4} B  "
        f"smem {compiled.metadata.shared // 1024:>3} KiB  async copies {copies}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    parser.add_argument(
        "--max-seqlen", type=int, default=4096, help="drives the tile heuristic (64: windows)"
    )
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}, max_seqlen {args.max_seqlen}")
    device = torch.device("cuda")
    for d in args.head_dim:
        t = vat.tiles_for(device, d, args.max_seqlen, args.max_seqlen)
        kernels = (
            ("fwd", vat._varlen_attention_fwd_kernel, t.fwd_m, t.fwd_n),
            ("dkdv", vat._varlen_attention_bwd_dkdv_kernel, t.dkdv_m, t.dkdv_n),
            ("dq", vat._varlen_attention_bwd_dq_kernel, t.dq_m, t.dq_n),
        )
        for rope in (False, True) if d % 4 == 0 else (False,):
            for causal in (False, True):
                for name, kernel, bm, bn in kernels:
                    consts = vat._kernel_args(d, rope, causal, bm, bn, DTYPES[args.dtype])
                    if name == "fwd":
                        consts["ROPE_ROWS"] = 32
                    for cfg in kernel.configs:
                        warps, stages = cfg.num_warps, cfg.num_stages
                        report = compile_report(kernel, consts, args.dtype, args.arch, warps, stages)
                        print(
                            f"{name:4s} D={d:<3d} rope={rope:d} causal={causal:d} {bm:>3d}x{bn:<3d} "
                            f"warps {warps} stages {stages}: {report}"
                        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
