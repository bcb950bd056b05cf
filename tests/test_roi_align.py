"""roi_align against a slow float64 reference written straight from the definition (``TestRoiAlign``),
plus the cases the tester does not generate: the backward op, boxes as lists, the module, CUDA."""

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


# ---- the reference --------------------------------------------------------------------------


def bilinear(image: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """Bilinear value of ``image[C, H, W]`` at (y, x); zero beyond one pixel outside the map (and
    everywhere on a map without pixels)."""
    _, height, width = image.shape
    if y < -1 or y > height or x < -1 or x > width or height == 0 or width == 0:
        return image.new_zeros(image.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return (
        (1 - ly) * (1 - lx) * image[:, y0, x0]
        + (1 - ly) * lx * image[:, y0, x1]
        + ly * (1 - lx) * image[:, y1, x0]
        + ly * lx * image[:, y1, x1]
    )


def roi_align_reference(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    ph, pw = output_size
    input = input.double().cpu()
    out = torch.zeros(rois.size(0), input.size(1), ph, pw, dtype=torch.float64)
    offset = 0.5 if aligned else 0.0
    for k, (n, x1, y1, x2, y2) in enumerate(rois.double().cpu().tolist()):
        sx, sy = x1 * spatial_scale - offset, y1 * spatial_scale - offset
        w, h = x2 * spatial_scale - offset - sx, y2 * spatial_scale - offset - sy
        if not aligned:
            w, h = max(w, 1.0), max(h, 1.0)
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(h / ph)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(w / pw)
        for py in range(ph):
            for px in range(pw):
                acc = torch.zeros(input.size(1), dtype=torch.float64)
                for iy in range(gh):
                    y = sy + py * h / ph + (iy + 0.5) * h / ph / gh
                    for ix in range(gw):
                        x = sx + px * w / pw + (ix + 0.5) * w / pw / gw
                        acc += bilinear(input[int(n)], y, x)
                out[k, :, py, px] = acc / (gh * gw) if gh * gw > 0 else 0.0
    return out


# ---- input makers ---------------------------------------------------------------------------


def random_rois(num: int, batch: int, height: int, width: int, scale: float, dtype, device="cpu") -> torch.Tensor:
    """Boxes in image coordinates: inside, partly outside, wholly outside and zero-area ones."""
    img_h, img_w = height / scale, width / scale
    xy = torch.rand(num, 2, dtype=torch.float64) * torch.tensor([img_w, img_h]) * 1.4 - 0.2 * torch.tensor(
        [img_w, img_h]
    )
    wh = torch.rand(num, 2, dtype=torch.float64) * torch.tensor([img_w, img_h]) * 0.8
    if num >= 3:
        wh[0] = 0  # zero-area box
        xy[1] = torch.tensor([-3 * img_w, -3 * img_h])  # wholly outside
    index = torch.randint(0, batch, (num, 1)).double()
    return torch.cat([index, xy, xy + wh], dim=1).to(dtype=dtype, device=device)


def make_case(dtype, device, batch=2, channels=3, height=11, width=9, num_rois=6, scale=1.0):
    x = torch.randn(batch, channels, height, width, dtype=dtype, device=device)
    return x, random_rois(num_rois, batch, height, width, scale, dtype, device)


# ---- forward ----------------------------------------------------------------------------------


def test_hand_computed_case():
    # v(y, x) = 4y + x is linear, so bilinear sampling is exact: aligned=True puts the single
    # sample of each 2x2 bin of the box (0, 0, 4, 4) at pixel coordinates 0.5 and 2.5.
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    boxes = torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]])
    out = fastdl.ops.roi_align(x, boxes, 2, sampling_ratio=1, aligned=True)
    assert out.tolist() == [[[[2.5, 4.5], [10.5, 12.5]]]]
    # legacy (aligned=False) samples at 1.0 and 3.0 -> clamped to the last row/column for 3.0
    out = fastdl.ops.roi_align(x, boxes, 2, sampling_ratio=1, aligned=False)
    assert out.tolist() == [[[[5.0, 7.0], [13.0, 15.0]]]]


