"""Box utilities (a tester each for box_area, box_iou, box_convert and clip_boxes_to_image),
BoxCoder and multi-scale ROI-align."""

from __future__ import annotations

import math

import pytest
import torch

import fastdl.nn
import fastdl.ops as ops
from harness import assert_close, fresh_seed, non_contiguous
from optester import OpTester, Sample, dtype_name
from test_nms import iou as iou_reference
from test_nms import random_boxes


FORMATS = ("xyxy", "xywh", "cxcywh")


def box_samples(sizes=(17, 1, 0)):
    """Random xyxy boxes (clustered, with a duplicate) of each size, in float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        for n in sizes:
            yield dtype, n, random_boxes(n, dtype=dtype)[0]


def to_xyxy_reference(box: list[float], fmt: str) -> list[float]:
    a, b, c, d = box
    if fmt == "xywh":
        return [a, b, a + c, b + d]
    if fmt == "cxcywh":
        return [a - c / 2, b - d / 2, a + c / 2, b + d / 2]
    return [a, b, c, d]


def from_xyxy_reference(box: list[float], fmt: str) -> list[float]:
    x1, y1, x2, y2 = box
    if fmt == "xywh":
        return [x1, y1, x2 - x1, y2 - y1]
    if fmt == "cxcywh":
        return [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
    return [x1, y1, x2, y2]


class TestBoxArea(OpTester):
    op = ops.box_area
    differentiable = (0,)

    def samples(self):
        for dtype, n, boxes in box_samples():
            yield Sample((boxes,), name=f"{dtype_name(dtype)}-{n}")
        yield Sample((non_contiguous(random_boxes(9)[0]),), name="non_contiguous")

    def reference(self, boxes):
        return torch.tensor([(x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in boxes.double().tolist()], dtype=torch.float64)

    def bad_inputs(self):
        return [
            ((torch.zeros(3, 5),), {}, ValueError, r"Tensor\[\.\.\., 4\]"),
            ((torch.zeros(3, 4, dtype=torch.bool),), {}, TypeError, "real numbers"),
        ]


class TestBoxIou(OpTester):
    op = ops.box_iou
    differentiable = (0, 1)

    def samples(self):
        for dtype, n, boxes in box_samples():
            yield Sample((boxes, random_boxes(9, dtype=dtype)[0]), name=f"{dtype_name(dtype)}-{n}x9")
        yield Sample((random_boxes(4)[0], torch.zeros(0, 4)), name="4x0")

    def reference(self, a, b):
        return torch.tensor(
            [[iou_reference(x, y) for y in b.double().tolist()] for x in a.double().tolist()], dtype=torch.float64
        ).view(len(a), len(b))

    def bad_inputs(self):
        return [((torch.zeros(3, 4), torch.zeros(2, 3)), {}, ValueError, r"boxes2 must be a Tensor\[\.\.\., 4\]")]


class TestBoxConvert(OpTester):
    op = ops.box_convert
    differentiable = (0,)

    def samples(self):
        for dtype, n, boxes in box_samples(sizes=(50, 0)):
            for in_fmt in FORMATS:
                for out_fmt in FORMATS:
                    yield Sample((boxes, in_fmt, out_fmt), name=f"{dtype_name(dtype)}-{n}-{in_fmt}-{out_fmt}")

    def reference(self, boxes, in_fmt, out_fmt):
        rows = [from_xyxy_reference(to_xyxy_reference(box, in_fmt), out_fmt) for box in boxes.double().tolist()]
        return torch.tensor(rows, dtype=torch.float64).view(-1, 4)

    def bad_inputs(self):
        return [
            ((torch.zeros(2, 4), "xy", "xyxy"), {}, ValueError, "in_fmt"),
            ((torch.zeros(2, 4), "xyxy", "yx"), {}, ValueError, "out_fmt"),
        ]


class TestClipBoxesToImage(OpTester):
    op = ops.clip_boxes_to_image
    differentiable = (0,)

    def samples(self):
        for dtype, n, boxes in box_samples():
            yield Sample((boxes, (120, 90)), name=f"{dtype_name(dtype)}-{n}")

    def reference(self, boxes, size):
        height, width = size
        rows = [
            [min(max(v, 0.0), width if i % 2 == 0 else height) for i, v in enumerate(box)]
            for box in boxes.double().tolist()
        ]
        return torch.tensor(rows, dtype=torch.float64).view(-1, 4)

    def bad_inputs(self):
        return [((torch.zeros(2, 4), (-1, 5)), {}, ValueError, r"size\[0\] \(height\) must be at least 0")]


def test_box_convert_known_values_and_round_trips():
    xyxy = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    assert ops.box_convert(xyxy, "xyxy", "xywh").tolist() == [[10.0, 20.0, 20.0, 40.0]]
    assert ops.box_convert(xyxy, "xyxy", "cxcywh").tolist() == [[20.0, 40.0, 20.0, 40.0]]
    fresh_seed()
    boxes, _ = random_boxes(50, dtype=torch.float64)
    for a in FORMATS:
        for b in FORMATS:
            assert_close(ops.box_convert(ops.box_convert(boxes, "xyxy", a), a, b), ops.box_convert(boxes, "xyxy", b))


def test_clip_and_remove_small():
    boxes = torch.tensor([[-5.0, -5, 10, 10], [5, 5, 50, 40], [0, 0, 0.5, 3]])
    assert ops.clip_boxes_to_image(boxes, (30, 20)).tolist() == [[0, 0, 10, 10], [5, 5, 20, 30], [0, 0, 0.5, 3]]
    assert ops.remove_small_boxes(boxes, 1.0).tolist() == [0, 1]
    with pytest.raises(ValueError, match="min_size"):
        ops.remove_small_boxes(boxes, -1)


def test_box_coder_formula_round_trip_and_clamp():
    coder = ops.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    proposals = torch.tensor([[0.0, 0, 10, 20]])
    gt = torch.tensor([[5.0, 5, 25, 25]])
    # px=5 py=10 pw=10 ph=20; gx=15 gy=15 gw=20 gh=20
    expected = [[10 * (15 - 5) / 10, 10 * (15 - 10) / 20, 5 * math.log(2.0), 5 * math.log(1.0)]]
    assert_close(coder.encode_single(gt, proposals), torch.tensor(expected), torch.float32)
    fresh_seed()
    p, _ = random_boxes(40, dtype=torch.float64)
    g, _ = random_boxes(40, dtype=torch.float64)
    assert_close(coder.decode_single(coder.encode_single(g, p), p), g)
    # per image: encode splits by image, decode gives Tensor[N, C, 4]
    targets = coder.encode([g[:15], g[15:]], [p[:15], p[15:]])
    assert [t.shape for t in targets] == [(15, 4), (25, 4)]
    assert_close(torch.cat(targets), coder.encode_single(g, p))
    codes = torch.cat([torch.cat(targets), torch.zeros(40, 4, dtype=torch.float64)], 1)  # two classes
    decoded = coder.decode(codes, [p[:15], p[15:]])
    assert decoded.shape == (40, 2, 4)
    assert_close(decoded[:, 0], g)
    assert_close(decoded[:, 1], p)  # zero codes decode to the reference box
    huge = torch.full((1, 8), 1e4)
    decoded = coder.decode_single(huge, proposals)
    assert decoded.shape == (1, 8) and torch.isfinite(decoded).all()
    with pytest.raises(ValueError, match="weights"):
        ops.BoxCoder(weights=(1.0, 0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"Tensor\[1, 4 \* C\]"):
        coder.decode_single(torch.zeros(1, 5), proposals)
    with pytest.raises(ValueError, match="same shape"):
        coder.encode_single(g[:3], p[:4])


def level_reference(box, scales, canonical_scale=224.0, canonical_level=4):
    size = math.sqrt(max((box[2] - box[0]) * (box[3] - box[1]), 0.0))
    lo, hi = -math.log2(scales[0]), -math.log2(scales[-1])
    level = math.floor(canonical_level + math.log2(size / canonical_scale) + 1e-6) if size > 0 else -math.inf
    return int(min(max(level, lo), hi) - lo)


def test_multiscale_roi_align_picks_the_fpn_level():
    fresh_seed()
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    features = [torch.randn(2, 3, int(256 * s), int(256 * s), dtype=torch.float64) for s in scales]
    sizes = torch.tensor([8.0, 40, 100, 200, 400, 250])
    xy = torch.rand(6, 2, dtype=torch.float64) * 50
    rois = torch.cat([torch.tensor([[0.0], [1], [0], [1], [0], [1]], dtype=torch.float64), xy, xy + sizes[:, None]], 1)
    out = ops.multiscale_roi_align(features, rois, 3, scales, 2, True)
    for k in range(6):
        lvl = level_reference(rois[k, 1:].tolist(), scales)
        assert_close(out[k], ops.roi_align(features[lvl], rois[k : k + 1], 3, scales[lvl], 2, True)[0])
    assert len({level_reference(r[1:].tolist(), scales) for r in rois}) >= 3  # several levels used
    pooler = fastdl.nn.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 3, 2, aligned=True)
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    named = dict(zip(["p2", "p3", "p4", "p5"], features))
    expected = torch.cat([out[rois[:, 0] == i] for i in range(2)])
    assert_close(pooler(named, boxes, [(256, 256), (256, 256)]), expected)
    with pytest.raises(ValueError, match="powers of two"):
        ops.multiscale_roi_align(features, rois, 3, [1 / 3, 1 / 8, 1 / 16, 1 / 32])
    with pytest.raises(KeyError, match="p6"):
        fastdl.nn.MultiScaleRoIAlign(["p6"], 3)(named, boxes, [(256, 256)] * 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.uint8])
def test_areas_and_iou_are_upcast(dtype):
    """Products of coordinates in float32 / int32, as torchvision: a 300-pixel float16 box's area
    (90,000) is past float16's range, and an int8 box of 20 x 20 wraps."""
    big = 300 if dtype.is_floating_point else 20
    boxes = torch.tensor([[0, 0, big, big], [big // 2, 0, big + big // 2, big]]).to(dtype)
    area = ops.box_area(boxes)
    assert area.dtype == (torch.float32 if dtype.is_floating_point else torch.int32)
    assert area.tolist() == [big * big] * 2
    iou = ops.box_iou(boxes, boxes)
    assert iou.dtype == torch.float32
    assert_close(iou, torch.tensor([[1.0, 1 / 3], [1 / 3, 1.0]]), torch.float32)


def test_multiscale_roi_align_repr():
    pooler = fastdl.nn.MultiScaleRoIAlign(["0", "1"], 7, 2)
    assert repr(pooler) == "MultiScaleRoIAlign(featmap_names=['0', '1'], output_size=(7, 7), sampling_ratio=2)"
