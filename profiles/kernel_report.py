"""Static Hopper evidence for every kernel of the project, without a GPU: registers, spills, shared
memory, the occupancy that follows on H100/H200, the tensor-core instructions and how many wgmma
groups the code keeps in flight.

    python profiles/kernel_report.py                  # everything; writes kernel_report.{md,json}
    python profiles/kernel_report.py --json           # the same, JSON on stdout
    python profiles/kernel_report.py --hot --check    # the hot kernels against the baseline (CI)
    python profiles/kernel_report.py --only "grouped_gemm: CUTLASS" --only persistent   # rows whose
                                                      # key has one of these; writes nothing

Triton kernels are lowered for sm_90a by Triton's own compiler (profiles/triton_aot.py's launches)
at the shapes of the model presets: attention at the ViT's head dim 64 with 2D RoPE and the LLM's
128 causal (and its fp32-output ring variant), every autotune config; the expert GEMMs of the Qwen3
MoE presets; pool_adapter at seedvit-532m's width. ``ptxas -v`` (the ptxas and flags Triton uses)
gives registers and spill stores/loads; the SASS of the cubin (``cuobjdump -sass``) gives the MMA
instructions and the wgmma wait values. CUDA kernels come from the sm_90a code of the built
extension (``seedvl_kernels/_C*.so``; ``scripts/build_ext_for_gpu_machine.sh`` or ``pip install -e .``
builds it): ``cuobjdump --dump-resource-usage`` and the SASS; the dynamic shared memory and the
threads per block are what the launchers in csrc/ ask for (``_cuda_launch``).

Columns:
- spill: bytes of spill stores + spill loads (ptxas). The stack frame is reported beside it: a
  kernel that evaluates an accurate sin/cos keeps 32 B of stack for its argument reduction (the
  CUDA rope_2d kernels), which is not a spill. CUDA kernels: 0 when the stack frame is 0, else
  unknown ("?": ptxas was not run).
- occupancy: CTAs and warps per SM on sm_90 (64K registers in 4 sub-partitions, allocated per warp
  in units of 256; 228 KB shared memory with 1 KB reserved per CTA; 2048 threads; 32 CTAs), and the
  limit that binds.
- MMA: ``wgmma`` (HGMMA in the SASS), ``mma.sync`` (HMMA) or none.
- waits: the distinct N of ``wgmma.wait_group N`` (SASS ``WARPGROUP.DEPBAR.LE gsb0, N``). With N >= 1
  a loop issues its next wgmma group while N are still running (N + 1 in flight); waits of 0 only
  mean every group is drained before the next is issued (tensor cores idle during the softmax or
  epilogue math between them), unless other warpgroups of the CTA issue their own.
- MMA partitions: in a warp-specialized Triton kernel (``ttg.warp_specialize`` in its TTGIR), the
  partitions that issue wgmma (``ttng.warp_group_dot``), each its own warpgroup with its own waits;
  ``in flight`` is then per CTA: (max N + 1) x partitions. Threads and occupancy count every
  partition's warps (the compiled kernel's num_warps, not the launch's).
- instruction mix (its own table): static SASS instructions of the kernel, its MUFU ones by function
  (EX2, RCP, ...), its wgmma ones by MxNxK shape (the tensor-core work of one pass through the code),
  its local-memory ones (LDL/STL: spills, or the stack of an accurate sin/cos's
  argument reduction) and, for Triton kernels, the sin/cos operations in its TTGIR (each one an
  inlined libdevice sinf/cosf over a whole tile: the polynomial, and a Payne-Hanek reduction through
  local memory for large angles).

``--check`` compares the hot kernels (or all, without ``--hot``) with the baseline
(profiles/kernel_report.json) and exits 1 when one newly spills (or spills more than the
baseline's known, explained spill), loses its tensor-core instructions, falls back from wgmma to
mma.sync, stops keeping more than one wgmma group in flight, evaluates sin/cos where the baseline
reads a table, or did not compile.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASELINE = HERE / "kernel_report.json"
MARKDOWN = HERE / "kernel_report.md"
ARCH = "sm_90a"

# H100/H200 (sm_90) per-SM limits, as the CUDA occupancy calculator uses them.
REGS_PER_SM = 65536
SUB_PARTITIONS = 4
REG_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_PER_SM = 233472  # 228 KB
SMEM_RESERVED_PER_CTA = 1024
SMEM_UNIT = 128
MAX_WARPS_PER_SM = 64  # 2048 threads
MAX_CTAS_PER_SM = 32

# The kernels CI holds the line on (tests/test_kernel_report.py): keys of the report's rows. The
# attention ones are the configs pinned runs use (varlen_attention_triton_common._PINNED).
HOT_TRITON = (
    "varlen_attention: fwd D=64 rope=1 causal=0 128x64 w8 s2",
    "varlen_attention: dkdv D=64 rope=1 causal=0 32x128 w8 s2",
    "varlen_attention: dq D=64 rope=1 causal=0 128x32 w4 s2",
    "varlen_attention: fwd D=128 rope=0 causal=1 128x64 w8 s2",
    "varlen_attention: dkdv D=128 rope=0 causal=1 32x64 w8 s2",
    "varlen_attention: dq D=128 rope=0 causal=1 64x32 w4 s2",
    "varlen_attention: fwd_ws D=64 rope=1 causal=0 128x64 w4 s2",  # warp-specialized: 2 consumers
    "varlen_attention: fwd_ws D=128 rope=0 causal=1 128x64 w4 s2",
    "grouped_gemm: qwen3-30b-a3b M-grouped (gate_up fwd)",
    "grouped_gemm: qwen3-30b-a3b K-grouped (dW gate_up)",
    "grouped_gemm: qwen3-30b-a3b K-grouped (dW down)",  # pipelined since its row scale moved onto A
    "pool_adapter: F1 h, a = GELU(mean4(x) w1 + b1)",
    "pool_adapter: B1 dh, a, db1, db2 partials",
    "rope_2d: D=64 inverse=0",
)
HOT_CUDA_OPS = ("grouped_gemm", "pool_adapter")


@dataclass
class Row:
    """The static facts of one kernel at one config / shape class."""

    source: str  # "triton" or "cuda"
    op: str
    kernel: str
    shape: str  # config / shape class
    regs: int | None
    spill: int | None  # bytes, spill stores + spill loads; None: unknown
    stack: int | None  # bytes of stack frame per thread
    smem: int  # bytes per CTA
    threads: int
    ctas_per_sm: int
    warps_per_sm: int
    limit: str  # what bounds the occupancy
    mma: str  # "wgmma", "mma.sync" or "none"
    waits: list[int]  # distinct wgmma.wait_group N
    notes: str = ""
    instrs: int | None = None  # static SASS instructions
    mufu: dict[str, int] | None = None  # MUFU instructions by function (EX2, RCP, ...)
    local_mem: int | None = None  # LDL/STL instructions
    sincos: int | None = None  # sin/cos operations in the TTGIR (Triton kernels)
    hgmma: dict[str, int] | None = None  # wgmma instructions by MxNxK shape
    mma_partitions: int | None = None  # warp-specialized partitions issuing wgmma (None: not specialized)

    @property
    def key(self) -> str:
        return f"{self.source} {self.op}: {self.shape}"

    @property
    def in_flight(self) -> int | None:
        """wgmma groups a CTA can have in flight when one of its warpgroups issues the next one (None:
        no wgmma): per issuing warpgroup max N + 1, times the warpgroups that issue independently."""
        if self.mma != "wgmma":
            return None
        return (max(self.waits, default=0) + 1) * (self.mma_partitions or 1)


# ----------------------------------------------------------------------------- occupancy


def occupancy(regs: int | None, smem: int, threads: int) -> tuple[int, int, str]:
    """(CTAs per SM, warps per SM, binding limit) on sm_90 with the largest shared-memory carveout."""
    warps = max(1, math.ceil(threads / 32))
    limits = {"threads": MAX_WARPS_PER_SM // warps, "CTAs": MAX_CTAS_PER_SM}
    if regs:
        per_warp = math.ceil(regs * 32 / REG_UNIT) * REG_UNIT
        limits["regs"] = (REGS_PER_SM // SUB_PARTITIONS // per_warp) * SUB_PARTITIONS // warps
    per_cta = math.ceil((smem + SMEM_RESERVED_PER_CTA) / SMEM_UNIT) * SMEM_UNIT
    limits["smem"] = SMEM_PER_SM // per_cta
    ctas = min(limits.values())
    binding = "/".join(name for name, n in limits.items() if n == ctas and name != "CTAs") or "CTAs"
    return ctas, ctas * warps, binding


# ----------------------------------------------------------------------------- tools


def _tool(name: str) -> str | None:
    """A CUDA binary tool: Triton's bundled copy, else PATH, else the nvidia-cuda-* PyPI package."""
    with contextlib.suppress(ImportError):
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if bundled.exists():
            return str(bundled)
    found = shutil.which(name)
    if found:
        return found
    with contextlib.suppress(ImportError):
        import nvidia

        for base in nvidia.__path__:
            candidate = next(Path(base).glob(f"cuda_*/bin/{name}"), None)
            if candidate:
                return str(candidate)
    return None


