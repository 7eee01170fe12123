"""Max-IoU matching with mmdet's low-quality rule."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection import _utils as det_utils

__all__ = ["MaxIoUMatcher"]


class MaxIoUMatcher(det_utils.Matcher):
    """torchvision's matcher with mmdet's ``MaxIoUAssigner`` low-quality rule: each gt whose
    best IoU is at least ``min_pos_iou`` claims every prediction at that IoU (ties
    included), later gts overriding earlier ones. ``min_pos_iou=None`` disables it."""

    def __init__(self, high_threshold: float, low_threshold: float,
                 min_pos_iou: float | None = None) -> None:
        super().__init__(high_threshold, low_threshold, min_pos_iou is not None)
        self.min_pos_iou = min_pos_iou

    def set_low_quality_matches_(self, matches: Tensor, all_matches: Tensor,
                                 match_quality_matrix: Tensor) -> None:
        best = match_quality_matrix.max(dim=1).values  # (G,)
        claim = (match_quality_matrix == best[:, None]) & (best[:, None] >= self.min_pos_iou)
        claimed = claim.any(dim=0)
        if not bool(claimed.any()):
            return
        # index of the last gt claiming each prediction
        last = claim.shape[0] - 1 - claim.flip(0).to(torch.uint8).argmax(dim=0)
        matches[claimed] = last[claimed]
