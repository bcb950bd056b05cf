"""Loads the operator library once: torch first (the library links libtorch), then fastdl._C,
whose static initialisers register the C++/CUDA kernels with the dispatcher.

A C++ extension only works with the torch it was compiled against; a mismatch otherwise shows up
as undefined symbols or "operator does not exist". Both are turned into one clear error here.
"""

import torch

from . import _build_info


def _rebuild_hint() -> str:
    return (
        f"fastdl was built against torch {_build_info.TORCH_VERSION} but torch {torch.__version__} is installed; "
        "rebuild fastdl against this torch: pip install --no-build-isolation --force-reinstall --no-deps <fastdl source>"
    )


def _release(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


if _release(_build_info.TORCH_VERSION) != _release(torch.__version__):
    raise ImportError(_rebuild_hint())

try:
    from . import _C
except ImportError as error:
    raise ImportError(f"{error}\n{_rebuild_hint()}") from error

# Reading the CPU capability applies FASTDL_CPU_CAPABILITY now, so a bad value fails the import
# with its message instead of the first op call.
try:
    _C.cpu_capability()
except ValueError as error:
    raise ImportError(f"fastdl: {error}") from None


def cuda_kernels_built() -> bool:
    """Whether this build of fastdl compiled its CUDA kernels."""
    return _build_info.CUDA_KERNELS
