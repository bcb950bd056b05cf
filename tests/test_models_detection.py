"""fastdl.models.detection (Fast R-CNN) against plain-PyTorch references written from
torchvision's documented semantics: each piece alone, then the batched detector against a
per-image loop of the same layers, weights, gradients, bad input and a short training run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from harness import assert_close, fresh_seed
from test_models_resnet import reference as reference_resnet
from torch import nn

import fastdl.ops as ops
from fastdl.models import detection as det

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

try:
    import torchvision  # noqa: F401

    HAS_TORCHVISION = True
except Exception:  # a torchvision built for another torch fails to import with various errors
    HAS_TORCHVISION = False
needs_torchvision = pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not importable with this torch")

WEIGHTS = (10.0, 10.0, 5.0, 5.0)


# ---------------------------------------------------------------------------------------------
# References, written out per image and per box from torchvision's documented behaviour.


def ref_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box of ``a`` with every box of ``b``, by the definition."""
    out = torch.zeros(len(a), len(b), dtype=torch.float64)
    for i, p in enumerate(a.double().tolist()):
        for j, q in enumerate(b.double().tolist()):
            w = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            h = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - w * h
            out[i, j] = w * h / union
    return out


def ref_matcher(iou: torch.Tensor, high: float, low: float, low_quality: bool) -> list[int]:
    """Column by column: the first row of the largest IoU, or -1 below ``low``, -2 in between;
    with ``low_quality``, every column that is a row's best (ties included) keeps its match."""
    rows, cols = iou.shape
    values = iou.tolist()
    best = [max(range(rows), key=lambda r: (values[r][c], -r)) for c in range(cols)]
    codes = []
    for c in range(cols):
        v = values[best[c]][c]
        codes.append(best[c] if v >= high else (-1 if v < low else -2))
    if low_quality:
        for r in range(rows):
            row_best = max(values[r])
            for c in range(cols):
                if values[r][c] == row_best:
                    codes[c] = best[c]
    return codes


def ref_sample(labels: torch.Tensor, batch_size: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's draw: randperm over the positives, then over the negatives."""
    positive = torch.nonzero(labels >= 1).flatten()
    negative = torch.nonzero(labels == 0).flatten()
    num_positive = min(len(positive), int(batch_size * fraction))
    num_negative = min(len(negative), batch_size - num_positive)
    positive = positive[torch.randperm(len(positive))[:num_positive]]
    negative = negative[torch.randperm(len(negative))[:num_negative]]
    return positive, negative


def ref_encode(gt: torch.Tensor, boxes: torch.Tensor, weights=WEIGHTS) -> torch.Tensor:
    wx, wy, ww, wh = weights
    pw, ph = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    px, py = boxes[:, 0] + pw / 2, boxes[:, 1] + ph / 2
    gx, gy = gt[:, 0] + gw / 2, gt[:, 1] + gh / 2
    return torch.stack([wx * (gx - px) / pw, wy * (gy - py) / ph, ww * torch.log(gw / pw), wh * torch.log(gh / ph)], 1)


def ref_decode(deltas: torch.Tensor, box: list[float], weights=WEIGHTS) -> list[float]:
    """One box's deltas ``(dx, dy, dw, dh)`` applied to ``box``."""
    wx, wy, ww, wh = weights
    clip = math.log(1000.0 / 16)
    pw, ph = box[2] - box[0], box[3] - box[1]
    px, py = box[0] + pw / 2, box[1] + ph / 2
    dx, dy, dw, dh = deltas
    cx, cy = dx / wx * pw + px, dy / wy * ph + py
    w, h = math.exp(min(dw / ww, clip)) * pw, math.exp(min(dh / wh, clip)) * ph
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def ref_greedy_nms(boxes: list[list[float]], order: list[int], threshold: float) -> list[int]:
    kept = []
    for i in order:
        if all(ref_iou(torch.tensor([boxes[i]]), torch.tensor([boxes[k]]))[0, 0] <= threshold for k in kept):
            kept.append(i)
    return kept


def ref_postprocess(logits, deltas, proposals, size, score_thresh=0.05, nms_thresh=0.5, top=100, min_box=1e-2):
    """One image: softmax; per RoI and foreground class decode, clip, threshold, drop small
    boxes; greedy NMS per class in (score desc, candidate index) order; the best ``top``."""
    height, width = size
    num_classes = logits.size(1)
    scores = F.softmax(logits.double(), dim=1).tolist()
    per_class_deltas = deltas.double().reshape(len(proposals), deltas.size(1) // 4, 4).tolist()
    candidates = []  # (score, box, label), RoI-major: equal scores rank by RoI, then class
    for r, box in enumerate(proposals.double().tolist()):
        for c in range(1, num_classes):
            d = per_class_deltas[r][c if len(per_class_deltas[r]) > 1 else 0]
            x1, y1, x2, y2 = ref_decode(d, box)
            x1, x2 = (min(max(v, 0.0), width) for v in (x1, x2))
            y1, y2 = (min(max(v, 0.0), height) for v in (y1, y2))
            score = scores[r][c]
            if score > score_thresh and x2 - x1 >= min_box and y2 - y1 >= min_box:
                candidates.append((score, [x1, y1, x2, y2], c))
    kept = []
    for c in range(1, num_classes):
        order = sorted((k for k, cand in enumerate(candidates) if cand[2] == c), key=lambda k: (-candidates[k][0], k))
        kept += ref_greedy_nms([cand[1] for cand in candidates], order, nms_thresh)
    kept = sorted(kept, key=lambda k: (-candidates[k][0], k))[:top]
    return {
        "boxes": torch.tensor([candidates[k][1] for k in kept], dtype=torch.float64).reshape(-1, 4),
        "scores": torch.tensor([candidates[k][0] for k in kept], dtype=torch.float64),
        "labels": torch.tensor([candidates[k][2] for k in kept], dtype=torch.int64),
    }


def assert_same_detections(actual: list[dict], expected: list[dict], **tolerance) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a["labels"].dtype == torch.int64, f"image {i}"
        assert a["labels"].tolist() == e["labels"].tolist(), f"image {i}: labels differ"
        assert_close(a["scores"], e["scores"], **tolerance)
        assert_close(a["boxes"], e["boxes"], **tolerance)


def random_boxes(count: int, height: float, width: float, min_side: float = 4.0) -> torch.Tensor:
    x1 = torch.rand(count) * (width - min_side)
    y1 = torch.rand(count) * (height - min_side)
    x2 = x1 + min_side + torch.rand(count) * (width - min_side - x1)
    y2 = y1 + min_side + torch.rand(count) * (height - min_side - y1)
    return torch.stack([x1, y1, x2, y2], 1)


# ---------------------------------------------------------------------------------------------
# BoxCoder (fastdl.ops.BoxCoder, with the box head's weights)


def test_box_coder_known_values_and_round_trip():
    fresh_seed()
    coder = det.BoxCoder(WEIGHTS)
    proposal = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[1.0, 2.0, 11.0, 14.0]])  # centre (6, 8), size 10 x 12
    expected = torch.tensor([[10 * 1 / 10, 10 * 3 / 10, 0.0, 5 * math.log(1.2)]])
    assert_close(coder.encode_single(gt, proposal), expected)

    proposals = random_boxes(50, 100, 80).double()
    gt = random_boxes(50, 100, 80).double()
    codes = coder.encode_single(gt, proposals)
    assert_close(codes, ref_encode(gt, proposals))
    decoded = coder.decode(codes, [proposals[:20], proposals[20:]])
    assert decoded.shape == (50, 1, 4)
    assert_close(decoded[:, 0], gt)

    # a huge width delta is clipped at log(1000 / 16) before exp
    huge = coder.decode_single(torch.tensor([[0.0, 0.0, 1e3, 0.0]]), proposal)
    assert_close(huge, torch.tensor([ref_decode([0.0, 0.0, 1e3, 0.0], [0.0, 0.0, 10.0, 10.0])]))


