"""Gradient clipping over parameters that live on different device meshes.

``torch.nn.utils.clip_grad_norm_`` stacks every gradient's norm in one op, which DTensors on two
meshes (dense weights on "dp_cp", expert weights on ("edp", "ep")) refuse. Here the norm of each
mesh's gradients is reduced on its own mesh, the global norm combines them, and each group is
scaled with torch's own ``clip_grads_with_norm_``. With one group (single process, or no expert
parallelism) this is exactly what ``clip_grad_norm_`` computes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their global 2-norm is at most ``max_norm``; returns the norm
    before clipping (a plain tensor, the same on every rank)."""
    groups: dict[object, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            mesh = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(mesh, []).append(p)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.zeros(())
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
