"""fastdl's functional API. Every function here is a thin wrapper over ``torch.ops.fastdl.*``."""

import torch.fx

from .. import _loader  # noqa: F401  (must precede the op modules)
from .attention import attention
from .boxes import BoxCoder, box_area, box_convert, box_iou, clip_boxes_to_image, remove_small_boxes
from .conv2d import conv2d, conv2d_winograd_weight
from .layer_norm import layer_norm
from .linear import linear
from .linear_cross_entropy import linear_cross_entropy
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
    "layer_norm",
    "linear",
    "linear_cross_entropy",
    "lstm",
    "lstm_cell",
    "multiscale_roi_align",
    "nms",
    "remove_small_boxes",
    "roi_align",
    "roi_pool",
]


def _refuse_torchscript(name: str):
    def prepare():
        raise RuntimeError(
            f"fastdl.ops.{name} cannot be compiled by TorchScript, which PyTorch has deprecated: use "
            "torch.compile or torch.export, or call the registered operators (torch.ops.fastdl.*), "
            "which scripted code can call"
        )

    return prepare


# torch.fx.symbolic_trace keeps calls of these (as ``fastdl.ops.<name>`` and from fastdl.nn) as
# leaf nodes instead of tracing into the wrappers, whose argument handling (lists of boxes,
# ints for sizes) cannot run on proxies. torch.jit.script of one fails with a clear message.
for _name in __all__:
    if _name != "BoxCoder":
        torch.fx.wrap(_name)
        globals()[_name].__prepare_scriptable__ = _refuse_torchscript(_name)
del _name