# ---------------------------------------------------------------------------------------------
# Matcher


def test_matcher_crafted_codes():
    iou = torch.tensor(
        [
            [0.9, 0.5, 0.49, 0.1, 0.3, 0.0],
            [0.9, 0.2, 0.3, 0.39, 0.3, 0.0],
        ]
    )
    matcher = det.Matcher(0.5, 0.4)
    # ties pick the first ground truth; IoU == high matches, == low is "between"
    assert matcher(iou.clone()).tolist() == [0, 0, -2, -1, -1, -1]
    assert det.Matcher(0.5, 0.3)(iou).tolist() == [0, 0, -2, -2, -2, -1]
    assert matcher(iou).tolist() == ref_matcher(iou, 0.5, 0.4, False)


def test_matcher_low_quality_matches():
    iou = torch.tensor(
        [
            [0.1, 0.3, 0.3, 0.0],  # best 0.3, tied between predictions 1 and 2: both kept
            [0.0, 0.2, 0.1, 0.05],  # best 0.2 is prediction 1, which belongs to gt 0 (0.3 > 0.2)
            [0.0, 0.0, 0.0, 0.0],  # all zero: every prediction is its best, and keeps its own match
        ]
    )
    plain = det.Matcher(0.7, 0.3)(iou)
    assert plain.tolist() == [-1, -2, -2, -1]
    low_quality = det.Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    assert low_quality.tolist() == ref_matcher(iou, 0.7, 0.3, True) == [0, 0, 0, 1]


@pytest.mark.parametrize("low_quality", [False, True])
def test_matcher_random_against_reference(low_quality):
    fresh_seed()
    for _ in range(5):
        gt, predictions = random_boxes(4, 50, 50), random_boxes(30, 50, 50)
        iou = ops.box_iou(gt, predictions)
        codes = det.Matcher(0.5, 0.2, low_quality)(iou)
        assert codes.dtype == torch.int64
        assert codes.tolist() == ref_matcher(iou, 0.5, 0.2, low_quality)


def test_matcher_bad_input():
    with pytest.raises(ValueError, match="low_threshold .* must not exceed high_threshold"):
        det.Matcher(0.3, 0.5)
    with pytest.raises(ValueError, match="no ground-truth boxes"):
        det.Matcher(0.5, 0.5)(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="no predictions"):
        det.Matcher(0.5, 0.5)(torch.zeros(2, 0))
    with pytest.raises(ValueError, match=r"Tensor\[M, N\]"):
        det.Matcher(0.5, 0.5)(torch.zeros(5))


# ---------------------------------------------------------------------------------------------
# BalancedPositiveNegativeSampler


