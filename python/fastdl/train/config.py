"""What a training run is: :class:`TrainConfig`, and the checks that turn a bad value into an
error naming the command-line argument and what it got.

This module imports no torch, so building the command line stays fast.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

__all__ = ["TrainConfig", "ConfigError", "DataSpec", "parse_data", "MODELS", "DATA_KINDS", "DEVICES", "RECIPE_FIELDS"]

# Model names and their BasicBlock/Bottleneck depths (fastdl.models); resnet10 is the small
# one-block-per-stage network for quick runs.
MODELS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

# Data kinds of --data: those taking a path, and those bundled (no path).
DATA_KINDS_WITH_PATH = ("cifar10", "cifar100", "mnist", "fashion-mnist", "folder")
DATA_KINDS_BUNDLED = ("digits",)
DATA_KINDS = DATA_KINDS_WITH_PATH + DATA_KINDS_BUNDLED

DEVICES = ("auto", "cpu", "cuda", "mps")

# The fields that decide the trajectory of a run: a resumed run must keep them. The others
# (epochs, patience, device, compile, amp, workers, progress) may change between the runs.
RECIPE_FIELDS = (
    "model",
    "data",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "seed",
    "limit_train",
    "limit_test",
    "sync_bn",
)


class ConfigError(ValueError):
    """A training setting that cannot work; the message names the argument and the value."""


@dataclass(frozen=True)
class DataSpec:
    """``--data KIND=PATH`` (or a bundled ``KIND``) split into its parts."""

    kind: str
    path: str | None


def parse_data(spec: str) -> DataSpec:
    """``"cifar10=~/data"`` -> ``DataSpec("cifar10", "/home/.../data")``; ``"digits"`` ->
    ``DataSpec("digits", None)``. Raises :class:`ConfigError` for an unknown kind, a missing
    path, a path that does not exist, or a path given to a bundled kind."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"--data: expected KIND=PATH or digits, got {spec!r}")
    kind, has_path, path = spec.partition("=")
    kind = kind.strip().lower()
    if kind not in DATA_KINDS:
        raise ConfigError(
            f"--data {spec}: unknown data kind {kind!r}; expected one of "
            + ", ".join(f"{k}=PATH" for k in DATA_KINDS_WITH_PATH)
            + " or "
            + ", ".join(DATA_KINDS_BUNDLED)
        )
    if kind in DATA_KINDS_BUNDLED:
        if has_path:
            raise ConfigError(f"--data {spec}: {kind} is bundled and takes no path; pass --data {kind}")
        return DataSpec(kind, None)
    if not path:
        raise ConfigError(f"--data {spec}: {kind} needs the folder of its files: --data {kind}=PATH")
    expanded = os.path.expanduser(path)
    if not os.path.exists(expanded):
        raise ConfigError(f"--data {spec}: the path {expanded!r} does not exist")
    if not os.path.isdir(expanded):
        raise ConfigError(f"--data {spec}: the path {expanded!r} is not a folder")
    return DataSpec(kind, expanded)


@dataclass
class TrainConfig:
    """One training run. The defaults are the course recipe: SGD with momentum 0.9 and weight
    decay 5e-4, a cosine learning-rate schedule over ``epochs``, batch 128, learning rate 0.1.

    Attributes:
        model: one of :data:`MODELS`.
        data: ``"cifar10=PATH"``, ``"cifar100=PATH"``, ``"mnist=PATH"``, ``"fashion-mnist=PATH"``,
            ``"folder=PATH"`` or ``"digits"`` (see :func:`parse_data`).
        epochs: the length of the cosine schedule, and of the run unless early stopping ends it.
        batch_size: the global batch: under torchrun each process takes a share of it.
        lr, momentum, weight_decay: SGD's.
        device: "auto" (CUDA, else MPS, else CPU), "cpu", "cuda" or "mps".
        compile: ``torch.compile`` the model.
        channels_last: the model and each batch in channels-last memory format.
        amp: autocast (float16 with a gradient scaler on CUDA and MPS, bfloat16 on CPU).
        workers: threads decoding image files (``folder`` data).
        out: where ``last.pt``, ``best.pt``, ``metrics.json`` and the plots go.
        resume: continue from ``out/last.pt``.
        patience: stop after this many epochs without a better test accuracy (0: never).
        seed: fixes the initial weights, the shuffling and the augmentation.
        limit_train, limit_test: use only this many images of the split (evenly spaced).
        sync_bn: BatchNorm statistics over the global batch under torchrun.
        progress: a progress bar per epoch when printing to a terminal.
    """

    model: str = "resnet18"
    data: str = "digits"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    device: str = "auto"
    compile: bool = False
    channels_last: bool = False
    amp: bool = False
    workers: int = 4
    out: str = "train-results"
    resume: bool = False
    patience: int = 0
    seed: int = 0
    limit_train: int | None = None
    limit_test: int | None = None
    sync_bn: bool = False
    progress: bool = True

    def check(self) -> DataSpec:
        """Raise :class:`ConfigError` for the first impossible setting; return the parsed data."""
        if self.model not in MODELS:
            raise ConfigError(f"MODEL: unknown model {self.model!r}; expected one of {', '.join(MODELS)}")
        spec = parse_data(self.data)
        if self.device not in DEVICES:
            raise ConfigError(f"--device: unknown device {self.device!r}; expected one of {', '.join(DEVICES)}")
        _positive("--epochs", self.epochs)
        _positive("--batch-size", self.batch_size)
        if not self.lr >= 0:
            raise ConfigError(f"--lr: must be >= 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum: must lie in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"--weight-decay: must be >= 0, got {self.weight_decay}")
        if self.workers < 0:
            raise ConfigError(f"--workers: must be >= 0, got {self.workers}")
        if self.patience < 0:
            raise ConfigError(f"--patience: must be >= 0 (0 turns early stopping off), got {self.patience}")
        for name, value in (("--limit-train", self.limit_train), ("--limit-test", self.limit_test)):
            if value is not None:
                _positive(name, value)
        if self.resume:
            last = os.path.join(self.out, "last.pt")
            if not os.path.isfile(last):
                raise ConfigError(
                    f"--resume: no checkpoint {last!r} (--out {self.out}); train without --resume first, or pass "
                    "the --out folder of the run to continue"
                )
        return spec

    def to_dict(self) -> dict:
        """The settings as plain values (stored in checkpoints and metrics.json)."""
        return dataclasses.asdict(self)


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
