"""Compile every Triton kernel of the package for a GPU target on a machine without a GPU.

Each kernel is lowered through Triton's real compiler (TTIR -> TTGIR -> PTX -> cubin with the
ptxas bundled with Triton) at the tile configs its launcher picks on a GPU (every autotune config
for the attention kernels), at model shapes, with the arguments specialised the way such a launch
would be: the launch's unit strides as constants, pointers and the other strides divisible by 16,
token counts not, and never the integers a kernel marks ``do_not_specialize`` (counts that change
every batch, which the launcher passes unspecialised so that a new batch does not recompile).
Lowering errors, shared memory past the device's limit, dot products that fell back from tensor
cores, main loops that are not software-pipelined and register spills show up here, before any
GPU time is spent. Timing still needs a GPU.

    python profiles/triton_aot.py                          # everything, sm_90, bf16
    python profiles/triton_aot.py --op varlen_attention --arch 80 --dtype fp16
    python profiles/triton_aot.py --quick --check          # what tests/test_triton_aot.py runs in CI

``--check`` exits non-zero if any launch fails to compile, exceeds the shared memory of one block,
has a dot product without a tensor-core MMA (fp16/bf16) or a main loop without async copies, if
a Triton kernel of the package (a ``*_kernel`` JIT function) has no launch here, or if it
specialises a per-batch integer (PER_BATCH_INTS: num_seqs, total_q, ...). Register spills are
reported, not failed (they cost speed, not correctness).

The Triton kernels must be real JIT functions, so this unsets TRITON_INTERPRET before importing
them (the test runs it in a subprocess for that reason).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton.jit runs for the package's kernels
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import triton
from triton.backends.compiler import GPUTarget

import seedvl_kernels
from model.config import QWEN3_30B_A3B, QWEN3_235B_A22B, get_preset
from seedvl_kernels import _backends

# Integer arguments that change every batch, by name (the same names in every kernel): a kernel must
# mark them ``do_not_specialize``, or each new "divisible by 16" / "== 1" combination recompiles it.
PER_BATCH_INTS = frozenset({"num_seqs", "num_table", "num_table_a", "num_table_b", "total_q", "total_k"})

# Shared memory one block may use (bytes), by compute capability x 10.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# Pointer arguments that are not in the data dtype, by name (the same names in every kernel).
INT32_POINTERS = frozenset(
    {
        "rec_ptr", "table_ptr", "cu_q_ptr", "cu_k_ptr", "pos_ptr",  # varlen_attention, rope_2d
        "cu_a_ptr", "cu_other_a_ptr", "rec_a_ptr", "table_a_ptr",  # the attention schedule
        "cu_b_ptr", "cu_other_b_ptr", "rec_b_ptr", "table_b_ptr",
        "offsets_ptr", "order_ptr", "a_rows_ptr", "c_rows_ptr", "out_rows_ptr",  # grouped GEMMs
        "src_ptr", "slot_ptr",  # moe_ffn
    }
)  # fmt: skip
FP32_POINTERS = frozenset(
    {
        "lse_ptr", "dlse_ptr", "lse2_ptr", "delta_ptr", "inv_freq_ptr", "cs_ptr",  # varlen_attention, rope_2d
        "row_scale_ptr", "c_scale_ptr", "scale_ptr", "part_ptr",  # gate weights, partial sums
        "sum_out_ptr", "sum_a_ptr",  # pool_adapter's bias-gradient partials
    }
)  # fmt: skip


@dataclass(frozen=True)
class Launch:
    """One kernel launch as its launcher makes it on a GPU.

    ``aligned``: integer arguments other than strides that the model shapes make multiples of 16
    (hidden sizes); ``unaligned``: strides that need not be (token counts, int32 pairs).
    ``pointers``: pointer types other than the defaults (INT32_POINTERS, FP32_POINTERS, else the
    data dtype). ``dot``/``loop``: the kernel multiplies tiles / has a main loop worth pipelining.
    """

    op: str
    label: str
    kernel: object  # a @triton.jit function, or an autotuner around one
    constexprs: dict
    num_warps: int
    num_stages: int
    unit_strides: frozenset[str] = frozenset()
    aligned: frozenset[str] = frozenset()
    unaligned: frozenset[str] = frozenset()
    pointers: dict[str, str] = field(default_factory=dict)
    dot: bool = True
    loop: bool = True


@dataclass(frozen=True)
class Report:
    smem: int  # bytes
    registers: int | None
    spill: int | None  # bytes of stack per thread
    mma: str  # "wgmma", "mma" or "none"
    async_copies: bool  # cp.async or TMA (cp.async.bulk) in the PTX

    def __str__(self) -> str:
        regs = "?" if self.registers is None else self.registers
        spill = "?" if self.spill is None else self.spill
        pipe = "pipelined" if self.async_copies else "NOT pipelined"
        return f"smem {self.smem / 1024:6.1f} KiB  regs {regs:>3}  spill {spill:>4} B  {self.mma:5s}  {pipe}"


def _jit(kernel) -> object:
    return kernel.fn if hasattr(kernel, "configs") else kernel


def signature(launch: Launch, dtype: torch.dtype) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for triton.compiler.ASTSource, keyed as Triton wants them."""
    fn = _jit(launch.kernel)
    names = list(fn.arg_names)
    consts = dict(launch.constexprs)
    consts.update({n: 1 for n in launch.unit_strides})
    unknown = set(consts) - set(names)
    if unknown:
        raise ValueError(f"{launch.label}: {sorted(unknown)} are not arguments of {fn.__name__}")
    per_batch = {p.name for p in getattr(fn, "params", ()) if getattr(p, "do_not_specialize", False)}
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in consts:
            sig[n] = "constexpr"
            continue
        if n.endswith("_ptr"):
            default = "*i32" if n in INT32_POINTERS else "*fp32" if n in FP32_POINTERS else f"*{_TYPE[dtype]}"
            sig[n] = launch.pointers.get(n, default)
            aligned = True
        else:
            sig[n] = "fp32" if "scale" in n else "i32"
            aligned = (n.startswith("stride_") and n not in launch.unaligned) or n in launch.aligned
            aligned = aligned and n not in per_batch
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, {(names.index(n),): v for n, v in consts.items()}, attrs


