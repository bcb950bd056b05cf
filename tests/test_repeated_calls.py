"""Every op called many times, forward and backward.

* From several Python threads at once, it gives its single-threaded results: the kernels keep
  per-call state on the stack or in per-thread scratch (cpu_scratch.h), and no call may see
  another's.
* Called ``FASTDL_LEAK_CALLS`` times in a row (default 200; the release profile uses 2000), it
  leaves no memory behind: the bytes malloc has handed out and not taken back stay level, and
  so does the resident set.
"""

from __future__ import annotations

import ctypes
import os
import sys
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
    "linear": lambda x, boxes, q, k, *_: fastdl.ops.linear(q[0, 0, :6], k[0, 0]),
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


LEAK_CALLS = int(os.environ.get("FASTDL_LEAK_CALLS", "200"))
# One leaked output of the smallest op above is over 500 bytes, so a leak per call exceeds the
# heap bound at the quick profile's 200 calls; the headroom covers torch's and Python's caches.
HEAP_GROWTH_LIMIT = 64 << 10
RSS_GROWTH_LIMIT = 2 << 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _heap_in_use() -> int:
    """Bytes glibc's malloc has handed out, small blocks and mmapped ones (mallinfo2)."""
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_has_mallinfo2 = _libc is not None and hasattr(_libc, "mallinfo2")
if _has_mallinfo2:
    _libc.mallinfo2.restype = _MallInfo2


@pytest.mark.skipif(not _has_mallinfo2, reason="needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
@pytest.mark.skipif(
    _libc is not None and hasattr(_libc, "__asan_init"),
    reason="under ASan freed memory waits in a quarantine and malloc is ASan's",
)
@pytest.mark.parametrize("name", sorted(OPS))
def test_repeated_calls_leave_no_memory_behind(name):
    for seed in range(30):  # warm-up: per-thread scratch, dispatcher and autograd caches
        _call(name, seed % 4)
    heap, resident = _heap_in_use(), _resident_bytes()
    for seed in range(LEAK_CALLS):
        _call(name, seed % 4)
    heap_growth, resident_growth = _heap_in_use() - heap, _resident_bytes() - resident
    assert heap_growth < HEAP_GROWTH_LIMIT, f"{name}: heap grew by {heap_growth} bytes over {LEAK_CALLS} calls"
    assert resident_growth < RSS_GROWTH_LIMIT, f"{name}: RSS grew by {resident_growth} bytes over {LEAK_CALLS} calls"
