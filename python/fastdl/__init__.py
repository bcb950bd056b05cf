"""fastdl: hand-written fast deep-learning kernels for PyTorch.

:mod:`fastdl.ops` is the functional API over ``torch.ops.fastdl.*``, :mod:`fastdl.nn` holds
drop-in modules, :mod:`fastdl.models` ResNets built on them and :mod:`fastdl.data` dataset readers
and batched image transforms; importing any of these loads torch (all but ``data`` also the
operator library). :mod:`fastdl.train` is ``fastdl train`` and :func:`fastdl.train.fit`.
:mod:`fastdl.game2048` (the 2048 engine) needs no torch, so ``import fastdl`` alone imports
nothing heavy.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["ops", "nn", "models", "data", "train", "backends", "game2048", "__version__"]


def __getattr__(name):
    if name in ("ops", "nn", "models", "data", "train", "backends", "game2048"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastdl' has no attribute {name!r}")
