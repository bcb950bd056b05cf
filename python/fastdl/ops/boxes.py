"""Box utilities for detection (plain PyTorch, differentiable, any device).

Boxes are ``Tensor[..., 4]``; ``xyxy`` means ``(x1, y1, x2, y2)`` corners, ``xywh`` is
``(x1, y1, width, height)`` and ``cxcywh`` is ``(center_x, center_y, width, height)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._utils import check_number

__all__ = ["box_area", "box_iou", "box_convert", "clip_boxes_to_image", "remove_small_boxes", "BoxCoder"]


def _check_boxes(name: str, boxes: Tensor) -> None:
    if not isinstance(boxes, Tensor) or boxes.dim() < 1 or boxes.size(-1) != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"{name} must be a Tensor[..., 4], got {shape}")
    if boxes.dtype == torch.bool or boxes.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {boxes.dtype}")


def _upcast(t: Tensor) -> Tensor:
    """``t`` in a type whose products of coordinates do not overflow, as torchvision computes
    areas: float16/bfloat16 in float32 (a 300-pixel box's area is past float16's 65504), and
    integers narrower than int32 in int32."""
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if t.dtype in (torch.int32, torch.int64) else t.int()


def box_area(boxes: Tensor) -> Tensor:
    """``Tensor[N, 4]`` xyxy -> ``Tensor[N]`` areas ``(x2 - x1) * (y2 - y1)``.

    float16/bfloat16 boxes give float32 areas and integer boxes narrower than int32 give int32
    (as in torchvision), so the product cannot overflow.
    """
    _check_boxes("boxes", boxes)
    boxes = _upcast(boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU: ``Tensor[N, 4]``, ``Tensor[M, 4]`` (xyxy) -> ``Tensor[N, M]``.

    Areas are computed in the upcast type of :func:`box_area`; the result is float32 for
    float16, bfloat16 and integer boxes. Two empty boxes have IoU ``0/0 = NaN`` (which never
    exceeds an NMS threshold).
    """
    _check_boxes("boxes1", boxes1)
    _check_boxes("boxes2", boxes2)
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = _upcast(rb - lt).clamp(min=0)
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
    check_number("clip_boxes_to_image", "size[0] (height)", height, minimum=0)
    check_number("clip_boxes_to_image", "size[1] (width)", width, minimum=0)
    x = boxes[..., 0::2].clamp(0, width)
    y = boxes[..., 1::2].clamp(0, height)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices (``Tensor[M]``, int64) of the boxes whose width and height are both >= ``min_size``."""
    _check_boxes("boxes", boxes)
    check_number("remove_small_boxes", "min_size", min_size, minimum=0, allow_inf=True)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return torch.nonzero((w >= min_size) & (h >= min_size)).flatten()


class BoxCoder:
    """Encodes boxes as regression targets relative to reference boxes, and back: torchvision's
    ``torchvision.models.detection._utils.BoxCoder``, with the same arguments, methods, shapes
    and numerics.

    For a proposal with centre ``(px, py)`` and size ``(pw, ph)`` and a matched ground-truth box
    ``(gx, gy, gw, gh)``, the target is ``dx = wx (gx - px) / pw``, ``dy = wy (gy - py) / ph``,
    ``dw = ww log(gw / pw)``, ``dh = wh log(gh / ph)`` with ``weights = (wx, wy, ww, wh)``
    (``(10, 10, 5, 5)`` in torchvision's box head, ``(1, 1, 1, 1)`` in its RPN). Decoding clamps
    ``dw``, ``dh`` at ``bbox_xform_clip`` (``log(1000 / 16)``) so that huge predictions cannot
    overflow ``exp``.
    """

    def __init__(self, weights: tuple[float, float, float, float], bbox_xform_clip: float = math.log(1000.0 / 16)):
        if len(weights) != 4 or any(not w > 0 for w in weights):
            raise ValueError(f"BoxCoder: weights must be 4 positive numbers, got {tuple(weights)}")
        if not bbox_xform_clip > 0:
            raise ValueError(f"BoxCoder: bbox_xform_clip must be positive, got {bbox_xform_clip}")
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, reference_boxes: list[Tensor], proposals: list[Tensor]) -> tuple[Tensor, ...]:
        """Per image: matched ground-truth ``Tensor[L_i, 4]`` and proposals ``Tensor[L_i, 4]`` (xyxy)
        -> a tuple of ``Tensor[L_i, 4]`` targets."""
        if len(reference_boxes) != len(proposals):
            raise ValueError(
                f"BoxCoder.encode: {len(reference_boxes)} lists of reference boxes for {len(proposals)} of proposals"
            )
        counts = [len(b) for b in reference_boxes]
        targets = self.encode_single(torch.cat(reference_boxes, dim=0), torch.cat(proposals, dim=0))
        return targets.split(counts, 0)

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """Ground-truth ``Tensor[N, 4]`` and proposals ``Tensor[N, 4]`` (xyxy) -> targets ``Tensor[N, 4]``."""
        _check_boxes("reference_boxes", reference_boxes)
        _check_boxes("proposals", proposals)
        if reference_boxes.shape != proposals.shape:
            raise ValueError(
                f"BoxCoder.encode: reference_boxes {tuple(reference_boxes.shape)} and proposals "
                f"{tuple(proposals.shape)} must have the same shape"
            )
        wx, wy, ww, wh = self.weights
        px, py, pw, ph = _centres_and_sizes(proposals)
        gx, gy, gw, gh = _centres_and_sizes(reference_boxes)
        return torch.stack(
            [wx * (gx - px) / pw, wy * (gy - py) / ph, ww * torch.log(gw / pw), wh * torch.log(gh / ph)], dim=1
        )

    def decode(self, rel_codes: Tensor, boxes: list[Tensor]) -> Tensor:
        """Codes ``Tensor[N, 4 * C]`` for the concatenated per-image boxes ``Tensor[L_i, 4]``
        (``N = sum L_i``) -> ``Tensor[N, C, 4]`` decoded xyxy boxes."""
        if not isinstance(boxes, (list, tuple)) or not all(isinstance(b, Tensor) for b in boxes):
            raise TypeError(f"BoxCoder.decode: boxes must be a list of Tensor[L, 4], got {type(boxes).__name__}")
        total = sum(b.size(0) for b in boxes)
        concatenated = torch.cat(list(boxes), dim=0) if boxes else rel_codes.new_zeros(0, 4)
        decoded = self.decode_single(rel_codes.reshape(total, -1) if total > 0 else rel_codes, concatenated)
        return decoded.reshape(total, -1, 4) if total > 0 else decoded

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """Codes ``Tensor[N, 4 * C]`` and reference boxes ``Tensor[N, 4]`` (xyxy) -> ``Tensor[N, 4 * C]``."""
        _check_boxes("boxes", boxes)
        if rel_codes.dim() != 2 or rel_codes.size(0) != boxes.size(0) or rel_codes.size(1) % 4:
            raise ValueError(
                f"BoxCoder.decode: rel_codes must be Tensor[{boxes.size(0)}, 4 * C], got {tuple(rel_codes.shape)}"
            )
        wx, wy, ww, wh = self.weights
        px, py, pw, ph = (t[:, None] for t in _centres_and_sizes(boxes.to(rel_codes.dtype)))
        dx, dy = rel_codes[:, 0::4] / wx, rel_codes[:, 1::4] / wy
        dw = (rel_codes[:, 2::4] / ww).clamp(max=self.bbox_xform_clip)
        dh = (rel_codes[:, 3::4] / wh).clamp(max=self.bbox_xform_clip)
        cx, cy = dx * pw + px, dy * ph + py
        half_w, half_h = 0.5 * torch.exp(dw) * pw, 0.5 * torch.exp(dh) * ph
        return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=2).flatten(1)


def _centres_and_sizes(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(cx, cy, w, h)`` of xyxy boxes, the centre as ``x1 + w / 2`` (torchvision's rounding)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h
