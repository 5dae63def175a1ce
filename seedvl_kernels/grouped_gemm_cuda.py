"""CUTLASS grouped GEMM: the ``cuda`` implementation of seedvl::grouped_gemm and grouped_gemm_dw.

Math: see seedvl_kernels.grouped_gemm. The kernels (csrc/grouped_gemm/) are CUTLASS 3.x Hopper
ptr-array grouped GEMMs (TMA loads and stores, warp-specialised wgmma, persistent grid of one CTA
per SM, fp32 accumulators rounded once to bf16):

* forward and dgrad, grouped over M: one problem <size_e, N, K> per group, B = b[e] (K, N) or
  b[e]^T (stored (N, K)) — two instantiations, so neither layout is ever transposed in memory;
  cooperative schedule, 128 x 256 tiles;
* wgrad, grouped over K: dB[e] = a_e^T dC_e is the problem <K, N, size_e> with both operands read
  in their stored (row-major) order; with trans_b the roles of a and dC swap. Pingpong schedule,
  128 x 128 tiles: its K is an expert's row count, often short, and pingpong runs one consumer
  warpgroup's epilogue under the other's mainloop.

Problem sizes and pointers are built on the device by a setup kernel from ``offsets``, so nothing
syncs with the host: the host passes E and the bounds M, N, K only. The kernels write every
element of ``out``: rows past offsets[-1] and the dB slices of empty groups are zero-filled by the
setup kernel (CUTLASS skips empty problems). The workspace (per-group arrays plus CUTLASS's per-SM
TMA descriptors, ~1 KB per group + 256 B per SM) comes from PyTorch's caching allocator.

Requirements, checked with errors that name the argument: bf16, an sm_90 GPU (the kernels are
sm_90a code: wgmma and in-kernel TMA descriptor updates), an extension built with 90a in
SEEDVL_CUDA_ARCHS, and K and N multiples of 8 (TMA moves 16-byte rows). Operands whose row stride
or base address is not 16-byte aligned are copied to a contiguous buffer first (a slow path, never
taken by the MoE layer's own tensors).

Determinism: no split-K and no atomics; every output tile has one writer and a fixed K order, so
results are bitwise reproducible on the same GPU and build.
"""

from __future__ import annotations

import functools

import torch

from . import _backends

OP = "grouped_gemm"
DTYPES = (torch.bfloat16,)
ALIGN = 8  # elements of 16 bytes


def support(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the CUTLASS kernels can run on (device, dtype), else the reason."""
    reason = _backends.cuda_support_for(OP, DTYPES)(device, dtype)
    if reason is not None:
        return reason
    if "90a" not in _backends.C.cuda_archs:
        return f"seedvl_kernels._C was built for {list(_backends.C.cuda_archs)}, without sm_90a"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return f"the CUTLASS grouped GEMM is sm_90a code (H100/H200), this GPU is sm_{major}{minor}"
    return None


def shape_reason(k: int, n: int) -> str | None:
    """Why the kernels cannot take a problem with these K and N (None if they can)."""
    if k % ALIGN != 0:
        return f"a: impl='cuda' needs K (a.shape[1]) to be a multiple of {ALIGN} for TMA, got {k}"
    if n % ALIGN != 0:
        return f"b: impl='cuda' needs N (the output columns) to be a multiple of {ALIGN} for TMA, got {n}"
    return None


@functools.lru_cache(maxsize=64)
def _workspace_bytes(num_groups: int, wgrad: bool, device_index: int) -> int:
    return int(_backends.C.grouped_gemm_workspace_size(num_groups, wgrad, device_index))


def _workspace(num_groups: int, wgrad: bool, device: torch.device) -> torch.Tensor:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.empty(max(_workspace_bytes(num_groups, wgrad, index), 1), dtype=torch.uint8, device=device)


def _tma_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when TMA can read it (unit last stride, 16-byte aligned rows and base)."""
    rows_ok = all(s % ALIGN == 0 for s in t.stride()[:-1]) and t.stride(-1) == 1
    if rows_ok and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def launch_grouped_gemm(
    a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor, trans_b: bool
) -> None:
    """The ``cuda`` entry of grouped_gemm's _LAUNCH (forward and dgrad)."""
    k = a.shape[1]
    if out.numel() == 0:
        return
    if k == 0 or b.shape[0] == 0:  # empty sums, or every row is padding
        out.zero_()
        return
    reason = shape_reason(k, out.shape[1])
    if reason is not None:
        raise ValueError(reason)
    a, b = _tma_ready(a), _tma_ready(b)
    workspace = _workspace(b.shape[0], False, a.device)
    dl = _backends.dl
    _backends.C.grouped_gemm(
        dl(a), dl(b), dl(offsets.contiguous()), dl(out), dl(workspace), bool(trans_b), _backends.stream_of(a)
    )


def launch_grouped_gemm_dw(
    a: torch.Tensor, grad_out: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor, trans_b: bool
) -> None:
    """The ``cuda`` entry of grouped_gemm's _LAUNCH_DW (wgrad): out[e] = a_e^T dC_e, or its
    transpose dC_e^T a_e with trans_b (the same kernel with the operands swapped)."""
    if out.numel() == 0:
        return
    if a.shape[0] == 0:  # no rows at all: every group is empty
        out.zero_()
        return
    reason = shape_reason(a.shape[1], grad_out.shape[1])
    if reason is not None:
        raise ValueError(reason)
    x, y = (grad_out, a) if trans_b else (a, grad_out)
    x, y = _tma_ready(x), _tma_ready(y)
    workspace = _workspace(out.shape[0], True, a.device)
    dl = _backends.dl
    _backends.C.grouped_gemm_dw(
        dl(x), dl(y), dl(offsets.contiguous()), dl(out), dl(workspace), _backends.stream_of(a)
    )
