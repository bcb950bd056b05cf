"""fastdl: hand-written fast deep-learning kernels for PyTorch.

:mod:`fastdl.ops` is the functional API over ``torch.ops.fastdl.*`` and :mod:`fastdl.nn` holds
drop-in modules; importing either loads torch and the operator library. :mod:`fastdl.game2048`
(the 2048 engine) needs no torch, so ``import fastdl`` alone imports nothing heavy.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["ops", "nn", "backends", "game2048", "__version__"]


def __getattr__(name):
    if name in ("ops", "nn", "backends", "game2048"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastdl' has no attribute {name!r}")
