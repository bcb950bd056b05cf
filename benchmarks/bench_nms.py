"""nms and batched_nms against eager PyTorch (and torchvision when it imports).

Baselines: "eager" is the greedy loop over a precomputed IoU matrix (fastdl's plain-PyTorch
composite); "python-loop" is the per-kept-box loop found in course notes (each kept box's IoU
with the remaining boxes, then filter); for batched NMS, "per-class-eager" runs the eager NMS
once per class.
"""

from __future__ import annotations

import pytest
import torch

import fastdl.ops
from fastdl.ops._library import composite

from ._common import record, sync, torchvision_ops

# name: (number of boxes, number of classes or 0 for plain nms, quick?)
CASES = {
    "random-5k": (5000, 0, False),
    "random-1k": (1000, 0, True),
    "80cls-20k": (20000, 80, False),
    "80cls-4k": (4000, 80, True),
}


def make_inputs(case: str, device: str):
    n, classes, _ = CASES[case]
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(n, 2, generator=gen) * 1000
    wh = torch.rand(n, 2, generator=gen) * 100 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=gen)
    idxs = torch.randint(0, max(classes, 1), (n,), generator=gen)
    return boxes.to(device), scores.to(device), idxs.to(device)


def nms_python_loop(boxes, scores, threshold):
    """The course-notes NMS: take the best remaining box, drop its overlaps, repeat."""
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    order = scores.argsort(descending=True)
    keep = []
    while order.numel() > 0:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest])).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest])).clamp(min=0)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= threshold]
    return torch.stack(keep) if keep else order


def batched_nms_per_class(boxes, scores, idxs, threshold):
    keep = []
    for c in torch.unique(idxs):
        members = torch.nonzero(idxs == c).flatten()
        keep.append(members[composite("nms")(boxes[members], scores[members], threshold)])
    keep = torch.cat(keep)
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


NMS_IMPLS = {
    "fastdl": lambda b, s, i, t: fastdl.ops.nms(b, s, t),
    "eager": lambda b, s, i, t: composite("nms")(b, s, t),
    "python-loop": lambda b, s, i, t: nms_python_loop(b, s, t),
}
BATCHED_IMPLS = {
    "fastdl": lambda b, s, i, t: fastdl.ops.batched_nms(b, s, i, t),
    "per-class-eager": batched_nms_per_class,
}
if (tv_ops := torchvision_ops()) is not None:
    NMS_IMPLS["torchvision"] = lambda b, s, i, t: tv_ops.nms(b, s, t)
    BATCHED_IMPLS["torchvision"] = lambda b, s, i, t: tv_ops.batched_nms(b, s, i, t)


def _params():
    for name, (_, classes, quick) in CASES.items():
        for impl in BATCHED_IMPLS if classes else NMS_IMPLS:
            yield pytest.param(name, impl, marks=[pytest.mark.quick] if quick else [], id=f"{name}-{impl}")


@pytest.mark.parametrize("case,impl", list(_params()))
def test_nms(benchmark, case, impl, device):
    boxes, scores, idxs = make_inputs(case, device)
    classes = CASES[case][1]
    fn = (BATCHED_IMPLS if classes else NMS_IMPLS)[impl]
    reference = fastdl.ops.batched_nms(boxes, scores, idxs, 0.5) if classes else fastdl.ops.nms(boxes, scores, 0.5)

    def run():
        out = fn(boxes, scores, idxs, 0.5)
        sync(device)
        return out

    kept = benchmark(run)
    # error column: number of kept indices that differ from fastdl's answer (0 = identical)
    same = kept.numel() == reference.numel() and bool((kept.cpu() == reference.cpu()).all())
    record(
        benchmark,
        op="batched_nms" if classes else "nms",
        case=case,
        impl=impl,
        result=torch.tensor([0.0 if same else 1.0]),
        reference=torch.tensor([0.0]),
    )
