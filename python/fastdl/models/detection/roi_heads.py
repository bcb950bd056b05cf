"""The box head of Fast R-CNN: RoI features -> class scores and box deltas, its loss, and the
post-processing that turns its outputs into detections (torchvision's ``roi_heads`` semantics)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import ops
from ...ops import BoxCoder

__all__ = ["TwoMLPHead", "FastRCNNPredictor", "fastrcnn_loss", "postprocess_detections"]


class TwoMLPHead(nn.Module):
    """``fc6`` and ``fc7``, each followed by a ReLU (and dropout when ``dropout > 0``, in training):
    ``Tensor[K, C, PH, PW]`` (or ``Tensor[K, C * PH * PW]``) -> ``Tensor[K, representation_size]``.

    The names are torchvision's, so its box-head weights load; dropout holds no parameters and
    changes no key.
    """

    def __init__(self, in_channels: int, representation_size: int, dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"TwoMLPHead: dropout must be in [0, 1), got {dropout}")
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=1)
        x = self.dropout(F.relu(self.fc6(x)))
        return self.dropout(F.relu(self.fc7(x)))


class FastRCNNPredictor(nn.Module):
    """``cls_score`` (``num_classes`` logits, background included) and ``bbox_pred`` (box deltas:
    4 per class, or 4 shared by all classes when ``class_specific_boxes=False``).

    ``forward(Tensor[K, in_channels]) -> (Tensor[K, num_classes], Tensor[K, 4 * num_classes])``
    (``Tensor[K, 4]`` when class-agnostic).
    """

    def __init__(self, in_channels: int, num_classes: int, class_specific_boxes: bool = True):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4 * num_classes if class_specific_boxes else 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


def fastrcnn_loss(
    class_logits: Tensor, box_regression: Tensor, labels: Sequence[Tensor], regression_targets: Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    """The Fast R-CNN losses over the sampled RoIs of a batch.

    Args:
        class_logits: ``Tensor[K, num_classes]``.
        box_regression: ``Tensor[K, 4 * num_classes]`` (or ``Tensor[K, 4]``, class-agnostic).
        labels: per image ``Tensor[K_i]`` (int64, 0 = background), ``sum K_i = K``.
        regression_targets: per image ``Tensor[K_i, 4]``, the encoded matched ground truth.

    Returns:
        ``(loss_classifier, loss_box_reg)``: the mean cross-entropy over the ``K`` RoIs, and the
        smooth-L1 loss (``beta = 1/9``) of each positive RoI's deltas for its own class, summed
        and divided by ``K`` (so background RoIs dilute it, as in torchvision).
    """
    labels = torch.cat(list(labels), dim=0)
    regression_targets = torch.cat(list(regression_targets), dim=0)
    if labels.numel() == 0:
        raise ValueError("fastrcnn_loss: no sampled RoIs in the batch (no proposals and no ground-truth boxes)")
    loss_classifier = F.cross_entropy(class_logits, labels)
    positive = torch.nonzero(labels > 0).flatten()
    deltas = box_regression.reshape(box_regression.size(0), box_regression.size(1) // 4, 4)
    # class-agnostic heads predict one set of deltas, read as class 0's
    classes = labels[positive] if deltas.size(1) > 1 else torch.zeros_like(positive)
    loss_box_reg = (
        F.smooth_l1_loss(deltas[positive, classes], regression_targets[positive], beta=1 / 9, reduction="sum")
        / labels.numel()
    )
    return loss_classifier, loss_box_reg


def postprocess_detections(
    class_logits: Tensor,
    box_regression: Tensor,
    proposals: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    box_coder: BoxCoder,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    min_box_size: float = 1e-2,
) -> list[dict[str, Tensor]]:
    """Detections from the box head's outputs, for a whole batch at once.

    Per RoI and foreground class: softmax score, box decoded from the class's deltas and clipped
    to the image; then candidates scoring ``<= score_thresh`` or narrower/shorter than
    ``min_box_size`` are dropped, NMS at ``nms_thresh`` runs per image and class (one
    :func:`fastdl.ops.batched_nms` call for the batch) and each image keeps its
    ``detections_per_img`` best. Equal scores are ranked by RoI, then class (NMS's stable
    order), the same as a per-image loop would give.

    Args:
        class_logits: ``Tensor[K, num_classes]``, class 0 the background.
        box_regression: ``Tensor[K, 4 * num_classes]`` or ``Tensor[K, 4]`` (class-agnostic).
        proposals: per image ``Tensor[L_i, 4]`` xyxy, ``sum L_i = K``, in the order of the rows.
        image_sizes: per image ``(height, width)`` for clipping.
        box_coder: decodes the deltas (``BoxCoder((10, 10, 5, 5))`` in Fast R-CNN).

    Returns:
        per image a dict with ``boxes: Tensor[D, 4]``, ``scores: Tensor[D]`` and
        ``labels: Tensor[D]`` (int64, in ``[1, num_classes)``), ``D <= detections_per_img``, by
        decreasing score.
    """
    num_images, num_classes = len(proposals), class_logits.size(-1)
    if len(image_sizes) != num_images:
        raise ValueError(f"postprocess_detections: {num_images} lists of proposals but {len(image_sizes)} image sizes")
    counts = [p.size(0) for p in proposals]
    if sum(counts) != class_logits.size(0) or box_regression.size(0) != class_logits.size(0):
        raise ValueError(
            f"postprocess_detections: {sum(counts)} proposals, but class_logits {tuple(class_logits.shape)} and "
            f"box_regression {tuple(box_regression.shape)}"
        )
    device = class_logits.device
    all_proposals = torch.cat(list(proposals), dim=0) if proposals else class_logits.new_zeros((0, 4))
    boxes = box_coder.decode_single(box_regression, all_proposals.to(box_regression.dtype))
    boxes = boxes.reshape(boxes.size(0), box_regression.size(1) // 4, 4).expand(-1, num_classes, -1)
    scores = F.softmax(class_logits, dim=-1)

    image_of_roi = torch.repeat_interleave(torch.arange(num_images, device=device), torch.tensor(counts, device=device))
    sizes = torch.tensor(list(image_sizes), dtype=boxes.dtype, device=device).reshape(-1, 2)[image_of_roi]
    heights, widths = sizes[:, 0, None], sizes[:, 1, None]
    x = boxes[..., 0::2].clamp(min=0).minimum(widths[..., None])
    y = boxes[..., 1::2].clamp(min=0).minimum(heights[..., None])
    boxes = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)

    # candidates: (RoI, foreground class) pairs, RoI-major, so an image's are contiguous
    labels = torch.arange(1, num_classes, device=device).expand(boxes.size(0), -1).reshape(-1)
    image_of_candidate = image_of_roi[:, None].expand(-1, num_classes - 1).reshape(-1)
    boxes, scores = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1)

    keep = torch.nonzero(scores > score_thresh).flatten()
    keep = keep[ops.remove_small_boxes(boxes[keep], min_box_size)]
    groups = image_of_candidate[keep] * num_classes + labels[keep]
    keep = keep[ops.batched_nms(boxes[keep], scores[keep], groups, nms_thresh)]

    # NMS returned the batch by decreasing score; a stable sort by image keeps that order inside each
    keep = keep[torch.sort(image_of_candidate[keep], stable=True).indices]
    per_image = torch.bincount(image_of_candidate[keep], minlength=num_images)
    first_of_image = torch.cumsum(per_image, 0) - per_image
    rank = torch.arange(keep.numel(), device=device) - first_of_image[image_of_candidate[keep]]
    keep = keep[rank < detections_per_img]
    detections = []
    for indices in keep.split(per_image.clamp(max=detections_per_img).tolist()):
        detections.append({"boxes": boxes[indices], "scores": scores[indices], "labels": labels[indices]})
    return detections
