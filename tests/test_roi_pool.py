"""roi_pool against a slow float64 reference written from the definition (``TestRoiPool``), plus the
cases the tester does not generate: the backward op, the module, CUDA precision and determinism."""

from __future__ import annotations

import math

import pytest
import torch

import fastdl.nn
import fastdl.ops
from fastdl.ops import _library
from harness import (
    DEVICES,
    LAYOUTS,
    assert_close,
    check_compiled,
    composite_serves_mps,
    fresh_seed,
    needs_cuda,
    run_opcheck,
    with_layout,
)
from optester import OpTester, Sample, dtype_name
from test_roi_align import random_rois


def c_round(v: float) -> int:
    """C's round(): halves away from zero."""
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def roi_pool_reference(input, rois, output_size, spatial_scale=1.0):
    ph, pw = output_size
    input = input.double().cpu()
    _, c, h, w = input.shape
    out = torch.zeros(rois.size(0), c, ph, pw, dtype=torch.float64)
    for k, (n, x1, y1, x2, y2) in enumerate(rois.double().cpu().tolist()):
        sx, sy = c_round(x1 * spatial_scale), c_round(y1 * spatial_scale)
        ex, ey = c_round(x2 * spatial_scale), c_round(y2 * spatial_scale)
        bin_h, bin_w = max(ey - sy + 1, 1) / ph, max(ex - sx + 1, 1) / pw
        for py in range(ph):
            y0 = min(max(math.floor(py * bin_h) + sy, 0), h)
            y1_ = min(max(math.ceil((py + 1) * bin_h) + sy, 0), h)
            for px in range(pw):
                x0 = min(max(math.floor(px * bin_w) + sx, 0), w)
                x1_ = min(max(math.ceil((px + 1) * bin_w) + sx, 0), w)
                if y1_ > y0 and x1_ > x0:
                    out[k, :, py, px] = input[int(n), :, y0:y1_, x0:x1_].amax(dim=(1, 2))
    return out


def make_case(dtype, device, batch=2, channels=3, height=11, width=9, num_rois=7, scale=1.0):
    x = torch.randn(batch, channels, height, width, dtype=dtype, device=device)
    return x, random_rois(num_rois, batch, height, width, scale, dtype, device)


def test_hand_computed_case():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # box (0,0)-(3,3) inclusive covers the map: 2x2 bins of 2x2 pixels -> their maxima
    out = fastdl.ops.roi_pool(x, torch.tensor([[0.0, 0, 0, 3, 3]]), 2)
    assert out.tolist() == [[[[5.0, 7.0], [13.0, 15.0]]]]
    # a box wholly outside the map gives empty bins -> 0
    assert fastdl.ops.roi_pool(x, torch.tensor([[0.0, 10, 10, 12, 12]]), 2).abs().sum() == 0


class TestRoiPool(OpTester):
    op = torch.ops.fastdl.roi_pool.default
    differentiable = (0,)
    # torchvision's rule: the op runs in float32 and returns the features' dtype
    autocast_dtype = torch.bfloat16

    def samples(self):
        for device in DEVICES:
            for dtype in (torch.float32, torch.float64):
                for layout in LAYOUTS:
                    for scale in (1.0, 0.5, 1 / 16):
                        x, rois = make_case(dtype, device, scale=scale)
                        yield Sample(
                            (with_layout(x, layout), rois, scale, 3, 2),
                            name=f"{device}-{dtype_name(dtype)}-{layout}-scale{scale:g}",
                        )
                # one row or column of pixels, one channel, one box; and no boxes at all
                x, rois = make_case(dtype, device, batch=1, channels=1, height=1, width=13, num_rois=1)
                yield Sample((x, rois, 1.0, 1, 4), name=f"{device}-{dtype_name(dtype)}-one_row")
                x, rois = make_case(dtype, device, height=5, width=1, num_rois=3)
                yield Sample((x, rois, 1.0, 2, 1), name=f"{device}-{dtype_name(dtype)}-one_column")
                x, rois = make_case(dtype, device, num_rois=0)
                yield Sample((x, rois, 1.0, 2, 2), name=f"{device}-{dtype_name(dtype)}-no_boxes")

    def reference(self, x, rois, scale, pooled_height, pooled_width):
        return roi_pool_reference(x, rois, (pooled_height, pooled_width), scale)

    def assert_matches(self, sample, result, expected):
        out, argmax = result
        assert_close(out, expected, sample.dtype)
        # argmax points at a pixel holding the output value (or -1 for an empty bin)
        x, rois = sample.args[:2]
        image = x[rois[:, 0].long()].flatten(2)
        picked = torch.gather(image, 2, argmax.clamp(min=0).flatten(2)).view_as(out)
        assert torch.equal(torch.where(argmax >= 0, picked, torch.zeros_like(picked)), out)

    def gradcheck_samples(self):
        for device in DEVICES:
            for draw in range(3):
                # distinct values so that the max is unique and the function is differentiable
                x = torch.randperm(2 * 2 * 8 * 7, dtype=torch.float64, device=device).view(2, 2, 8, 7)
                rois = random_rois(5, 2, 8, 7, 1.0, torch.float64, device)
                yield Sample((x, rois, 1.0, 3, 2), name=f"{device}-distinct{draw}")

    def compile_sample(self):
        x, rois = make_case(torch.float32, "cpu")
        return Sample((x, rois, 0.5, 2, 3))

    def autocast_sample(self):
        x, rois = make_case(torch.float32, "cpu")
        return Sample((x.bfloat16(), rois, 1.0, 3, 3))

    def bad_inputs(self):
        x, rois = make_case(torch.float32, "cpu")
        return [
            ((x[0], rois, 1.0, 2, 2), {}, RuntimeError, "4-D tensor"),
            ((x, rois[:, :4], 1.0, 2, 2), {}, RuntimeError, r"shape \[K, 5\]"),
            ((x, torch.tensor([[0.0, 0, float("nan"), 1, 1]]), 1.0, 2, 2), {}, RuntimeError, "NaN or infinite"),
            ((x, torch.tensor([[2.0, 0, 0, 1, 1]]), 1.0, 2, 2), {}, RuntimeError, r"must lie in \[0, 2\)"),
            ((x, rois, 1.0, -1, 2), {}, RuntimeError, "output_size must be positive"),
        ]


