"""The official test-time view, restated with direct OpenCV calls (mmcv 1.3 / mmseg 0.19)."""

from __future__ import annotations

import cv2
import numpy as np
import torch

# The config's normalisation, stored as float32 by mmseg's Normalize.
OFFICIAL_MEAN = np.array([122.7709383, 116.7460125, 104.09373615], dtype=np.float32)
OFFICIAL_STD = np.array([68.5005327, 66.6321579, 70.32316305], dtype=np.float32)


def official_view(image: np.ndarray, bounds) -> torch.Tensor:
    """One view of mmseg's MultiScaleFlipAug, with direct OpenCV calls: Resize
    (mmcv.imrescale of the original BGR uint8 image) then Normalize(to_rgb=True)."""
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    h, w = bgr.shape[:2]
    factor = min(max(bounds) / max(h, w), min(bounds) / min(h, w))
    size = int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)
    img = cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR).astype(np.float32)
    cv2.cvtColor(img, cv2.COLOR_BGR2RGB, img)
    cv2.subtract(img, np.float64(OFFICIAL_MEAN.reshape(1, -1)), img)
    cv2.multiply(img, 1 / np.float64(OFFICIAL_STD.reshape(1, -1)), img)
    return torch.from_numpy(img).permute(2, 0, 1)
