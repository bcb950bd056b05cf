"""Image transforms on whole batches ``Tensor[N, C, H, W]``, with per-image randomness.

Random transforms draw from ``generator`` (a ``torch.Generator``; the global one if None) on
its own device and move the draws to the images' device, so a CPU generator seeds
augmentation of CUDA batches as well.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "to_float",
    "normalize",
    "pad",
    "crop",
    "random_crop",
    "random_horizontal_flip",
    "resize",
    "train_transform",
    "eval_transform",
]

# Per-channel mean and standard deviation of the training images, scaled to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
# ImageNet's, for fine-tuning ImageNet-trained weights (e.g. on Tiny ImageNet)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[Tensor], Tensor]


def _check_batch(images: Tensor, where: str) -> None:
    if images.dim() != 4:
        raise ValueError(f"{where}: expected images [N, C, H, W], got shape {list(images.shape)}")


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _draw(generator: torch.Generator | None, device: torch.device, draw: Callable[..., Tensor]) -> Tensor:
    """``draw(generator=..., device=...)`` on the generator's device, moved to ``device``."""
    source = generator.device if generator is not None else device
    return draw(generator=generator, device=source).to(device)


def to_float(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 ``0..255`` to floating ``0..1`` (floating input is returned as it is)."""
    return images.to(dtype) / 255 if not images.is_floating_point() else images


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(images - mean) / std`` per channel on ``Tensor[N, C, H, W]``; uint8 images are first
    scaled to ``0..1`` (:func:`to_float`), as mean/std constants assume."""
    _check_batch(images, "normalize")
    x = to_float(images)
    if len(mean) != x.size(1) or len(std) != x.size(1):
        raise ValueError(f"normalize: {x.size(1)} channels but {len(mean)} means and {len(std)} stds")
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def pad(images: Tensor, padding: int, fill: float = 0) -> Tensor:
    """``Tensor[N, C, H + 2p, W + 2p]``: ``padding`` pixels of ``fill`` on every side."""
    _check_batch(images, "pad")
    return F.pad(images, (padding,) * 4, value=fill) if padding else images


def crop(images: Tensor, top: Tensor, left: Tensor, size: int | Sequence[int]) -> Tensor:
    """Per-image crops: image ``n`` cut at rows ``top[n] : top[n] + h``, columns
    ``left[n] : left[n] + w``, in one gather (no loop over images).

    ``images: Tensor[N, C, H, W]``, ``top``/``left: Tensor[N]`` integer offsets (each crop must
    fit), ``size``: ``h`` or ``(h, w)``. Returns ``Tensor[N, C, h, w]``.
    """
    _check_batch(images, "crop")
    n, c, height, width = images.shape
    h, w = _pair(size)
    top, left = top.to(images.device, torch.int64), left.to(images.device, torch.int64)
    if top.shape != (n,) or left.shape != (n,):
        raise ValueError(f"crop: top and left must be [N] = [{n}], got {list(top.shape)} and {list(left.shape)}")
    if n and (top.min() < 0 or left.min() < 0 or top.max() + h > height or left.max() + w > width):
        raise ValueError(f"crop: a {h}x{w} crop at the given offsets leaves the {height}x{width} images")
    rows = (top[:, None] + torch.arange(h, device=images.device)).view(n, 1, h, 1).expand(n, c, h, width)
    cols = (left[:, None] + torch.arange(w, device=images.device)).view(n, 1, 1, w).expand(n, c, h, w)
    return images.gather(2, rows).gather(3, cols)


def random_crop(
    images: Tensor,
    size: int | Sequence[int],
    padding: int = 0,
    fill: float = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pad by ``padding`` (``fill``), then cut a ``size`` crop at a uniformly random offset drawn
    for each image (the notes' ``RandomCrop(32, padding=4)``). Returns ``Tensor[N, C, h, w]``."""
    padded = pad(images, padding, fill)
    h, w = _pair(size)
    n, _, height, width = padded.shape
    if h > height or w > width:
        raise ValueError(f"random_crop: crop {h}x{w} is larger than the padded images {height}x{width}")
    top = _draw(generator, images.device, lambda **kw: torch.randint(0, height - h + 1, (n,), **kw))
    left = _draw(generator, images.device, lambda **kw: torch.randint(0, width - w + 1, (n,), **kw))
    return crop(padded, top, left, (h, w))


def random_horizontal_flip(images: Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each image left-right with probability ``p``, independently."""
    _check_batch(images, "random_horizontal_flip")
    flip = _draw(generator, images.device, lambda **kw: torch.rand(images.size(0), **kw)) < p
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def resize(images: Tensor, size: int | Sequence[int], mode: str = "bilinear", antialias: bool = True) -> Tensor:
    """``Tensor[N, C, h, w]`` by ``F.interpolate`` (``antialias`` applies to bilinear/bicubic
    downscaling). uint8 images are resized in float32 and rounded back to uint8."""
    _check_batch(images, "resize")
    x = images if images.is_floating_point() else images.float()
    smooth = mode in ("bilinear", "bicubic")
    out = F.interpolate(
        x, size=_pair(size), mode=mode, antialias=antialias and smooth, **({"align_corners": False} if smooth else {})
    )
    return out if images.is_floating_point() else out.round_().clamp_(0, 255).to(images.dtype)


def train_transform(
    mean: Sequence[float],
    std: Sequence[float],
    padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> Transform:
    """The notes' training augmentation as one batch function: random crop of the input size
    after ``padding``, random horizontal flip (if ``flip``; not for digits), then
    :func:`normalize`. ``uint8 Tensor[N, C, H, W] -> float32 Tensor[N, C, H, W]``."""

    def transform(images: Tensor) -> Tensor:
        images = random_crop(images, images.shape[-2:], padding, generator=generator)
        if flip:
            images = random_horizontal_flip(images, generator=generator)
        return normalize(images, mean, std)

    return transform


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> Transform:
    """:func:`normalize` only, for evaluation."""
    return lambda images: normalize(images, mean, std)
