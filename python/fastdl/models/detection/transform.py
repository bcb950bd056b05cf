"""The image side of a detector: normalise, resize, batch with padding, and map the
detections back (torchvision's ``GeneralizedRCNNTransform``, extended to proposals)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["DetectionTransform", "ImageList", "resize_boxes"]


class ImageList:
    """A padded batch ``tensors: Tensor[B, C, H_pad, W_pad]`` and the ``(height, width)`` of each
    image in it before padding (``image_sizes``), as torchvision's ``ImageList``."""

    def __init__(self, tensors: Tensor, image_sizes: list[tuple[int, int]]):
        self.tensors = tensors
        self.image_sizes = image_sizes

    def to(self, device: torch.device | str) -> "ImageList":
        return ImageList(self.tensors.to(device), self.image_sizes)


def resize_boxes(boxes: Tensor, original_size: Sequence[int], new_size: Sequence[int]) -> Tensor:
    """xyxy ``boxes: Tensor[N, 4]`` of an image of ``original_size = (height, width)`` -> the same
    boxes in that image resized to ``new_size``."""
    ratio_height = new_size[0] / original_size[0]
    ratio_width = new_size[1] / original_size[1]
    return boxes * boxes.new_tensor([ratio_width, ratio_height, ratio_width, ratio_height])


