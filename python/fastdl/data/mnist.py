"""MNIST and Fashion-MNIST from their IDX files, raw or gzipped."""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .dataset import ImageTensorDataset

__all__ = ["read_idx", "MNIST", "FashionMNIST"]

# IDX type codes: element dtype (big-endian on disk)
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        content = f.read()
    if content[:2] != b"\x1f\x8b":
        return content
    try:
        return gzip.decompress(content)
    except (EOFError, OSError) as error:
        raise ValueError(f"{path}: truncated or corrupt gzip file ({error})") from error


def read_idx(path: str | os.PathLike) -> Tensor:
    """The array in an IDX file (raw, or gzipped: recognised by its content) as a tensor.

    The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each size as a big-endian
    int32; the data follows, big-endian. A bad magic number or a size mismatch raises a
    ValueError naming the file.
    """
    path = Path(path)
    content = _read_bytes(path)
    if len(content) < 4 or content[:2] != b"\0\0" or content[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: not an IDX file: the magic number must be 00 00 <type> <ndim> with type in "
            f"{[hex(t) for t in _IDX_DTYPES]}, got {content[:4].hex(' ')}"
        )
    dtype, ndim = _IDX_DTYPES[content[2]], content[3]
    header = 4 + 4 * ndim
    if len(content) < header:
        raise ValueError(f"{path}: IDX header promises {ndim} dimensions but the file ends after {len(content)} bytes")
    shape = [int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = math.prod(shape) * dtype.itemsize
    if len(content) - header != expected:
        raise ValueError(
            f"{path}: IDX header says {'x'.join(map(str, shape))} {dtype.name} = {expected} bytes of data, "
            f"but the file has {len(content) - header}"
        )
    array = np.frombuffer(content, dtype=dtype, count=math.prod(shape), offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def _find_file(folders: list[Path], name: str) -> Path:
    for folder in folders:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"no {name} or {name}.gz in {', '.join(map(str, folders))}")


class MNIST(ImageTensorDataset):
    """MNIST read from the IDX files in ``root``: ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte`` (``train=True``, 60,000 images) or ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte`` (10,000), each raw or with ``.gz``. torchvision's layout
    (``root/MNIST/raw/``) is found too. ``images`` is ``Tensor[N, 1, 28, 28]`` uint8,
    ``labels`` ``Tensor[N]`` int64.
    """

    classes = [str(digit) for digit in range(10)]
    folder_name = "MNIST"

    def __init__(self, root: str | os.PathLike, train: bool = True, transform=None):
        root = Path(root)
        folders = [root, root / self.folder_name / "raw", root / self.folder_name]
        prefix = "train" if train else "t10k"
        images_path = _find_file(folders, f"{prefix}-images-idx3-ubyte")
        labels_path = _find_file(folders, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.dim() != 3 or images.dtype != torch.uint8:
            raise ValueError(f"{images_path}: expected uint8 images [N, H, W], got {images.dtype} {list(images.shape)}")
        if labels.dim() != 1 or labels.dtype != torch.uint8:
            raise ValueError(f"{labels_path}: expected uint8 labels [N], got {labels.dtype} {list(labels.shape)}")
        if labels.size(0) != images.size(0):
            raise ValueError(f"{images_path} has {images.size(0)} images but {labels_path} has {labels.size(0)} labels")
        if labels.numel() and labels.max() >= len(self.classes):
            raise ValueError(f"{labels_path}: labels must lie in [0, {len(self.classes)}), got {labels.max()}")
        super().__init__(images.unsqueeze(1), labels.long(), self.classes, transform)


class FashionMNIST(MNIST):
    """Fashion-MNIST: MNIST's file names and format (``root/FashionMNIST/raw/`` is found too),
    ten clothing classes."""

    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    folder_name = "FashionMNIST"
