"""fastdl's functional API. Every function here is a thin wrapper over ``torch.ops.fastdl.*``."""

from .. import _loader  # noqa: F401  (must precede the op modules)
from .roi_align import roi_align

__all__ = ["roi_align"]
