"""The test harness every fastdl op uses.

An op's test module supplies a slow reference (plain Python/PyTorch, float64) and input makers;
this module supplies the rest: devices, fresh seeds, memory layouts, per-dtype tolerances, and the
dispatcher-level checks (opcheck, torch.compile, the composite's registration).
"""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

import fastdl.ops  # noqa: F401  (registers torch.ops.fastdl.*)
from fastdl.ops import _library

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# Per-dtype tolerances for comparisons against a float64 reference.
TOLERANCE = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}


def require_triton(kernels: str):
    """Skip the calling test module unless the Triton ``kernels`` can run: triton must import, and
    there must be a CUDA device or the interpreter (tests/conftest.py sets TRITON_INTERPRET when
    there is no GPU). Returns the triton module."""
    triton = pytest.importorskip("triton", reason=f"triton is not installed: the Triton {kernels} kernels cannot run")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip(
            "no CUDA device and TRITON_INTERPRET is not set: the Triton kernels cannot run", allow_module_level=True
        )
    return triton


def fresh_seed() -> int:
    """Seed torch and random from the running test's id (and ``--seed``, default 0) and print
    the seed (shown on failure): a failure reproduces on rerun, ``--seed N`` draws other inputs."""
    test_id = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    seed = zlib.crc32(f"{os.environ.get('FASTDL_TEST_SEED', '0')}:{test_id}".encode())
    print(f"seed={seed} (test {test_id!r}, --seed {os.environ.get('FASTDL_TEST_SEED', '0')})")
    torch.manual_seed(seed)
    random.seed(seed)
    return seed


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, **overrides):
    """Compare with the tolerance of ``dtype`` (default: ``actual``'s), in float64."""
    tol = dict(TOLERANCE[dtype or actual.dtype])
    tol.update(overrides)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not actual.isnan().any() or expected.isnan().any(), "NaN in the result"
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), **tol)


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a strided (non-contiguous) tensor: every other element of a wider one."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    assert not view.is_contiguous() or t.numel() <= 1
    return view


LAYOUTS = ["contiguous", "channels_last", "non_contiguous"]


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "non_contiguous":
        return non_contiguous(t)
    raise ValueError(layout)


def run_opcheck(op, args, kwargs=None):
    """Schema, autograd registration, fake tensor and AOT-dispatch (dynamic) checks."""
    torch.library.opcheck(op, args, kwargs or {})


def check_compiled(fn, *args, grad: bool = True):
    """``fn`` under ``torch.compile(fullgraph=True)`` matches eager, forward and backward."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    eager_args = [a.detach().clone().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in args]
    out_c, out_e = compiled(*args), fn(*eager_args)
    torch.testing.assert_close(out_c, out_e)
    if grad:
        out_c.sum().backward()
        out_e.sum().backward()
        for a, e in zip(args, eager_args):
            if torch.is_tensor(a) and a.requires_grad:
                torch.testing.assert_close(a.grad, e.grad)


def composite_serves_mps(name: str) -> bool:
    """The op's MPS dispatch entry resolves to fastdl's plain-PyTorch composite."""
    qualname = _library.qualname(name)
    return torch._C._dispatch_has_computed_kernel_for_dispatch_key(qualname, "MPS") and _library.implementation(
        name, "mps"
    ).startswith("composite")