class DetectionTransform(nn.Module):
    """Turns a list of images of any sizes into one normalised, padded batch, scaling the
    proposals and the target boxes with their images; :meth:`postprocess` maps detections back.

    Args:
        min_size: the short side each image is resized to; a tuple draws one per image in
            training (uniformly, with torch's generator) and uses the last one in eval.
        max_size: the long side is capped at this: the scale is
            ``min(min_size / short_side, max_size / long_side)``.
        image_mean, image_std: per-channel normalisation (default ImageNet's); the images must be
            floating point in ``[0, 1]``.
        size_divisible: the batch's height and width are padded (with zeros, after normalising)
            up to a multiple of this, the stride of the backbone.

    ``forward(images: list[Tensor[C, H_i, W_i]], proposals: list[Tensor[L_i, 4]] | None,
    targets: list[dict] | None) -> (ImageList, proposals, targets)``: boxes are xyxy in
    pixels; the returned proposals and targets are new objects in the resized images'
    coordinates (the inputs are not modified; other keys of a target are kept).

    Resizing is bilinear (``align_corners=False``, no antialiasing), to
    ``floor(side * scale)``, as torchvision resizes; an image already at its size is not
    interpolated.
    """

    def __init__(
        self,
        min_size: int | Sequence[int] = 800,
        max_size: int = 1333,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        size_divisible: int = 32,
    ):
        super().__init__()
        self.min_size = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        if not self.min_size or any(not isinstance(s, int) or s < 1 for s in self.min_size):
            raise ValueError(
                f"DetectionTransform: min_size must be a positive int or a tuple of them, got {min_size!r}"
            )
        if max_size < max(self.min_size):
            raise ValueError(f"DetectionTransform: max_size ({max_size}) must be >= min_size ({max(self.min_size)})")
        if len(image_mean) != len(image_std) or any(s <= 0 for s in image_std):
            raise ValueError(
                f"DetectionTransform: image_mean and image_std must give one value per channel, the std positive; "
                f"got {tuple(image_mean)} and {tuple(image_std)}"
            )
        if size_divisible < 1:
            raise ValueError(f"DetectionTransform: size_divisible must be >= 1, got {size_divisible}")
        self.max_size = max_size
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.size_divisible = size_divisible

    def forward(
        self,
        images: Sequence[Tensor],
        proposals: Sequence[Tensor] | None = None,
        targets: Sequence[dict[str, Tensor]] | None = None,
    ) -> tuple[ImageList, list[Tensor] | None, list[dict[str, Tensor]] | None]:
        self.check_images(images)
        for name, boxes in (("proposals", proposals), ("targets", targets)):
            if boxes is not None and len(boxes) != len(images):
                raise ValueError(f"DetectionTransform: {len(images)} images but {len(boxes)} {name}")
        resized_images, resized_proposals, resized_targets = [], [], []
        for i, image in enumerate(images):
            original_size = tuple(image.shape[-2:])
            image = self.resize(self.normalize(image))
            new_size = tuple(image.shape[-2:])
            resized_images.append(image)
            if proposals is not None:
                resized_proposals.append(resize_boxes(proposals[i].to(image), original_size, new_size))
            if targets is not None:
                target = dict(targets[i])
                target["boxes"] = resize_boxes(target["boxes"].to(image), original_size, new_size)
                resized_targets.append(target)
        image_sizes = [tuple(image.shape[-2:]) for image in resized_images]
        return (
            ImageList(self.batch_images(resized_images), image_sizes),
            resized_proposals if proposals is not None else None,
            resized_targets if targets is not None else None,
        )

    def check_images(self, images: Sequence[Tensor]) -> None:
        """A clear error unless ``images`` is a non-empty list of floating-point ``Tensor[C, H, W]``
        with the transform's number of channels."""
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError(
                f"images must be a non-empty list of Tensor[C, H, W], got {type(images).__name__} {images!r:.80}"
            )
        channels = len(self.image_mean)
        for i, image in enumerate(images):
            if not isinstance(image, Tensor) or image.dim() != 3:
                shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
                raise ValueError(f"images[{i}] must be a Tensor[C, H, W], got {shape}")
            if not image.is_floating_point():
                raise TypeError(f"images[{i}] must be floating point with values in [0, 1], got {image.dtype}")
            if image.size(0) != channels:
                raise ValueError(
                    f"images[{i}] has {image.size(0)} channels (shape {tuple(image.shape)}), but the transform "
                    f"normalises {channels} (image_mean {self.image_mean})"
                )
            if image.size(1) == 0 or image.size(2) == 0:
                raise ValueError(f"images[{i}] is empty: shape {tuple(image.shape)}")

    def normalize(self, image: Tensor) -> Tensor:
        """``(image - mean) / std`` per channel."""
        mean = torch.tensor(self.image_mean, dtype=image.dtype, device=image.device)[:, None, None]
        std = torch.tensor(self.image_std, dtype=image.dtype, device=image.device)[:, None, None]
        return (image - mean) / std

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The ``(height, width)`` an image of this size is resized to (one draw of ``min_size``
        in training when it holds several)."""
        if self.training and len(self.min_size) > 1:
            min_size = self.min_size[int(torch.randint(len(self.min_size), ()).item())]
        else:
            min_size = self.min_size[-1]
        scale = min(min_size / min(height, width), self.max_size / max(height, width))
        return math.floor(height * scale), math.floor(width * scale)

    def resize(self, image: Tensor) -> Tensor:
        """``Tensor[C, H, W]`` -> ``Tensor[C, H', W']`` with ``(H', W') = target_size(H, W)``."""
        size = self.target_size(image.size(1), image.size(2))
        if size == tuple(image.shape[-2:]):
            return image
        return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]

    def batch_images(self, images: list[Tensor]) -> Tensor:
        """Zero-pad ``Tensor[C, H_i, W_i]`` images at the bottom and right into one
        ``Tensor[B, C, H_pad, W_pad]``, ``H_pad``, ``W_pad`` the largest sides rounded up to a
        multiple of ``size_divisible``."""
        stride = self.size_divisible
        height = math.ceil(max(image.size(1) for image in images) / stride) * stride
        width = math.ceil(max(image.size(2) for image in images) / stride) * stride
        batch = images[0].new_zeros((len(images), images[0].size(0), height, width))
        for slot, image in zip(batch, images):
            slot[:, : image.size(1), : image.size(2)].copy_(image)
        return batch

    def postprocess(
        self,
        detections: list[dict[str, Tensor]],
        image_sizes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Map each detection's ``boxes`` from the resized image (``image_sizes``) back to the
        original one; the dicts are updated in place and returned."""
        for detection, size, original_size in zip(detections, image_sizes, original_image_sizes):
            detection["boxes"] = resize_boxes(detection["boxes"], size, original_size)
        return detections

    def extra_repr(self) -> str:
        return (
            f"min_size={self.min_size}, max_size={self.max_size}, image_mean={self.image_mean}, "
            f"image_std={self.image_std}, size_divisible={self.size_divisible}"
        )
