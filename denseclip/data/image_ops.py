"""The 8-bit image operations of the official pipeline (mmcv 1.3 with its OpenCV backend),
on ``H × W × C`` uint8 numpy arrays (``H × W`` for label maps).

mmcv resizes with ``cv2.resize`` on uint8 data, whose bilinear mode uses fixed-point
weights and rounds to 8 bits; a float resize differs by one level on a fifth of the pixels,
enough to flip the argmax of near-tied logits. These functions call OpenCV the same way, so
their results equal mmcv's to the bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from ..utils import keep_ratio_size

__all__ = ["imrescale", "imresize"]

_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}


def imresize(array: np.ndarray, size: Sequence[int], interpolation: str = "bilinear"
             ) -> np.ndarray:
    """``array`` resized to ``size`` = (H, W) as ``mmcv.imresize`` does (``cv2.resize``;
    ``"bilinear"`` for images, ``"nearest"`` for label maps). No work at the same size."""
    h, w = int(size[0]), int(size[1])
    if array.shape[:2] == (h, w):
        return array
    out = cv2.resize(array, (w, h), interpolation=_INTERPOLATION[interpolation])
    if array.ndim == 3 and out.ndim == 2:  # OpenCV drops a single channel axis
        out = out[:, :, None]
    return out


def imrescale(array: np.ndarray, scale: Sequence[int], interpolation: str = "bilinear"
              ) -> np.ndarray:
    """Keep-ratio resize to the edge bounds ``scale`` (either order), as ``mmcv.imrescale``:
    the size is :func:`denseclip.utils.keep_ratio_size`, the pixels :func:`imresize`."""
    return imresize(array, keep_ratio_size(array.shape[0], array.shape[1], scale),
                    interpolation)
