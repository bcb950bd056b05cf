"""Modules for detection heads (Fast R-CNN)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from .. import ops
from ..ops._utils import BoxesLike, pair


class RoIAlign(nn.Module):
    """Module form of :func:`fastdl.ops.roi_align` (same arguments, same semantics)."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int = -1, aligned: bool = False):
        super().__init__()
        self.output_size = pair(output_size, "output_size")
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, boxes: BoxesLike) -> Tensor:
        return ops.roi_align(input, boxes, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )


class RoIPool(nn.Module):
    """Module form of :func:`fastdl.ops.roi_pool`."""

    def __init__(self, output_size, spatial_scale: float):
        super().__init__()
        self.output_size = pair(output_size, "output_size")
        self.spatial_scale = spatial_scale

    def forward(self, input: Tensor, boxes: BoxesLike) -> Tensor:
        return ops.roi_pool(input, boxes, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


class MultiScaleRoIAlign(nn.Module):
    """ROI-align over named feature-pyramid levels (as in torchvision's ``MultiScaleRoIAlign``).

    ``forward(features, boxes, image_sizes)`` takes a dict of ``Tensor[N, C, H_l, W_l]`` maps, a
    list of per-image ``Tensor[L, 4]`` boxes in image coordinates and the ``(height, width)`` of
    each image; each map's scale is inferred as the power of two nearest to its size over the
    largest image's size. Returns ``Tensor[K, C, PH, PW]`` with the boxes of all images in order.
    """

    def __init__(self, featmap_names: list[str], output_size, sampling_ratio: int = -1, *, aligned: bool = False,
                 canonical_scale: float = 224.0, canonical_level: int = 4):
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = pair(output_size, "output_size")
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]) -> Tensor:
        missing = [name for name in self.featmap_names if name not in features]
        if missing:
            raise KeyError(f"MultiScaleRoIAlign: feature maps {missing} not in the input (have {list(features)})")
        maps = [features[name] for name in self.featmap_names]
        max_h = max(s[0] for s in image_sizes)
        max_w = max(s[1] for s in image_sizes)
        scales = [2.0 ** round(math.log2(0.5 * (m.shape[-2] / max_h + m.shape[-1] / max_w))) for m in maps]
        return ops.multiscale_roi_align(
            maps, boxes, self.output_size, scales, self.sampling_ratio, self.aligned, self.canonical_scale, self.canonical_level
        )
