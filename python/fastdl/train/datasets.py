"""The data of a run: both splits in memory, with the recipe that goes with each kind.

=============  ==========================================  ===================  ================
kind           splits                                      normalised with      augmentation
=============  ==========================================  ===================  ================
cifar10        CIFAR10(path), test_batch                   CIFAR-10 mean/std    crop(pad 4), flip
cifar100       CIFAR100(path), test                        CIFAR-100 mean/std   crop(pad 4), flip
mnist          MNIST(path) train, t10k                     MNIST mean/std       none
fashion-mnist  FashionMNIST(path) train, t10k              the train images'    none
folder         path/train + path/val (ImageFolder), or     the train images'    crop(pad H/8), flip
               Tiny ImageNet's layout (wnids.txt)
digits         scikit-learn's 8x8 digits, 80/20 split      the train images'    none
=============  ==========================================  ===================  ================

CIFAR, MNIST and digits use the small-input stem (3x3 stride-1 ``conv1``, no max pool); so do
folder images of at most 64x64 pixels.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .. import data
from ..data import transforms as T
from ..data.dataset import ImageTensorDataset
from .config import ConfigError, DataSpec

__all__ = ["TrainData", "load_data", "describe", "channel_mean_std", "evenly_spaced"]


@dataclass
class TrainData:
    """Both splits (uint8 images in memory) and how to feed them to a model."""

    train: ImageTensorDataset
    test: ImageTensorDataset
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int  # random crop of the image size after this much zero padding (0: no crop)
    flip: bool  # random horizontal flips
    small_input: bool  # the CIFAR stem

    @property
    def in_channels(self) -> int:
        return self.train.images.size(1)

    def train_transform(self, generator: torch.Generator):
        """uint8 batch -> augmented, normalised float32 batch, drawing from ``generator``."""
        if self.crop_padding == 0 and not self.flip:
            return self.eval_transform()
        mean, std, padding, flip = self.mean, self.std, self.crop_padding, self.flip

        def transform(images: Tensor) -> Tensor:
            if padding:
                images = T.random_crop(images, images.shape[-2:], padding, generator=generator)
            if flip:
                images = T.random_horizontal_flip(images, generator=generator)
            return T.normalize(images, mean, std)

        return transform

    def eval_transform(self):
        return T.eval_transform(self.mean, self.std)


def evenly_spaced(n: int, limit: int | None) -> Tensor | None:
    """Indices of ``limit`` of ``n`` items spread evenly (every class of a class-sorted folder
    keeps its share), or None when ``limit`` keeps them all."""
    if limit is None or limit >= n:
        return None
    return torch.linspace(0, n - 1, limit, dtype=torch.float64).round().long()


def channel_mean_std(images: Tensor, chunk: int = 2048) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 ``images [N, C, H, W]`` on the 0..1
    scale, summed in float64 over chunks (no float copy of the whole set)."""
    channels = images.size(1)
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.size(0), chunk):
        x = images[start : start + chunk].to(torch.float64) / 255
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
    count = images.numel() / channels
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _limited(dataset: ImageTensorDataset, limit: int | None) -> ImageTensorDataset:
    chosen = evenly_spaced(len(dataset), limit)
    if chosen is None:
        return dataset
    return ImageTensorDataset(dataset.images[chosen], dataset.labels[chosen], dataset.classes)


def _load_files(files: data.ImageFiles, limit: int | None, workers: int, where: str) -> ImageTensorDataset:
    """Decode (the chosen ``limit`` of) ``files`` into memory, ``workers`` threads at a time
    (Pillow decodes without holding the GIL)."""
    chosen = evenly_spaced(len(files.samples), limit)
    samples = files.samples if chosen is None else [files.samples[i] for i in chosen.tolist()]

    def read(sample):
        return data.read_image(sample[0], files.mode)

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            images = list(pool.map(read, samples))
    else:
        images = [read(sample) for sample in samples]
    sizes = {tuple(image.shape) for image in images}
    if len(sizes) > 1:
        raise ConfigError(
            f"{where}: the images differ in size ({', '.join('x'.join(map(str, s[1:])) for s in sorted(sizes)[:4])}); "
            "training reads them into one tensor, so resize them to one size first"
        )
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return ImageTensorDataset(torch.stack(images), labels, files.classes)


