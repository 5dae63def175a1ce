"""Compile every tile candidate of the grouped GEMM's search for sm_90a, at every expert launch of the
Qwen3 MoE presets, and print registers, spills, shared memory and occupancy (no GPU needed).

    python profiles/grouped_gemm_candidates.py            # M_CANDIDATES and K_CANDIDATES, bf16
    python profiles/grouped_gemm_candidates.py --extra    # also the configs dropped from the lists

The launches are profiles/triton_aot.py's ``moe_launches`` (the model shapes and the launchers'
specialisation) with the tiles replaced; the occupancy is profiles/kernel_report.py's. A candidate
that spills at any launch does not belong in seedvl_kernels.grouped_gemm_tune's lists.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be real JIT functions
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import kernel_report  # noqa: E402
import torch  # noqa: E402
import triton_aot  # noqa: E402

from seedvl_kernels import grouped_gemm_tune as tune  # noqa: E402

# Tried and dropped (profiles/grouped_gemm.md): near the register cap or the same code as a listed one.
EXTRA_M = (tune.MGroupedConfig(128, 128, 64, 8, 4, 3), tune.MGroupedConfig(64, 256, 64, 8, 4, 3))
EXTRA_K = (tune.KGroupedConfig(128, 128, 64, 8, 8, 4), tune.KGroupedConfig(128, 128, 32, 8, 4, 4))


def with_tiles(launch: triton_aot.Launch, cfg) -> triton_aot.Launch:
    consts = dict(launch.constexprs)
    if isinstance(cfg, tune.KGroupedConfig):
        consts.update(BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r, GROUP_K=cfg.group_k)
    else:
        consts.update(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)
        consts["EVEN_K"] = True  # the presets' K are multiples of 64
    return dataclasses.replace(launch, constexprs=consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", action="store_true", help="also the configs dropped from the lists")
    args = parser.parse_args(argv)
    m_cands = list(tune.M_CANDIDATES) + (list(EXTRA_M) if args.extra else [])
    k_cands = list(tune.K_CANDIDATES) + (list(EXTRA_K) if args.extra else [])
    spilled = []
    for launch in triton_aot.moe_launches(torch.bfloat16, list(triton_aot.MOE_PRESETS)):
        if launch.op != "grouped_gemm" or "persistent" in launch.label:
            continue
        for cfg in k_cands if "K-grouped" in launch.label else m_cands:
            rep = triton_aot.report(triton_aot.compile_launch(with_tiles(launch, cfg), torch.bfloat16, 90))
            ctas, _, limit = kernel_report.occupancy(rep.registers, rep.smem, cfg.num_warps * 32)
            tiles = "x".join(str(v) for v in dataclasses.astuple(cfg)[:3])
            config = f"{tiles:>10s} w{cfg.num_warps} s{cfg.num_stages}"
            print(
                f"{launch.label:45s} {config}  regs {rep.registers:>3}  spill {rep.spill} B  "
                f"smem {rep.smem // 1024:>3} KiB  {ctas} CTA/SM ({limit})",
                flush=True,
            )
            if rep.spill:
                spilled.append(f"{launch.label} {cfg}")
    if spilled:
        print("\nSpills:\n  " + "\n  ".join(spilled))
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
