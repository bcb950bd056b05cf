"""fastdl's functional API. Every function here is a thin wrapper over ``torch.ops.fastdl.*``."""

from .. import _loader  # noqa: F401  (must precede the op modules)
from .attention import attention
from .boxes import BoxCoder, box_area, box_convert, box_iou, clip_boxes_to_image, remove_small_boxes
from .conv2d import conv2d, conv2d_winograd_weight
from .lstm import lstm, lstm_cell
from .nms import batched_nms, nms
from .poolers import multiscale_roi_align
from .roi_align import roi_align
from .roi_pool import roi_pool

__all__ = [
    "BoxCoder",
    "attention",
    "batched_nms",
    "box_area",
    "box_convert",
    "box_iou",
    "clip_boxes_to_image",
    "conv2d",
    "conv2d_winograd_weight",
    "lstm",
    "lstm_cell",
    "multiscale_roi_align",
    "nms",
    "remove_small_boxes",
    "roi_align",
    "roi_pool",
]
