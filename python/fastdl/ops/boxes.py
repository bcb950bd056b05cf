"""Box utilities for detection (plain PyTorch, differentiable, any device).

Boxes are ``Tensor[..., 4]``; ``xyxy`` means ``(x1, y1, x2, y2)`` corners, ``xywh`` is
``(x1, y1, width, height)`` and ``cxcywh`` is ``(center_x, center_y, width, height)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["box_area", "box_iou", "box_convert", "clip_boxes_to_image", "remove_small_boxes", "BoxCoder"]


def _check_boxes(name: str, boxes: Tensor) -> None:
    if not isinstance(boxes, Tensor) or boxes.dim() < 1 or boxes.size(-1) != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"{name} must be a Tensor[..., 4], got {shape}")


def box_area(boxes: Tensor) -> Tensor:
    """``Tensor[N, 4]`` xyxy -> ``Tensor[N]`` areas ``(x2 - x1) * (y2 - y1)``."""
    _check_boxes("boxes", boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU: ``Tensor[N, 4]``, ``Tensor[M, 4]`` (xyxy) -> ``Tensor[N, M]``.

    Two empty boxes have IoU ``0/0 = NaN`` (which never exceeds an NMS threshold).
    """
    _check_boxes("boxes1", boxes1)
    _check_boxes("boxes2", boxes2)
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter)


_FORMATS = ("xyxy", "xywh", "cxcywh")


def box_convert(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """Convert ``Tensor[..., 4]`` between ``"xyxy"``, ``"xywh"`` and ``"cxcywh"``."""
    _check_boxes("boxes", boxes)
    for name, fmt in (("in_fmt", in_fmt), ("out_fmt", out_fmt)):
        if fmt not in _FORMATS:
            raise ValueError(f"box_convert: {name} must be one of {_FORMATS}, got {fmt!r}")
    a, b, c, d = boxes.unbind(-1)
    if in_fmt == "xywh":
        a, b, c, d = a, b, a + c, b + d
    elif in_fmt == "cxcywh":
        a, b, c, d = a - c / 2, b - d / 2, a + c / 2, b + d / 2
    # now xyxy
    if out_fmt == "xywh":
        a, b, c, d = a, b, c - a, d - b
    elif out_fmt == "cxcywh":
        a, b, c, d = (a + c) / 2, (b + d) / 2, c - a, d - b
    return torch.stack([a, b, c, d], dim=-1)


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clamp xyxy ``boxes`` into an image of ``size = (height, width)``."""
    _check_boxes("boxes", boxes)
    height, width = size
    if height < 0 or width < 0:
        raise ValueError(f"clip_boxes_to_image: size must be non-negative, got {size}")
    x = boxes[..., 0::2].clamp(0, width)
    y = boxes[..., 1::2].clamp(0, height)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices (``Tensor[M]``, int64) of the boxes whose width and height are both >= ``min_size``."""
    _check_boxes("boxes", boxes)
    if min_size < 0:
        raise ValueError(f"remove_small_boxes: min_size must be non-negative, got {min_size}")
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return torch.nonzero((w >= min_size) & (h >= min_size)).flatten()


class BoxCoder:
    """Encodes ground-truth boxes relative to proposals as regression targets, and back.

    For a proposal with centre ``(px, py)`` and size ``(pw, ph)`` and a target with ``(gx, gy, gw, gh)``:
    ``tx = wx (gx - px) / pw``, ``ty = wy (gy - py) / ph``, ``tw = ww log(gw / pw)``,
    ``th = wh log(gh / ph)``, with per-coordinate ``weights = (wx, wy, ww, wh)`` (default 1).
    ``decode`` inverts it; the exponent is clamped at ``bbox_xform_clip`` (default ``log(1000/16)``)
    so that huge predicted deltas cannot overflow.
    """

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0), bbox_xform_clip: float = math.log(1000.0 / 16)):
        if len(weights) != 4 or any(w <= 0 for w in weights):
            raise ValueError(f"BoxCoder: weights must be 4 positive numbers, got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, proposals: Tensor, gt: Tensor) -> Tensor:
        """``Tensor[N, 4]`` proposals and matched ``Tensor[N, 4]`` targets (xyxy) -> ``Tensor[N, 4]`` deltas."""
        _check_boxes("proposals", proposals)
        _check_boxes("gt", gt)
        if proposals.shape != gt.shape:
            raise ValueError(f"BoxCoder.encode: proposals {tuple(proposals.shape)} and gt {tuple(gt.shape)} must have the same shape")
        wx, wy, ww, wh = self.weights
        px, py, pw, ph = box_convert(proposals, "xyxy", "cxcywh").unbind(-1)
        gx, gy, gw, gh = box_convert(gt, "xyxy", "cxcywh").unbind(-1)
        return torch.stack([wx * (gx - px) / pw, wy * (gy - py) / ph, ww * torch.log(gw / pw), wh * torch.log(gh / ph)], dim=-1)

    def decode(self, proposals: Tensor, deltas: Tensor) -> Tensor:
        """``Tensor[N, 4]`` proposals (xyxy) and ``Tensor[N, 4 * C]`` deltas -> ``Tensor[N, 4 * C]`` boxes (xyxy)."""
        _check_boxes("proposals", proposals)
        if deltas.dim() != 2 or deltas.size(0) != proposals.size(0) or deltas.size(1) % 4:
            raise ValueError(f"BoxCoder.decode: deltas must be Tensor[{proposals.size(0)}, 4 * C], got {tuple(deltas.shape)}")
        wx, wy, ww, wh = self.weights
        px, py, pw, ph = (t[:, None] for t in box_convert(proposals.to(deltas.dtype), "xyxy", "cxcywh").unbind(-1))
        dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.bbox_xform_clip)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.bbox_xform_clip)
        cx, cy = dx * pw + px, dy * ph + py
        w, h = torch.exp(dw) * pw, torch.exp(dh) * ph
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1).flatten(1)
