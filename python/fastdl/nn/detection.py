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
    """ROI-align over named feature-pyramid levels: torchvision's ``MultiScaleRoIAlign``, with the
    same arguments, level rule, scale inference, output and repr.

    ``forward(x, boxes, image_shapes)`` takes a dict of ``Tensor[N, C, H_l, W_l]`` maps, a list of
    per-image ``Tensor[L, 4]`` boxes in image coordinates and the ``(height, width)`` of each
    image. Each map's scale is the power of two nearest to its height over the largest image
    height (as torchvision infers it). Returns ``Tensor[K, C, PH, PW]`` with the boxes of all
    images in order. ``aligned`` (keyword, default ``False`` as in torchvision) is passed to
    :func:`fastdl.ops.roi_align`.
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size,
        sampling_ratio: int = -1,
        *,
        aligned: bool = False,
        canonical_scale: float = 224.0,
        canonical_level: int = 4,
    ):
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = pair(output_size, "output_size")
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        missing = [name for name in self.featmap_names if name not in x]
        if missing:
            raise KeyError(f"MultiScaleRoIAlign: feature maps {missing} not in the input (have {list(x)})")
        if not image_shapes:
            raise ValueError("MultiScaleRoIAlign: image_shapes is empty")
        maps = [x[name] for name in self.featmap_names]
        max_height = max(shape[0] for shape in image_shapes)
        scales = [2.0 ** round(math.log2(m.shape[-2] / max_height)) for m in maps]
        return ops.multiscale_roi_align(
            maps,
            boxes,
            self.output_size,
            scales,
            self.sampling_ratio,
            self.aligned,
            self.canonical_scale,
            self.canonical_level,
        )

    def extra_repr(self) -> str:
        return (
            f"featmap_names={self.featmap_names}, output_size={self.output_size}, sampling_ratio={self.sampling_ratio}"
        )
