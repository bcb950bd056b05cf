"""CIFAR-10 and CIFAR-100 from their "python version" pickles (``cifar-10-batches-py/``,
``cifar-100-python/``), as extracted from the official archives."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .dataset import ImageTensorDataset

__all__ = ["CIFAR10", "CIFAR100"]

# What a CIFAR pickle may reference: numpy arrays and their dtypes. Anything else (a pickle can
# run arbitrary code) is refused.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR file holds only arrays and lists")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    """The dict in a CIFAR pickle, with str keys (the files were written by Python 2, whose str
    arrives as bytes)."""
    try:
        with open(path, "rb") as f:
            content = _ArrayUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise
    except Exception as error:  # truncated or foreign files raise EOFError, UnpicklingError, ...
        raise ValueError(f"{path}: not a CIFAR python pickle ({type(error).__name__}: {error})") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(content).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


def _entry(content: dict, key: str, path: Path):
    if key not in content:
        raise ValueError(f"{path}: no {key!r} entry (has {sorted(content)})")
    return content[key]


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[n, 3, 32, 32]`` uint8 and labels ``[n]`` of one batch file."""
    content = _load_pickle(path)
    data = np.asarray(_entry(content, "data", path))
    labels = np.asarray(_entry(content, label_key, path), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: 'data' must be uint8 [n, 3072] (32x32 RGB rows), got {data.dtype} {list(data.shape)}"
        )
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.size} labels in {label_key!r}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    # each row is the red plane, then green, then blue, each 32x32 row-major
    return data.reshape(-1, 3, 32, 32), labels


def _find_root(root: str | os.PathLike, subdir: str, marker: str) -> Path:
    """``root`` itself if it holds ``marker``, else ``root/subdir`` (the archive's folder)."""
    root = Path(root)
    for candidate in (root, root / subdir):
        if (candidate / marker).is_file():
            return candidate
    raise FileNotFoundError(f"no {marker} in {root} or {root / subdir}: extract the CIFAR python archive there")


class CIFAR10(ImageTensorDataset):
    """CIFAR-10 read from ``root`` (the ``cifar-10-batches-py`` folder, or its parent).

    ``train=True`` reads ``data_batch_1`` .. ``data_batch_5`` (50,000 images), ``train=False``
    reads ``test_batch`` (10,000); class names come from ``batches.meta``. ``images`` is
    ``Tensor[N, 3, 32, 32]`` uint8, ``labels`` ``Tensor[N]`` int64.
    """

    def __init__(self, root: str | os.PathLike, train: bool = True, transform=None):
        folder = _find_root(root, "cifar-10-batches-py", "batches.meta")
        classes = _names(_entry(_load_pickle(folder / "batches.meta"), "label_names", folder / "batches.meta"))
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        batches = [_read_batch(folder / name, "labels", len(classes)) for name in files]
        images = torch.from_numpy(np.concatenate([b[0] for b in batches]))
        labels = torch.from_numpy(np.concatenate([b[1] for b in batches]))
        super().__init__(images, labels, classes, transform)


class CIFAR100(ImageTensorDataset):
    """CIFAR-100 read from ``root`` (the ``cifar-100-python`` folder, or its parent).

    ``train=True`` reads ``train`` (50,000 images), ``train=False`` reads ``test`` (10,000).
    ``label="fine"`` gives the 100 classes, ``label="coarse"`` the 20 superclasses; names come
    from ``meta``. ``images`` is ``Tensor[N, 3, 32, 32]`` uint8, ``labels`` ``Tensor[N]`` int64.
    """

    def __init__(self, root: str | os.PathLike, train: bool = True, label: str = "fine", transform=None):
        if label not in ("fine", "coarse"):
            raise ValueError(f"label must be 'fine' or 'coarse', got {label!r}")
        folder = _find_root(root, "cifar-100-python", "meta")
        classes = _names(_entry(_load_pickle(folder / "meta"), f"{label}_label_names", folder / "meta"))
        images, labels = _read_batch(folder / ("train" if train else "test"), f"{label}_labels", len(classes))
        super().__init__(torch.from_numpy(images), torch.from_numpy(labels), classes, transform)
