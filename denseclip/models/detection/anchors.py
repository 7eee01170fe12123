"""Anchors at fixed strides, mmdet style, and the RetinaNet and RPN anchor settings."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

__all__ = ["GridAnchorGenerator", "retinanet_anchor_generator", "rpn_anchor_generator"]


class GridAnchorGenerator(AnchorGenerator):
    """Anchors at fixed strides, mmdet style: base anchors of ``sizes[l] × ratios`` centred
    on ``stride · (i, j)`` (ratio = h/w, ratio-major order), not rounded, in float32.

    Unlike torchvision's generator, the stride of each level is given rather than derived
    from image and feature sizes, and :meth:`valid_masks` marks anchors inside each image's
    own padded area (mmdet's valid flags).
    """

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[float],
                 strides: Sequence[int], pad_divisor: int = 32) -> None:
        sizes = tuple(tuple(float(s) for s in level) for level in sizes)
        ratios = tuple(float(r) for r in aspect_ratios)
        if len(sizes) != len(strides):
            raise ValueError(f"{len(sizes)} anchor size levels for {len(strides)} strides")
        super().__init__(sizes, (ratios,) * len(sizes))
        self.strides = tuple(int(s) for s in strides)
        self.pad_divisor = int(pad_divisor)

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32,
                         device: torch.device | None = None) -> Tensor:
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"{len(feature_maps)} feature maps for {len(self.strides)} "
                             "anchor levels")
        device = feature_maps[0].device
        levels = []
        for fmap, stride, sizes, ratios in zip(feature_maps, self.strides, self.sizes,
                                               self.aspect_ratios, strict=True):
            h, w = fmap.shape[-2:]
            base = self.generate_anchors(sizes, ratios, torch.float32, device)
            xs = torch.arange(w, dtype=torch.float32, device=device) * stride
            ys = torch.arange(h, dtype=torch.float32, device=device) * stride
            sy, sx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)
            levels.append((shifts + base[None]).reshape(-1, 4))
        anchors = torch.cat(levels)
        return [anchors for _ in image_list.image_sizes]

    def valid_masks(self, image_sizes: Sequence[tuple[int, int]],
                    grid_sizes: Sequence[Sequence[int]], device: torch.device) -> list[Tensor]:
        """Per image, a bool mask over all anchors: True where the anchor's grid cell lies
        inside the image padded to a multiple of ``pad_divisor``."""
        a = [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios, strict=True)]
        out = []
        for h, w in image_sizes:
            pad_h = math.ceil(h / self.pad_divisor) * self.pad_divisor
            pad_w = math.ceil(w / self.pad_divisor) * self.pad_divisor
            masks = []
            for (gh, gw), stride, n in zip(grid_sizes, self.strides, a, strict=True):
                vh, vw = min(math.ceil(pad_h / stride), gh), min(math.ceil(pad_w / stride), gw)
                m = torch.zeros(gh, gw, dtype=torch.bool, device=device)
                m[:vh, :vw] = True
                masks.append(m.reshape(-1, 1).expand(-1, n).reshape(-1))
            out.append(torch.cat(masks))
        return out


def retinanet_anchor_generator(pad_divisor: int = 32) -> GridAnchorGenerator:
    """octave_base_scale 4, scales_per_octave 3, ratios 0.5/1/2, strides 8–128."""
    strides = (8, 16, 32, 64, 128)
    sizes = [[4 * s * 2 ** (i / 3) for i in range(3)] for s in strides]
    return GridAnchorGenerator(sizes, (0.5, 1.0, 2.0), strides, pad_divisor)


def rpn_anchor_generator(pad_divisor: int = 32) -> GridAnchorGenerator:
    """Scale 8, ratios 0.5/1/2, strides 4–64."""
    strides = (4, 8, 16, 32, 64)
    return GridAnchorGenerator([[8 * s] for s in strides], (0.5, 1.0, 2.0), strides,
                               pad_divisor)
