"""Matching proposals to ground truth and sampling the RoIs that train the box head.

Both follow ``torchvision.models.detection._utils`` (names, arguments, codes, random draws).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Matcher", "BalancedPositiveNegativeSampler"]


class Matcher:
    """Assigns each prediction (column of an IoU matrix) the ground-truth box (row) it overlaps
    most, or a negative code.

    ``matcher(match_quality_matrix: Tensor[M, N]) -> Tensor[N]`` (int64): for prediction ``n``,
    the index in ``[0, M)`` of its best ground-truth box when that IoU is ``>= high_threshold``,
    :attr:`BELOW_LOW_THRESHOLD` (-1) when it is ``< low_threshold`` and
    :attr:`BETWEEN_THRESHOLDS` (-2) in between. Ties pick the lowest ground-truth index.

    With ``allow_low_quality_matches``, every ground-truth box also keeps the predictions it
    overlaps most (all of them on a tie), even below ``low_threshold``, so that no box is left
    without a match (the Faster R-CNN RPN rule). The box head of Fast R-CNN does not use it.
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False):
        if low_threshold > high_threshold:
            raise ValueError(
                f"Matcher: low_threshold ({low_threshold}) must not exceed high_threshold ({high_threshold})"
            )
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, match_quality_matrix: Tensor) -> Tensor:
        if match_quality_matrix.dim() != 2:
            raise ValueError(
                f"Matcher: match_quality_matrix must be a Tensor[M, N] (ground truth x predictions), "
                f"got shape {tuple(match_quality_matrix.shape)}"
            )
        if match_quality_matrix.size(0) == 0:
            raise ValueError("Matcher: no ground-truth boxes (match_quality_matrix has 0 rows)")
        if match_quality_matrix.size(1) == 0:
            raise ValueError("Matcher: no predictions (match_quality_matrix has 0 columns)")
        matched_vals, matches = match_quality_matrix.max(dim=0)
        best_matches = matches.clone() if self.allow_low_quality_matches else None
        below_low = matched_vals < self.low_threshold
        between = (matched_vals >= self.low_threshold) & (matched_vals < self.high_threshold)
        matches[below_low] = self.BELOW_LOW_THRESHOLD
        matches[between] = self.BETWEEN_THRESHOLDS
        if best_matches is not None:
            # every prediction that is some box's best (ties included) gets its best match back
            best_per_gt = match_quality_matrix.max(dim=1, keepdim=True).values
            predictions = torch.nonzero(match_quality_matrix == best_per_gt)[:, 1]
            matches[predictions] = best_matches[predictions]
        return matches

    def __repr__(self) -> str:
        return (
            f"Matcher(high_threshold={self.high_threshold}, low_threshold={self.low_threshold}, "
            f"allow_low_quality_matches={self.allow_low_quality_matches})"
        )


class BalancedPositiveNegativeSampler:
    """Draws, per image, at most ``batch_size_per_image`` RoIs of which at most
    ``positive_fraction`` are positive; negatives fill the rest when there are enough.

    ``sampler(labels: list[Tensor[L_i]]) -> (positive_masks, negative_masks)``, two lists of bool
    ``Tensor[L_i]``. Labels ``>= 1`` are positive, ``0`` negative, ``-1`` ignored. The draw is
    ``torch.randperm`` over the positives, then over the negatives, image by image (as in
    torchvision), so ``torch.manual_seed`` reproduces it.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        if batch_size_per_image < 1:
            raise ValueError(
                f"BalancedPositiveNegativeSampler: batch_size_per_image must be >= 1, got {batch_size_per_image}"
            )
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(
                f"BalancedPositiveNegativeSampler: positive_fraction must be in [0, 1], got {positive_fraction}"
            )
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        positive_masks, negative_masks = [], []
        for i, labels_in_image in enumerate(labels):
            if labels_in_image.dim() != 1:
                raise ValueError(
                    f"BalancedPositiveNegativeSampler: labels[{i}] must be a Tensor[L], "
                    f"got {tuple(labels_in_image.shape)}"
                )
            positive = torch.nonzero(labels_in_image >= 1).flatten()
            negative = torch.nonzero(labels_in_image == 0).flatten()
            num_positive = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_negative = min(negative.numel(), self.batch_size_per_image - num_positive)
            chosen_positive = positive[torch.randperm(positive.numel(), device=positive.device)[:num_positive]]
            chosen_negative = negative[torch.randperm(negative.numel(), device=negative.device)[:num_negative]]
            positive_mask = torch.zeros_like(labels_in_image, dtype=torch.bool)
            negative_mask = torch.zeros_like(labels_in_image, dtype=torch.bool)
            positive_mask[chosen_positive] = True
            negative_mask[chosen_negative] = True
            positive_masks.append(positive_mask)
            negative_masks.append(negative_mask)
        return positive_masks, negative_masks

    def __repr__(self) -> str:
        return (
            f"BalancedPositiveNegativeSampler(batch_size_per_image={self.batch_size_per_image}, "
            f"positive_fraction={self.positive_fraction})"
        )
