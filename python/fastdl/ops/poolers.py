"""Multi-scale ROI-align over a feature pyramid (FPN)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ._utils import BoxesLike, boxes_to_rois, check_rois, pair
from .roi_align import roi_align

__all__ = ["multiscale_roi_align", "pyramid_levels"]


def pyramid_levels(
    rois: Tensor, scales: Sequence[float], canonical_scale: float = 224.0, canonical_level: int = 4, eps: float = 1e-6
) -> Tensor:
    """Index into ``scales`` of the level that pools each box (FPN paper, eq. 1).

    A box of size ``s = sqrt(area)`` goes to level ``floor(canonical_level + log2(s / canonical_scale) + eps)``,
    clamped to the pyramid; level ``l`` is the map with scale ``2**-l``. This is torchvision's
    rule, ``eps`` included: it lifts a box whose size is an exact power of two times
    ``canonical_scale`` (``log2`` a hair below an integer) onto the level it belongs to.
    """
    level_min, level_max = -math.log2(scales[0]), -math.log2(scales[-1])
    size = torch.sqrt(((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).clamp(min=0))
    level = torch.floor(canonical_level + torch.log2(size / canonical_scale) + eps)
    return (level.clamp(level_min, level_max) - level_min).long()


def multiscale_roi_align(
    features: Sequence[Tensor],
    boxes: BoxesLike,
    output_size: int | tuple[int, int],
    spatial_scales: Sequence[float],
    sampling_ratio: int = -1,
    aligned: bool = False,
    canonical_scale: float = 224.0,
    canonical_level: int = 4,
) -> Tensor:
    """ROI-align each box on the pyramid level that suits its size.

    Args:
        features: maps ``Tensor[N, C, H_l, W_l]``, finest first.
        boxes: ``Tensor[K, 5]`` or a list of per-image ``Tensor[L, 4]`` (image coordinates).
        output_size: ``(PH, PW)`` or an int.
        spatial_scales: one per level, powers of two (e.g. ``[1/4, 1/8, 1/16, 1/32]``).
        sampling_ratio, aligned: as in :func:`fastdl.ops.roi_align`.
        canonical_scale, canonical_level: a box of ``canonical_scale`` pixels maps to level
            ``canonical_level`` (224 and 4 in the FPN paper).

    Returns:
        ``Tensor[K, C, PH, PW]``, in the order of the boxes.
    """
    if len(features) == 0 or len(features) != len(spatial_scales):
        raise ValueError(
            f"multiscale_roi_align: need one spatial scale per feature map, got {len(features)} maps and {len(spatial_scales)} scales"
        )
    for s in spatial_scales:
        if s <= 0 or abs(math.log2(s) - round(math.log2(s))) > 1e-6:
            raise ValueError(f"multiscale_roi_align: spatial scales must be powers of two, got {list(spatial_scales)}")
    rois = boxes_to_rois(boxes, features[0])
    check_rois("multiscale_roi_align", features[0], rois)  # NaN boxes would match no level
    pooled = pair(output_size, "output_size")
    if len(features) == 1:
        return roi_align(features[0], rois, pooled, spatial_scales[0], sampling_ratio, aligned)
    levels = pyramid_levels(rois, spatial_scales, canonical_scale, canonical_level)
    n, c = features[0].shape[:2]
    result = features[0].new_zeros((rois.size(0), c, *pooled))
    for level, (feature, scale) in enumerate(zip(features, spatial_scales)):
        index = torch.nonzero(levels == level).flatten()
        result = result.index_put((index,), roi_align(feature, rois[index], pooled, scale, sampling_ratio, aligned))
    return result
