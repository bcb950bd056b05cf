"""linear_cross_entropy: fastdl's chunked LM head + loss against the logits formed in full.

``eager`` is ``F.cross_entropy(hidden @ weight.T, target)``, which holds the ``[N, V]`` float32
logits (and, backward, their gradient and log-softmax); fastdl forms one chunk of rows at a time.
``peak_mb`` is the peak of the extra memory one call allocates, torch's CPU allocator profiler.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdl.ops

from ._common import make_run, peak_mb, record

# name: (rows N, hidden E, vocab V, quick?); 1024 rows = GPT-2 at batch 4 x 256 tokens
CASES = {
    "N1024-E768-V50257": (1024, 768, 50257, False),
    "N4096-E768-V50257": (4096, 768, 50257, False),
    "N256-E256-V8192": (256, 256, 8192, True),
}

IMPLS = {
    "fastdl": lambda h, w, y: fastdl.ops.linear_cross_entropy(h, w, y),
    "eager": lambda h, w, y: F.cross_entropy(h @ w.T, y),
}


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", [pytest.param(n, marks=[pytest.mark.quick] if s[3] else []) for n, s in CASES.items()])
def test_linear_cross_entropy(benchmark, case, impl, mode, device):
    rows, width, vocab, _ = CASES[case]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, width, generator=gen).to(device)
    weight = (0.02 * torch.randn(vocab, width, generator=gen)).to(device)
    target = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    reference = F.cross_entropy(hidden.double() @ weight.double().T, target)
    if mode == "forward+backward":
        hidden.requires_grad_()
        weight.requires_grad_()
    run = make_run(IMPLS[impl], (hidden, weight, target), mode, device)
    result = benchmark(run)
    record(
        benchmark,
        op="linear_cross_entropy",
        case=f"{case} {mode}",
        impl=impl,
        result=result.detach(),
        reference=reference,
    )
    if device == "cpu":
        benchmark.extra_info["peak_mb"] = peak_mb(run)