def _folder(spec: DataSpec, limit_train, limit_test, workers) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    root = Path(spec.path)
    where = f"--data folder={spec.path}"
    if (root / "wnids.txt").is_file():
        train_files, test_files = data.TinyImageNet(root, "train"), data.TinyImageNet(root, "val")
    else:
        splits = [root / name for name in ("train", "val")]
        if not splits[1].is_dir() and (root / "test").is_dir():
            splits[1] = root / "test"
        missing = [str(folder) for folder in splits if not folder.is_dir()]
        if missing:
            raise ConfigError(
                f"{where}: expected train/ and val/ (or test/) subfolders holding one folder per class, or Tiny "
                f"ImageNet's wnids.txt; missing {', '.join(missing)}"
            )
        train_files, test_files = data.ImageFolder(splits[0]), data.ImageFolder(splits[1])
        if train_files.classes != test_files.classes:
            raise ConfigError(
                f"{where}: {splits[0]} and {splits[1]} hold different class folders "
                f"({len(train_files.classes)} vs {len(test_files.classes)}); both need the same classes"
            )
    train = _load_files(train_files, limit_train, workers, where)
    test = _load_files(test_files, limit_test, workers, where)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise ConfigError(
            f"{where}: train images are {list(train.images.shape[1:])} but test images {list(test.images.shape[1:])}"
        )
    return train, test


def _read(spec: DataSpec, limit_train, limit_test, workers) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """Both splits of ``spec``, limited."""
    if spec.kind == "folder":
        return _folder(spec, limit_train, limit_test, workers)
    if spec.kind == "digits":
        train, test = data.digits("train"), data.digits("test")
    else:
        reader = {
            "cifar10": data.CIFAR10,
            "cifar100": data.CIFAR100,
            "mnist": data.MNIST,
            "fashion-mnist": data.FashionMNIST,
        }[spec.kind]
        train, test = reader(spec.path, train=True), reader(spec.path, train=False)
    return _limited(train, limit_train), _limited(test, limit_test)


def load_data(
    spec: DataSpec, limit_train: int | None = None, limit_test: int | None = None, workers: int = 0
) -> TrainData:
    """Read both splits of ``spec`` and pick their recipe (the table in this module's doc).
    A reader's error (a missing or damaged file) comes back as a :class:`ConfigError` naming
    ``--data``."""
    try:
        train, test = _read(spec, limit_train, limit_test, workers)
    except (FileNotFoundError, ValueError) as error:
        if isinstance(error, ConfigError):
            raise
        shown = spec.kind if spec.path is None else f"{spec.kind}={spec.path}"
        raise ConfigError(f"--data {shown}: {error}") from error
    if len(train) == 0 or len(test) == 0:
        raise ConfigError(f"--data {spec.kind}: the {'train' if len(train) == 0 else 'test'} split has no images")
    constants = {
        "cifar10": (T.CIFAR10_MEAN, T.CIFAR10_STD),
        "cifar100": (T.CIFAR100_MEAN, T.CIFAR100_STD),
        "mnist": (T.MNIST_MEAN, T.MNIST_STD),
    }
    mean, std = constants.get(spec.kind) or channel_mean_std(train.images)
    height, width = train.images.shape[-2:]
    if spec.kind in ("cifar10", "cifar100"):
        padding, flip, small = 4, True, True
    elif spec.kind == "folder":
        padding, flip, small = max(height, width) // 8, True, max(height, width) <= 64
    else:  # mnist, fashion-mnist, digits: centred glyphs, no mirror images
        padding, flip, small = 0, False, True
    return TrainData(train, test, list(train.classes), tuple(mean), tuple(std), padding, flip, small)


def describe(train_data: TrainData, spec: DataSpec) -> str:
    """One line: what was read."""
    c, h, w = train_data.train.images.shape[1:]
    source = spec.kind if spec.path is None else f"{spec.kind} ({os.path.abspath(spec.path)})"
    return (
        f"data: {source}: {len(train_data.train)} train / {len(train_data.test)} test images [{c}, {h}, {w}], "
        f"{len(train_data.classes)} classes"
    )
