"""Drop-in ``torch.nn`` modules backed by fastdl's kernels."""

from .detection import MultiScaleRoIAlign, RoIAlign, RoIPool

__all__ = ["MultiScaleRoIAlign", "RoIAlign", "RoIPool"]
