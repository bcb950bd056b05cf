"""fastdl's detection ops and modules against torchvision's, on the same random inputs.

Skipped where torchvision cannot be imported (it needs the torch it was built for); CI runs it
in the torch 2.14 + torchvision 0.29 environment of .ci/cuda-wheel. Both libraries are loaded
side by side here, which is itself a check that their operator names do not clash.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastdl.nn
import fastdl.ops as ops
from harness import LAYOUTS, fresh_seed, with_layout

torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed for this torch")
tv_ops = torchvision.ops
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder  # noqa: E402

FLOATS = [torch.float32, torch.float64]


def random_boxes(count: int, size: float, dtype=torch.float32, min_side: float = 0.5) -> torch.Tensor:
    xy = torch.rand(count, 2, dtype=torch.float64) * size
    wh = torch.rand(count, 2, dtype=torch.float64) * size / 2 + min_side
    return torch.cat([xy, xy + wh], 1).to(dtype)


def random_rois(count: int, batch: int, size: float, dtype=torch.float32) -> torch.Tensor:
    index = torch.randint(0, batch, (count, 1)).to(dtype)
    return torch.cat([index, random_boxes(count, size, dtype)], 1)


def assert_same_with_gradients(ours_fn, theirs_fn, features: torch.Tensor) -> None:
    """``ours_fn(features)`` equals ``theirs_fn(features)``, and so do the input gradients of the
    same random output gradient."""
    ours_in, theirs_in = features.clone().requires_grad_(), features.clone().requires_grad_()
    ours, theirs = ours_fn(ours_in), theirs_fn(theirs_in)
    torch.testing.assert_close(ours, theirs)
    grad = torch.randn_like(ours)
    ours.backward(grad)
    theirs.backward(grad)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad)


def test_operators_live_side_by_side():
    assert torch.ops.fastdl.roi_align.default.name() == "fastdl::roi_align"
    assert torch.ops.torchvision.roi_align.default.name() == "torchvision::roi_align"


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align(sampling_ratio, aligned, layout, dtype):
    fresh_seed()
    features = with_layout(torch.randn(2, 7, 23, 19, dtype=dtype), layout)
    rois = random_rois(33, 2, 40.0, dtype)
    assert_same_with_gradients(
        lambda f: ops.roi_align(f, rois, (5, 4), 0.5, sampling_ratio, aligned),
        lambda f: tv_ops.roi_align(f, rois, (5, 4), 0.5, sampling_ratio, aligned),
        features,
    )


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_roi_pool(layout, dtype):
    fresh_seed()
    features = with_layout(torch.randn(2, 5, 17, 21, dtype=dtype), layout)
    rois = random_rois(29, 2, 30.0, dtype)
    assert_same_with_gradients(
        lambda f: ops.roi_pool(f, rois, (3, 5), 0.625), lambda f: tv_ops.roi_pool(f, rois, (3, 5), 0.625), features
    )


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7, 1.0])
def test_nms_and_batched_nms(threshold, dtype):
    fresh_seed()
    boxes = random_boxes(500, 100.0, dtype)
    scores = torch.rand(500, dtype=dtype)
    idxs = torch.randint(0, 5, (500,))
    assert torch.equal(ops.nms(boxes, scores, threshold), tv_ops.nms(boxes, scores, threshold))
    assert torch.equal(
        ops.batched_nms(boxes, scores, idxs, threshold), tv_ops.batched_nms(boxes, scores, idxs, threshold)
    )


def test_nms_float16_composite():
    """float16 boxes a few hundred pixels wide: the plain-PyTorch NMS (which serves MPS) computes
    areas upcast, as torchvision's does, instead of overflowing to NaN and suppressing nothing."""
    fresh_seed()
    # whole-pixel corners and distinct scores: float16 holds them exactly, so the only
    # difference from float32 could be the overflow this test is about
    boxes = random_boxes(200, 600.0, min_side=100.0).round().half()
    scores = (torch.randperm(200) / 256).half()
    from fastdl.ops import _library

    ours = _library.composite("nms")(boxes, scores, 0.5)
    assert torch.equal(ours, tv_ops.nms(boxes.float(), scores.float(), 0.5))


