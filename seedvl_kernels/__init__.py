"""SeedVL kernels: the ops of a native-resolution VLM with an MoE LLM.

Every op has a pure-PyTorch reference (the spec and the CPU path) and, where written, Triton and
CUDA implementations; ``impl=`` / :func:`use_impl` / ``SEEDVL_IMPL`` choose between them
(see :mod:`seedvl_kernels._dispatch`). Kernel entries are ``torch.library`` custom ops in the
``seedvl`` namespace, so ``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` work.
"""

from ._dispatch import ImplUnavailableError, implementations, ops, resolve, use_impl
from .grouped_gemm import grouped_gemm
from .moe_ep import EPDispatch, EPState, ep_combine, ep_dispatch, ep_moe_ffn
from .moe_ffn import moe_ffn
from .moe_permute import moe_permute, moe_unpermute
from .pool_adapter import pool_adapter
from .ring_attention import ZigzagShard, ring_attention, zigzag_shard, zigzag_unshard
from .rope_2d import rope_2d
from .route import RouteOutput, route, update_router_bias
from .varlen_attention import varlen_attention

__version__ = "0.1.0"

__all__ = [
    "EPDispatch",
    "EPState",
    "ImplUnavailableError",
    "RouteOutput",
    "ZigzagShard",
    "ep_combine",
    "ep_dispatch",
    "ep_moe_ffn",
    "grouped_gemm",
    "implementations",
    "moe_ffn",
    "moe_permute",
    "moe_unpermute",
    "ops",
    "pool_adapter",
    "resolve",
    "ring_attention",
    "rope_2d",
    "route",
    "update_router_bias",
    "use_impl",
    "varlen_attention",
    "zigzag_shard",
    "zigzag_unshard",
]
