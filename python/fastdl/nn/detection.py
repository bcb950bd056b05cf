"""Modules for detection heads (Fast R-CNN)."""

from __future__ import annotations

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
