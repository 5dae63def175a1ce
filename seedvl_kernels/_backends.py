"""What each backend can serve on this machine, and the bridge to the CUDA extension.

The extension ``seedvl_kernels._C`` receives tensors as DLPack capsules (no stream handshake) plus
the caller's current CUDA stream as an integer, so its kernels are ordered with the surrounding
PyTorch work without any synchronisation.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch
from torch.utils.dlpack import to_dlpack

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _load_extension() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("seedvl_kernels._C"), None
    except ImportError as err:  # built without a CUDA toolkit, or not built
        return None, str(err)


C, C_IMPORT_ERROR = _load_extension()


def triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return triton.__version__


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def ref_support(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def cpu_support_for(dtypes: tuple[torch.dtype, ...]):
    """Support predicate for an implementation on CPU tensors (PyTorch's CPU kernels) of ``dtypes``."""

    def support(device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return f"the cpu implementation runs on CPU tensors, not on {device.type}"
        if dtype not in dtypes:
            return f"the cpu implementation handles {[str(d) for d in dtypes]}, not {dtype}"
        return None

    return support


# Triton's interpreter computes tl.dot on bfloat16 operands wrongly (an upstream defect: errors of
# 1e9 and more), so under TRITON_INTERPRET=1 no kernel that multiplies with tl.dot serves bfloat16.
INTERPRETER_DOT_BROKEN = (torch.bfloat16,)


def triton_support_for(dtypes: tuple[torch.dtype, ...], *, uses_dot: bool = True):
    """Support predicate for a Triton kernel that handles ``dtypes``; ``uses_dot``: whether it
    multiplies with tl.dot (every kernel but the elementwise ones)."""

    def support(device: torch.device, dtype: torch.dtype) -> str | None:
        if triton_version() is None:
            return "triton is not installed"
        if dtype not in dtypes:
            return f"the Triton kernel handles {[str(d) for d in dtypes]}, not {dtype}"
        if triton_interpret() and uses_dot and dtype in INTERPRETER_DOT_BROKEN:
            return f"under TRITON_INTERPRET=1, Triton's interpreter computes tl.dot on {dtype} wrongly"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return None
        return f"Triton runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), not on {device.type}"

    return support


def cuda_support_for(op: str, dtypes: tuple[torch.dtype, ...]):
    """Support predicate for a kernel of the CUDA extension named ``op``."""

    def support(device: torch.device, dtype: torch.dtype) -> str | None:
        if C is None:
            return f"seedvl_kernels._C is not built ({C_IMPORT_ERROR})"
        if op not in C.ops:
            return f"seedvl_kernels._C has no {op} kernel"
        if device.type != "cuda":
            return f"the CUDA kernel needs CUDA tensors, not {device.type}"
        if dtype not in dtypes:
            return f"the CUDA kernel handles {[str(d) for d in dtypes]}, not {dtype}"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"seedvl_kernels._C targets sm_80 and newer, this GPU is sm_{major}{minor}"
        return None

    return support


def dl(t: torch.Tensor):
    """A DLPack capsule of ``t`` for the extension (``t`` stays alive for the call)."""
    return to_dlpack(t)


def stream_of(t: torch.Tensor) -> int:
    """The current CUDA stream on ``t``'s device, as the integer handle the extension takes."""
    return torch.cuda.current_stream(t.device).cuda_stream
