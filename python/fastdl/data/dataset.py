"""The in-memory image dataset every reader returns."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["ImageTensorDataset"]


class ImageTensorDataset(Dataset):
    """Images and labels held as two tensors.

    Attributes:
        images: ``Tensor[N, C, H, W]`` uint8 (0..255).
        labels: ``Tensor[N]`` int64, indices into ``classes``.
        classes: the class names.

    ``dataset[i]`` is ``(images[i], labels[i])`` (``Tensor[C, H, W]`` uint8 and an int64 scalar),
    with ``transform`` applied to the image if given; the default ``DataLoader`` collation
    stacks these. :class:`fastdl.data.TensorBatches` slices whole batches instead, faster.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        classes: Sequence[str],
        transform: Callable[[Tensor], Tensor] | None = None,
    ):
        if images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {list(images.shape)}")
        if labels.shape != (images.size(0),):
            raise ValueError(f"labels must be [N] = [{images.size(0)}], got shape {list(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return self.images.size(0)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.labels[index]

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"{type(self).__name__}({n} images [{c}, {h}, {w}], {len(self.classes)} classes)"
