"""Loads the operator library once: torch first (the library links libtorch), then fastdl._C,
whose static initialisers register the C++/CUDA kernels with the dispatcher."""

import torch  # noqa: F401

from . import _C  # noqa: F401


def cuda_kernels_built() -> bool:
    """Whether this build of fastdl compiled its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastdl::roi_align", "CUDA")
