"""Argument checks shared by the ops. Each raises ValueError/TypeError naming the argument.

One helper per kind of argument, so that every op enforces the same rules for it:

* data tensors: :func:`tensor`, :func:`ndim`, :func:`dtype`, :func:`last_dim_contiguous`, ...;
* index tensors (``cu_seqlens``, ``offsets``): :func:`cu_seqlens` -- int32, 1-D, contiguous, and
  (on CPU) starting at 0 and non-decreasing;
* bias vectors: :func:`bias_vector` -- 1-D, the data's dtype, contiguous;
* host scalars: :func:`host_float` -- a real Python/NumPy number (not a tensor, not a bool) inside
  the argument's range, NaN and inf refused unless the range says otherwise.

Index tensors and bias vectors are small (O(B) and O(N) elements), and every kernel -- Triton and
CUDA -- reads them with unit stride, so a strided view is refused with a message rather than
threaded through each kernel as strides; ``.contiguous()`` on the caller's side costs nothing.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch


def tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def ndim(name: str, t: torch.Tensor, n: int, layout: str) -> None:
    if t.dim() != n:
        raise ValueError(f"{name}: expected {n} dims {layout}, got shape {tuple(t.shape)}")


def dtype(name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def same_device(tensors: dict[str, torch.Tensor | None]) -> torch.device:
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for n, d in devices.items():
        if d != first:
            raise ValueError(f"{n}: expected a tensor on {first} (the device of {first_name}), got {d}")
    return first


def dim_size(name: str, t: torch.Tensor, dim: int, size: int, what: str) -> None:
    if t.shape[dim] != size:
        raise ValueError(f"{name}: expected size {size} in dim {dim} ({what}), got shape {tuple(t.shape)}")


def last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: last dim must be contiguous (stride 1), got strides {t.stride()}")


def with_last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if its last dim has stride 1 (the layout every kernel accepts), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def contiguous_vector(name: str, t: torch.Tensor) -> None:
    """A 1-D tensor that the kernels read with unit stride (see the module docstring)."""
    if t.numel() > 1 and t.stride(0) != 1:
        raise ValueError(
            f"{name}: expected a contiguous 1-D tensor (stride 1; the kernels read it with unit stride), "
            f"got stride {t.stride(0)}; pass {name}.contiguous()"
        )


def bias_vector(
    name: str, b: object, size: int, dim: str, what: str, ref_name: str, ref: torch.Tensor
) -> torch.Tensor:
    """A ({dim},) = (size,) bias in the dtype of ``ref``, contiguous; ``what`` says where size comes from."""
    tensor(name, b)
    ndim(name, b, 1, f"({dim},)")
    dim_size(name, b, 0, size, what)
    same_dtype(name, b, ref_name, ref)
    contiguous_vector(name, b)
    return b


def host_float(
    name: str,
    value: object,
    *,
    low: float | None = None,
    low_inclusive: bool = True,
    what: str = "a host float",
) -> float:
    """``value`` as a Python float: a real number (not a tensor: reading one would sync with the
    device; not a bool), finite, and >= ``low`` (> ``low`` unless ``low_inclusive``)."""
    if isinstance(value, (torch.Tensor, bool)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {what}, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite value ({what}), got {v}")
    if low is not None and (v < low or (v == low and not low_inclusive)):
        bound = f">= {low}" if low_inclusive else f"> {low}"
        raise ValueError(f"{name}: expected {what} {bound}, got {v}")
    return v


def cu_seqlens(name: str, cu: object, total: int | None = None) -> None:
    """An index tensor of offsets: int32 (B+1,) on the data's device, contiguous, starting at 0,
    non-decreasing; values checked only on CPU (no GPU sync).

    ``total`` is the number of rows of the packed tensor; the last offset may be smaller (the rest
    are padding rows) but not larger.
    """
    tensor(name, cu)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name}: expected int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name}: expected shape (B+1,) with B >= 0, got {tuple(cu.shape)}")
    contiguous_vector(name, cu)
    if cu.device.type == "cpu" and not _is_fake(cu):
        if int(cu[0]) != 0:
            raise ValueError(f"{name}: must start at 0, got {int(cu[0])}")
        if cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"{name}: must be non-decreasing, got {cu.tolist()}")
        if total is not None and int(cu[-1]) > total:
            raise ValueError(f"{name}: last offset {int(cu[-1])} exceeds the {total} packed rows")


def max_seqlen(name: str, value: object, cu: torch.Tensor) -> int:
    """A host int at least the longest sequence of ``cu`` (checked on CPU only)."""
    if isinstance(value, torch.Tensor) or not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a host int (computed once per batch), got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name}: expected >= 0, got {value}")
    if cu.device.type == "cpu" and not _is_fake(cu) and cu.numel() > 1:
        longest = int((cu[1:] - cu[:-1]).max())
        if longest > value:
            raise ValueError(f"{name}: {value} is smaller than the longest sequence ({longest})")
    return value


def _is_fake(t: torch.Tensor) -> bool:
    """True while tracing (torch.compile, opcheck) or for meta tensors: no values to check."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return True
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)