def compile_launch(launch: Launch, dtype: torch.dtype, arch: int = 90):
    """The compiled kernel (triton.compiler.CompiledKernel) for a CUDA target of ``arch``."""
    sig, consts, attrs = signature(launch, dtype)
    src = triton.compiler.ASTSource(_jit(launch.kernel), sig, constexprs=consts, attrs=attrs)
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def report(compiled) -> Report:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "none")
    return Report(
        smem=compiled.metadata.shared,
        registers=int(regs.group(1)) if regs else None,
        spill=int(stack.group(1)) if stack else None,
        mma=mma,
        async_copies="cp.async" in ptx,
    )


def problems(launch: Launch, rep: Report, dtype: torch.dtype, arch: int) -> list[str]:
    """What --check fails a compiled launch for."""
    out = []
    limit = SMEM_LIMIT.get(arch)
    if limit is not None and rep.smem > limit:
        out.append(f"shared memory {rep.smem} B > {limit} B per block on sm_{arch}")
    if launch.dot and dtype != torch.float32 and rep.mma == "none":
        out.append("no tensor-core MMA in the PTX (the dot products run on FMA units)")
    if launch.loop and not rep.async_copies:
        out.append("main loop not software-pipelined (no cp.async / TMA in the PTX)")
    return out


# ----------------------------------------------------------------------------- the launches


# (head dim, max_seqlen, rope, causal, every autotune config, fp32 outputs as ring attention asks)
AttentionCase = tuple[int, int, bool, bool, bool, bool]
_ATTENTION_UNALIGNED = frozenset({"stride_pos_t", "stride_pos_c", "stride_lse_h", "stride_dlse_h"})


