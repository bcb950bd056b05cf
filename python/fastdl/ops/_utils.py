"""Small argument helpers shared by the op wrappers."""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

BoxesLike = Union[Tensor, Sequence[Tensor]]

INT64_MAX = 2**63 - 1


def check_number(op: str, name: str, value, *, minimum: float | None = None, allow_inf: bool = False) -> float:
    """A real-valued parameter (a threshold, a size, a weight): a number, not NaN (a NaN
    parameter has no meaning, unlike NaN data), finite unless ``allow_inf``, at least
    ``minimum``. Returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{op}: {name} must be {'a number' if allow_inf else 'finite'}, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{op}: {name} must be at least {minimum}, got {value}")
    return value


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``3`` -> ``(3, 3)``; ``(3, 5)`` stays; anything else is an error naming ``name``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return tuple(value)


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
    index = torch.cat([torch.full((b.size(0), 1), i, dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)])
    return torch.cat([index, torch.cat(boxes)], dim=1)


def check_rois(op: str, input: Tensor, rois: Tensor, *, check_values: bool = True) -> None:
    """The Python twin of ``csrc/common/rois.h``: used by composites and fake kernels."""
    torch._check(
        input.dim() == 4,
        lambda: f"{op}: expected input to be a 4-D tensor [N, C, H, W], but got shape {tuple(input.shape)}",
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
    if check_values:
        check_roi_rows(op, rois, input.size(0), f"input of shape {tuple(input.shape)}")


def check_roi_rows(op: str, rois: Tensor, batch_size: int, images: str) -> None:
    """Finite coordinates and whole batch indices in ``[0, batch_size)`` (``check_roi_rows`` in C++)."""
    if rois.numel() == 0:
        return
    index = rois[:, 0]
    torch._check(bool(torch.isfinite(rois).all()), lambda: f"{op}: rois contain NaN or infinite values")
    torch._check(
        bool((index == index.floor()).all()), lambda: f"{op}: rois[:, 0] (batch index) must hold whole numbers"
    )
    lo, hi = float(index.min()), float(index.max())
    torch._check(
        lo >= 0 and hi < batch_size,
        lambda: (
            f"{op}: rois[:, 0] (batch index) must lie in [0, {batch_size}) for {images}, but ranges over [{lo}, {hi}]"
        ),
    )


def check_backward_rois(op: str, rois: Tensor, batch_size: int, channels: int, height: int, width: int) -> None:
    """The internal backward ops' rois and input size (``check_backward_rois`` in C++)."""
    sizes = (batch_size, channels, height, width)
    torch._check(all(v >= 0 for v in sizes), lambda: f"{op}: the input size must be non-negative, got {list(sizes)}")
    torch._check(
        rois.dim() == 2 and rois.size(1) == 5,
        lambda: f"{op}: expected rois of shape [K, 5] with rows (batch_index, x1, y1, x2, y2), got {tuple(rois.shape)}",
    )
    check_roi_rows(op, rois, batch_size, f"batch_size {batch_size}")


def check_spatial_scale(op: str, spatial_scale: float) -> None:
    torch._check(
        spatial_scale > 0 and math.isfinite(spatial_scale),
        lambda: f"{op}: spatial_scale must be positive and finite, got {spatial_scale}",
    )


def check_output_size(op: str, pooled_height: int, pooled_width: int) -> None:
    torch._check(
        pooled_height > 0 and pooled_width > 0,
        lambda: f"{op}: output_size must be positive, got ({pooled_height}, {pooled_width})",
    )


def suggest_memory_format(t: Tensor) -> torch.memory_format:
    """The memory format the C++ kernels give their outputs (``Tensor::suggest_memory_format``)."""
    return torch._prims_common.suggest_memory_format(t)
