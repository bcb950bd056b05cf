"""Small argument helpers shared by the op wrappers."""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

BoxesLike = Union[Tensor, Sequence[Tensor]]


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``3`` -> ``(3, 3)``; ``(3, 5)`` stays; anything else is an error naming ``name``."""
    if isinstance(value, int):
        return value, value
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return value


def boxes_to_rois(boxes: BoxesLike, like: Tensor) -> Tensor:
    """Turn ``Tensor[K, 5]`` or a list of per-image ``Tensor[L, 4]`` into ``Tensor[K, 5]``.

    Rows of the result are ``(batch_index, x1, y1, x2, y2)``; the list form numbers images by
    their position in the list.
    """
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.size(1) != 5:
            raise ValueError(
                "boxes must be a Tensor[K, 5] (batch_index, x1, y1, x2, y2) or a list of "
                f"Tensor[L, 4], got a tensor of shape {tuple(boxes.shape)}"
            )
        return boxes
    boxes = list(boxes)
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.size(1) != 4:
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"boxes[{i}] must be a Tensor[L, 4] (x1, y1, x2, y2), got {shape}")
    if not boxes:
        return like.new_zeros((0, 5))
    index = torch.cat(
        [torch.full((b.size(0), 1), i, dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)]
    )
    return torch.cat([index, torch.cat(boxes)], dim=1)


def check_rois(op: str, input: Tensor, rois: Tensor, *, check_values: bool = True) -> None:
    """The Python twin of ``csrc/common/rois.h``: used by composites and fake kernels."""
    torch._check(
        input.dim() == 4, lambda: f"{op}: expected input to be a 4-D tensor [N, C, H, W], but got shape {tuple(input.shape)}"
    )
    torch._check(
        rois.dim() == 2 and rois.size(1) == 5,
        lambda: f"{op}: expected rois of shape [K, 5] with rows (batch_index, x1, y1, x2, y2), got {tuple(rois.shape)}",
    )
    torch._check(
        input.device == rois.device,
        lambda: f"{op}: input is on {input.device} but rois is on {rois.device}; move them to the same device",
    )
    torch._check(
        input.dtype == rois.dtype, lambda: f"{op}: input has dtype {input.dtype} but rois has dtype {rois.dtype}"
    )
    if check_values and rois.numel() > 0:
        index = rois[:, 0]
        torch._check(bool(torch.isfinite(rois).all()), lambda: f"{op}: rois contain NaN or infinite values")
        torch._check(bool((index == index.floor()).all()), lambda: f"{op}: rois[:, 0] (batch index) must hold whole numbers")
        lo, hi = float(index.min()), float(index.max())
        torch._check(
            lo >= 0 and hi < input.size(0),
            lambda: f"{op}: rois[:, 0] (batch index) must lie in [0, {input.size(0)}) for input of shape "
            f"{tuple(input.shape)}, but ranges over [{lo}, {hi}]",
        )


def check_output_size(op: str, pooled_height: int, pooled_width: int) -> None:
    torch._check(
        pooled_height > 0 and pooled_width > 0,
        lambda: f"{op}: output_size must be positive, got ({pooled_height}, {pooled_width})",
    )


def suggest_memory_format(t: Tensor) -> torch.memory_format:
    """The memory format the C++ kernels give their outputs (``Tensor::suggest_memory_format``)."""
    return torch._prims_common.suggest_memory_format(t)
