"""layer_norm: fastdl's kernel against ``torch.nn.functional.layer_norm``, alone and with the
residual add of a pre-norm transformer block fused in (``eager``: ``x + r`` then layer_norm)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdl.ops

from ._common import make_run, record

# name: (rows, width, residual?, quick?); 1024 rows = GPT-2 at batch 4 x 256 tokens
CASES = {
    "N1024-E768": (1024, 768, False, False),
    "N1024-E768-residual": (1024, 768, True, False),
    "N8192-E1024-residual": (8192, 1024, True, False),
    "N256-E768-residual": (256, 768, True, True),
}


def fastdl_layer_norm(x, r, w, b):
    if r is None:
        return fastdl.ops.layer_norm(x, x.shape[-1:], w, b)
    out, summed = fastdl.ops.layer_norm(x, x.shape[-1:], w, b, residual=r)
    return out + summed  # one output for the timing closure; both are used by a block


def eager_layer_norm(x, r, w, b):
    if r is None:
        return F.layer_norm(x, x.shape[-1:], w, b)
    summed = x + r
    return F.layer_norm(summed, x.shape[-1:], w, b) + summed


IMPLS = {"fastdl": fastdl_layer_norm, "eager": eager_layer_norm}


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", [pytest.param(n, marks=[pytest.mark.quick] if s[3] else []) for n, s in CASES.items()])
def test_layer_norm(benchmark, case, impl, mode, device):
    rows, width, with_residual, _ = CASES[case]
    gen = torch.Generator().manual_seed(0)
    x, r = (torch.randn(rows, width, generator=gen).to(device) for _ in range(2))
    w, b = (
        (1 + 0.1 * torch.randn(width, generator=gen)).to(device),
        (0.1 * torch.randn(width, generator=gen)).to(device),
    )
    r = r if with_residual else None
    reference = eager_layer_norm(*(None if t is None else t.double() for t in (x, r, w, b)))
    if mode == "forward+backward":
        for t in (x, r, w, b):
            if t is not None:
                t.requires_grad_()
    run = make_run(IMPLS[impl], (x, r, w, b), mode, device)
    result = benchmark(run)
    record(benchmark, op="layer_norm", case=f"{case} {mode}", impl=impl, result=result.detach(), reference=reference)