@pytest.mark.parametrize("device", DEVICES)
def test_backward_native_equals_composite(device):
    fresh_seed()
    x, rois = make_case(torch.float64, device, num_rois=12)
    out, argmax = torch.ops.fastdl.roi_pool(x, rois, 1.0, 3, 3)
    grad = torch.randn_like(out)
    args = (grad, rois, argmax, 1.0, 3, 3, *x.shape)
    assert_close(torch.ops.fastdl._roi_pool_backward(*args), _library.composite("_roi_pool_backward")(*args))


@pytest.mark.parametrize("device", DEVICES)
def test_wrapper_on_no_boxes_and_module(device):
    x = torch.randn(2, 3, 6, 6, device=device, requires_grad=True)
    assert fastdl.ops.roi_pool(x, torch.zeros(0, 5, device=device), 2).shape == (0, 3, 2, 2)
    boxes = [torch.tensor([[0.0, 0, 4, 4]], device=device), torch.zeros(0, 4, device=device)]
    out = fastdl.nn.RoIPool(2, 1.0)(x, boxes)
    assert_close(out, roi_pool_reference(x.detach(), torch.tensor([[0.0, 0, 0, 4, 4]]), (2, 2)).to(out.dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_opcheck(device):
    fresh_seed()
    x, rois = make_case(torch.float32, device)
    out, argmax = torch.ops.fastdl.roi_pool(x, rois, 0.5, 2, 3)
    run_opcheck(torch.ops.fastdl._roi_pool_backward.default, (torch.randn_like(out), rois, argmax, 0.5, 2, 3, *x.shape))


def test_wrapper_under_torch_compile():
    fresh_seed()
    x, rois = make_case(torch.float32, "cpu")
    check_compiled(lambda x, r: fastdl.ops.roi_pool(x, r, 2, 0.5) * 3, x.requires_grad_(), rois)


def test_composite_serves_mps():
    assert composite_serves_mps("roi_pool") and composite_serves_mps("_roi_pool_backward")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_reduced_precision(dtype):
    fresh_seed()
    x, rois = make_case(torch.float32, "cuda", channels=8)
    out = fastdl.ops.roi_pool(x.to(dtype), rois.to(dtype), 3)
    assert_close(out, roi_pool_reference(x.to(dtype), rois.to(dtype), (3, 3)), dtype)


@needs_cuda
def test_cuda_deterministic_backward():
    fresh_seed()
    x, rois = make_case(torch.float64, "cuda", num_rois=30)
    out, argmax = torch.ops.fastdl.roi_pool(x, rois, 1.0, 3, 3)
    args = (torch.randn_like(out), rois, argmax, 1.0, 3, 3, *x.shape)
    atomic = torch.ops.fastdl._roi_pool_backward(*args)
    torch.use_deterministic_algorithms(True)
    try:
        det = torch.ops.fastdl._roi_pool_backward(*args)
    finally:
        torch.use_deterministic_algorithms(False)
    assert_close(det, atomic)


def test_backward_op_checks_its_rois_and_argmax():
    """The internal backward is reachable through torch.ops.fastdl: it checks like the forward."""
    backward = torch.ops.fastdl._roi_pool_backward.default
    grad, argmax = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"batch index\) must lie in \[0, 2\) for batch_size 2"):
        backward(grad, torch.tensor([[2.0, 0, 0, 3, 3]]), argmax, 1.0, 2, 2, 2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="argmax must be int64"):
        backward(grad, torch.tensor([[0.0, 0, 0, 3, 3]]), argmax.int(), 1.0, 2, 2, 2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="beyond the 8x8 map"):
        backward(grad, torch.tensor([[0.0, 0, 0, 3, 3]]), argmax + 64, 1.0, 2, 2, 2, 3, 8, 8)
