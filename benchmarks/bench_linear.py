"""linear: fastdl's kernel against ``torch.nn.functional.linear`` on the products of a GPT-2
decoding step (one row per sequence of the batch; ``eager``: the BLAS libtorch links), and on a
prompt-sized product, where both take the BLAS."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdl.ops

from ._common import make_run, record

# name: (rows, in_features, out_features, quick?): GPT-2 small's four projections and its head
CASES = {
    "decode-b1-c_attn": (1, 768, 2304, False),
    "decode-b8-c_attn": (8, 768, 2304, False),
    "decode-b8-mlp_c_fc": (8, 768, 3072, False),
    "decode-b8-mlp_c_proj": (8, 3072, 768, False),
    "decode-b1-lm_head": (1, 768, 50257, False),
    "decode-b8-lm_head": (8, 768, 50257, False),
    "prefill-b1-p128-c_attn": (128, 768, 2304, False),
    "decode-b4-c_fc-small": (4, 256, 1024, True),
}

IMPLS = {"fastdl": fastdl.ops.linear, "eager": F.linear}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", [pytest.param(n, marks=[pytest.mark.quick] if s[3] else []) for n, s in CASES.items()])
def test_linear(benchmark, case, impl, device):
    rows, features, outputs, _ = CASES[case]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, features, generator=gen).to(device)
    w = (0.02 * torch.randn(outputs, features, generator=gen)).to(device)
    b = (0.02 * torch.randn(outputs, generator=gen)).to(device)
    reference = F.linear(x.double(), w.double(), b.double())
    run = make_run(IMPLS[impl], (x, w, b), "forward", device)
    result = benchmark(run)
    record(benchmark, op="linear", case=case, impl=impl, result=result, reference=reference)