def attention_launches(dtype: torch.dtype, cases: list[AttentionCase]) -> Iterator[Launch]:
    """The forward, dK/dV and dQ launches of varlen_attention for each case."""
    from seedvl_kernels import varlen_attention_triton as vat
    from seedvl_kernels.varlen_attention_triton_common import searched

    cuda = torch.device("cuda")
    kernels = (
        ("fwd", vat._varlen_attention_fwd_kernel, "fwd_m", "fwd_n", "out_ptr"),
        ("dkdv", vat._varlen_attention_bwd_dkdv_kernel, "dkdv_m", "dkdv_n", ("dk_ptr", "dv_ptr")),
        ("dq", vat._varlen_attention_bwd_dq_kernel, "dq_m", "dq_n", "dq_ptr"),
    )
    for d, max_seqlen, rope, causal, all_configs, fp32_out in cases:
        tiles = vat.tiles_for(cuda, d, max_seqlen, max_seqlen)
        for name, kernel, m, n, outs in kernels:
            bm, bn = getattr(tiles, m), getattr(tiles, n)
            consts = vat._kernel_args(d, rope, causal, bm, bn, dtype)
            if name == "fwd":
                consts["ROPE_ROWS"] = min(tiles.rope_rows, bm)
            pointers = {p: "*fp32" for p in ((outs,) if isinstance(outs, str) else outs)} if fp32_out else {}
            if fp32_out and name == "fwd" and not rope:
                pointers["q_rot_ptr"] = "*fp32"  # the launcher passes out as the unused rotated-q pointer
            configs = kernel.configs if all_configs else kernel.configs[:1]
            for cfg in [c for c in configs if searched(name, c, d, bm)]:  # what search mode times
                block_n = cfg.kwargs.get("BLOCK_N", bn)  # the forward's is a config dimension
                label = (
                    f"{name} D={d} rope={rope:d} causal={causal:d} {bm}x{block_n}"
                    f"{' fp32 out' if fp32_out else ''} w{cfg.num_warps} s{cfg.num_stages}"
                )
                yield Launch(
                    "varlen_attention", label, kernel, {**consts, **cfg.kwargs}, cfg.num_warps,
                    cfg.num_stages, unaligned=_ATTENTION_UNALIGNED, pointers=pointers,
                )  # fmt: skip


def attention_ws_launches(dtype: torch.dtype, cases: list[AttentionCase]) -> Iterator[Launch]:
    """The warp-specialized forward ($SEEDVL_ATTENTION_WS=1) for each case, every config. q arrives
    rotated, so RoPE only names the case; the launch's num_warps is per partition."""
    from seedvl_kernels import varlen_attention_triton as vat
    from seedvl_kernels.varlen_attention_triton_common import WS_TUNE_KEY

    for d, max_seqlen, rope, causal, all_configs, fp32_out in cases:
        tiles = vat.tiles_for(torch.device("cuda"), d, max_seqlen, max_seqlen)
        args = vat._kernel_args(d, False, causal, tiles.fwd_m, tiles.fwd_n, dtype)
        consts = {n: args[n] for n in (*WS_TUNE_KEY, "BLOCK_DA", "BLOCK_DB", "SPLIT_D")}
        consts["WARP_SPECIALIZE"] = True
        kernel = vat._varlen_attention_fwd_ws_kernel
        for cfg in kernel.configs if all_configs else kernel.configs[:1]:
            label = (
                f"fwd_ws D={d} rope={rope:d} causal={causal:d} {tiles.fwd_m}x{tiles.fwd_n}"
                f"{' fp32 out' if fp32_out else ''} w{cfg.num_warps} s{cfg.num_stages}"
            )
            yield Launch(
                "varlen_attention", label, kernel, consts, cfg.num_warps, cfg.num_stages,
                unaligned=_ATTENTION_UNALIGNED, pointers={"out_ptr": "*fp32"} if fp32_out else {},
            )  # fmt: skip


def _varlen_attention(dtype: torch.dtype, quick: bool) -> Iterator[Launch]:
    if quick:
        cases = [(64, 4096, True, True, True, False), (128, 4096, False, False, False, False)]
        cases += [(80, 4096, True, False, False, False), (64, 64, True, False, False, False)]
        cases += [(128, 4096, False, True, False, True)]
    else:
        cases = [
            (d, 4096, rope, causal, True, False)
            for d in (64, 72, 80, 128)
            for rope in (False, True)
            for causal in (False, True)
        ]
        cases += [(64, 64, True, False, True, False), (128, 4096, False, True, True, True)]
    yield from attention_launches(dtype, cases)
    yield from attention_ws_launches(dtype, cases)
    yield from attention_aux_launches()


