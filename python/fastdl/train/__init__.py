"""Training ResNets: ``fastdl train`` / ``python -m fastdl.train`` and :func:`fit`.

- :mod:`.config`: :class:`TrainConfig`, the settings of a run, and their checks.
- :mod:`.datasets`: both splits of each data kind in memory, with its recipe.
- :mod:`.model`: the network, wrapped for the device (synchronized BatchNorm, DDP, compile).
- :mod:`.distributed`: torchrun's process group and each rank's share of a global batch.
- :mod:`.sync_batchnorm`: BatchNorm over the global batch on the CPU too.
- :mod:`.checkpoint`: ``last.pt`` / ``best.pt`` and the random states an exact resume needs.
- :mod:`.progress`, :mod:`.plots`: the progress bar, ``curves.png`` and ``predictions.png``.
- :mod:`.loop`: :func:`fit`, the epochs themselves.
- :mod:`.cli`: the command line.

``import fastdl.train`` imports no torch; :func:`fit` does, when first used.

    from fastdl.train import TrainConfig, fit
    result = fit(TrainConfig(model="resnet10", data="digits", epochs=3, out="runs/digits"))
    print(result.best_test_acc, result.per_class_accuracy)
"""

from .config import ConfigError, TrainConfig

__all__ = ["TrainConfig", "ConfigError", "fit", "TrainResult", "main"]


def __getattr__(name):
    if name in ("fit", "TrainResult"):
        from . import loop

        return getattr(loop, name)
    if name == "main":
        from .cli import main

        return main
    raise AttributeError(f"module 'fastdl.train' has no attribute {name!r}")
