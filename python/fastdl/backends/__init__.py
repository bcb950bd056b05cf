"""Settings of fastdl's kernel backends, in the manner of :mod:`torch.backends`."""

from . import cpu

__all__ = ["cpu"]
