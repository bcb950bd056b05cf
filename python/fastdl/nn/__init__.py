"""Drop-in ``torch.nn`` modules backed by fastdl's kernels."""

from . import functional
from .attention import MultiheadAttention
from .detection import MultiScaleRoIAlign, RoIAlign, RoIPool
from .recurrent import LSTM, LSTMCell

__all__ = ["LSTM", "LSTMCell", "MultiScaleRoIAlign", "MultiheadAttention", "RoIAlign", "RoIPool"]
