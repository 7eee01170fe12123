"""What the predictor returns: one dataclass per task, plus its error type."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DetectionPrediction", "PredictionError", "Prepared", "SegmentationPrediction"]


class PredictionError(ValueError):
    """An input the predictor cannot use (image, class list); the message says why."""


@dataclass
class SegmentationPrediction:
    """One image's segmentation, at the image's original size (H × W).

    ``labels``/``probs`` come from the decode head (trained classes, the model's accuracy);
    ``open_labels``/``open_scores`` from the text score maps for the open-vocabulary class
    list, if one is set (coarse, zero-shot; see :mod:`denseclip.inference`).
    """

    labels: np.ndarray  # (H, W) int64 indices into class_names
    probs: np.ndarray | None  # (K, H, W) float32 softmax of the head (None if not requested)
    class_names: list[str]
    open_labels: np.ndarray | None = None  # (H, W) int64 indices into open_class_names
    open_scores: np.ndarray | None = None  # (K', H, W) float32 cosine similarities, [-1, 1]
    open_class_names: list[str] | None = None


@dataclass
class DetectionPrediction:
    """One image's detections in original pixel coordinates."""

    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2
    labels: np.ndarray  # (N,) int64 indices into class_names
    scores: np.ndarray  # (N,) float32
    class_names: list[str]
    masks: np.ndarray | None = None  # (N, H, W) bool (mask probability >= 0.5), Mask R-CNN


@dataclass
class Prepared:
    """An image decoded and preprocessed by :meth:`Predictor.prepare`."""

    image: np.ndarray  # original RGB uint8 (H, W, 3)
    tensor: torch.Tensor  # segmentation: normalised (3, h, w) at the test scale;
    #                       detection: (3, h, w) float 0..255, uint8-resized to the
    #                       detection scale (boxes are mapped back to the original size)