def attention_aux_launches() -> Iterator[Launch]:
    """varlen_attention's kernels without a dot product: the backward's preprocess, the schedule."""
    from seedvl_kernels import varlen_attention_triton as vat

    for d in (64, 128):
        consts = dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_T=64, HAS_DLSE=True)
        yield Launch(
            "varlen_attention", f"bwd preprocess D={d}", vat._varlen_attention_bwd_preprocess_kernel,
            consts, 4, 1, unaligned=_ATTENTION_UNALIGNED, dot=False, loop=False,
        )  # fmt: skip
    for d in (64, 128):  # the warp-specialized forward's padding rows (rotated q too at the ViT's D)
        consts = dict(
            HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), ROPE=d == 64, PAD=vat.PAD_ROWS, BLOCK_R=64
        )
        yield Launch(
            "varlen_attention", f"fwd_ws padding D={d}", vat._varlen_attention_fwd_pad_kernel, consts, 4, 1,
            unaligned=_ATTENTION_UNALIGNED, dot=False, loop=False,
        )  # fmt: skip
    num_seqs = 64
    consts = dict(
        BLOCK_SEQ=triton.next_power_of_2(num_seqs),
        CHUNK=vat.SCHEDULE_CHUNK,
        SEARCH_STEPS=num_seqs.bit_length(),
    )
    yield Launch(
        "varlen_attention", "schedule (64 sequences)", vat._varlen_attention_schedule_kernel, consts, 4, 1,
        dot=False, loop=False,
    )  # fmt: skip


def _rope_2d(dtype: torch.dtype, quick: bool) -> Iterator[Launch]:
    from seedvl_kernels.rope_2d import _rope_2d_fwd_kernel

    # (inverse, write the cos/sin table): rope_2d's forward and backward, and the rotation of k that
    # also writes varlen_attention's table
    for d in (64,) if quick else (64, 80, 128):
        for inverse, cs in ((False, False), (True, False), (False, True)):
            consts = dict(
                QUARTER=d // 4, INVERSE=inverse, BLOCK_T=16, BLOCK_HALF=triton.next_power_of_2(d // 2),
                WRITE_CS=cs,
            )  # fmt: skip
            label = f"D={d} inverse={inverse:d}" + (" + cos/sin table" if cs else "")
            yield Launch(
                "rope_2d", label, _rope_2d_fwd_kernel, consts, 4, 1,
                unaligned=frozenset({"stride_pos_t", "stride_pos_c"}), dot=False, loop=False,
            )  # fmt: skip


def _ring_attention(dtype: torch.dtype, quick: bool) -> Iterator[Launch]:
    """ring_attention's fused (out, lse) merge: fp32 partials whatever the inputs' dtype."""
    from seedvl_kernels import ring_attention_triton as rat

    for d in (128,) if quick else (64, 128):
        consts = dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_T=rat.block_t(d))
        fp32 = {p: "*fp32" for p in ("out_ptr", "lse_ptr", "blk_out_ptr", "blk_lse_ptr")}
        yield Launch(
            "ring_attention", f"merge D={d}", rat._ring_attention_merge_kernel, consts, 4, 1,
            unaligned=frozenset({"stride_lse_h", "stride_blse_h"}), pointers=fp32, dot=False, loop=False,
        )  # fmt: skip


MOE_PRESETS = {"qwen3-30b-a3b": QWEN3_30B_A3B, "qwen3-235b-a22b": QWEN3_235B_A22B}


def _moe(dtype: torch.dtype, quick: bool) -> Iterator[Launch]:
    yield from moe_launches(dtype, ["qwen3-30b-a3b"] if quick else list(MOE_PRESETS))


