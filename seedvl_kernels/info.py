"""What this install can do: ``python -m seedvl_kernels.info [--json]``.

Reports the versions of torch, triton and CUDA, whether the extension ``_C`` was built and for
which architectures, the GPU if any, for each op which implementations can serve a call here, and
which implementations have been verified on a GPU (GPU_VERIFIED) rather than only compiled.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
from typing import Any

import torch

import seedvl_kernels

from . import _backends, _dispatch

# (op, impl) -> (date, GPU, result file) of the GPU pass (scripts/gpu_pass.sh) in which the
# implementation passed the real-size bf16 self-check; add an entry only with that committed file.
# No implementation has run on a GPU yet: Triton kernels are checked by the interpreter and
# compiled for sm_90a offline (profiles/triton_aot.py), CUDA kernels are compiled by nvcc (sm_80,
# sm_90a; the CUTLASS grouped GEMM sm_90a only), and only the references (and the Triton kernels
# in the interpreter) are tested on a CPU.
# What the compiled sm_90a code looks like (registers, spills, occupancy, wgmma) is in
# profiles/kernel_report.md.
GPU_VERIFIED: dict[tuple[str, str], tuple[str, str, str]] = {}
_NOT_VERIFIED = {
    "triton": "compiled only (interpreter tests on CPU, sm_90a AOT compile)",
    "cuda": "compiled only (nvcc sm_80/sm_90a)",
    "ref": "reference (tested on CPU)",
}
# Kernels built for fewer architectures than the extension's list (CMakeLists.txt).
_NOT_VERIFIED_OP = {("grouped_gemm", "cuda"): "compiled only (nvcc sm_90a; CUTLASS Hopper kernels)"}


def _verification() -> dict[str, dict[str, str]]:
    """For each op and implementation: where it was verified on a GPU, or what it has had instead."""
    table: dict[str, dict[str, str]] = {}
    for op in _dispatch.ops():
        row = {}
        for impl in _dispatch.implementations(op):
            if impl == "cpu":  # runs on CPU tensors only: tested on CPU, nothing to verify on a GPU
                continue
            seen = GPU_VERIFIED.get((op, impl))
            unseen = _NOT_VERIFIED_OP.get((op, impl), _NOT_VERIFIED[impl])
            row[impl] = f"verified on {seen[1]} {seen[0]} ({seen[2]})" if seen else unseen
        table[op] = row
    return table


def _nvcc_version() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release ([\d.]+)", out)
    return match.group(1) if match else None


def _driver_version() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def _gpu() -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "capability": f"sm_{props.major}{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "count": torch.cuda.device_count(),
        "driver": _driver_version(),
    }


def _extension() -> dict[str, Any]:
    C = _backends.C
    if C is None:
        return {"built": False, "reason": _backends.C_IMPORT_ERROR}
    runtime = int(C.cuda_runtime_version)
    return {
        "built": True,
        "archs": [f"sm_{a}" for a in C.cuda_archs],
        "cuda_runtime": f"{runtime // 1000}.{runtime % 1000 // 10}",
        "ops": list(C.ops),
        "cutlass_include": C.cutlass_include,
    }


def _ops(device: torch.device, dtype: torch.dtype) -> dict[str, dict[str, str]]:
    table: dict[str, dict[str, str]] = {}
    for op in _dispatch.ops():
        row = {}
        for impl in _dispatch.IMPLS:
            reason = _dispatch.unavailable_reason(op, impl, device, dtype)
            row[impl] = "available" if reason is None else f"unavailable: {reason}"
        try:
            row["auto"] = _dispatch.resolve(op, "auto", device, dtype)
        except _dispatch.ImplUnavailableError as err:
            row["auto"] = f"unavailable: {err}"
        table[op] = row
    return table


def collect() -> dict[str, Any]:
    """Everything the report shows, as a JSON-serialisable dict."""
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    return {
        "seedvl_kernels": seedvl_kernels.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _backends.triton_version(),
        "triton_interpret": _backends.triton_interpret(),
        "nvcc": _nvcc_version(),
        "extension": _extension(),
        "gpu": _gpu(),
        "ops_device": f"{device.type} {str(dtype).replace('torch.', '')}",
        "ops": _ops(device, dtype),
        "gpu_verified": _verification(),
    }


def _print(info: dict[str, Any]) -> None:
    ext = info["extension"]
    gpu = info["gpu"]
    print(f"seedvl_kernels {info['seedvl_kernels']} (python {info['python']})")
    print(f"  torch   {info['torch']} (CUDA {info['torch_cuda'] or 'none'})")
    print(
        f"  triton  {info['triton'] or 'not installed'}"
        + (" [interpreter]" if info["triton_interpret"] else "")
    )
    print(f"  nvcc    {info['nvcc'] or 'not found'}")
    if ext["built"]:
        print(
            f"  _C      built for {', '.join(ext['archs'])} (CUDA runtime {ext['cuda_runtime']}), ops: "
            f"{', '.join(ext['ops'])}"
        )
    else:
        print(f"  _C      not built ({ext['reason']})")
    if gpu:
        print(
            f"  GPU     {gpu['name']} ({gpu['capability']}, {gpu['memory_gib']} GiB, "
            f"{gpu['count']} device(s), driver {gpu['driver']})"
        )
    else:
        print("  GPU     none")
    print(f"implementations for {info['ops_device']} tensors:")
    width = max((len(op) for op in info["ops"]), default=0)
    for op, row in info["ops"].items():
        cells = "  ".join(
            f"{impl}:{'yes' if row[impl] == 'available' else 'no '}" for impl in _dispatch.IMPLS
        )
        print(f"  {op:<{width}}  {cells}  auto -> {row['auto']}")
    verified = [
        f"{op}/{impl}"
        for op, row in info["gpu_verified"].items()
        for impl, v in row.items()
        if v.startswith("verified")
    ]
    print(
        "verified on a GPU: "
        + (", ".join(verified) if verified else "none yet (no implementation has run on a GPU)")
    )
    print("  static sm_90a evidence (registers, spills, occupancy, wgmma): profiles/kernel_report.md")
    for op, row in info["gpu_verified"].items():
        kernels = {impl: v for impl, v in row.items() if impl != "ref"}
        if kernels:
            print(f"  {op:<{width}}  " + "; ".join(f"{impl}: {v}" for impl, v in kernels.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m seedvl_kernels.info", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--json", action="store_true", help="emit JSON (with the reason for every unavailable impl)"
    )
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
    else:
        _print(info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
