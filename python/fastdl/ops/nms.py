"""Non-maximum suppression: greedy NMS and per-class (batched) NMS."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._library import register_autocast, register_composite
from ._utils import check_number

__all__ = ["nms", "batched_nms"]


def nms(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    *,
    score_threshold: float | None = None,
    max_output: int | None = None,
) -> Tensor:
    """Greedy non-maximum suppression.

    Visits boxes in decreasing score order and drops every box whose IoU with an already kept box
    is greater than ``iou_threshold``.

    Args:
        boxes: ``Tensor[N, 4]`` rows ``(x1, y1, x2, y2)`` with ``x1 <= x2``, ``y1 <= y2``.
        scores: ``Tensor[N]``, same dtype and device as ``boxes``.
        iou_threshold: in ``[0, 1]``.
        score_threshold: if given, boxes scoring below it are dropped first.
        max_output: if given, at most this many indices are returned (the best ones).

    Returns:
        ``Tensor[M]`` (int64): indices of the kept boxes, by decreasing score. Equal scores are
        ordered by index (a stable sort), on CPU and CUDA alike, so results are deterministic.
    """
    candidates = _above(scores, score_threshold)
    if candidates is None:
        keep = torch.ops.fastdl.nms.default(boxes, scores, float(iou_threshold))
    else:
        keep = candidates[torch.ops.fastdl.nms.default(boxes[candidates], scores[candidates], float(iou_threshold))]
    return keep if max_output is None else keep[: _check_max_output(max_output)]


def batched_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
    *,
    strategy: str = "native",
    score_threshold: float | None = None,
    max_output: int | None = None,
) -> Tensor:
    """NMS done independently per category: boxes with different ``idxs`` never suppress each other.

    Args:
        boxes, scores, iou_threshold, score_threshold, max_output: as in :func:`nms`.
        idxs: ``Tensor[N]`` integer category of each box.
        strategy: ``"native"`` (default) runs exact per-class NMS in the kernel (classes in
            parallel on CPU; class-aware suppression mask on CUDA). ``"offset"`` shifts each class's
            boxes by a class-dependent offset so that classes cannot overlap and calls :func:`nms`
            once (the classic trick; can lose float precision for very large coordinates).

    Returns:
        ``Tensor[M]`` (int64) indices of kept boxes, by decreasing score (ties by index).
    """
    if strategy not in ("native", "offset"):
        raise ValueError(f"batched_nms: strategy must be 'native' or 'offset', got {strategy!r}")
    candidates = _above(scores, score_threshold)
    if candidates is not None:
        boxes, scores, idxs = boxes[candidates], scores[candidates], idxs[candidates]
    if strategy == "native":
        keep = torch.ops.fastdl.batched_nms.default(boxes, scores, idxs, float(iou_threshold))
    else:
        keep = _batched_nms_by_offset(torch.ops.fastdl.nms.default, boxes, scores, idxs, float(iou_threshold))
    if candidates is not None:
        keep = candidates[keep]
    return keep if max_output is None else keep[: _check_max_output(max_output)]


def _above(scores: Tensor, score_threshold: float | None) -> Tensor | None:
    if score_threshold is None:
        return None
    check_number("nms", "score_threshold", score_threshold, allow_inf=True)
    return torch.nonzero(scores >= score_threshold).flatten()


def _check_max_output(max_output: int) -> int:
    if isinstance(max_output, bool) or not isinstance(max_output, int) or max_output < 0:
        raise ValueError(f"max_output must be a non-negative int, got {max_output!r}")
    return max_output


def _batched_nms_by_offset(nms_op, boxes, scores, idxs, iou_threshold):
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    if idxs.dim() != 1 or idxs.size(0) != boxes.size(0) or idxs.is_floating_point():
        raise RuntimeError(
            f"batched_nms: expected integer idxs of shape [{boxes.size(0)}], got {idxs.dtype} {tuple(idxs.shape)}"
        )
    # every class gets its own stretch of the plane, wider than all boxes together
    span = boxes.max() - torch.minimum(boxes.min(), torch.zeros((), dtype=boxes.dtype, device=boxes.device)) + 1
    shifted = boxes + (idxs.to(boxes.dtype) * span)[:, None]
    return nms_op(shifted, scores, iou_threshold)


# ---- fake kernels: the number of kept boxes is decided by the data ----------------------------


def _fake(op, boxes, scores, idxs=None):
    torch._check(
        boxes.dim() == 2 and boxes.size(1) == 4,
        lambda: f"{op}: expected boxes of shape [N, 4], got {tuple(boxes.shape)}",
    )
    torch._check(
        scores.dim() == 1 and scores.size(0) == boxes.size(0), lambda: f"{op}: scores must have shape [{boxes.size(0)}]"
    )
    kept = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((kept,), dtype=torch.long)


@torch.library.register_fake("fastdl::nms")
def _nms_fake(boxes, scores, iou_threshold):
    return _fake("nms", boxes, scores)


@torch.library.register_fake("fastdl::batched_nms")
def _batched_nms_fake(boxes, scores, idxs, iou_threshold):
    return _fake("batched_nms", boxes, scores, idxs)


register_autocast("nms", "float32")
register_autocast("batched_nms", "float32")


# ---- composites -------------------------------------------------------------------------------


def _check(op, boxes, scores, iou_threshold):
    torch._check(
        boxes.dim() == 2 and boxes.size(1) == 4,
        lambda: f"{op}: expected boxes of shape [N, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}",
    )
    torch._check(
        scores.dim() == 1 and scores.size(0) == boxes.size(0),
        lambda: (
            f"{op}: expected scores of shape [{boxes.size(0)}] to match boxes {tuple(boxes.shape)}, got {tuple(scores.shape)}"
        ),
    )
    torch._check(
        boxes.device == scores.device, lambda: f"{op}: boxes is on {boxes.device} but scores is on {scores.device}"
    )
    torch._check(
        boxes.dtype == scores.dtype, lambda: f"{op}: boxes has dtype {boxes.dtype} but scores has dtype {scores.dtype}"
    )
    torch._check(0 <= iou_threshold <= 1, lambda: f"{op}: iou_threshold must lie in [0, 1], got {iou_threshold}")
    if boxes.numel():
        torch._check(bool(torch.isfinite(boxes).all()), lambda: f"{op}: boxes contain NaN or infinite values")
        torch._check(bool(torch.isfinite(scores).all()), lambda: f"{op}: scores contain NaN or infinite values")
        ok = (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])
        torch._check(bool(ok.all()), lambda: f"{op}: every box must satisfy x1 <= x2 and y1 <= y2")


def _area_safe(boxes: Tensor) -> Tensor:
    """``area_safe`` of ``csrc/ops/nms/nms.h``: boxes past 2^60 (2^500 in float64) scaled by an
    exact power of two, so that their areas do not overflow to inf."""
    if boxes.numel() == 0:
        return boxes
    limit_exponent = 500 if boxes.dtype == torch.float64 else 60
    largest = float(boxes.abs().max())
    if not largest > 2.0**limit_exponent:
        return boxes
    exponent = math.frexp(largest)[1] - limit_exponent  # frexp's exponent is ilogb + 1
    return boxes * 2.0**-exponent


@register_composite("nms")
def nms_composite(boxes, scores, iou_threshold):
    """Greedy NMS over a precomputed IoU matrix, one kept box per step."""
    _check("nms", boxes, scores, iou_threshold)
    boxes = _area_safe(boxes)
    order = torch.sort(scores, descending=True, stable=True).indices
    if order.numel() == 0:
        return order
    from .boxes import box_iou

    iou = box_iou(boxes[order], boxes[order])
    removed = torch.zeros(order.numel(), dtype=torch.bool, device=boxes.device)
    keep = torch.zeros_like(removed)
    for i in range(order.numel()):
        if removed[i]:
            continue
        keep[i] = True
        removed |= iou[i] > iou_threshold
    return order[keep]


@register_composite("batched_nms")
def batched_nms_composite(boxes, scores, idxs, iou_threshold):
    _check("batched_nms", boxes, scores, iou_threshold)
    return _batched_nms_by_offset(nms_composite, boxes, scores, idxs, iou_threshold)