@pytest.mark.parametrize(
    "dtype",
    [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64],
)
def test_box_area_and_iou(dtype):
    fresh_seed()
    scale = 100.0 if dtype.is_floating_point else 60.0
    a = random_boxes(31, scale, torch.float64, min_side=1.0)
    b = random_boxes(17, scale, torch.float64, min_side=1.0)
    if not dtype.is_floating_point:
        a, b = a.round(), b.round()
    a, b = a.to(dtype), b.to(dtype)
    area, expected_area = ops.box_area(a), tv_ops.box_area(a)
    assert area.dtype == expected_area.dtype
    torch.testing.assert_close(area, expected_area)
    iou, expected_iou = ops.box_iou(a, b), tv_ops.box_iou(a, b)
    assert iou.dtype == expected_iou.dtype
    torch.testing.assert_close(iou, expected_iou)


@pytest.mark.parametrize("in_fmt", ["xyxy", "xywh", "cxcywh"])
@pytest.mark.parametrize("out_fmt", ["xyxy", "xywh", "cxcywh"])
def test_box_convert(in_fmt, out_fmt):
    fresh_seed()
    boxes = random_boxes(40, 50.0, torch.float64)
    torch.testing.assert_close(ops.box_convert(boxes, in_fmt, out_fmt), tv_ops.box_convert(boxes, in_fmt, out_fmt))


def test_clip_and_remove_small_boxes():
    fresh_seed()
    boxes = random_boxes(60, 80.0) - 10
    torch.testing.assert_close(ops.clip_boxes_to_image(boxes, (50, 40)), tv_ops.clip_boxes_to_image(boxes, (50, 40)))
    for min_size in (0.0, 3.0, 20.0):
        assert torch.equal(ops.remove_small_boxes(boxes, min_size), tv_ops.remove_small_boxes(boxes, min_size))


def test_multiscale_roi_align():
    fresh_seed()
    names = ["p2", "p3", "p4", "p5"]
    image_shapes = [(200, 248), (256, 230)]
    features = {n: torch.randn(2, 4, math.ceil(256 / 2**k), math.ceil(256 / 2**k)) for k, n in enumerate(names, 2)}
    # boxes of every size, so every level is used, and sizes exactly at a level boundary
    boxes = [
        random_boxes(40, 200.0, min_side=4.0),
        torch.tensor([[0.0, 0, 112, 112], [10, 10, 234, 234], [5, 5, 61, 61]]),
    ]
    ours = fastdl.nn.MultiScaleRoIAlign(names, 7, 2)
    theirs = tv_ops.MultiScaleRoIAlign(names, 7, 2)
    assert repr(ours) == repr(theirs)
    torch.testing.assert_close(ours(features, boxes, image_shapes), theirs(features, boxes, image_shapes))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder(weights):
    fresh_seed()
    ours, theirs = ops.BoxCoder(weights), TorchvisionBoxCoder(weights)
    proposals = [random_boxes(12, 60.0), random_boxes(7, 60.0)]
    gt = [random_boxes(12, 60.0), random_boxes(7, 60.0)]
    for mine, reference in zip(ours.encode(gt, proposals), theirs.encode(gt, proposals)):
        torch.testing.assert_close(mine, reference)
    torch.testing.assert_close(ours.encode_single(gt[0], proposals[0]), theirs.encode_single(gt[0], proposals[0]))
    codes = torch.randn(19, 4 * 3) * 3  # three classes, some codes past the exp clamp
    codes[0, 2] = 50.0
    torch.testing.assert_close(ours.decode(codes, proposals), theirs.decode(codes, proposals))
    torch.testing.assert_close(
        ours.decode_single(codes, torch.cat(proposals)), theirs.decode_single(codes, torch.cat(proposals))
    )