@pytest.mark.parametrize(
    "positives, negatives, expected",
    [
        (100, 100, (16, 48)),  # enough of both: the positive fraction
        (5, 100, (5, 59)),  # few positives: negatives fill the batch
        (100, 10, (16, 10)),  # few negatives: positives stay capped
        (0, 3, (0, 3)),
    ],
)
def test_sampler_counts(positives, negatives, expected):
    fresh_seed()
    labels = torch.cat(
        [torch.randint(1, 4, (positives,)), torch.zeros(negatives, dtype=torch.int64), torch.full((7,), -1)]
    )
    labels = labels[torch.randperm(len(labels))]
    sampler = det.BalancedPositiveNegativeSampler(64, 0.25)
    (positive,), (negative,) = sampler([labels])
    assert positive.dtype == negative.dtype == torch.bool
    assert (int(positive.sum()), int(negative.sum())) == expected
    assert bool((labels[positive] >= 1).all()) and bool((labels[negative] == 0).all())
    assert not bool((positive & negative).any())


def test_sampler_reproducible_and_equal_to_reference():
    fresh_seed()
    labels = [torch.randint(-1, 3, (200,)), torch.randint(-1, 2, (50,)), torch.zeros(0, dtype=torch.int64)]
    sampler = det.BalancedPositiveNegativeSampler(32, 0.5)
    torch.manual_seed(7)
    positive, negative = sampler(labels)
    torch.manual_seed(7)
    again = sampler(labels)
    torch.manual_seed(7)
    for i, labels_in_image in enumerate(labels):
        ref_positive, ref_negative = ref_sample(labels_in_image, 32, 0.5)
        assert torch.equal(positive[i], again[0][i]) and torch.equal(negative[i], again[1][i])
        assert torch.nonzero(positive[i]).flatten().tolist() == sorted(ref_positive.tolist())
        assert torch.nonzero(negative[i]).flatten().tolist() == sorted(ref_negative.tolist())
    torch.manual_seed(8)
    assert not torch.equal(sampler(labels)[1][0], negative[0])


def test_sampler_bad_input():
    with pytest.raises(ValueError, match="batch_size_per_image"):
        det.BalancedPositiveNegativeSampler(0, 0.25)
    with pytest.raises(ValueError, match="positive_fraction"):
        det.BalancedPositiveNegativeSampler(8, 1.5)


# ---------------------------------------------------------------------------------------------
# DetectionTransform


def normalized(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=image.dtype)[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225], dtype=image.dtype)[:, None, None]
    return (image - mean) / std