class TestRoiAlign(OpTester):
    op = torch.ops.fastdl.roi_align.default
    differentiable = (0,)
    # torchvision's rule: the op runs in float32 and returns the features' dtype
    autocast_dtype = torch.bfloat16

    def samples(self):
        for device in DEVICES:
            for dtype in (torch.float32, torch.float64):
                name = f"{device}-{dtype_name(dtype)}"
                for aligned in (False, True):
                    for sampling_ratio in (-1, 0, 1, 2):
                        for layout in LAYOUTS:
                            x, rois = make_case(dtype, device, channels=3 if layout != "channels_last" else 5)
                            yield Sample(
                                (with_layout(x, layout), rois, 1.0, 3, 4, sampling_ratio, aligned),
                                name=f"{name}-aligned{aligned}-ratio{sampling_ratio}-{layout}",
                            )
                # feature maps at 1/16 and 1/32 of the image
                for scale in (1 / 16, 1 / 32):
                    for aligned in (False, True):
                        x, rois = make_case(dtype, device, height=13, width=10, num_rois=8, scale=scale)
                        yield Sample(
                            (x, rois, scale, 2, 3, -1, aligned), name=f"{name}-scale{scale:g}-aligned{aligned}"
                        )
                # no boxes, no channels, and maps without pixels (every sample point is outside: zeros)
                x, rois = make_case(dtype, device, num_rois=0)
                yield Sample((x, rois, 1.0, 3, 3, -1, False), name=f"{name}-no_boxes")
                x, rois = make_case(dtype, device, channels=0, num_rois=2)
                yield Sample((x, rois, 1.0, 2, 2, -1, False), name=f"{name}-no_channels")
                rois = torch.tensor([[0, 0.0, 0, 3, 3], [1, 1.0, 1, 2, 5]], dtype=dtype, device=device)
                for height, width in ((0, 7), (6, 0)):
                    x = torch.randn(2, 3, height, width, dtype=dtype, device=device)
                    yield Sample((x, rois, 1.0, 2, 2, 2, True), name=f"{name}-map{height}x{width}")

    def reference(self, x, rois, scale, pooled_height, pooled_width, sampling_ratio, aligned):
        return roi_align_reference(x, rois, (pooled_height, pooled_width), scale, sampling_ratio, aligned)

    def assert_matches(self, sample, result, expected):
        assert_close(result, expected, sample.dtype)
        x = sample.args[0]
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            assert result.is_contiguous(memory_format=torch.channels_last)

    def gradcheck_samples(self):
        for device in DEVICES:
            for aligned in (False, True):
                for sampling_ratio in (-1, 2):
                    for draw in range(3):
                        x, rois = make_case(torch.float64, device, channels=2, height=7, width=6, num_rois=4)
                        yield Sample(
                            (x, rois, 0.5, 2, 3, sampling_ratio, aligned),
                            name=f"{device}-aligned{aligned}-ratio{sampling_ratio}-draw{draw}",
                        )

    def compile_sample(self):
        x, rois = make_case(torch.float32, "cpu")
        return Sample((x, rois, 0.5, 2, 2, 2, True))

    def autocast_sample(self):
        x, rois = make_case(torch.float32, "cpu")
        return Sample((x.bfloat16(), rois, 1.0, 3, 3, 2, True))

    def bad_inputs(self):
        x, rois = make_case(torch.float32, "cpu")
        cases = [
            ((x[0], rois), "4-D tensor"),
            ((x, rois[:, 1:]), r"shape \[K, 5\]"),
            ((x, torch.tensor([[5.0, 0, 0, 1, 1]])), r"must lie in \[0, 2\)"),
            ((x, torch.tensor([[-1.0, 0, 0, 1, 1]])), r"must lie in \[0, 2\)"),
            ((x, torch.tensor([[0.5, 0, 0, 1, 1]])), "whole numbers"),
            ((x, torch.tensor([[0.0, float("nan"), 0, 1, 1]])), "NaN or infinite"),
            ((x, torch.tensor([[0.0, 0, 0, float("inf"), 1]])), "NaN or infinite"),
            ((x, rois.double()), "dtype"),
        ]
        bad = [
            ((features, boxes, 1.0, 2, 2, -1, False), {}, RuntimeError, message) for (features, boxes), message in cases
        ]
        return bad + [((x, rois, 1.0, 0, 2, -1, False), {}, RuntimeError, "output_size must be positive")]


@pytest.mark.parametrize("device", DEVICES)
def test_list_of_boxes_equals_tensor_form(device):
    fresh_seed()
    x = torch.randn(3, 4, 8, 8, device=device)
    per_image = [random_rois(n, 1, 8, 8, 1.0, torch.float32, device)[:, 1:] for n in (2, 0, 3)]
    rois = torch.cat(
        [torch.cat([torch.full((len(b), 1), float(i), device=device), b], 1) for i, b in enumerate(per_image)]
    )
    assert_close(fastdl.ops.roi_align(x, per_image, 2, 0.5), fastdl.ops.roi_align(x, rois, 2, 0.5))
    module = fastdl.nn.RoIAlign(2, 0.5, 2, True)
    assert_close(module(x, per_image), fastdl.ops.roi_align(x, rois, 2, 0.5, 2, True))


@pytest.mark.parametrize("device", DEVICES)
def test_wrapper_on_no_boxes_and_no_images(device):
    x = torch.randn(2, 3, 5, 5, device=device, requires_grad=True)
    out = fastdl.ops.roi_align(x, torch.zeros(0, 5, device=device), 3)
    assert out.shape == (0, 3, 3, 3)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert fastdl.ops.roi_align(torch.randn(0, 3, 5, 5, device=device), [], 2).shape == (0, 3, 2, 2)


# ---- backward ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_backward_native_equals_composite(device):
    fresh_seed()
    x, rois = make_case(torch.float64, device, channels=5, height=12, width=9, num_rois=10)
    grad = torch.randn(10, 5, 3, 3, dtype=torch.float64, device=device)
    args = (grad, rois, 0.5, 3, 3, 2, 5, 12, 9, -1, True)
    assert_close(torch.ops.fastdl._roi_align_backward(*args), _library.composite("_roi_align_backward")(*args))


