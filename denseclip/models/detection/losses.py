"""DenseCLIP's auxiliary box-mask loss on the detectors' score map (DESIGN §6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["box_seg_loss"]


def box_seg_loss(score_logits: Tensor, boxes: Sequence[Tensor], labels: Sequence[Tensor],
                 stride: int = 4) -> Tensor:
    """DenseCLIP's auxiliary box-mask loss (DESIGN §6).

    ``score_logits`` (B, K, H, W) is the τ-divided score map at ``stride``; per image and
    class the target is 1 inside that class's boxes (coordinates divided by ``stride``,
    truncated, clamped to W−1 / H−1, end-exclusive, as the official code does); pixels
    inside any box are the ones counted. Returns
    Σ BCE(sigmoid(score), target) over classes and counted pixels / (K × counted pixels),
    computed over the batch as one tensor."""
    b, k, h, w = score_logits.shape
    target = score_logits.new_zeros((b, k, h, w), dtype=torch.float32)
    counted = torch.zeros((b, 1, h, w), dtype=torch.bool, device=score_logits.device)
    ys = torch.arange(h, device=score_logits.device)
    xs = torch.arange(w, device=score_logits.device)
    for i, (bx, lb) in enumerate(zip(boxes, labels, strict=True)):
        if bx.numel() == 0:
            continue
        q = torch.div(bx.detach(), stride).trunc().long()
        # clamped to the last row / column, then used end-exclusive (the official code): a
        # box reaching the right or bottom edge leaves out that last column or row
        x1, x2 = q[:, 0].clamp(0, w - 1), q[:, 2].clamp(0, w - 1)
        y1, y2 = q[:, 1].clamp(0, h - 1), q[:, 3].clamp(0, h - 1)
        inside = ((ys[None, :, None] >= y1[:, None, None]) & (ys[None, :, None] < y2[:, None, None])
                  & (xs[None, None, :] >= x1[:, None, None])
                  & (xs[None, None, :] < x2[:, None, None]))  # (n, H, W)
        target[i].index_add_(0, lb.long(), inside.float())
        counted[i, 0] = inside.any(dim=0)
    target.clamp_(max=1.0)
    loss = F.binary_cross_entropy_with_logits(score_logits.float(), target, reduction="none")
    mask = counted.float()
    return (loss * mask).sum() / (k * mask.sum()).clamp(min=1.0)
