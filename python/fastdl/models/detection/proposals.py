"""Region proposals for Fast R-CNN without a proposal network: windows of several sizes and
aspect ratios slid over the image, and a ground-truth-guided selection for training."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ... import ops

__all__ = ["SlidingWindowProposals", "top_by_ground_truth_iou"]


class SlidingWindowProposals:
    """Anchor boxes of every size and aspect ratio, centred on a grid of step ``stride`` over the
    image, clipped to it.

    Args:
        sizes: the square root of each window's area, in image pixels.
        aspect_ratios: height / width of the windows (torchvision's convention): a window of size
            ``s`` and ratio ``r`` is ``s / sqrt(r)`` wide and ``s * sqrt(r)`` tall.
        stride: the grid step in pixels; the centres are at ``(i + 0.5) * stride`` for
            ``i < ceil(side / stride)``.
        min_size: clipped windows narrower or shorter than this many pixels are dropped.

    ``proposals(images_or_sizes) -> list[Tensor[L_i, 4]]``: one xyxy set per image, given a
    list of ``(height, width)`` or of images ``Tensor[C, H, W]`` (whose dtype and device the
    boxes then take). Windows that clipping makes identical are kept once; the rows are sorted
    (``torch.unique``), so the output does not depend on the order of ``sizes``.
    """

    def __init__(
        self,
        sizes: Sequence[float] = (32, 64, 128),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        stride: int = 16,
        min_size: float = 1.0,
    ):
        self.sizes = tuple(float(s) for s in sizes)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        if not self.sizes or any(not s > 0 for s in self.sizes):
            raise ValueError(f"SlidingWindowProposals: sizes must be positive numbers, got {tuple(sizes)}")
        if not self.aspect_ratios or any(not r > 0 for r in self.aspect_ratios):
            raise ValueError(
                f"SlidingWindowProposals: aspect_ratios must be positive numbers, got {tuple(aspect_ratios)}"
            )
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"SlidingWindowProposals: stride must be a positive int, got {stride!r}")
        self.stride = stride
        self.min_size = float(min_size)

    @property
    def windows_per_position(self) -> int:
        return len(self.sizes) * len(self.aspect_ratios)

    def window_shapes(self) -> tuple[Tensor, Tensor]:
        """``(widths, heights)``, each ``Tensor[A]`` (float64), ratio-major then size."""
        ratios = torch.tensor(self.aspect_ratios, dtype=torch.float64)
        sizes = torch.tensor(self.sizes, dtype=torch.float64)
        widths = (sizes[None, :] / ratios.sqrt()[:, None]).reshape(-1)
        heights = (sizes[None, :] * ratios.sqrt()[:, None]).reshape(-1)
        return widths, heights

    def for_image(
        self, height: int, width: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> Tensor:
        """The windows of one ``height x width`` image: ``Tensor[L, 4]`` xyxy."""
        if height < 1 or width < 1:
            raise ValueError(f"SlidingWindowProposals: image size must be positive, got ({height}, {width})")
        widths, heights = self.window_shapes()
        cx = (torch.arange(math.ceil(width / self.stride), dtype=torch.float64) + 0.5) * self.stride
        cy = (torch.arange(math.ceil(height / self.stride), dtype=torch.float64) + 0.5) * self.stride
        cy, cx = (c.reshape(-1, 1) for c in torch.meshgrid(cy, cx, indexing="ij"))
        windows = torch.stack([cx - widths / 2, cy - heights / 2, cx + widths / 2, cy + heights / 2], dim=-1).reshape(
            -1, 4
        )
        windows = ops.clip_boxes_to_image(windows, (height, width))
        windows = windows[ops.remove_small_boxes(windows, self.min_size)]
        return torch.unique(windows, dim=0).to(dtype=dtype, device=device)

    def __call__(self, images_or_sizes: Sequence[Tensor] | Sequence[tuple[int, int]]) -> list[Tensor]:
        proposals = []
        for i, item in enumerate(images_or_sizes):
            if isinstance(item, Tensor):
                if item.dim() != 3:
                    raise ValueError(
                        f"SlidingWindowProposals: images[{i}] must be a Tensor[C, H, W], got {tuple(item.shape)}"
                    )
                dtype = item.dtype if item.is_floating_point() else torch.float32
                proposals.append(self.for_image(item.size(1), item.size(2), dtype, item.device))
            else:
                height, width = item
                proposals.append(self.for_image(int(height), int(width)))
        return proposals

    def __repr__(self) -> str:
        return (
            f"SlidingWindowProposals(sizes={self.sizes}, aspect_ratios={self.aspect_ratios}, "
            f"stride={self.stride}, min_size={self.min_size})"
        )


def top_by_ground_truth_iou(
    proposals: Sequence[Tensor], gt_boxes: Sequence[Tensor], num_per_image: int
) -> list[Tensor]:
    """For training only: keep in each image the ``num_per_image`` proposals whose best IoU with
    that image's ground-truth boxes is highest (all of them when there are fewer).

    It reads the ground truth, so the kept set is biased towards the objects: use it to make the
    sampled RoIs richer in positives while training, never at evaluation. Equal overlaps keep the
    earlier proposal; an image without ground truth keeps its first ``num_per_image``.

    Args:
        proposals: per image ``Tensor[L_i, 4]`` xyxy.
        gt_boxes: per image ``Tensor[M_i, 4]`` xyxy.
        num_per_image: how many to keep per image.

    Returns:
        per image ``Tensor[min(L_i, num_per_image), 4]``, by decreasing best IoU.
    """
    if len(proposals) != len(gt_boxes):
        raise ValueError(
            f"top_by_ground_truth_iou: {len(proposals)} lists of proposals but {len(gt_boxes)} of gt_boxes"
        )
    if num_per_image < 0:
        raise ValueError(f"top_by_ground_truth_iou: num_per_image must be >= 0, got {num_per_image}")
    kept = []
    for boxes, gt in zip(proposals, gt_boxes):
        if gt.numel() == 0 or boxes.numel() == 0:
            kept.append(boxes[:num_per_image])
            continue
        best_iou = ops.box_iou(boxes, gt.to(boxes)).max(dim=1).values
        order = torch.sort(best_iou, descending=True, stable=True).indices
        kept.append(boxes[order[:num_per_image]])
    return kept
