"""Choosing an implementation (``ref``, ``cpu``, ``triton``, ``cuda``) for each op call.

Precedence, first match wins:

1. the call's ``impl=`` keyword;
2. the innermost :func:`use_impl` context (a per-op choice before a global one);
3. the environment: ``SEEDVL_IMPL_<OP>`` (for example ``SEEDVL_IMPL_ROPE_2D``), then ``SEEDVL_IMPL``;
4. ``auto``.

``auto`` takes the fastest implementation that can serve the call's device and dtype (CUDA, then
Triton, then the reference on a GPU; on a CPU an op's ``cpu`` implementation where it has one (built
on PyTorch's own CPU kernels), then the reference, since the Triton interpreter is only a test
vehicle). An explicit choice that cannot serve a call raises :class:`ImplUnavailableError`
with the reason; it never silently falls back. What each implementation serves is declared once
per backend in :mod:`seedvl_kernels._backends` (for example: under ``TRITON_INTERPRET=1`` no Triton
kernel that uses ``tl.dot`` serves bfloat16, which the interpreter multiplies wrongly).

The choice is made on the host from tensor metadata, so under ``torch.compile`` it is fixed when
the graph is traced.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

IMPLS: tuple[str, ...] = ("ref", "cpu", "triton", "cuda")
CHOICES: tuple[str, ...] = (*IMPLS, "auto")
_AUTO_ORDER_GPU: tuple[str, ...] = ("cuda", "triton", "ref")
_AUTO_ORDER_CPU: tuple[str, ...] = ("cpu", "ref")


class ImplUnavailableError(RuntimeError):
    """An explicitly chosen implementation cannot serve this call."""


# Returns None when the implementation can serve a call on (device, dtype), else the reason it cannot.
Support = Callable[[torch.device, torch.dtype], "str | None"]


@dataclass(frozen=True)
class _Entry:
    support: Support


_REGISTRY: dict[str, dict[str, _Entry]] = {}
_CONTEXT: contextvars.ContextVar[tuple[dict[str, str], ...]] = contextvars.ContextVar(
    "seedvl_impl_context", default=()
)


def register(op: str, impl: str, support: Support) -> None:
    """Declare that ``op`` has implementation ``impl``; ``support`` says which calls it can serve."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    _REGISTRY.setdefault(op, {})[impl] = _Entry(support)


def ops() -> list[str]:
    """Names of all registered ops."""
    return sorted(_REGISTRY)


def implementations(op: str) -> list[str]:
    """Implementations registered for ``op`` (whether or not this machine can run them)."""
    if op not in _REGISTRY:
        raise ValueError(f"op: unknown op {op!r}; known ops: {ops()}")
    return [i for i in IMPLS if i in _REGISTRY[op]]


def unavailable_reason(op: str, impl: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if ``impl`` of ``op`` can serve (device, dtype), else why not."""
    entry = _REGISTRY.get(op, {}).get(impl)
    if entry is None:
        return f"{op} has no {impl!r} implementation (it has {implementations(op)})"
    return entry.support(device, dtype)


def _check_choice(name: str, value: str) -> str:
    if value not in CHOICES:
        raise ValueError(f"{name}: expected one of {CHOICES}, got {value!r}")
    return value


@contextlib.contextmanager
def use_impl(default: str | None = None, **per_op: str) -> Iterator[None]:
    """Choose implementations inside a ``with`` block.

    ``use_impl("triton")`` sets every op; ``use_impl(varlen_attention="ref")`` sets one op; both
    may be combined. Nested blocks override outer ones.
    """
    frame: dict[str, str] = {}
    if default is not None:
        frame["*"] = _check_choice("default", default)
    for op, value in per_op.items():
        if op not in _REGISTRY:
            raise ValueError(f"{op}: unknown op; known ops: {ops()}")
        frame[op] = _check_choice(op, value)
    token = _CONTEXT.set((*_CONTEXT.get(), frame))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def requested(op: str, impl: str | None = None) -> str:
    """The implementation asked for (possibly ``auto``), by the precedence in the module docstring."""
    if impl is not None:
        return _check_choice("impl", impl)
    for frame in reversed(_CONTEXT.get()):
        if op in frame:
            return frame[op]
        if "*" in frame:
            return frame["*"]
    for var in (f"SEEDVL_IMPL_{op.upper()}", "SEEDVL_IMPL"):
        value = os.environ.get(var)
        if value:
            return _check_choice(var, value)
    return "auto"


@torch.compiler.assume_constant_result
def resolve(op: str, impl: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete implementation that will run ``op`` for tensors on ``device`` of ``dtype``."""
    choice = requested(op, impl)
    if choice != "auto":
        reason = unavailable_reason(op, choice, device, dtype)
        if reason is not None:
            raise ImplUnavailableError(f"{op}: impl={choice!r} cannot run this call: {reason}")
        return choice
    order = _AUTO_ORDER_GPU if device.type == "cuda" else _AUTO_ORDER_CPU
    for candidate in order:
        if candidate in _REGISTRY.get(op, {}) and unavailable_reason(op, candidate, device, dtype) is None:
            return candidate
    raise ImplUnavailableError(f"{op}: no implementation serves device={device} dtype={dtype}")
