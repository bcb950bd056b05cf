"""Drop-in ``torch.nn`` modules backed by fastdl's kernels."""

from . import functional
from .attention import MultiheadAttention
from .conv import Conv2d, Conv2dNormActivation, fuse_conv_bn
from .detection import MultiScaleRoIAlign, RoIAlign, RoIPool
from .linear import Linear
from .normalization import LayerNorm
from .recurrent import LSTM, LSTMCell
from .replace import replace_modules

__all__ = [
    "Conv2d",
    "Conv2dNormActivation",
    "LSTM",
    "LayerNorm",
    "Linear",
    "LSTMCell",
    "MultiScaleRoIAlign",
    "MultiheadAttention",
    "RoIAlign",
    "RoIPool",
    "functional",
    "fuse_conv_bn",
    "replace_modules",
]