def toolchain_missing() -> str | None:
    """Why this machine cannot make the report, or None."""
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as e:
        return f"Triton with its NVIDIA backend is not installed ({e})"
    try:
        ptxas = Path(get_ptxas(90).path)
    except Exception as e:  # a Triton without its bundled ptxas raises here
        return f"no ptxas for sm_90a ({type(e).__name__}: {e})"
    if not ptxas.exists():
        return f"no ptxas for sm_90a ({ptxas} does not exist)"
    if _tool("cuobjdump") is None:
        return "no cuobjdump (Triton's bundle, the CUDA toolkit or nvidia-cuda-cuobjdump)"
    return None


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


# ----------------------------------------------------------------------------- SASS and ptxas


_FUNCTION = re.compile(r"^\s*Function : (\S+)", re.M)
_DEPBAR = re.compile(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)")


def sass_facts(sass: str) -> dict[str, tuple[str, list[int]]]:
    """Per function of a cuobjdump -sass listing: (MMA kind, distinct wgmma wait values)."""
    out = {}
    starts = list(_FUNCTION.finditer(sass))
    for i, m in enumerate(starts):
        body = sass[m.end() : starts[i + 1].start() if i + 1 < len(starts) else len(sass)]
        mma = "wgmma" if "HGMMA." in body else "mma.sync" if "HMMA." in body else "none"
        out[m.group(1)] = (mma, sorted({int(v, 16) for v in _DEPBAR.findall(body)}))
    return out


