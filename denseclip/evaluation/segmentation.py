"""Semantic-segmentation evaluation over a (sharded) dataset.

The model runs its own test-time inference (:class:`~denseclip.models.seg_inference.SegInference`:
whole image or sliding windows, multi-scale views, as its ``inference_settings`` say).
Single-scale evaluation takes the dataset's test-pipeline ``image``. Multi-scale evaluation
(``aug_test``) loads each original decoded image instead (``dataset.get(i, original=True)``)
and the model rescales it once per ratio (``model.aug_inference``), as mmseg's
``MultiScaleFlipAug`` does, rather than resampling the test-scaled image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from ..config import Config
from ..data.samplers import build_test_loader
from ..dist import DistEnv
from ..utils import unwrap_model
from .metrics import SegmentationMetric


class OriginalImages(Dataset):
    """``dataset`` seen through ``dataset.get(index, original=True)``: items with the
    original uint8 image (``ori_image``), ``ori_target``, ``name`` and ``ori_size``, for
    multi-scale testing (the test pipeline is skipped)."""

    def __init__(self, dataset: Any):
        if not callable(getattr(dataset, "get", None)):
            raise TypeError(
                f"multi-scale testing needs the original images, which a "
                f"{type(dataset).__name__} does not provide (a SegmentationDataset does)")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.dataset.get(index, original=True)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, cfg: Config, env: DistEnv | None = None,
             aug_test: bool = False, out_dir: str | Path | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset`` (test pipeline): each process runs its exact shard,
    the confusion matrices are summed across processes, and every process returns the
    metrics (mIoU, mAcc, aAcc in percent, per-class table). ``model`` (or the model it
    wraps) is a :class:`~denseclip.models.seg_inference.SegInference` model: its
    ``inference_settings`` (set from ``cfg.evaluation`` when the task builds it) choose
    whole-image or sliding-window inference. Predictions are resized to each image's
    original size. ``aug_test``: multi-scale (+ flip) testing of the original images
    (``evaluation.aug_ratios``/``aug_flip``). The result also holds
    ``confusion``, the summed ``K x K`` int64 confusion matrix (rows: ground truth, columns:
    prediction) as a NumPy array. With ``out_dir``, one label PNG per image (dataset label
    space), ``metrics.json`` (all but the table and the matrix) and ``confusion_matrix.npy``
    are written there."""
    env = env or DistEnv()
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    num_classes = net.num_classes
    metric = SegmentationMetric(num_classes, cfg.model.ignore_index)
    source = OriginalImages(dataset) if aug_test else dataset
    loader = build_test_loader(source, env.rank, env.world_size, cfg.data.num_workers)
    bar = tqdm(loader, desc="eval", disable=not (progress and env.is_main), leave=False,
               dynamic_ncols=True)
    for batch in bar:
        ori_size = tuple(batch["ori_size"][0])
        if aug_test:
            probs = net.aug_inference(batch["ori_image"][0], ori_size, device=env.device)
        else:
            probs = net.inference(batch["image"].to(env.device), ori_size).softmax(dim=1)
        pred = probs.argmax(dim=1)[0].cpu()
        metric.update(pred, batch["ori_target"][0])
        if out_dir is not None:
            dataset.save_prediction(pred, out_dir, batch["name"][0])
    metric.all_reduce()
    class_names = getattr(dataset, "class_names", None)
    result = metric.compute(class_names)
    result["table"] = metric.format_table(class_names)
    result["num_images"] = len(dataset)
    result["confusion"] = metric.confusion.cpu().numpy()
    if out_dir is not None and env.is_main:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "metrics.json").write_text(json.dumps(
            {k: v for k, v in result.items() if k not in ("table", "confusion")}, indent=2,
            default=float))
        np.save(Path(out_dir) / "confusion_matrix.npy", result["confusion"])
    net.train(was_training)
    return result
