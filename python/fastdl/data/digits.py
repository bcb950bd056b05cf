"""scikit-learn's bundled handwritten digits as an image dataset (no download)."""

from __future__ import annotations

import torch

from .dataset import ImageTensorDataset

__all__ = ["digits"]


def digits(split: str = "train", test_fraction: float = 0.2, seed: int = 0) -> ImageTensorDataset:
    """The 1,797 8x8 digit images of ``sklearn.datasets.load_digits`` (real handwriting, UCI).

    ``images`` is ``Tensor[N, 1, 8, 8]`` uint8, the 0..16 grey levels scaled to 0..255;
    ``labels`` are the digits 0..9. ``split``: "train", "test" or "all"; the split is a random
    permutation drawn from ``seed``, ``test_fraction`` of it the test set, so "train" and
    "test" with the same arguments never overlap.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("digits() needs scikit-learn: pip install scikit-learn") from None
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    bunch = load_digits()
    levels = torch.as_tensor(bunch.images, dtype=torch.int64)
    images = ((levels * 255 + 8) // 16).to(torch.uint8).unsqueeze(1)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    if split != "all":
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        num_test = round(test_fraction * len(labels))
        chosen = order[:num_test] if split == "test" else order[num_test:]
        images, labels = images[chosen], labels[chosen]
    return ImageTensorDataset(images, labels, [str(d) for d in range(10)])