def test_weight_window_sums_to_one():
    # Each bin's output is a convex combination of input pixels when every sample is inside the
    # map, so the input gradient of out.sum() totals exactly K * PH * PW.
    x = torch.randn(1, 1, 10, 10, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.0, 7.0, 8.0], [0, 2.5, 0.5, 6.0, 3.0]], dtype=torch.float64)
    fastdl.ops.roi_align(x, rois, (3, 2), 1.0, 2, True).sum().backward()
    assert x.grad.sum().item() == pytest.approx(2 * 3 * 2, abs=1e-12)


# ---- dispatcher-level checks ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_backward_opcheck(device):
    fresh_seed()
    x, rois = make_case(torch.float32, device)
    grad = torch.randn(rois.size(0), 3, 2, 3, device=device)
    run_opcheck(torch.ops.fastdl._roi_align_backward.default, (grad, rois, 0.5, 2, 3, 2, 3, 11, 9, 2, True))


def test_wrapper_under_torch_compile():
    fresh_seed()
    x, rois = make_case(torch.float32, "cpu")
    x.requires_grad_()
    check_compiled(lambda x, r: fastdl.ops.roi_align(x, r, (2, 2), 0.5, 2, True).relu() * 2, x, rois)


def test_composite_serves_mps():
    assert composite_serves_mps("roi_align")
    assert composite_serves_mps("_roi_align_backward")


# ---- bad input (the rest are TestRoiAlign's) ---------------------------------------------------


def test_native_checks_scale_and_dtype():
    """The composite leaves these to the PyTorch ops it calls."""
    x, rois = make_case(torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="spatial_scale must be positive"):
        torch.ops.fastdl.roi_align.default(x, rois, -1.0, 2, 2, -1, False)
    with pytest.raises(RuntimeError, match="unsupported dtype Int"):
        torch.ops.fastdl.roi_align.default(x.int(), rois.int(), 1.0, 2, 2, -1, False)


def test_bad_python_arguments():
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="output_size"):
        fastdl.ops.roi_align(x, torch.zeros(1, 5), (1, 2, 3))
    with pytest.raises(ValueError, match=r"boxes\[0\] must be a Tensor\[L, 4\]"):
        fastdl.ops.roi_align(x, [torch.zeros(2, 5)], 2)


# ---- CUDA -------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_reduced_precision(dtype):
    fresh_seed()
    x, rois = make_case(torch.float32, "cuda", channels=8, num_rois=12)
    out = fastdl.ops.roi_align(x.to(dtype), rois.to(dtype), (3, 3), 1.0, 2, True)
    assert out.dtype == dtype
    assert_close(out, roi_align_reference(x.to(dtype), rois.to(dtype), (3, 3), 1.0, 2, True), dtype)


@needs_cuda
def test_cuda_deterministic_backward_matches_atomic():
    fresh_seed()
    x, rois = make_case(torch.float64, "cuda", channels=4, height=16, width=16, num_rois=20)
    grad = torch.randn(20, 4, 3, 3, dtype=torch.float64, device="cuda")
    args = (grad, rois, 1.0, 3, 3, 2, 4, 16, 16, -1, True)
    atomic = torch.ops.fastdl._roi_align_backward(*args)
    torch.use_deterministic_algorithms(True)
    try:
        first, second = torch.ops.fastdl._roi_align_backward(*args), torch.ops.fastdl._roi_align_backward(*args)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first, second)
    assert_close(first, atomic)


@needs_cuda
def test_cuda_matches_cpu():
    fresh_seed()
    x, rois = make_case(torch.float32, "cpu", channels=16, height=20, width=24, num_rois=30)
    assert_close(
        fastdl.ops.roi_align(x.cuda(), rois.cuda(), 7, 0.5, -1, True), fastdl.ops.roi_align(x, rois, 7, 0.5, -1, True)
    )


def test_backward_op_checks_its_rois():
    """The internal backward is reachable through torch.ops.fastdl: a batch index beyond
    batch_size, a NaN box or a negative size is an error, not a write outside the gradient."""
    backward = torch.ops.fastdl._roi_align_backward.default
    grad = torch.ones(1, 3, 2, 2)
    with pytest.raises(RuntimeError, match=r"batch index\) must lie in \[0, 2\) for batch_size 2"):
        backward(grad, torch.tensor([[5.0, 0, 0, 3, 3]]), 1.0, 2, 2, 2, 3, 8, 8, 2, True)
    with pytest.raises(RuntimeError, match="NaN or infinite"):
        backward(grad, torch.tensor([[0.0, 0, float("nan"), 3, 3]]), 1.0, 2, 2, 2, 3, 8, 8, 2, True)
    with pytest.raises(RuntimeError, match="input size must be non-negative"):
        backward(grad, torch.tensor([[0.0, 0, 0, 3, 3]]), 1.0, 2, 2, 2, 3, -8, 8, 2, True)