def test_transform_resize_pad_and_box_scaling():
    fresh_seed()
    transform = det.DetectionTransform(min_size=120, max_size=1000).eval()
    images = [torch.rand(3, 60, 80), torch.rand(3, 50, 200)]
    boxes = [random_boxes(5, 60, 80), random_boxes(3, 50, 200)]
    proposals = [random_boxes(7, 60, 80), torch.zeros(0, 4)]
    targets = [
        {"boxes": b.clone(), "labels": torch.ones(len(b), dtype=torch.int64), "image_id": i}
        for i, b in enumerate(boxes)
    ]
    image_list, new_proposals, new_targets = transform(images, proposals, targets)

    # scale = min(120 / short side, 1000 / long side); sizes floor(side * scale)
    assert image_list.image_sizes == [(120, 160), (120, 480)]
    assert image_list.tensors.shape == (2, 3, 128, 480)  # padded up to multiples of 32
    for i, (image, (h, w)) in enumerate(zip(images, image_list.image_sizes)):
        expected = F.interpolate(normalized(image)[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        assert_close(image_list.tensors[i, :, :h, :w], expected)
        assert not image_list.tensors[i, :, h:].any() and not image_list.tensors[i, :, :, w:].any()
        ratio = torch.tensor([w / image.size(2), h / image.size(1)] * 2)
        assert_close(new_targets[i]["boxes"], boxes[i] * ratio)
        assert_close(new_proposals[i], proposals[i] * ratio)
        assert new_targets[i]["image_id"] == i
        assert torch.equal(targets[i]["boxes"], boxes[i]), "the input targets were modified"

    # postprocess maps boxes back to the original pixels
    detections = [{"boxes": t["boxes"].clone()} for t in new_targets]
    back = transform.postprocess(detections, image_list.image_sizes, [(60, 80), (50, 200)])
    for b, original in zip(back, boxes):
        assert_close(b["boxes"], original)


def test_transform_max_size_caps_and_same_size_is_untouched():
    fresh_seed()
    transform = det.DetectionTransform(min_size=100, max_size=150, size_divisible=1).eval()
    image_list, _, _ = transform([torch.rand(3, 50, 200)])
    assert image_list.image_sizes == [(37, 150)]  # scale min(100/50, 150/200) = 0.75
    image = torch.rand(3, 100, 120)
    image_list, _, _ = transform([image])
    assert image_list.image_sizes == [(100, 120)]
    assert torch.equal(image_list.tensors[0], normalized(image))


def test_transform_training_draws_min_size():
    fresh_seed()
    transform = det.DetectionTransform(min_size=(32, 48, 64), max_size=1000).train()
    images = [torch.rand(3, 40, 50) for _ in range(30)]
    torch.manual_seed(3)
    sizes = transform(images)[0].image_sizes
    assert {min(s) for s in sizes} == {32, 48, 64}
    torch.manual_seed(3)
    assert transform(images)[0].image_sizes == sizes
    assert {min(s) for s in transform.eval()(images)[0].image_sizes} == {64}


def test_transform_bad_input():
    transform = det.DetectionTransform(min_size=32, max_size=64)
    with pytest.raises(ValueError, match=r"images\[1\] has 1 channels"):
        transform([torch.rand(3, 32, 32), torch.rand(1, 32, 32)])
    with pytest.raises(ValueError, match=r"images\[0\] must be a Tensor\[C, H, W\], got \(1, 3, 32, 32\)"):
        transform([torch.rand(1, 3, 32, 32)])
    with pytest.raises(TypeError, match=r"floating point .* torch.uint8"):
        transform([torch.zeros(3, 32, 32, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="non-empty list"):
        transform([])
    with pytest.raises(ValueError, match="max_size"):
        det.DetectionTransform(min_size=100, max_size=50)


# ---------------------------------------------------------------------------------------------
# postprocess_detections on crafted head outputs


def run_postprocess(logits, deltas, proposals, sizes, **kwargs):
    return det.postprocess_detections(logits, deltas, proposals, sizes, det.BoxCoder(WEIGHTS), **kwargs)


def test_postprocess_random_batch_against_reference():
    fresh_seed()
    sizes = [(60, 70), (40, 90), (50, 50)]
    proposals = [random_boxes(30, *sizes[0]), torch.zeros(0, 4), random_boxes(45, *sizes[2])]
    logits = torch.randn(75, 5, dtype=torch.float64) * 2
    deltas = torch.randn(75, 20, dtype=torch.float64)
    proposals = [p.double() for p in proposals]
    actual = run_postprocess(logits, deltas, proposals, sizes, score_thresh=0.1, nms_thresh=0.4)
    rows = [slice(0, 30), slice(30, 30), slice(30, 75)]
    expected = [
        ref_postprocess(logits[r], deltas[r], p, s, score_thresh=0.1, nms_thresh=0.4)
        for r, p, s in zip(rows, proposals, sizes)
    ]
    assert_same_detections(actual, expected)
    assert actual[1]["boxes"].shape == (0, 4)


def test_postprocess_ties_all_background_threshold_and_top_k():
    fresh_seed()
    # ties: equal logits for every class; identical boxes within a class suppress each other,
    # and the survivor is the lowest RoI (NMS visits equal scores in index order)
    proposals = [torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3, dtype=torch.float64)]
    logits = torch.zeros(3, 3, dtype=torch.float64)
    deltas = torch.zeros(3, 12, dtype=torch.float64)
    (out,) = run_postprocess(logits, deltas, proposals, [(20, 20)])
    assert out["labels"].tolist() == [1, 2]
    assert_same_detections([out], [ref_postprocess(logits, deltas, proposals[0], (20, 20))])

    # all background: nothing survives, with the right shapes and dtypes
    logits = torch.tensor([[10.0, -10.0, -10.0]] * 3, dtype=torch.float64)
    (out,) = run_postprocess(logits, deltas, proposals, [(20, 20)])
    assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,) and out["labels"].dtype == torch.int64

    # the score threshold is strict: a score equal to it is dropped, one just above kept
    logits = torch.tensor([[0.0, -3.0], [0.0, -2.999]], dtype=torch.float64)
    (out,) = run_postprocess(
        logits,
        torch.zeros(2, 4, dtype=torch.float64),
        [torch.tensor([[0.0, 0.0, 5.0, 5.0], [10.0, 10.0, 15.0, 15.0]], dtype=torch.float64)],
        [(20, 20)],
        score_thresh=float(F.softmax(logits[0], 0)[1]),
    )
    assert out["boxes"].tolist() == [[10.0, 10.0, 15.0, 15.0]]

    # more than 100 candidates that do not overlap: the 100 best, by decreasing score
    grid = torch.arange(12, dtype=torch.float64) * 10
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")
    boxes = torch.stack([xs, ys, xs + 8, ys + 8], -1).reshape(-1, 4)  # 144 disjoint boxes
    logits = torch.stack([torch.zeros(288), torch.randperm(288).double() / 10], 1).double()
    outputs = run_postprocess(logits, torch.zeros(288, 8, dtype=torch.float64), [boxes, boxes], [(120, 120)] * 2)
    for out, rows in zip(outputs, (slice(0, 144), slice(144, 288))):  # 100 per image, not for the batch
        assert len(out["scores"]) == 100
        assert_close(out["scores"], F.softmax(logits[rows], 1)[:, 1].sort(descending=True).values[:100])

    # a box clipped to nothing (outside the image) is removed as small
    (out,) = run_postprocess(
        torch.tensor([[0.0, 5.0]], dtype=torch.float64),
        torch.zeros(1, 8, dtype=torch.float64),
        [torch.tensor([[30.0, 30.0, 40.0, 40.0]], dtype=torch.float64)],
        [(20, 20)],
    )
    assert len(out["boxes"]) == 0


def test_postprocess_class_agnostic_boxes():
    fresh_seed()
    proposals = [random_boxes(20, 50, 50).double()]
    logits, deltas = torch.randn(20, 4, dtype=torch.float64), torch.randn(20, 4, dtype=torch.float64)
    actual = run_postprocess(logits, deltas, proposals, [(50, 50)])
    assert_same_detections(actual, [ref_postprocess(logits, deltas, proposals[0], (50, 50))])


# ---------------------------------------------------------------------------------------------
# Proposals


def test_sliding_windows_against_reference():
    generator = det.SlidingWindowProposals(sizes=(8, 20), aspect_ratios=(0.5, 1.0, 2.0), stride=10)
    height, width = 25, 33
    expected = set()
    for i in range(math.ceil(height / 10)):
        for j in range(math.ceil(width / 10)):
            cx, cy = (j + 0.5) * 10, (i + 0.5) * 10
            for ratio in (0.5, 1.0, 2.0):
                for size in (8, 20):
                    w, h = size / math.sqrt(ratio), size * math.sqrt(ratio)
                    box = (
                        min(max(cx - w / 2, 0), width),
                        min(max(cy - h / 2, 0), height),
                        min(max(cx + w / 2, 0), width),
                        min(max(cy + h / 2, 0), height),
                    )
                    if box[2] - box[0] >= 1 and box[3] - box[1] >= 1:
                        expected.add(tuple(round(v, 4) for v in box))
    (windows,) = generator([(height, width)])
    assert windows.dtype == torch.float32
    assert {tuple(round(v, 4) for v in row) for row in windows.tolist()} == expected
    assert len(windows) == len(expected)  # each window once

    # a grid of cells when the windows are square and as large as the stride
    (cells,) = det.SlidingWindowProposals(sizes=(16,), aspect_ratios=(1.0,), stride=16)([torch.rand(3, 32, 48)])
    assert sorted(map(tuple, cells.tolist())) == [
        (float(x), float(y), float(x + 16), float(y + 16)) for x in (0, 16, 32) for y in (0, 16)
    ]


def test_top_by_ground_truth_iou():
    fresh_seed()
    proposals = [random_boxes(40, 64, 64), random_boxes(10, 64, 64)]
    gt = [random_boxes(3, 64, 64), torch.zeros(0, 4)]
    kept = det.top_by_ground_truth_iou(proposals, gt, 15)
    best = ref_iou(gt[0], proposals[0]).max(0).values
    expected = sorted(range(40), key=lambda k: (-best[k], k))[:15]
    assert torch.equal(kept[0], proposals[0][expected])
    assert torch.equal(kept[1], proposals[1])  # no ground truth: the first ones, all 10 of them


def test_proposals_bad_input():
    with pytest.raises(ValueError, match="sizes"):
        det.SlidingWindowProposals(sizes=(0,))
    with pytest.raises(ValueError, match="stride"):
        det.SlidingWindowProposals(stride=0)
    with pytest.raises(ValueError, match=r"images\[0\]"):
        det.SlidingWindowProposals()([torch.rand(32, 32)])


# ---------------------------------------------------------------------------------------------
# The whole detector: the batch against a per-image loop of the same layers


class ToyBackbone(nn.Module):
    """Three stride-2 convolutions without normalisation, so that images of a batch do not
    interact (a per-image loop can reproduce the batch)."""

    out_channels = 6
    stride = 8

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(8, 6, 3, 2, 1),
            nn.ReLU(),
        )

    def forward(self, x):
        return self.body(x)


def toy_model(roi_op="align", class_specific_boxes=True, **kwargs) -> det.FastRCNN:
    settings = dict(
        roi_op=roi_op,
        class_specific_boxes=class_specific_boxes,
        min_size=64,
        max_size=128,
        representation_size=32,
        box_fg_iou_thresh=0.5,
        box_bg_iou_thresh=0.3,
        box_batch_size_per_image=16,
        box_positive_fraction=0.25,
    )
    settings.update(kwargs)
    return det.FastRCNN(ToyBackbone(), 4, **settings).double()


def toy_batch(with_targets=True):
    """Three images of different sizes; the last one without proposals."""
    sizes = [(64, 64), (48, 80), (56, 40)]
    images = [torch.rand(3, h, w, dtype=torch.float64) for h, w in sizes]
    proposals = [random_boxes(40, h, w).double() for h, w in sizes[:2]] + [torch.zeros(0, 4, dtype=torch.float64)]
    targets = [
        {"boxes": random_boxes(3, *sizes[0]).double(), "labels": torch.tensor([1, 2, 3])},
        {"boxes": random_boxes(1, *sizes[1]).double(), "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4, dtype=torch.float64), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    # proposals near the ground truth, so that some RoIs are positive and some ignored
    for p, t in zip(proposals[:2], targets[:2]):
        p[:8] = t["boxes"][0] + torch.randn(8, 4, dtype=torch.float64) * torch.arange(1, 9)[:, None]
    return images, proposals, (targets if with_targets else None)


def roi_features(model, features, boxes):
    output_size = model.box_roi_pool.output_size
    scale = model.box_roi_pool.spatial_scale
    if isinstance(model.box_roi_pool, det.fast_rcnn.RoIPool):
        return ops.roi_pool(features, [boxes], output_size, scale)
    return ops.roi_align(features, [boxes], output_size, scale, model.box_roi_pool.sampling_ratio)


def loop_detections(model, images, proposals):
    image_list, proposals, _ = model.transform(images, proposals)
    results = []
    for i, image in enumerate(images):
        features = model.backbone(image_list.tensors[i : i + 1])
        logits, deltas = model.box_predictor(model.box_head(roi_features(model, features, proposals[i])))
        result = ref_postprocess(logits, deltas, proposals[i], image_list.image_sizes[i])
        (h, w), (h0, w0) = image_list.image_sizes[i], image.shape[-2:]
        result["boxes"] = result["boxes"] * torch.tensor([w0 / w, h0 / h] * 2, dtype=torch.float64)
        results.append(result)
    return results


def loop_losses(model, images, proposals, targets):
    """torchvision's training step written per image: append the ground truth, match, sample
    (same draws), pool, run the head; the losses over all sampled RoIs of the batch, and how
    many RoIs were ignored (IoU between the thresholds)."""
    image_list, proposals, targets = model.transform(images, proposals, targets)
    logits, deltas, labels, regression_targets = [], [], [], []
    ignored = 0
    for i in range(len(images)):
        gt, gt_labels = targets[i]["boxes"], targets[i]["labels"]
        rois = torch.cat([proposals[i], gt])
        if len(gt):
            codes = torch.tensor(ref_matcher(ref_iou(gt, rois), 0.5, 0.3, False))
            roi_labels = torch.where(codes >= 0, gt_labels[codes.clamp(min=0)], torch.where(codes == -1, 0, -1))
            ignored += int((codes == -2).sum())
            matched = gt[codes.clamp(min=0)]
        else:
            roi_labels, matched = torch.zeros(len(rois), dtype=torch.int64), rois
        positive, negative = ref_sample(roi_labels, 16, 0.25)
        sampled = torch.cat([positive, negative]).sort().values
        features = model.backbone(image_list.tensors[i : i + 1])
        image_logits, image_deltas = model.box_predictor(model.box_head(roi_features(model, features, rois[sampled])))
        logits.append(image_logits)
        deltas.append(image_deltas)
        labels.append(roi_labels[sampled])
        regression_targets.append(ref_encode(matched[sampled], rois[sampled]))
    logits, deltas, labels = torch.cat(logits), torch.cat(deltas), torch.cat(labels)
    regression_targets = torch.cat(regression_targets)
    total = len(labels)
    positive = labels > 0
    deltas = deltas.reshape(total, -1, 4)
    classes = labels[positive] if deltas.size(1) > 1 else torch.zeros_like(labels[positive])
    return {
        "loss_classifier": F.cross_entropy(logits, labels, reduction="sum") / total,
        "loss_box_reg": F.smooth_l1_loss(
            deltas[positive, classes], regression_targets[positive], beta=1 / 9, reduction="sum"
        )
        / total,
    }, ignored


@pytest.mark.parametrize("roi_op", ["align", "pool"])
@pytest.mark.parametrize("class_specific_boxes", [True, False])
def test_detector_eval_equals_per_image_loop(roi_op, class_specific_boxes):
    fresh_seed()
    model = toy_model(roi_op, class_specific_boxes).eval()
    images, proposals, _ = toy_batch(with_targets=False)
    with torch.no_grad():
        detections = model(images, proposals)
        assert_same_detections(detections, loop_detections(model, images, proposals))
    assert detections[2]["boxes"].shape == (0, 4)
    assert any(len(d["boxes"]) for d in detections)


@pytest.mark.parametrize("roi_op", ["align", "pool"])
@pytest.mark.parametrize("class_specific_boxes", [True, False])
def test_detector_losses_equal_per_image_loop(roi_op, class_specific_boxes):
    fresh_seed()
    model = toy_model(roi_op, class_specific_boxes).train()
    images, proposals, targets = toy_batch()
    torch.manual_seed(11)
    losses = model(images, proposals, targets)
    torch.manual_seed(11)
    expected, ignored = loop_losses(model, images, proposals, targets)
    assert ignored > 0
    assert set(losses) == {"loss_classifier", "loss_box_reg"}
    for name in losses:
        assert_close(losses[name], expected[name])
    assert float(losses["loss_box_reg"].detach()) > 0  # positives were sampled and regressed


def test_select_training_samples_adds_ground_truth_and_samples():
    fresh_seed()
    model = toy_model(box_batch_size_per_image=8, box_positive_fraction=0.5)
    gt = torch.tensor([[10.0, 10.0, 30.0, 30.0]], dtype=torch.float64)
    far = torch.tensor([[40.0, 40.0, 60.0, 60.0]] * 20, dtype=torch.float64)
    rois, labels, regression_targets = model.select_training_samples(
        [far], [{"boxes": gt, "labels": torch.tensor([3])}]
    )
    # the only positive is the ground-truth box itself, whose regression target is zero
    assert labels[0].tolist().count(3) == 1 and labels[0].tolist().count(0) == 7
    assert torch.equal(rois[0][labels[0] == 3], gt)
    assert_close(regression_targets[0][labels[0] == 3], torch.zeros(1, 4, dtype=torch.float64))


def test_gradients_reach_the_backbone():
    fresh_seed()
    model = toy_model().train()
    losses = model(*toy_batch())
    sum(losses.values()).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), f"no gradient for {name}"


def test_eval_is_deterministic():
    fresh_seed()
    model = toy_model(dropout=0.3).eval()
    images, proposals, _ = toy_batch(with_targets=False)
    with torch.no_grad():
        first, second = model(images, proposals), model.eval()(images, proposals)
    for a, b in zip(first, second):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(a[key], b[key])


def test_empty_proposals():
    fresh_seed()
    model = toy_model().eval()
    images = [torch.rand(3, 64, 64, dtype=torch.float64), torch.rand(3, 40, 50, dtype=torch.float64)]
    with torch.no_grad():
        detections = model(images, [torch.zeros(0, 4, dtype=torch.float64)] * 2)
    for d in detections:
        assert d["boxes"].shape == (0, 4) and d["scores"].shape == (0,) and d["labels"].dtype == torch.int64
    # in training, an image without proposals still learns from its ground truth, and one
    # without ground truth from its proposals (as background)
    model.train()
    losses = model(
        images,
        [torch.zeros(0, 4, dtype=torch.float64), random_boxes(5, 40, 50).double()],
        [
            {"boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]], dtype=torch.float64), "labels": torch.tensor([1])},
            {"boxes": torch.zeros(0, 4, dtype=torch.float64), "labels": torch.zeros(0, dtype=torch.int64)},
        ],
    )
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="no sampled RoIs"):
        model(
            images[:1],
            [torch.zeros(0, 4, dtype=torch.float64)],
            [{"boxes": torch.zeros(0, 4, dtype=torch.float64), "labels": torch.zeros(0, dtype=torch.int64)}],
        )


def test_bad_input():
    model = toy_model().train()
    images, proposals, targets = toy_batch()
    with pytest.raises(ValueError, match="targets are required in training mode"):
        model(images, proposals)
    with pytest.raises(ValueError, match=r"images\[1\] has 1 channels"):
        model([images[0], images[1][:1], images[2]], proposals, targets)
    with pytest.raises(ValueError, match=r"proposals\[1\] must be a Tensor\[L, 4\] .*got \(40, 3\)"):
        model(images, [proposals[0], proposals[1][:, :3], proposals[2]], targets)
    with pytest.raises(ValueError, match="3 images but 2 proposal tensors"):
        model(images, proposals[:2], targets)
    for label in (4, -1):
        bad = [dict(t) for t in targets]
        bad[1]["labels"] = torch.tensor([label])
        with pytest.raises(ValueError, match=rf"targets\[1\]\['labels'\] must lie in \[0, 4\).*\[{label}, {label}\]"):
            model(images, proposals, bad)
    bad = [dict(t) for t in targets]
    bad[0]["boxes"] = bad[0]["boxes"].clone()
    bad[0]["boxes"][2, 2] = bad[0]["boxes"][2, 0]
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]\[2\] .* no positive width and height"):
        model(images, proposals, bad)
    bad = [dict(t) for t in targets]
    bad[0]["labels"] = bad[0]["labels"].float()
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must be an integer Tensor\[3\]"):
        model(images, proposals, bad)
    with pytest.raises(ValueError, match="targets must be a list of 3 dicts"):
        model(images, proposals, targets[:1])
    with pytest.raises(ValueError, match="num_classes counts the background"):
        det.FastRCNN(ToyBackbone(), 1)
    with pytest.raises(ValueError, match="roi_op must be 'align' or 'pool'"):
        det.FastRCNN(ToyBackbone(), 3, roi_op="max")
    with pytest.raises(ValueError, match=r"backbone \(ReLU\) needs an int attribute out_channels"):
        det.FastRCNN(nn.ReLU(), 3)
    backbone = nn.Conv2d(3, 4, 1)  # out_channels 4, but its stride is a convolution's pair
    with pytest.raises(ValueError, match=r"positive number as its stride attribute \(got \(1, 1\)\); or pass"):
        det.FastRCNN(backbone, 3)
    assert det.FastRCNN(backbone, 3, spatial_scale=1.0).box_roi_pool.spatial_scale == 1.0


# ---------------------------------------------------------------------------------------------
# ResNet builders: structure, names, weights


def test_resnet50_builder_is_the_course_model():
    with torch.device("meta"):  # the structure only: no memory for its 100M-parameter fc6
        model = det.fastrcnn_resnet50(5)
    assert (model.backbone.out_channels, model.backbone.stride) == (2048, 32)
    assert isinstance(model.box_roi_pool, det.fast_rcnn.RoIAlign)
    assert model.box_roi_pool.output_size == (7, 7)
    assert model.box_roi_pool.spatial_scale == 1 / 32 and model.box_roi_pool.sampling_ratio == 2
    assert model.box_head.fc6.in_features == 2048 * 49 and model.box_head.fc6.out_features == 1024
    assert model.box_predictor.bbox_pred.out_features == 20
    assert not any(name.startswith(("backbone.fc", "backbone.avgpool")) for name, _ in model.named_modules())


def test_state_dict_names_and_torchvision_resnet_weights(tmp_path):
    fresh_seed()
    resnet = reference_resnet("resnet18")  # torch.nn, torchvision's module names
    path = tmp_path / "resnet18.pt"
    torch.save(resnet.state_dict(), path)
    model = det.fastrcnn_resnet18(3, weights_backbone=path, representation_size=64)
    state = model.state_dict()
    head = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("backbone.")}
    assert head == {
        "box_head.fc6.weight": (64, 512 * 49),
        "box_head.fc6.bias": (64,),
        "box_head.fc7.weight": (64, 64),
        "box_head.fc7.bias": (64,),
        "box_predictor.cls_score.weight": (3, 64),
        "box_predictor.cls_score.bias": (3,),
        "box_predictor.bbox_pred.weight": (12, 64),
        "box_predictor.bbox_pred.bias": (12,),
    }
    without_fc = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    assert {k[len("backbone.") :] for k in state if k.startswith("backbone.")} == set(without_fc)
    for key, value in without_fc.items():
        assert torch.equal(state["backbone." + key], value), key
    model.backbone.load_state_dict(without_fc, strict=True)

    # the backbone computes the ResNet trunk: stride 32, 512 channels
    resnet.eval(), model.eval()
    x = torch.rand(2, 3, 96, 64)
    with torch.no_grad():
        trunk = resnet.layer4(
            resnet.layer3(resnet.layer2(resnet.layer1(resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x)))))))
        )
        assert_close(model.backbone(x), trunk, rtol=1e-4, atol=1e-4)
    assert trunk.shape == (2, 512, 3, 2)

    # a whole-model checkpoint loads back through weights=
    whole = tmp_path / "fastrcnn.pt"
    torch.save(state, whole)
    again = det.fastrcnn_resnet18(3, weights=whole, representation_size=64)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="does not match the model"):
        det.fastrcnn_resnet18(4, weights=whole, representation_size=64)


