"""mmcv 1.3's ``batched_nms`` (the class- or level-wise NMS of mmdet's post-processing)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import nms

__all__ = ["batched_nms"]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                split_thr: int = 10000) -> Tensor:
    """Indices of the boxes kept by NMS run separately per ``idxs`` value, by decreasing
    score (suppressed where IoU > ``iou_threshold``), as ``mmcv.ops.batched_nms``.

    Below ``split_thr`` boxes all groups run in one NMS, each group's boxes shifted by
    ``idx · (max coordinate + 1)``; from ``split_thr`` on, group by group. torchvision's
    ``batched_nms`` does the same with another switch-over (1000 boxes on the CPU, 5000
    on GPUs); as the shift changes float rounding, the switch-over decides near-threshold
    ties, and mmdet's labels are 0-based (torchvision's R-CNN labels start at 1)."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.shape[0] < split_thr:
        offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
        return nms(boxes + offsets[:, None], scores, iou_threshold)
    kept = torch.zeros_like(scores, dtype=torch.bool)
    for group in torch.unique(idxs):
        members = torch.nonzero(idxs == group)[:, 0]
        kept[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    keep = torch.nonzero(kept)[:, 0]
    return keep[scores[keep].sort(descending=True)[1]]
