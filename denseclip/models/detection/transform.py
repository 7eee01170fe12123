"""The detectors' input transform (normalise, keep-ratio resize, pad), mmdet's scale
factors between the network input and the original images, and the paste of predicted
masks into the original image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ...utils import keep_ratio_size

__all__ = ["DetectionTransform", "paste_masks", "scale_factors"]


def paste_masks(masks: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Paste M×M mask probabilities (N×1×M×M) into an image of ``size`` at ``boxes`` (N×4)
    by bilinear sampling at pixel centres (mmdet's paste); zero outside the boxes."""
    h, w = int(size[0]), int(size[1])
    n = masks.shape[0]
    out = torch.zeros((n, 1, h, w), dtype=torch.float32, device=masks.device)
    if n == 0 or h == 0 or w == 0:
        return out
    ys = torch.arange(h, dtype=torch.float32, device=masks.device) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=masks.device) + 0.5
    boxes = boxes.float()
    chunk = max(1, (1 << 24) // (h * w))
    for start in range(0, n, chunk):
        b = boxes[start:start + chunk]
        x0, y0, x1, y1 = b.unbind(1)
        gy = (ys[None] - y0[:, None]) / (y1 - y0).clamp(min=1e-6)[:, None] * 2 - 1
        gx = (xs[None] - x0[:, None]) / (x1 - x0).clamp(min=1e-6)[:, None] * 2 - 1
        grid = torch.stack([gx[:, None, :].expand(-1, h, -1), gy[:, :, None].expand(-1, -1, w)],
                           dim=3)
        out[start:start + chunk] = F.grid_sample(masks[start:start + chunk].float(), grid,
                                                 align_corners=False)
    return out


def scale_factors(image_sizes: Sequence[tuple[int, int]],
                  original_sizes: Sequence[tuple[int, int]],
                  device: torch.device | None = None) -> Tensor:
    """mmdet's ``scale_factor`` per image: (B, 4) float32 rows ``(w_scale, h_scale, w_scale,
    h_scale)`` with ``w_scale = resized width / original width`` (mmdet's ``Resize``).
    Boxes in the network input divided by it are in original pixels (``rescale=True``)."""
    rows = [[w / ow, h / oh, w / ow, h / oh]
            for (h, w), (oh, ow) in zip(image_sizes, original_sizes, strict=True)]
    return torch.tensor(rows, dtype=torch.float32, device=device).reshape(-1, 4)


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's detector transform (normalise, resize, pad to a multiple) with mmcv's
    resize rounding and no work when the image already has the target size (the data
    pipelines and the predictor resize the uint8 image with OpenCV beforehand, as mmcv
    does; a float bilinear resize here is the fallback for other inputs).

    :meth:`postprocess` returns the predictions unchanged: the heads rescale boxes to the
    original images before NMS and paste masks there themselves (mmdet's ``rescale=True``),
    so torchvision's box rescaling after NMS must not run."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        h, w = image.shape[-2:]
        size = keep_ratio_size(h, w, (self.max_size, self.min_size[-1]))
        if size == (h, w):
            return image, target
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is None:
            return image, target
        target = dict(target)
        ratio = torch.tensor([size[1] / w, size[0] / h] * 2, device=image.device)
        target["boxes"] = target["boxes"] * ratio.to(target["boxes"].dtype)
        if "masks" in target:
            masks = target["masks"]
            if masks.shape[0] == 0:
                target["masks"] = masks.new_zeros((0, *size))
            else:
                target["masks"] = F.interpolate(masks[:, None].float(), size=size,
                                                mode="nearest")[:, 0].to(masks.dtype)
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        return result