def moe_launches(dtype: torch.dtype, presets: list[str]) -> Iterator[Launch]:
    """The grouped GEMM and moe_ffn launches at the expert shapes of each LLM preset."""
    from seedvl_kernels import grouped_gemm_triton as ggt
    from seedvl_kernels import moe_ffn_triton as mft

    cuda = torch.device("cuda")
    precision = ggt.dot_precision(dtype)
    m_unit = frozenset({"stride_ak", "stride_bn", "stride_on"})
    persistent = ggt._grouped_gemm_fwd_persistent_kernel  # MGroupedConfig.persistent: the same tiles
    for preset in presets:
        cfg = MOE_PRESETS[preset]
        D, FF, E = cfg.hidden, cfg.moe_ffn_dim, cfg.num_experts
        groups = {"NUM_GROUPS": E, "GROUPS_POW2": ggt.groups_pow2(E)}
        for n, k, what in ((2 * FF, D, "gate_up fwd"), (D, FF, "down fwd"), (D, 2 * FF, "gate_up dgrad")):
            c = ggt.m_grouped_config(n, k, dtype, cuda)
            down = what == "down fwd"
            consts = {**groups, "GATHER_A": False, "SCATTER_OUT": down, "SCALE_OUT": down}
            consts |= {"EVEN_K": k % c.block_k == 0, "DOT_PRECISION": precision}
            consts |= {"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "GROUP_M": c.group_m}
            yield Launch(
                "grouped_gemm", f"{preset} M-grouped ({what})", ggt._grouped_gemm_fwd_kernel, consts,
                c.num_warps, c.num_stages, unit_strides=m_unit, aligned=frozenset({"N", "K"}),
            )  # fmt: skip
            yield Launch(
                "grouped_gemm", f"{preset} M-grouped persistent ({what})", persistent, consts,
                c.num_warps, c.num_stages, unit_strides=m_unit, aligned=frozenset({"N", "K"}),
            )  # fmt: skip
        for n, k, what, gather in (
            (2 * FF, D, "dW gate_up", (True, False, False)),
            (D, FF, "dW down", (False, True, True)),
        ):
            c = ggt.k_grouped_config(n, k, dtype, cuda)
            consts = dict(zip(("GATHER_A", "GATHER_C", "SCALE_C"), gather, strict=True))
            consts |= {"DOT_PRECISION": precision, "BLOCK_K": c.block_k, "BLOCK_N": c.block_n}
            consts |= {"BLOCK_R": c.block_r, "GROUP_K": c.group_k}
            yield Launch(
                "grouped_gemm", f"{preset} K-grouped ({what})", ggt._grouped_gemm_dw_kernel, consts,
                c.num_warps, c.num_stages, unit_strides=frozenset({"stride_ak", "stride_cn", "stride_on"}),
                aligned=frozenset({"N", "K"}),
            )  # fmt: skip
        for fn, c, extra, unit in (
            (mft._moe_gate_up_fwd_kernel, mft._swiglu_config(FF, D, dtype, cuda), {"SAVE_GU": True},
             {"stride_xd", "stride_wf", "stride_gun", "stride_hn"}),
            (mft._moe_down_bwd_kernel, mft._down_bwd_config(FF, D, dtype, cuda), {},
             {"stride_dd", "stride_wd", "stride_gun", "stride_dgn"}),
        ):  # fmt: skip
            consts = {**groups, **extra, "EVEN_K": D % c.block_k == 0, "DOT_PRECISION": precision}
            consts |= {"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "GROUP_M": c.group_m}
            yield Launch(
                "moe_ffn", f"{preset} {_jit(fn).__name__}", fn, consts, c.num_warps, c.num_stages,
                unit_strides=frozenset(unit), aligned=frozenset({"FF", "D"}),
            )  # fmt: skip
        yield Launch(
            "moe_ffn", f"{preset} combine", mft._moe_combine_kernel,
            {"BLOCK_T": 16, "BLOCK_D": min(256, triton.next_power_of_2(D))}, 4, 1,
            aligned=frozenset({"D"}), unaligned=frozenset({"stride_ym"}), dot=False, loop=False,
        )  # fmt: skip


def _pool_adapter(dtype: torch.dtype, quick: bool) -> Iterator[Launch]:
    from seedvl_kernels import pool_adapter_triton as pat
    from seedvl_kernels.grouped_gemm_triton import dot_precision

    cuda = torch.device("cuda")
    T, C, F, C_OUT = 16384, get_preset("seedvit-532m").width, 4096, 4096  # a 16k-token pack, 4096-wide LLM
    N = T // 4
    # (label, M, N, K, pooled, epilogue, wgrad (K = tokens), the launch's unit strides)
    launches = (
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
    for label, m, n, k, pooled, epilogue, wgrad, unit in launches:
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
        yield Launch(
            "pool_adapter", label, pat._pool_adapter_gemm_kernel, consts, cfg.num_warps, cfg.num_stages,
            unit_strides=frozenset(unit), aligned=frozenset({"M", "N"} if wgrad else {"N", "K"}),
        )  # fmt: skip


OPS = {
    "varlen_attention": _varlen_attention,
    "rope_2d": _rope_2d,
    "grouped_gemm": _moe,  # the grouped GEMMs and moe_ffn's kernels come from one shape table
    "moe_ffn": _moe,
    "pool_adapter": _pool_adapter,
    "ring_attention": _ring_attention,
}


def launches(dtype: torch.dtype, ops: list[str] | None = None, quick: bool = False) -> list[Launch]:
    """The launches of ``ops`` (default: all), in a fixed order."""
    if _backends.triton_interpret():
        raise RuntimeError("TRITON_INTERPRET is set: the kernels are interpreted, not compiled; unset it")
    chosen = list(OPS) if ops is None else ops
    out, seen = [], set()
    for op in chosen:
        if OPS[op] in seen:
            continue
        seen.add(OPS[op])
        out += [launch for launch in OPS[op](dtype, quick) if ops is None or launch.op in chosen]
    return out


def package_kernels() -> dict[str, object]:
    """Every Triton kernel (``*_kernel`` JIT function or autotuner) defined in seedvl_kernels."""
    found = {}
    for info in pkgutil.iter_modules(seedvl_kernels.__path__):
        if info.name == "_C":
            continue
        module = importlib.import_module(f"seedvl_kernels.{info.name}")
        for name, obj in vars(module).items():
            jit = getattr(obj, "fn", None) if hasattr(obj, "configs") else obj
            if name.endswith("_kernel") and isinstance(jit, triton.runtime.jit.JITFunction):
                if jit.fn.__module__ == module.__name__:  # defined here, not imported
                    found[f"{module.__name__}.{name}"] = obj
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--op", action="append", choices=sorted(OPS), help="repeatable; default: all")
    parser.add_argument("--quick", action="store_true", help="a representative subset (CI)")
    parser.add_argument("--check", action="store_true", help="exit 1 on any problem (see the docstring)")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    print(f"Triton {triton.__version__}, sm_{args.arch}, {args.dtype}")
    failed = []
    todo = launches(dtype, args.op, args.quick)
    if args.op is None:
        covered = {id(launch.kernel) for launch in todo}
        failed += [f"{name}: no launch in {Path(__file__).name}" for name, k in package_kernels().items()
                   if id(k) not in covered]  # fmt: skip
    for name, kernel in package_kernels().items():
        fn = _jit(kernel)
        free = {p.name for p in fn.params if p.do_not_specialize}
        specialised = sorted((set(fn.arg_names) & PER_BATCH_INTS) - free)
        if specialised:
            failed.append(f"{name}: per-batch integers {specialised} are not do_not_specialize")
    for launch in todo:
        name = f"{launch.op}: {launch.label}"
        try:
            rep = report(compile_launch(launch, dtype, args.arch))
        except Exception as e:  # report every launch, then fail
            failed.append(f"{name}: does not compile: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            print(f"  {name:78s} COMPILE ERROR")
            continue
        print(f"  {name:78s} {rep}")
        failed += [f"{name}: {p}" for p in problems(launch, rep, dtype, args.arch)]
    if failed:
        print("\nProblems:\n  " + "\n  ".join(failed))
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