def test_resnet_backbone_stages():
    fresh_seed()
    from fastdl import models

    backbone = det.ResNetBackbone(models.resnet18(), num_stages=3)
    assert (backbone.out_channels, backbone.stride) == (256, 16)
    assert backbone(torch.rand(1, 3, 64, 48)).shape == (1, 256, 4, 3)
    small = det.ResNetBackbone(models.resnet50(small_input=True), num_stages=2)
    assert (small.out_channels, small.stride) == (512, 2)
    with pytest.raises(TypeError, match="fastdl.models.ResNet"):
        det.ResNetBackbone(nn.Conv2d(3, 3, 1))


# ---------------------------------------------------------------------------------------------
# Training moves the losses


def test_a_few_sgd_steps_reduce_the_loss():
    fresh_seed()
    model = det.fastrcnn_resnet18(
        3, min_size=64, max_size=64, representation_size=64, box_batch_size_per_image=256
    ).train()
    images = [torch.rand(3, 64, 64) * 0.3 for _ in range(2)]
    targets = []
    for image, (box, label) in zip(images, [((8, 8, 40, 30), 1), ((20, 24, 56, 60), 2)]):
        x1, y1, x2, y2 = box
        image[label - 1, y1:y2, x1:x2] = 1.0  # a red or a green rectangle
        targets.append({"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([label])})
    proposals = det.SlidingWindowProposals(sizes=(16, 32), stride=16)(images)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(8):
        loss = sum(model(images, proposals, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.6 * history[0], history


# ---------------------------------------------------------------------------------------------
# torchvision itself, where it can be imported


@needs_torchvision
def test_pieces_match_torchvision():
    fresh_seed()
    from torchvision.models.detection import _utils as tv_utils
    from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    iou = ops.box_iou(random_boxes(5, 50, 50), random_boxes(40, 50, 50))
    for low_quality in (False, True):
        assert torch.equal(
            det.Matcher(0.5, 0.3, low_quality)(iou.clone()), tv_utils.Matcher(0.5, 0.3, low_quality)(iou.clone())
        )

    labels = [torch.randint(-1, 3, (300,)), torch.randint(-1, 2, (40,))]
    torch.manual_seed(5)
    ours = det.BalancedPositiveNegativeSampler(64, 0.25)(labels)
    torch.manual_seed(5)
    theirs = tv_utils.BalancedPositiveNegativeSampler(64, 0.25)(labels)
    for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1]):
        assert torch.equal(a, b.bool())

    images = [torch.rand(3, 60, 85), torch.rand(3, 71, 50)]
    boxes = [
        {"boxes": random_boxes(4, 60, 85), "labels": torch.ones(4, dtype=torch.int64)},
        {"boxes": random_boxes(2, 71, 50), "labels": torch.ones(2, dtype=torch.int64)},
    ]
    ours = det.DetectionTransform(100, 160).eval()(images, None, boxes)
    theirs = GeneralizedRCNNTransform(100, 160, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).eval()(images, boxes)
    assert ours[0].image_sizes == [tuple(s) for s in theirs[0].image_sizes]
    torch.testing.assert_close(ours[0].tensors, theirs[0].tensors)
    for a, b in zip(ours[2], theirs[1]):
        torch.testing.assert_close(a["boxes"], b["boxes"])

    logits, deltas = torch.randn(30, 4), torch.randn(30, 16)
    roi_labels = [torch.randint(0, 4, (12,)), torch.randint(0, 4, (18,))]
    targets = [torch.randn(12, 4), torch.randn(18, 4)]
    ours = det.fastrcnn_loss(logits, deltas, roi_labels, targets)
    for a, b in zip(ours, fastrcnn_loss(logits, deltas, roi_labels, targets)):
        torch.testing.assert_close(a, b)

    heads = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100)
    proposals = [random_boxes(12, 60, 60), random_boxes(18, 50, 70)]
    sizes = [(60, 60), (50, 70)]
    tv_boxes, tv_scores, tv_labels = heads.postprocess_detections(logits, deltas, proposals, sizes)
    ours = det.postprocess_detections(logits, deltas, proposals, sizes, det.BoxCoder(WEIGHTS))
    for detection, b, s, lab in zip(ours, tv_boxes, tv_scores, tv_labels):
        torch.testing.assert_close(detection["boxes"], b)
        torch.testing.assert_close(detection["scores"], s)
        assert torch.equal(detection["labels"], lab)
