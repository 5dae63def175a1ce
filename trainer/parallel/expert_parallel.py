"""Expert parallelism: each MoE layer's routed experts are spread over the ep ranks.

The expert weights become DTensors sharded on the expert dimension (``Shard(0)``) over the "ep"
mesh dimension, so rank r of an ep block holds experts [r*E/ep, (r+1)*E/ep); the layer then runs
``seedvl_kernels.ep_moe_ffn`` (all-to-all dispatch, local grouped GEMMs, all-to-all combine). The
router and the shared experts stay dense. FSDP later shards the expert weights again over "edp",
the ranks that hold the same experts, whose gradients it sums.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

from model.llm import RoutedExperts
from model.vlm import SeedVLM


def _shard_experts(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    if not isinstance(module, RoutedExperts):
        return
    for pname, param in list(module.named_parameters(recurse=False)):
        sharded = nn.Parameter(distribute_tensor(param.data, mesh, [Shard(0)]), param.requires_grad)
        module.register_parameter(pname, sharded)


def apply_expert_parallel(model: SeedVLM, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's experts over ``ep_mesh`` (1D, the "ep" dimension)."""
    for layer in model.llm.layers:
        if layer.is_moe:
            distribute_module(layer.ffn.experts, ep_mesh, _shard_experts)
            layer.ffn.experts.ep_group = ep_mesh.get_group()
