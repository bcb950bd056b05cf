"""Drop-in ``torch.nn`` modules backed by fastdl's kernels."""

from .detection import RoIAlign

__all__ = ["RoIAlign"]
