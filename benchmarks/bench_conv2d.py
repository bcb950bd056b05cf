"""conv2d: fastdl against eager PyTorch (oneDNN on the CPU, cuDNN on CUDA) on ResNet-18's
convolutions at batch 8, and a CIFAR network's first layer at batch 64, float32.

Modes: ``forward`` (NCHW, as most models run), ``forward-channels_last``, ``conv-bn-relu``
(inference: fastdl's single fused pass from ``fuse_conv_bn``, whose Winograd weights are
prepacked, against eager conv -> bn -> relu)
and ``forward+backward`` (gradients of input and weight).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdl.nn
import fastdl.ops

from ._common import make_run, record

# name: (N, C, H, W, K, kernel, stride, padding, quick?)
CASES = {
    "stem-7x7s2-224": (8, 3, 224, 224, 64, 7, 2, 3, False),
    "3x3-56": (8, 64, 56, 56, 64, 3, 1, 1, False),
    "3x3-28": (8, 128, 28, 28, 128, 3, 1, 1, True),
    "3x3-14": (8, 256, 14, 14, 256, 3, 1, 1, False),
    "3x3-7": (8, 512, 7, 7, 512, 3, 1, 1, False),
    "1x1s2-downsample-56": (8, 64, 56, 56, 128, 1, 2, 0, False),
    "cifar-first-3x3-32": (64, 3, 32, 32, 64, 3, 1, 1, False),
}
MODES = ["forward", "forward-channels_last", "conv-bn-relu", "forward+backward"]


def make_layers(case: str, device: str):
    n, c, h, w, k, kernel, stride, padding, _ = CASES[case]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen).to(device)
    conv = nn.Conv2d(c, k, kernel, stride, padding, bias=False).to(device)
    bn = nn.BatchNorm2d(k).to(device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2, generator=gen)
        bn.bias.normal_(generator=gen)
        bn.running_mean.normal_(generator=gen)
        bn.running_var.uniform_(0.5, 2, generator=gen)
    return x, conv, bn.eval()


def setup(case: str, impl: str, mode: str, device: str):
    """The function to time, its arguments and the float64 result it should match."""
    x, conv, bn = make_layers(case, device)
    _, _, _, _, _, _, stride, padding, _ = CASES[case]
    if mode == "conv-bn-relu":
        eager = nn.Sequential(conv, bn, nn.ReLU())
        fn = fastdl.nn.fuse_conv_bn(conv, bn, "relu") if impl == "fastdl" else eager
        with torch.no_grad():
            reference = eager.double()(x.double())
            eager.float()
        return fn, (x,), reference
    if mode == "forward-channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = conv.weight.detach()
    conv_fn = fastdl.ops.conv2d if impl == "fastdl" else F.conv2d
    fn = lambda x, w: conv_fn(x, w, None, stride, padding)  # noqa: E731
    reference = F.conv2d(x.double(), weight.double(), None, stride, padding)
    if mode == "forward+backward":
        x, weight = x.requires_grad_(), weight.requires_grad_()
    return fn, (x, weight), reference


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["fastdl", "eager"])
@pytest.mark.parametrize(
    "case", [pytest.param(name, marks=[pytest.mark.quick] if spec[-1] else []) for name, spec in CASES.items()]
)
def test_conv2d(benchmark, case, impl, mode, device):
    fn, args, reference = setup(case, impl, mode, device)
    run = make_run(fn, args, "forward+backward" if mode == "forward+backward" else "forward", device)
    result = benchmark(run)
    record(benchmark, op="conv2d", case=f"{case} {mode}", impl=impl, result=result.detach(), reference=reference)
