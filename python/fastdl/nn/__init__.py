"""Drop-in ``torch.nn`` modules backed by fastdl's kernels."""

from . import functional
from .attention import MultiheadAttention
from .detection import MultiScaleRoIAlign, RoIAlign, RoIPool

__all__ = ["MultiScaleRoIAlign", "MultiheadAttention", "RoIAlign", "RoIPool"]
