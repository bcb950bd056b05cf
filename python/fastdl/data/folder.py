"""Image files on disk: class-per-folder trees (ImageFolder) and Tiny ImageNet's layout."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .dataset import ImageTensorDataset

__all__ = ["read_image", "ImageFiles", "ImageFolder", "TinyImageNet"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_image(path: str | os.PathLike, mode: str = "RGB") -> Tensor:
    """The image file at ``path`` (JPEG, PNG, ... through Pillow) as ``Tensor[C, H, W]`` uint8,
    converted to the Pillow ``mode`` ("RGB": C = 3, "L": grayscale, C = 1)."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading JPEG/PNG images needs Pillow: pip install pillow") from None
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert(mode))
    except (OSError, SyntaxError, ValueError) as error:  # Pillow's errors for unreadable/truncated files
        raise ValueError(f"{path}: cannot decode the image ({error})") from error
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


class ImageFiles(Dataset):
    """Images decoded from files when indexed.

    ``samples`` is a list of ``(path, label)``; ``dataset[i]`` is
    ``(Tensor[C, H, W] uint8, label)`` with ``transform`` applied to the image if given.
    :meth:`load` decodes them all into an in-memory :class:`ImageTensorDataset`.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        classes: Sequence[str],
        mode: str = "RGB",
        transform: Callable[[Tensor], Tensor] | None = None,
    ):
        self.samples = list(samples)
        self.classes = list(classes)
        self.mode = mode
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        image = read_image(path, self.mode)
        return (self.transform(image) if self.transform else image), label

    def load(self) -> ImageTensorDataset:
        """Every image decoded into one ``Tensor[N, C, H, W]`` uint8 (all images must share a
        size: resize them first otherwise; Tiny ImageNet's are all 64x64)."""
        if not self.samples:
            raise ValueError("load: the dataset has no images")
        first = read_image(self.samples[0][0], self.mode)
        images = torch.empty(len(self.samples), *first.shape, dtype=torch.uint8)
        for i, (path, _) in enumerate(self.samples):
            image = first if i == 0 else read_image(path, self.mode)
            if image.shape != first.shape:
                raise ValueError(f"{path}: size {list(image.shape)} differs from the first image's {list(first.shape)}")
            images[i] = image
        return ImageTensorDataset(images, torch.tensor(self.targets, dtype=torch.int64), self.classes)


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class ImageFolder(ImageFiles):
    """``root/<class>/**/<image>``: one subfolder per class, sorted by name into label indices
    0, 1, ... (as ``torchvision.datasets.ImageFolder`` orders them). Images are decoded on
    access; see :class:`ImageFiles`."""

    def __init__(self, root: str | os.PathLike, mode: str = "RGB", transform=None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such folder")
        classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
        samples = [(path, label) for label, name in enumerate(classes) for path in _image_files(root / name)]
        if not samples:
            raise FileNotFoundError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class subfolders")
        super().__init__(samples, classes, mode, transform)


class TinyImageNet(ImageFiles):
    """Tiny ImageNet (200 classes of 64x64 images) from the extracted ``tiny-imagenet-200`` folder.

    - ``wnids.txt``: the class ids (WordNet ids); labels index them sorted, the order an
      ImageFolder over ``train/`` gives.
    - ``split="train"``: ``train/<wnid>/images/*.JPEG`` (500 per class).
    - ``split="val"``: ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt``
      (lines ``<file>\\t<wnid>\\t<box>``), 50 per class.
    - ``words.txt`` (optional): ``class_names``, the readable names of ``classes``.

    Images are decoded on access (grayscale ones converted to RGB); ``.load()`` gives an
    in-memory ``Tensor[N, 3, 64, 64]`` dataset.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", transform=None):
        root = Path(root)
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val' (the test split has no labels), got {split!r}")
        wnids_path = root / "wnids.txt"
        if not wnids_path.is_file():
            raise FileNotFoundError(f"{wnids_path}: not found; root must be the extracted tiny-imagenet-200 folder")
        classes = sorted(line.strip() for line in wnids_path.read_text().splitlines() if line.strip())
        index = {wnid: i for i, wnid in enumerate(classes)}
        samples = self._train_samples(root, classes) if split == "train" else self._val_samples(root, index)
        super().__init__(samples, classes, "RGB", transform)
        self.class_names = self._read_words(root / "words.txt", classes)

    @staticmethod
    def _train_samples(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
        samples = []
        for label, wnid in enumerate(classes):
            folder = root / "train" / wnid / "images"
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: missing (wnids.txt lists {wnid})")
            samples += [(path, label) for path in _image_files(folder)]
        return samples

    @staticmethod
    def _val_samples(root: Path, index: dict[str, int]) -> list[tuple[Path, int]]:
        annotations = root / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise FileNotFoundError(
                f"{annotations}: not found (a val/ folder already sorted into class folders reads with ImageFolder)"
            )
        samples = []
        for number, line in enumerate(annotations.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise ValueError(
                    f"{annotations}, line {number}: expected '<file>\\t<wnid from wnids.txt>...', got {line!r}"
                )
            path = root / "val" / "images" / fields[0]
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in {annotations} but missing")
            samples.append((path, index[fields[1]]))
        return samples

    @staticmethod
    def _read_words(path: Path, classes: list[str]) -> list[str]:
        if not path.is_file():
            return list(classes)
        names = dict(line.split("\t", 1) for line in path.read_text().splitlines() if "\t" in line)
        return [names.get(wnid, wnid).strip() for wnid in classes]
