"""SeedVL kernels: the ops of a native-resolution VLM with an MoE LLM.

Every op has a pure-PyTorch reference (the spec and the CPU path) and, where written, Triton and
CUDA implementations; ``impl=`` / :func:`use_impl` / ``SEEDVL_IMPL`` choose between them
(see :mod:`seedvl_kernels._dispatch`). Kernel entries are ``torch.library`` custom ops in the
``seedvl`` namespace, so ``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` work.
"""

from ._dispatch import ImplUnavailableError, implementations, ops, resolve, use_impl
from .rope_2d import rope_2d

__version__ = "0.1.0"

__all__ = [
    "ImplUnavailableError",
    "implementations",
    "ops",
    "resolve",
    "rope_2d",
    "use_impl",
]
