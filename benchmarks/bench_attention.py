"""attention: fastdl's fused kernel against torch's SDPA and the naive eager formulation.

``eager`` is softmax(q k^T * scale) v written out (it materialises the N x N scores); ``sdpa`` is
``torch.nn.functional.scaled_dot_product_attention``. ``peak_mb`` is the peak of the extra memory
one call allocates (torch's CPU allocator profiler), where it can be measured.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastdl.ops

from ._common import make_run, peak_mb, record

# name: (B, H, N, D, causal, quick?)
CASES = {
    "N2048": (2, 8, 2048, 64, False, False),
    "N2048-causal": (2, 8, 2048, 64, True, False),
    "N512": (2, 8, 512, 64, False, True),
    "N512-causal": (2, 8, 512, 64, True, True),
}


def eager_attention(q, k, v, causal):
    s = q @ k.transpose(-1, -2) * (1 / math.sqrt(q.size(-1)))
    if causal:
        n = q.size(-2)
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


IMPLS = {
    "fastdl": lambda q, k, v, causal: fastdl.ops.attention(q, k, v, causal=causal),
    "sdpa": lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    "eager": eager_attention,
}


def make_inputs(case: str, device: str):
    b, h, n, d, _, _ = CASES[case]
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, n, d, generator=gen).to(device) for _ in range(3)]


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(
    "case", [pytest.param(name, marks=[pytest.mark.quick] if spec[5] else []) for name, spec in CASES.items()]
)
def test_attention(benchmark, case, impl, mode, device):
    q, k, v = make_inputs(case, device)
    causal = CASES[case][4]
    fn = IMPLS[impl]
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
    if mode == "forward+backward":
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    run = make_run(fn, (q, k, v, causal), mode, device)

    result = benchmark(run)
    record(benchmark, op="attention", case=f"{case} {mode}", impl=impl, result=result.detach(), reference=reference)
    if device == "cpu":
        benchmark.extra_info["peak_mb"] = peak_mb(run)


@pytest.mark.parametrize("impl", ["fastdl", "sdpa"])
def test_attention_memory_n8192(benchmark, impl, device):
    """Forward at N=8192 (B=1, H=2): fastdl's extra memory stays O(N)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8192, 64, generator=gen).to(device) for _ in range(3))

    run = make_run(IMPLS[impl], (q, k, v, True), "forward", device)
    result = benchmark.pedantic(run, rounds=1, iterations=1)
    record(benchmark, op="attention", case="N8192-causal B1H2 forward", impl=impl, result=result, reference=result)
    if device == "cpu":
        benchmark.extra_info["peak_mb"] = peak_mb(run)


# ---- CUDA: fastdl's Triton kernels against torch's SDPA (run with --device cuda) -----------------

# name: (N, D, causal); B * N = 16384 tokens, H = 16, float16
CUDA_CASES = {
    f"N{n // 1024}k-D{d}" + ("-causal" if causal else ""): (n, d, causal)
    for n in (1024, 4096, 16384)
    for d in (64, 128)
    for causal in (False, True)
}


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", ["fastdl", "sdpa"])
@pytest.mark.parametrize("case", list(CUDA_CASES))
def test_attention_cuda(benchmark, case, impl, mode, device):
    if device != "cuda":
        pytest.skip("CUDA-only case (--device cuda)")
    n, d, causal = CUDA_CASES[case]
    b, h = max(1, 16384 // n), 16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(device=device, dtype=torch.float16) for _ in range(3))
    fn = IMPLS[impl]
    with torch.no_grad():  # the reference is torch's own fused kernel (a float64 one would not fit)
        reference = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if mode == "forward+backward":
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    run = make_run(fn, (q, k, v, causal), mode, device, grad=torch.randn_like(reference))

    result = benchmark(run)
    record(
        benchmark,
        op="attention",
        case=f"cuda {case} fp16 {mode}",
        impl=impl,
        result=result.detach(),
        reference=reference,
    )
