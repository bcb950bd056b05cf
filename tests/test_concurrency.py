"""Every op called from several Python threads at once gives its single-threaded results.

The kernels keep per-call state on the stack or in per-thread scratch (cpu_scratch.h); this
checks that no call sees another's, forward and backward.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fastdl.ops

THREADS = 4
CALLS_PER_THREAD = 6


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 16, 16, generator=g, requires_grad=True)
    boxes = torch.tensor([[0, 1.0, 2.0, 12.0, 14.0], [1, 0.0, 0.0, 15.0, 9.0], [0, 4.0, 4.0, 6.0, 7.0]])
    q, k, v = (torch.randn(1, 2, 70, 32, generator=g, requires_grad=True) for _ in range(3))
    w = torch.randn(4, 8, 3, 3, generator=g, requires_grad=True)
    nms_boxes = torch.rand(50, 2, generator=g) * 50
    nms_boxes = torch.cat([nms_boxes, nms_boxes + torch.rand(50, 2, generator=g) * 20], 1)
    scores = torch.rand(50, generator=g)
    seq = torch.randn(5, 3, 6, generator=g, requires_grad=True)
    lstm_weights = [torch.randn(s, generator=g, requires_grad=True) * 0.3 for s in ((16, 6), (16, 4), (16,), (16,))]
    return x, boxes, q, k, v, w, nms_boxes, scores, seq, lstm_weights


OPS = {
    "roi_align": lambda x, boxes, *_: fastdl.ops.roi_align(x, boxes, 3, 0.5, 2, True),
    "roi_pool": lambda x, boxes, *_: fastdl.ops.roi_pool(x, boxes, 3, 0.5),
    "attention": lambda x, boxes, q, k, v, *_: fastdl.ops.attention(q, k, v, causal=True),
    "conv2d": lambda x, boxes, q, k, v, w, *_: fastdl.ops.conv2d(x, w, padding=1, activation="relu"),
    "nms": lambda *a: fastdl.ops.nms(a[6], a[7], 0.5).double(),
    "lstm": lambda *a: fastdl.ops.lstm(a[8], a[9])[0],
    "layer_norm": lambda x, *_: fastdl.ops.layer_norm(x, (16,)),
}


def _call(name, seed):
    inputs = _inputs(seed)
    out = OPS[name](*inputs)
    grads = ()
    if out.requires_grad:
        leaves = [t for t in (inputs[0], *inputs[2:6], inputs[8], *inputs[9]) if t.requires_grad]
        grads = torch.autograd.grad(out.square().sum(), leaves, allow_unused=True)
    return [out.detach()] + [g for g in grads if g is not None]


@pytest.mark.parametrize("name", sorted(OPS))
def test_concurrent_calls_match_single_threaded(name):
    seeds = list(range(THREADS * CALLS_PER_THREAD))
    expected = [_call(name, s) for s in seeds]
    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(lambda s: _call(name, s), seeds))
    for seed, got, want in zip(seeds, results, expected):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{name}, seed {seed}: {m}")
