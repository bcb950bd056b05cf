"""What the detection data sets share: the sample, the problems they skip, and batching.

A detection sample is ``(image, target)``:

- ``image``: ``Tensor[3, H, W]`` uint8.
- ``target``: a dict with
  ``boxes`` (``Tensor[M, 4]`` float32, ``(x1, y1, x2, y2)`` in pixels of this image, with
  ``0 <= x1 < x2 <= W`` and ``0 <= y1 < y2 <= H``), ``labels`` (``Tensor[M]`` int64 in
  ``1..C``: ``classes[label - 1]`` names it, 0 is left for the background), ``image_id`` (the
  reader's name for the image), and for the readers whose format has one, a ``Tensor[M]`` bool
  of objects that evaluation ignores: ``difficult`` (Pascal VOC) or ``iscrowd`` (COCO).

Detection batches are lists, since images differ in size and in object count:
:func:`collate_detection` turns a list of samples into ``(list of images, list of targets)``.

Readers skip what they cannot use and say so in one :class:`DetectionDataWarning` per kind of
problem (naming the first files), instead of failing on the thousandth file of a data set.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "DetectionDataset",
    "DetectionSubset",
    "DetectionDataWarning",
    "collate_detection",
    "ignored_objects",
    "image_size",
    "clip_boxes",
]


class DetectionDataWarning(UserWarning):
    """Images or objects a detection reader skipped, and why."""


class DetectionDataset(Dataset):
    """The common part of :class:`~fastdl.data.VOCDetection`, :class:`~fastdl.data.COCODetection`
    and :class:`~fastdl.data.shapes.Shapes`.

    Attributes:
        classes: the object class names; label ``k`` is ``classes[k - 1]``.
        targets: one target dict per image (see the module doc), available without decoding.
        image_sizes: ``(height, width)`` of each image.

    ``dataset[i]`` is ``(load_image(i), targets[i])``, the target's tensors copied (so that a
    transform may change them in place).
    """

    classes: list[str]
    targets: list[dict]
    image_sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, index: int) -> Tensor:
        """``Tensor[3, H, W]`` uint8 of image ``index``."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"{type(self).__name__}: index {index} out of range for {len(self)} images")
        target = {
            key: value.clone() if isinstance(value, Tensor) else value for key, value in self.targets[index].items()
        }
        return self.load_image(index), target

    def __repr__(self) -> str:
        objects = sum(target["boxes"].size(0) for target in self.targets)
        return f"{type(self).__name__}({len(self)} images, {objects} objects, classes {self.classes})"


class DetectionSubset(DetectionDataset):
    """The images ``indices`` of ``dataset`` (its classes, in the given order)."""

    def __init__(self, dataset: DetectionDataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.classes = dataset.classes
        self.targets = [dataset.targets[i] for i in self.indices]
        self.image_sizes = [dataset.image_sizes[i] for i in self.indices]

    def load_image(self, index: int) -> Tensor:
        return self.dataset.load_image(self.indices[index])


def collate_detection(samples: Sequence[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """``[(image, target), ...]`` -> ``([image, ...], [target, ...])``: the ``collate_fn`` of a
    ``DataLoader`` over a detection data set (the default one would try to stack the images)."""
    images, targets = [], []
    for image, target in samples:
        images.append(image)
        targets.append(target)
    return images, targets


def ignored_objects(target: dict) -> Tensor:
    """``Tensor[M]`` bool: the objects of ``target`` that evaluation ignores and training leaves
    out (VOC's ``difficult``, COCO's ``iscrowd``; none for other data)."""
    for key in ("difficult", "iscrowd"):
        if key in target:
            return target[key].bool()
    return torch.zeros(target["boxes"].size(0), dtype=torch.bool)


def clip_boxes(boxes: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Clip ``Tensor[M, 4]`` xyxy boxes into a ``height`` x ``width`` image; returns the clipped
    boxes and ``Tensor[M]`` bool, True for those with a positive width and height after clipping
    (a NaN coordinate counts as degenerate)."""
    clipped = torch.stack(
        [
            boxes[:, 0].clamp(0, width),
            boxes[:, 1].clamp(0, height),
            boxes[:, 2].clamp(0, width),
            boxes[:, 3].clamp(0, height),
        ],
        dim=1,
    )
    valid = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped, valid


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of the image file at ``path``, from its header (nothing is decoded)."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading JPEG/PNG images needs Pillow: pip install pillow") from None
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError) as error:  # Pillow's errors for unreadable files
        raise ValueError(f"{path}: cannot read the image ({error})") from error
    return height, width


class Problems:
    """What a reader skipped, grouped by reason, reported as one warning per reason."""

    SHOWN = 5  # files named per reason

    def __init__(self, where: str):
        self.where = where
        self.found: dict[str, list[str]] = defaultdict(list)

    def add(self, reason: str, item: str | os.PathLike) -> None:
        self.found[reason].append(str(item))

    def warn(self, stacklevel: int = 3) -> None:
        for reason, items in self.found.items():
            shown = ", ".join(items[: self.SHOWN]) + (
                f" and {len(items) - self.SHOWN} more" if len(items) > self.SHOWN else ""
            )
            warnings.warn(
                f"{self.where}: {reason} ({len(items)}): {shown}", DetectionDataWarning, stacklevel=stacklevel
            )


def check_classes(classes: Sequence[str] | None, where: str) -> list[str] | None:
    """``classes`` as a list of distinct non-empty names (None stays None)."""
    if classes is None:
        return None
    if isinstance(classes, str) or not all(isinstance(name, str) and name for name in classes):
        raise ValueError(f"{where}: classes must be a list of non-empty names, got {classes!r}")
    names = list(classes)
    if not names:
        raise ValueError(f"{where}: classes is empty")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{where}: classes repeats {repeated}")
    return names


def resolve_path(path: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(os.fspath(path)))