_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)")


def sass_counts(sass: str) -> dict[str, tuple[int, dict[str, int], int, dict[str, int]]]:
    """Per function of a cuobjdump -sass listing: (instructions, MUFU ones by function, LDL/STL ones,
    wgmma (HGMMA) ones by MxNxK shape)."""
    out = {}
    starts = list(_FUNCTION.finditer(sass))
    for i, m in enumerate(starts):
        body = sass[m.end() : starts[i + 1].start() if i + 1 < len(starts) else len(sass)]
        ops = _INSTR.findall(body)
        mufu: dict[str, int] = {}
        hgmma: dict[str, int] = {}
        for op in ops:
            parts = op.split(".")
            if parts[0] == "MUFU":
                mufu[parts[1]] = mufu.get(parts[1], 0) + 1
            elif parts[0] == "HGMMA":
                hgmma[parts[1]] = hgmma.get(parts[1], 0) + 1
        local = sum(op.split(".")[0] in ("LDL", "STL") for op in ops)
        out[m.group(1)] = (len(ops), dict(sorted(mufu.items())), local, dict(sorted(hgmma.items())))
    return out


_PARTITION = re.compile(r"^\s*(?:default \{|partition\d+\()", re.M)


def ttgir_mma_partitions(ttgir: str) -> int | None:
    """Partitions of a warp-specialized kernel (regions of its ``ttg.warp_specialize``) that issue
    wgmma (``ttng.warp_group_dot``); None when the kernel is not warp-specialized."""
    if "ttg.warp_specialize" not in ttgir:
        return None
    starts = [m.start() for m in _PARTITION.finditer(ttgir)] + [len(ttgir)]
    return sum("ttng.warp_group_dot" in ttgir[a:b] for a, b in itertools.pairwise(starts))


def ttgir_sincos(ttgir: str) -> int:
    """sin/cos operations in a Triton kernel's TTGIR (math.sin / math.cos)."""
    return len(re.findall(r"= math\.(?:sin|cos) ", ttgir))


_RESOURCES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)")


def resource_usage(binary: str, arch: str | None = None) -> dict[str, tuple[int, int, int]]:
    """(registers, stack bytes, static shared bytes) per function of a cubin or a fat binary."""
    cmd = [_tool("cuobjdump"), "--dump-resource-usage", binary] + (["-arch", arch] if arch else [])
    return {m.group(1): tuple(map(int, m.group(2, 3, 4))) for m in _RESOURCES.finditer(_run(cmd))}


_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_facts(log: str) -> tuple[int | None, int | None, list[str]]:
    """(registers, spill stores + loads, performance warnings) from a ``ptxas -v`` log of one kernel."""
    regs = re.search(r"Used (\d+) registers", log)
    props = _PTXAS_PROPS.search(log)
    warnings = sorted({line.split(":", 1)[-1].strip() for line in log.splitlines() if "Performance" in line})
    spill = int(props.group(2)) + int(props.group(3)) if props else None
    return (int(regs.group(1)) if regs else None), spill, warnings


# ----------------------------------------------------------------------------- Triton kernels


