"""nms / batched_nms against a simple greedy reference (``TestNms``, ``TestBatchedNms``), plus the
wrapper's options (strategy, score threshold, max output) and CUDA against CPU."""

from __future__ import annotations

import pytest
import torch

import fastdl.ops
from fastdl.ops import _library
from harness import DEVICES, composite_serves_mps, fresh_seed, needs_cuda, non_contiguous
from optester import OpTester, Sample, dtype_name


def iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else float("nan")


def nms_reference(boxes, scores, threshold, classes=None) -> list[int]:
    """Greedy NMS in decreasing score, ties by index; boxes of other classes never suppress."""
    b, s = boxes.double().cpu().tolist(), scores.double().cpu().tolist()
    c = classes.cpu().tolist() if classes is not None else [0] * len(b)
    order = sorted(range(len(b)), key=lambda i: (-s[i], i))
    keep: list[int] = []
    for i in order:
        if all(c[i] != c[k] or not iou(b[i], b[k]) > threshold for k in keep):
            keep.append(i)
    return keep


def random_boxes(n, device="cpu", dtype=torch.float32, clustered=True):
    """Boxes in clusters (so that many overlap), with tied scores and exact duplicates."""
    centers = torch.rand(max(n // 8, 1), 2, dtype=torch.float64) * 200
    xy = centers[torch.randint(0, len(centers), (n,))] + torch.randn(n, 2, dtype=torch.float64) * (
        8 if clustered else 80
    )
    wh = torch.rand(n, 2, dtype=torch.float64) * 40 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.round(torch.rand(n, dtype=torch.float64) * 20) / 20  # many ties
    if n >= 4:
        boxes[1] = boxes[0]  # duplicate box
        scores[3] = scores[2]
    return boxes.to(dtype=dtype, device=device), scores.to(dtype=dtype, device=device)


class NmsTester(OpTester):
    """What the two NMS ops share: indices compared exactly, and autocast's float32 rule."""

    autocast_dtype = torch.int64  # the indices, whatever the boxes' dtype

    def assert_matches(self, sample, result, expected):
        assert result.dtype == torch.long and result.device.type == sample.device
        assert result.tolist() == expected.tolist()

    def test_torch_compile(self):
        # the number of kept boxes depends on the data
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            super().test_torch_compile()


class TestNms(NmsTester):
    op = torch.ops.fastdl.nms.default

    def samples(self):
        for device in DEVICES:
            for dtype in (torch.float32, torch.float64):
                for threshold in (0.2, 0.5, 0.8):
                    for n in (0, 1, 2, 37, 300):
                        boxes, scores = random_boxes(n, device, dtype)
                        yield Sample(
                            (boxes, scores, threshold), name=f"{device}-{dtype_name(dtype)}-iou{threshold}-{n}"
                        )
            boxes, scores = random_boxes(50, device)
            yield Sample(
                (non_contiguous(boxes), non_contiguous(scores[:, None])[:, 0], 0.5), name=f"{device}-non_contiguous"
            )

    def reference(self, boxes, scores, threshold):
        return torch.tensor(nms_reference(boxes, scores, threshold), dtype=torch.long)

    def autocast_sample(self):
        boxes, scores = random_boxes(100)
        return Sample((boxes.bfloat16(), scores.bfloat16(), 0.5))

    def bad_inputs(self):
        boxes, scores = random_boxes(10)
        cases = [
            ((boxes[:, :3], scores, 0.5), r"shape \[N, 4\]"),
            ((boxes, scores[:5], 0.5), r"scores of shape \[10\]"),
            ((boxes, scores.double(), 0.5), "dtype"),
            ((boxes, scores, -0.1), r"iou_threshold must lie in \[0, 1\]"),
            ((boxes, scores, 1.5), r"iou_threshold must lie in \[0, 1\]"),
            ((torch.tensor([[0.0, 0, float("nan"), 1]]), torch.ones(1), 0.5), "NaN or infinite"),
            ((torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([float("inf")]), 0.5), "scores contain NaN"),
            ((torch.tensor([[5.0, 0, 1, 1]]), torch.ones(1), 0.5), "x1 <= x2"),
        ]
        return [(args, {}, RuntimeError, message) for args, message in cases]


class TestBatchedNms(NmsTester):
    op = torch.ops.fastdl.batched_nms.default

    def samples(self):
        for device in DEVICES:
            for n, classes in ((0, 1), (1, 1), (200, 1), (500, 7), (1000, 80)):
                boxes, scores = random_boxes(n, device)
                idxs = torch.randint(0, classes, (n,), device=device)
                yield Sample((boxes, scores, idxs, 0.5), name=f"{device}-{n}-classes{classes}")
            boxes, scores = random_boxes(800, device, torch.float64)
            idxs = torch.randint(-3, 40, (800,), device=device)  # any integer ids, negative included
            yield Sample((boxes, scores, idxs, 0.4), name=f"{device}-negative_ids")

    def reference(self, boxes, scores, idxs, threshold):
        return torch.tensor(nms_reference(boxes, scores, threshold, idxs), dtype=torch.long)

    def autocast_sample(self):
        boxes, scores = random_boxes(100)
        return Sample((boxes.bfloat16(), scores.bfloat16(), torch.randint(0, 3, (100,)), 0.5))

    def bad_inputs(self):
        boxes, scores = random_boxes(10)
        return [
            ((boxes, scores, torch.zeros(10), 0.5), {}, RuntimeError, "idxs"),
            ((boxes, scores, torch.zeros(3, dtype=torch.long), 0.5), {}, RuntimeError, r"idxs of shape \[10\]"),
        ]


def test_hand_computed_case():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.9])
    # IoU(box0, box1) = 81 / 119 = 0.68; box3 duplicates box0 with an equal score (lower index wins)
    assert fastdl.ops.nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert fastdl.ops.nms(boxes, scores, 0.7).tolist() == [0, 1, 2]
    assert fastdl.ops.nms(boxes, scores, 1.0).tolist() == [0, 3, 1, 2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", ["native", "offset"])
@pytest.mark.parametrize("n,classes", [(0, 1), (1, 1), (200, 1), (500, 7), (1000, 80)])
def test_batched_nms_wrapper_matches_per_class_reference(device, strategy, n, classes):
    fresh_seed()
    boxes, scores = random_boxes(n, device)
    idxs = torch.randint(0, classes, (n,), device=device)
    keep = fastdl.ops.batched_nms(boxes, scores, idxs, 0.5, strategy=strategy)
    assert keep.tolist() == nms_reference(boxes, scores, 0.5, idxs)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_nms_strategies_agree_and_composite(device):
    fresh_seed()
    boxes, scores = random_boxes(800, device, torch.float64)
    idxs = torch.randint(-3, 40, (800,), device=device)  # any integer ids, negative included
    native = fastdl.ops.batched_nms(boxes, scores, idxs, 0.4)
    assert torch.equal(native, fastdl.ops.batched_nms(boxes, scores, idxs, 0.4, strategy="offset"))
    assert torch.equal(native, _library.composite("batched_nms")(boxes, scores, idxs, 0.4))


def test_score_threshold_and_max_output():
    fresh_seed()
    boxes, scores = random_boxes(300)
    full = nms_reference(boxes, scores, 0.5)
    assert fastdl.ops.nms(boxes, scores, 0.5, max_output=5).tolist() == full[:5]
    mask = scores >= 0.5
    idx = torch.nonzero(mask).flatten()
    expected = [idx[i].item() for i in nms_reference(boxes[mask], scores[mask], 0.5)]
    assert fastdl.ops.nms(boxes, scores, 0.5, score_threshold=0.5).tolist() == expected
    classes = torch.randint(0, 4, (300,))
    got = fastdl.ops.batched_nms(boxes, scores, classes, 0.5, score_threshold=0.5, max_output=7)
    expected = [idx[i].item() for i in nms_reference(boxes[mask], scores[mask], 0.5, classes[mask])][:7]
    assert got.tolist() == expected


def test_wrapper_under_torch_compile():
    fresh_seed()
    boxes, scores = random_boxes(100)
    compiled = torch.compile(lambda b, s: b[fastdl.ops.nms(b, s, 0.5)] * 2, fullgraph=True)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        result = compiled(boxes, scores)
    torch.testing.assert_close(result, boxes[fastdl.ops.nms(boxes, scores, 0.5)] * 2)


def test_composite_serves_mps():
    assert composite_serves_mps("nms") and composite_serves_mps("batched_nms")


def test_batched_nms_rejects_an_unknown_strategy():
    boxes, scores = random_boxes(10)
    with pytest.raises(ValueError, match="strategy"):
        fastdl.ops.batched_nms(boxes, scores, torch.zeros(10, dtype=torch.long), 0.5, strategy="fast")


@needs_cuda
@pytest.mark.parametrize("n", [63, 64, 65, 5000])
def test_cuda_matches_cpu(n):
    fresh_seed()
    boxes, scores = random_boxes(n)
    assert torch.equal(fastdl.ops.nms(boxes.cuda(), scores.cuda(), 0.5).cpu(), fastdl.ops.nms(boxes, scores, 0.5))
    idxs = torch.randint(0, 20, (n,))
    assert torch.equal(
        fastdl.ops.batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.5).cpu(),
        fastdl.ops.batched_nms(boxes, scores, idxs, 0.5),
    )
