"""The one mechanism that wires a fastdl operator to every device.

An operator's schema is declared in C++ (``csrc/ops/schema.cpp``); CPU and CUDA kernels register
themselves from ``csrc/ops/<op>/``. This module adds, from Python, the parts every op shares:

* the **composite**: a plain-PyTorch implementation registered under the
  ``CompositeExplicitAutograd`` key, so it serves MPS and every other device that has no native
  kernel (a native CPU/CUDA kernel always takes precedence);
* a record of which implementation serves which device, for ``fastdl info``.

Fake kernels (``torch.library.register_fake``) and autograd formulas
(``torch.library.register_autograd``) sit next to each op's wrapper in ``fastdl/ops/<op>.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

NAMESPACE = "fastdl"


@dataclasses.dataclass(frozen=True)
class OpRecord:
    name: str
    composite: Callable
    cuda_kernel: str  # what kind of native CUDA kernel the op has: "CUDA C++" or "Triton"


_OPS: dict[str, OpRecord] = {}


def qualname(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def register_composite(name: str, *, cuda_kernel: str = "CUDA C++"):
    """Decorator: register ``fn`` as the plain-PyTorch implementation of ``fastdl::name``."""

    def decorate(fn: Callable) -> Callable:
        torch.library.impl(qualname(name), "CompositeExplicitAutograd", fn)
        _OPS[name] = OpRecord(name, fn, cuda_kernel)
        return fn

    return decorate


def composite(name: str) -> Callable:
    """The plain-PyTorch implementation of ``fastdl::name`` (callable on any device)."""
    return _OPS[name].composite


def public_ops() -> list[str]:
    """Registered operators, internal ones (leading underscore) last."""
    return sorted(_OPS, key=lambda n: (n.startswith("_"), n))


def register_triton_kernels(kernels: dict[str, Callable]) -> None:
    """Serve CUDA for each ``fastdl::name`` with ``kernels[name]`` (a Triton entry point). Called
    only when :func:`triton_available`; without it the composite keeps serving CUDA."""
    for name, kernel in kernels.items():
        torch.library.register_kernel(qualname(name), "cuda", kernel)


def triton_available() -> bool:
    """A CUDA device is present and triton imports (so ``fastdl.kernels`` can run)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def implementation(name: str, device: str) -> str:
    """Which implementation serves ``fastdl::name`` on ``device`` ("cpu", "cuda" or "mps")."""
    key = {"cpu": "CPU", "cuda": "CUDA", "mps": "MPS"}[device]
    if torch._C._dispatch_has_kernel_for_dispatch_key(qualname(name), key):
        return {"cpu": "C++", "cuda": _OPS[name].cuda_kernel, "mps": "native"}[device]
    return "composite (PyTorch)"


def _autocast_cast(value, dtype: torch.dtype):
    """``value`` cast to ``dtype`` if it is a floating tensor other than float64 (autocast leaves
    float64 alone), else unchanged."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.to(dtype)
    return value


def register_autocast(name: str, policy: str) -> None:
    """Autocast rule of ``fastdl::name`` on CPU and CUDA.

    * ``"float32"``: the op runs on float32 copies of its floating inputs and its first output is
      returned in the dtype of the first input; torchvision's rule for its detection ops, so that
      float16 features with float32 boxes (what an AMP detector passes) work.
    * ``"lower"``: floating inputs are cast to the autocast dtype
      (``torch.get_autocast_dtype``), as for ``scaled_dot_product_attention``.
    """
    if policy not in ("float32", "lower"):
        raise ValueError(f"register_autocast: policy must be 'float32' or 'lower', got {policy!r}")
    op = getattr(getattr(torch.ops, NAMESPACE), name).default
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(*args, _device_type=device_type, _excluded=excluded):
            dtype = torch.float32 if policy == "float32" else torch.get_autocast_dtype(_device_type)
            # the op itself must not reach this kernel again
            with torch._C._ExcludeDispatchKeyGuard(_excluded):
                result = op(*(_autocast_cast(a, dtype) for a in args))
            if policy == "lower":
                return result
            first = args[0]
            if isinstance(result, tuple):
                return (result[0].to(first.dtype), *result[1:])
            return result.to(first.dtype) if result.is_floating_point() else result

        torch.library.impl(qualname(name), key, kernel)