def triton_launches(hot: bool) -> list:
    """triton_aot launches at the model presets' shapes (only the HOT_TRITON ones with ``hot``)."""
    import torch
    import triton_aot as aot

    from model.config import QWEN3_30B_A3B, SEEDVIT_532M

    bf16 = torch.bfloat16
    vit_d, llm_d = SEEDVIT_532M.head_dim, QWEN3_30B_A3B.head_dim
    cases = [(vit_d, 4096, True, False, True, False), (llm_d, 4096, False, True, True, False)]
    if not hot:
        cases.append((llm_d, 4096, False, True, True, True))  # ring attention's fp32 partial outputs
        cases.append((80, 4096, True, False, True, False))  # Qwen2-VL's ViT: a split head dim (64 + 16)
    todo = list(aot.attention_launches(bf16, cases)) + list(aot.attention_ws_launches(bf16, cases))
    todo += list(aot.moe_launches(bf16, ["qwen3-30b-a3b"] if hot else list(aot.MOE_PRESETS)))
    todo += list(aot.OPS["pool_adapter"](bf16, True)) + list(aot.OPS["rope_2d"](bf16, True))
    if not hot:
        todo += list(aot.attention_aux_launches()) + list(aot.OPS["ring_attention"](bf16, True))
    if hot:
        todo = [launch for launch in todo if f"{launch.op}: {launch.label}" in HOT_TRITON]
    labels = [f"{launch.op}: {launch.label}" for launch in todo]
    if len(set(labels)) != len(labels):
        twice = sorted({x for x in labels if labels.count(x) > 1})
        raise RuntimeError(f"two launches share a label: {twice}")
    return todo


