"""Which instruction set fastdl's CPU kernels use.

The best one the running CPU supports is chosen when the library loads: ``"avx512"``,
``"avx2"`` (with FMA) or ``"default"`` (baseline x86-64, and every other architecture). The
environment variable ``FASTDL_CPU_CAPABILITY`` lowers it for the whole process, as
``ATEN_CPU_CAPABILITY`` does for PyTorch; :func:`set_cpu_capability` lowers it at run time. Asking
for more than the CPU supports is refused (or, from the environment, logged and ignored), so no
kernel can run an instruction the CPU lacks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .. import _loader

CAPABILITIES = ("default", "avx2", "avx512")  # in increasing order


def get_cpu_capability() -> str:
    """The capability the CPU kernels use now."""
    return _loader._C.cpu_capability()


def supported_cpu_capabilities() -> list[str]:
    """Every capability this CPU can run, from ``"default"`` up to the best."""
    best = _loader._C.supported_cpu_capability()
    return list(CAPABILITIES[: CAPABILITIES.index(best) + 1])


def set_cpu_capability(name: str) -> None:
    """Use ``name`` (one of :func:`supported_cpu_capabilities`) from now on, in every thread."""
    if not isinstance(name, str):
        raise TypeError(f"set_cpu_capability: name must be a str, got {type(name).__name__}")
    _loader._C.set_cpu_capability(name)


@contextlib.contextmanager
def cpu_capability(name: str) -> Iterator[None]:
    """Use ``name`` inside the ``with`` block, then restore the previous capability."""
    previous = get_cpu_capability()
    set_cpu_capability(name)
    try:
        yield
    finally:
        set_cpu_capability(previous)


def kernel_paths(capability: str | None = None) -> dict[str, str]:
    """What computes each public op's float32 CPU kernel at ``capability`` (default: the one in
    use), as ``fastdl info`` prints it. float64 always takes the portable loops (the checking
    path); the C++ sources and docs/architecture.md have the details."""
    cap = get_cpu_capability() if capability is None else capability
    if cap not in CAPABILITIES:
        raise ValueError(f"kernel_paths: capability must be one of {CAPABILITIES}, got {capability!r}")
    loops = f"{cap} vector loops"
    if cap == "default":
        attention = "BLAS block products, default vector softmax rows"
        conv2d = "im2col products through BLAS"
        linear = "BLAS"
    else:
        attention = f"{cap} register tiles (D a multiple of 16, >= 64 queries); BLAS otherwise"
        conv2d = f"{cap} direct, row and Winograd tiles; BLAS for grouped convolutions"
        linear = f"{cap} weight-streaming tiles for 1-16 rows; BLAS otherwise"
    return {
        "attention": attention,
        "conv2d": conv2d,
        "layer_norm": loops,
        "linear": linear,
        "linear_cross_entropy": f"BLAS chunks of logits, {loops}",
        "lstm_layer": f"MKL GEMMs (w_hh packed once), {loops}",
        "nms": loops,
        "batched_nms": loops,
        "roi_align": loops,
        "roi_pool": "baseline loops over channels-last windows",
    }
