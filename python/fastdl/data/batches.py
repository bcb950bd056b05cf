"""Fast mini-batches from an in-memory dataset: index the tensors, no per-sample collation."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

__all__ = ["TensorBatches"]


def _tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` of an :class:`ImageTensorDataset`-like dataset (``.images`` and
    ``.labels``), a two-tensor ``TensorDataset``, or a ``Subset`` of either."""
    if isinstance(dataset, Subset):
        images, labels = _tensors(dataset.dataset)
        indices = torch.as_tensor(dataset.indices, dtype=torch.int64)
        return images[indices], labels[indices]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors
    if isinstance(getattr(dataset, "images", None), Tensor) and isinstance(getattr(dataset, "labels", None), Tensor):
        return dataset.images, dataset.labels
    raise TypeError(
        f"TensorBatches needs a dataset held in tensors (.images and .labels, a TensorDataset(images, labels) or a "
        f"Subset of one), got {type(dataset).__name__}; use torch.utils.data.DataLoader for other datasets"
    )


class TensorBatches:
    """Iterate ``(images, labels)`` batches of an in-memory dataset, one epoch per ``iter()``.

    Args:
        dataset: :class:`ImageTensorDataset` (e.g. :class:`CIFAR10`), ``TensorDataset(images,
            labels)`` or a ``Subset`` of one.
        batch_size: images per batch; the last batch is smaller unless ``drop_last``.
        shuffle: a new random order each epoch, drawn from ``generator`` (seeded: reproducible).
        transform: applied to each batch of images after it is moved to ``device`` (e.g.
            :func:`fastdl.data.transforms.train_transform`).
        device: where batches go (the dataset may stay on the CPU); default: the dataset's device.

    Yields ``(transform(images[idx]), labels[idx])``: ``Tensor[B, C, H, W]`` and ``Tensor[B]``.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
        drop_last: bool = False,
        device: torch.device | str | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.images, self.labels = _tensors(dataset)
        self.batch_size, self.shuffle, self.generator = batch_size, shuffle, generator
        self.transform, self.drop_last = transform, drop_last
        self.device = torch.device(device) if device is not None else self.images.device

    def __len__(self) -> int:
        n = self.images.size(0)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = self.images.size(0)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.images.device)
        for batch in range(len(self)):
            idx = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            images = self.images[idx].to(self.device)
            labels = self.labels[idx].to(self.device)
            yield (self.transform(images) if self.transform else images), labels