def _ptxas_log(compiled, arch: str) -> str:
    """ptxas -v of a compiled kernel's PTX with the flags Triton's make_cubin uses (cache hits)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        fmad = [] if compiled.metadata.enable_fp_fusion else ["--fmad=false"]
        cmd = [get_ptxas(90).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}"]
        cmd += [str(ptx), "-o", str(ptx.with_suffix(".o"))]
        run = subprocess.run(cmd, capture_output=True, text=True)
        return run.stderr + run.stdout


def triton_row(launch) -> Row:
    import torch
    import triton
    import triton_aot as aot

    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = aot.compile_launch(launch, torch.bfloat16, 90)
    log = log.getvalue() if "Used " in log.getvalue() else _ptxas_log(compiled, ARCH)
    regs_ptxas, spill, warnings = ptxas_facts(log)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        (name, (regs, stack, _)), *_ = resource_usage(f.name).items()
        sass = _run([_tool("cuobjdump"), "-sass", f.name])
        (mma, waits), *_ = sass_facts(sass).values()
        (instrs, mufu, local, hgmma), *_ = sass_counts(sass).values()
    if regs_ptxas is not None and regs_ptxas != regs:
        raise RuntimeError(f"{launch.label}: ptxas -v says {regs_ptxas} registers, the cubin {regs}")
    threads = compiled.metadata.num_warps * 32  # every partition's warps when warp-specialized
    smem = compiled.metadata.shared
    ctas, warps, limit = occupancy(regs, smem, threads)
    return Row(
        "triton", launch.op, name, launch.label, regs, spill, stack, smem, threads, ctas, warps, limit,
        mma, waits, "; ".join(warnings), instrs, mufu, local, ttgir_sincos(compiled.asm["ttgir"]), hgmma,
        ttgir_mma_partitions(compiled.asm["ttgir"]),
    )  # fmt: skip


# ----------------------------------------------------------------------------- CUDA kernels


def find_extension() -> Path | None:
    """The built extension with sm_90a code: $SEEDVL_EXT, else the newest _C*.so here."""
    if os.environ.get("SEEDVL_EXT"):
        return Path(os.environ["SEEDVL_EXT"])
    found = [*ROOT.glob("seedvl_kernels/_C*.so"), *ROOT.glob("build/*/_C*.so")]
    with contextlib.suppress(ImportError):
        import importlib.util

        spec = importlib.util.find_spec("seedvl_kernels._C")
        if spec and spec.origin:
            found.append(Path(spec.origin))
    cuobjdump = _tool("cuobjdump")
    for so in sorted(set(found), key=lambda p: p.stat().st_mtime, reverse=True):
        listing = subprocess.run([cuobjdump, "--list-elf", str(so)], capture_output=True, text=True).stdout
        if ARCH in listing:
            return so
    return None


def _demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt")
    if filt is None:
        return names
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


# A tile extent is an integral constant ("NSC_ILi128EEE") or, when it repeats an earlier one, a mangling
# substitution ("SI_"): the 128 x 128 tile spells its second 128 that way.
_EXTENT = r"(?:NS\w+?_ILi(\d+)EEE|(S\w*?_))"
_CUTLASS = re.compile(
    r"MainloopSm90ArrayTmaGmmaWarpSpecializedILi(\d+)E.*?(Cooperative|Pingpong)EEENS\w+?_IJ"
    + _EXTENT * 3
    + r".*?MMA_\d+x\d+x\d+_F32BF16BF16_SSILN\w+?MajorE(\d)ELS\w+?_(\d)E"
)
# (A major, B major) of the CUTLASS grouped GEMMs (0: K-major, 1: MN-major) -> what they compute
_CUTLASS_ROLE = {(0, 1): "M-grouped, b (E, K, N)", (0, 0): "M-grouped, b (E, N, K)", (1, 1): "K-grouped (dW)"}


def _header_constants(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"constexpr int (k\w+) = (\d+);", path.read_text())}


def _cuda_launch(mangled: str, pretty: str) -> tuple[str, str, int, bool, int]:
    """(op, shape label, dynamic shared bytes, whether that is a lower bound, threads per CTA)."""
    if m := _CUTLASS.search(mangled):
        stages, schedule, *extents, a_major, b_major = m.groups()
        tile: list[int] = []
        for value, _substitution in zip(extents[::2], extents[1::2], strict=True):
            tile.append(int(value) if value else tile[-1])  # a substitution repeats the extent before it
        bm, bn, bk = tile
        stages, a_major, b_major = int(stages), int(a_major), int(b_major)
        role = _CUTLASS_ROLE.get((a_major, b_major), "?")
        role += " pingpong" if schedule == "Pingpong" else ""  # cooperative: the labels of the baseline
        label = f"CUTLASS {role} {bm}x{bn}x{bk} {stages} stages"
        # the mainloop's operand stages (bf16); the epilogue's share comes on top (not in the name)
        return "grouped_gemm", label, stages * (bm + bn) * bk * 2, True, 384
    short = re.sub(r"\(.*\)$", "", pretty).replace("void ", "")
    short = re.sub(r"seedvl::(\w+::)?", "", short).replace("cutlass::layout::", "")
    short = short.replace("__nv_bfloat16", "bf16").replace("float", "fp32").replace(" >", ">")
    if "pool_adapter_gemm_kernel" in mangled:
        c = _header_constants(ROOT / "csrc" / "pool_adapter" / "kernel.cuh")
        a_k, pool, b_k = (flag == "1" for flag in re.findall(r"Lb(\d)E", mangled))

        def tile(k_major: bool) -> int:  # Tile<K_MAJOR>::kElems: padded rows of 16-byte chunks
            rows, cols = (c["kBlockM"], c["kBlockK"]) if k_major else (c["kBlockK"], c["kBlockM"])
            return rows * (cols + c["kPad"])

        layout = f"{'pooled ' if pool else ''}A {'K' if a_k else 'M'}-major, B {'K' if b_k else 'N'}-major"
        label = f"pool_adapter_gemm_kernel<bf16, {layout}>"
        return "pool_adapter", label, c["kStages"] * (tile(a_k) + tile(b_k)) * 2, False, c["kThreads"]
    if "column_sum_kernel" in mangled:
        return "pool_adapter", short, 0, False, 256
    if "rope_2d_kernel" in mangled:
        return "rope_2d", short + " (D=64)", 64, False, 128  # D/4 fp32 inverse frequencies, 128 threads
    return "grouped_gemm", short, 0, False, 256  # the per-group setup kernels


def cuda_rows(so: Path, hot: bool) -> list[Row]:
    """The sm_90a kernels of the extension (bf16 and fp32 instantiations; fp16 mirrors bf16)."""
    usage = resource_usage(str(so), ARCH)
    names = [n for n in usage if "6__half" not in n]
    listing = _run([_tool("cuobjdump"), "-sass", "-arch", ARCH, str(so)])
    sass, counts = sass_facts(listing), sass_counts(listing)
    rows = []
    for mangled, pretty in zip(names, _demangle(names), strict=True):
        regs, stack, static_smem = usage[mangled]
        op, label, dynamic, lower_bound, threads = _cuda_launch(mangled, pretty)
        if hot and op not in HOT_CUDA_OPS:
            continue
        kernel = "cutlass::device_kernel" if label.startswith("CUTLASS") else label.split("<")[0]
        smem = max(0, static_smem - SMEM_RESERVED_PER_CTA) + dynamic  # sm_90 cubins count the reserved 1 KB
        ctas, warps, limit = occupancy(regs, smem, threads)
        mma, waits = sass.get(mangled, ("none", []))
        notes = "shared memory: mainloop stages only (epilogue on top)" if lower_bound else ""
        instrs, mufu, local, hgmma = counts.get(mangled, (None, None, None, None))
        rows.append(
            Row("cuda", op, kernel, label, regs, 0 if stack == 0 else None, stack, smem, threads, ctas, warps,
                limit, mma, waits, notes, instrs, mufu, local, None, hgmma)
        )  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- the baseline


def regressions(baseline: dict, rows: list[dict], expected: list[str] = ()) -> list[str]:
    """What got worse in ``rows`` (Row dicts with a "key") against ``baseline`` (kernel_report.json).

    A kernel newly spills, or spills more than the known spill the baseline explains; loses its
    tensor-core MMA or falls back from wgmma to mma.sync; stops keeping more than one wgmma group in
    flight (a pipelined loop's waits drop to 0, or a warp-specialized kernel has fewer partitions
    issuing wgmma); evaluates sin/cos where the baseline has none (the attention kernels read RoPE's table);
    or (``expected``: keys that must be present) did not compile at all.
    """
    known = {k: why for k, why in baseline.get("known_spills", {}).items() if why.strip()}
    base = baseline.get("kernels", {})
    rank = {"none": 0, "mma.sync": 1, "wgmma": 2}
    out = []
    seen = {r["key"] for r in rows}
    out += [f"{k}: not in this report (did it fail to compile?)" for k in expected if k not in seen]
    for r in rows:
        k, b = r["key"], base.get(r["key"])
        spill = r.get("spill")
        if spill:
            if k not in known:
                out.append(f"{k}: spills {spill} B (stores + loads), not a known spill in the baseline")
            elif b and b.get("spill") is not None and spill > b["spill"]:
                out.append(f"{k}: spills {spill} B, more than the baseline's {b['spill']} B ({known[k]})")
        if b is None:
            continue
        if rank[r["mma"]] < rank[b["mma"]]:
            out.append(f"{k}: MMA {b['mma']} -> {r['mma']} (lost its tensor-core instructions)")
        b_flight, flight = max(b.get("waits") or [0]), max(r.get("waits") or [0])
        if r["mma"] == b["mma"] == "wgmma" and b_flight >= 1 and flight == 0:
            was, now = b.get("waits"), r.get("waits")
            out.append(f"{k}: wgmma wait_group values {was} -> {now} (no longer pipelined)")
        if (r.get("mma_partitions") or 0) < (b.get("mma_partitions") or 0):
            was, now = b["mma_partitions"], r.get("mma_partitions")
            out.append(f"{k}: {was} -> {now} warp-specialized partitions issuing wgmma (specialization lost)")
        if b.get("sincos") == 0 and r.get("sincos"):
            out.append(f"{k}: {r['sincos']} sin/cos operations, the baseline has none (computed again?)")
    return out


def _as_dict(row: Row) -> dict:
    return {"key": row.key, **asdict(row), "in_flight": row.in_flight}


# ----------------------------------------------------------------------------- the report


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def _table(rows: list[Row]) -> list[str]:
    columns = [
        "kernel",
        "config / shape class",
        "regs",
        "spill B (stack)",
        "smem",
        "CTAs/SM",
        "warps/SM (limit)",
    ]
    columns += ["MMA", "wait_group N", "in flight"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        spill = "?" if r.spill is None else str(r.spill)
        waits = ",".join(map(str, r.waits)) or "-"
        flight = "-" if r.in_flight is None else str(r.in_flight)
        smem = ("≥" if "epilogue on top" in r.notes else "") + _kib(r.smem)
        lines.append(
            f"| `{r.kernel}` | {r.shape} | {r.regs} | {spill} ({r.stack}) | {smem} | {r.ctas_per_sm} | "
            f"{r.warps_per_sm} ({r.limit}) | {r.mma} | {waits} | {flight} |"
        )
    return lines


def _mix_table(rows: list[Row]) -> list[str]:
    lines = [
        "| kernel | config / shape class | SASS instrs | MUFU | LDL/STL | sin/cos (TTGIR) | HGMMA by shape |",
        "|" + "---|" * 7,
    ]
    for r in rows:
        mufu = ", ".join(f"{k} {n}" for k, n in (r.mufu or {}).items()) or "-"
        hgmma = ", ".join(f"{k} {n}" for k, n in (r.hgmma or {}).items()) or "-"
        sincos = "-" if r.sincos is None else str(r.sincos)
        lines.append(
            f"| `{r.kernel}` | {r.shape} | {r.instrs} | {mufu} | {r.local_mem} | {sincos} | {hgmma} |"
        )
    return lines


def _names(chosen: list[Row], rows: list[Row], extra=lambda r: "") -> list[str]:
    """``chosen`` grouped by kernel: "`kernel` (all N)" when every row of it is chosen, else its shapes."""
    out = []
    for source, kernel in dict.fromkeys((r.source, r.kernel) for r in chosen):
        mine = [r for r in chosen if (r.source, r.kernel) == (source, kernel)]
        total = sum((r.source, r.kernel) == (source, kernel) for r in rows)
        if len(mine) == total and not extra(mine[0]):
            out.append(f"`{kernel}` ({source}, all {total})")
        else:
            out.append(f"`{kernel}` ({source}): " + ", ".join(f"{r.shape}{extra(r)}" for r in mine))
    return out


def summary(rows: list[Row]) -> list[str]:
    """The "what this says" bullets, computed from the rows."""
    wgmma = [r for r in rows if r.mma == "wgmma"]
    spill = [r for r in rows if r.spill]
    full = [r for r in rows if (r.regs or 0) >= 240]
    serial = [r for r in wgmma if r.in_flight == 1]
    piped = [r for r in wgmma if (r.in_flight or 0) > 1 and not r.mma_partitions]
    specialized = [r for r in wgmma if r.mma_partitions]
    sync = [r for r in rows if r.mma == "mma.sync"]
    low = [r for r in rows if r.mma != "none" and r.warps_per_sm <= 4]
    warned = [f"{r.key}: {r.notes}" for r in rows if r.notes and r.source == "triton"]
    trig = [r for r in rows if r.sincos]
    bullets = (
        ("Spills (ptxas spill stores + loads)", _names(spill, rows, lambda r: f" {r.spill} B")),
        ("At or near the 255-register cap", _names(full, rows, lambda r: f" ({r.regs})")),
        ("wgmma not pipelined (only `wait_group 0`: each group is drained before the next is issued)",
         _names(serial, rows)),
        ("wgmma pipelined (a `wait_group` N >= 1)", _names(piped, rows)),
        ("Warp-specialized (a TMA producer warpgroup; wgmma from several consumer warpgroups, so one's MMAs "
         "run while another's softmax does)",
         _names(specialized, rows, lambda r: f" ({r.mma_partitions} consumers, {r.in_flight} in flight)")),
        ("mma.sync on sm_90a (Ampere-style tensor-core code, no wgmma)", _names(sync, rows)),
        ("4 warps/SM or fewer", _names(low, rows, lambda r: f" ({r.limit})")),
        ("ptxas performance warnings", warned),
        ("sin/cos evaluated in the kernel (TTGIR ops)", _names(trig, rows, lambda r: f" ({r.sincos})")),
    )  # fmt: skip
    out = [f"- **{title}**: " + "; ".join(items) + "." for title, items in bullets if items]
    if any(r.op == "varlen_attention" and r.in_flight == 1 for r in wgmma):
        out.append(
            "- In the plain attention kernels each iteration's P·V needs the softmax of its Q·Kᵀ, and the "
            "next tile's Q·Kᵀ is not issued ahead of that softmax, so the tensor cores wait on it every "
            "iteration. The warp-specialized forward (`_varlen_attention_fwd_ws_kernel`, "
            "$SEEDVL_ATTENTION_WS=1) splits the query tile between two consumer warpgroups instead "
            "(FlashAttention-3's inter-warpgroup overlap); issuing the next Q·Kᵀ before the softmax "
            "(its intra-warpgroup overlap) is what would change the wait values themselves."
        )
    return out


def markdown(rows: list[Row], meta: dict) -> str:
    lines = [
        "# Static Hopper evidence: every kernel compiled for sm_90a",
        "",
        f"Made by `{meta['command']}` on {meta['date']} (no GPU): Triton {meta['triton']}, "
        f"{meta['ptxas']}; CUDA kernels from `{meta['extension']}`. Nothing here ran on a GPU; see "
        "the docstring of `profiles/kernel_report.py` for where each column comes from.",
        "",
        "Occupancy is for H100/H200 (64K registers, 228 KB shared memory, 64 warps per SM). `in flight`:",
        "wgmma groups a CTA keeps running while it issues the next (max wait_group N + 1, times the",
        "consumer warpgroups of a warp-specialized kernel, which issue theirs independently). `spill B`:",
        "ptxas spill stores + loads; the stack frame in brackets (the CUDA rope_2d kernels' 32 B is",
        "sin/cos argument reduction, not a spill).",
        "",
        "## What this says",
        "",
        *summary(rows),
        "",
        "## Triton kernels (bf16, sm_90a)",
        "",
        *_table([r for r in rows if r.source == "triton"]),
        "",
        "## CUDA kernels (the extension's sm_90a code)",
        "",
    ]
    cuda = [r for r in rows if r.source == "cuda"]
    lines += _table(cuda) if cuda else ["No built extension with sm_90a code was found."]
    lines += [
        "",
        "CUDA shared memory is static + what the launcher asks for; the CUTLASS grouped GEMM's is its",
        "mainloop's operand stages (the epilogue's share comes on top), which already holds it to one",
        "CTA per SM, as CUTLASS's persistent cooperative kernels are designed to run.",
        "",
        "## Instruction mix (static SASS)",
        "",
        "Instructions in the code, not executed counts (a loop body counts once). MUFU by function;",
        "LDL/STL: local-memory instructions; sin/cos: operations in the TTGIR (Triton kernels only).",
        "",
        *_mix_table(rows),
        "",
    ]
    return "\n".join(lines)


def _meta(command: str, so: Path | None) -> dict:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    version = _run([get_ptxas(90).path, "--version"]).strip().splitlines()[-1]
    ext = str(so.relative_to(ROOT)) if so and so.is_relative_to(ROOT) else str(so)
    return {"command": command, "date": date.today().isoformat(), "triton": triton.__version__,
            "ptxas": f"ptxas {version}", "extension": ext, "arch": ARCH, "dtype": "bf16"}  # fmt: skip


def collect(
    hot: bool, with_cuda: bool = True, log=sys.stderr, only: list[str] = ()
) -> tuple[list[Row], list[str], Path | None]:
    """(rows, compile errors, extension used); with ``only``, the rows whose key has one of its texts."""
    os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be real JIT functions
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    sys.path[:0] = [str(HERE), str(ROOT)]

    def wanted(key: str) -> bool:
        return not only or any(text in key for text in only)

    rows, errors = [], []
    for launch in triton_launches(hot):
        if not wanted(f"triton {launch.op}: {launch.label}"):
            continue
        start = time.perf_counter()
        try:
            rows.append(triton_row(launch))
        except Exception as e:  # report every kernel, then fail
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            errors.append(f"triton {launch.op}: {launch.label}: {why}")
            continue
        print(f"  {rows[-1].key:80s} {time.perf_counter() - start:5.1f} s", file=log)
    so = find_extension() if with_cuda else None
    if so is not None:
        rows += [row for row in cuda_rows(so, hot) if wanted(row.key)]
    return rows, errors, so


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of markdown")
    parser.add_argument("--hot", action="store_true", help="only the hot kernels (HOT_TRITON, HOT_CUDA_OPS)")
    parser.add_argument("--check", action="store_true", help="exit 1 on a regression against the baseline")
    parser.add_argument("--no-cuda", action="store_true", help="skip the extension's kernels")
    parser.add_argument("--no-write", action="store_true", help="do not write kernel_report.{md,json}")
    parser.add_argument(
        "--only", action="append", default=[], metavar="TEXT", help="only rows whose key has TEXT; repeatable"
    )
    args = parser.parse_args(argv)
    missing = toolchain_missing()
    if missing:
        print(f"cannot compile for {ARCH}: {missing}", file=sys.stderr)
        return 2
    rows, errors, so = collect(args.hot, not args.no_cuda, only=args.only)
    flags = [f for f, on in (("--hot", args.hot), ("--no-cuda", args.no_cuda)) if on]
    flags += [f"--only {text!r}" for text in args.only]
    command = " ".join(["python profiles/kernel_report.py", *flags])
    meta = _meta(command, so)
    baseline = json.loads(BASELINE.read_text()) if BASELINE.exists() else {}
    if not args.hot and not args.no_write and not args.only:
        known = baseline.get("known_spills", {})
        spilling = {r.key: known.get(r.key, "") for r in rows if r.spill}
        unexplained = [k for k, why in spilling.items() if not why]
        data = {**meta, "known_spills": spilling, "kernels": {r.key: _as_dict(r) for r in rows}}
        BASELINE.write_text(json.dumps(data, indent=1) + "\n")
        MARKDOWN.write_text(markdown(rows, meta))
        if unexplained:
            new = "\n  ".join(unexplained)
            print(
                f"new spills: explain them in known_spills of kernel_report.json:\n  {new}", file=sys.stderr
            )
    if args.json:
        json.dump({**meta, "rows": [_as_dict(r) for r in rows], "errors": errors}, sys.stdout, indent=1)
        print()
    else:
        print(markdown(rows, meta))
    failed = [f"does not compile: {e}" for e in errors]
    if args.check:
        expected = [f"triton {k}" for k in HOT_TRITON] if args.hot else list(baseline.get("kernels", {}))
        if args.no_cuda or so is None:
            expected = [k for k in expected if not k.startswith("cuda ")]
        if args.only:
            expected = [k for k in expected if any(text in k for text in args.only)]
        failed += regressions(baseline, [_as_dict(r) for r in rows], expected)
    if failed:
        print("\nRegressions:\n  " + "\n  ".join(failed), file=sys.stderr)
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
