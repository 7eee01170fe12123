"""RoIAlign over FPN levels with mmdet's level rule."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

__all__ = ["MultiLevelRoIAlign"]


class MultiLevelRoIAlign(nn.Module):
    """RoIAlign over FPN levels with mmdet's level rule
    ``clamp(floor(log2(sqrt(w·h) / finest_scale + 1e-6)), 0, L-1)`` and fixed strides.

    Call signature as torchvision's ``MultiScaleRoIAlign``: ``(features: dict, boxes: list of
    (n_i, 4), image_shapes)`` → (Σn_i, C, *output_size)."""

    def __init__(self, featmap_names: Sequence[str], output_size: int,
                 strides: Sequence[int], sampling_ratio: int = 0, aligned: bool = True,
                 finest_scale: float = 56.0) -> None:
        super().__init__()
        if len(featmap_names) != len(strides):
            raise ValueError("one stride per feature map name is needed")
        self.featmap_names = list(featmap_names)
        self.output_size = (int(output_size), int(output_size))
        self.strides = [int(s) for s in strides]
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.finest_scale = finest_scale

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]] | None = None) -> Tensor:
        feats = [features[name] for name in self.featmap_names]
        # boxes stay float32 (as RoIAlign's autocast rule computes), whatever the features
        rois = torch.cat([
            torch.cat([torch.full_like(b[:, :1], i, dtype=torch.float32), b.float()], dim=1)
            for i, b in enumerate(boxes)
        ])
        channels = feats[0].shape[1]
        if rois.shape[0] == 0:
            return feats[0].new_zeros((0, channels, *self.output_size))
        wh = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
        scale = wh.float().clamp(min=0).sqrt()
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        levels = levels.clamp(0, len(feats) - 1).long()
        parts, where = [], []
        for lvl, (feat, stride) in enumerate(zip(feats, self.strides, strict=True)):
            idx = torch.nonzero(levels == lvl).flatten()
            if idx.numel() == 0:
                continue
            parts.append(roi_align(feat.float(), rois[idx], self.output_size, 1.0 / stride,
                                   self.sampling_ratio, self.aligned))
            where.append(idx)
        out = parts[0].new_zeros((rois.shape[0], channels, *self.output_size))
        for idx, part in zip(where, parts, strict=True):
            out[idx] = part
        return out

    def extra_repr(self) -> str:
        return (f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"strides={self.strides}, sampling_ratio={self.sampling_ratio}, "
                f"aligned={self.aligned}")
