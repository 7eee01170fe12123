"""What differs between segmentation and detection for the shared training engine:
datasets, batching, moving a batch to the device, evaluation and its headline numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..classes import load_class_names
from ..config import Config
from ..data.coco import build_coco_dataset, collate_detection, move_detection_batch
from ..data.samplers import collate_segmentation
from ..data.segmentation import build_segmentation_dataset
from ..evaluation.coco import evaluate_detection
from ..evaluation.segmentation import evaluate
from .dist import DistEnv


class SegmentationTask:
    name = "segmentation"
    summary_keys = ("mIoU", "mAcc", "aAcc")
    sync_batchnorm = True  # the official runs use SyncBN

    def __init__(self, cfg: Config, model: nn.Module) -> None:
        self.cfg = cfg
        self.num_classes = model.num_classes

    def dataset(self, split: str, train: bool):
        return build_segmentation_dataset(self.cfg.data, split, self.num_classes, train)

    @property
    def collate(self):
        return collate_segmentation

    def to_device(self, batch: dict[str, Any], device: torch.device):
        return (batch["image"].to(device, non_blocking=True),
                batch["target"].to(device, non_blocking=True))

    def evaluate(self, model: nn.Module, dataset, env: DistEnv, aug_test: bool = False,
                 out_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
        return evaluate(model, dataset, self.cfg, env, aug_test=aug_test, out_dir=out_dir,
                        progress=progress)

    def checkpoint_meta(self, dataset) -> dict[str, Any]:
        return {"classes": list(dataset.class_names)}


class DetectionTask:
    name = "detection"
    summary_keys = tuple(f"bbox_{k}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
    sync_batchnorm = False  # per-GPU BatchNorm

    def __init__(self, cfg: Config, model: nn.Module) -> None:
        self.cfg = cfg
        self.with_masks = cfg.model.task == "mask_rcnn"
        if self.with_masks:
            self.summary_keys = (*self.summary_keys,
                                 *(f"segm_{k}" for k in ("AP", "AP50", "AP75", "APs", "APm",
                                                         "APl")))
        self.class_names = load_class_names(cfg.model.classes)

    def dataset(self, split: str, train: bool):
        # Masks are only needed to train Mask R-CNN; evaluation reads them from the JSON.
        return build_coco_dataset(self.cfg.data, split, train,
                                  with_masks=self.with_masks and train,
                                  class_names=self.class_names)

    @property
    def collate(self):
        return collate_detection

    def to_device(self, batch: dict[str, Any], device: torch.device):
        return move_detection_batch(batch, device, non_blocking=True)

    def evaluate(self, model: nn.Module, dataset, env: DistEnv, aug_test: bool = False,
                 out_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
        if aug_test:
            raise ValueError("--aug-test is for segmentation; detection evaluates at "
                             "the (1333, 800) scale only")
        result = evaluate_detection(model, dataset, env, out_dir,
                                    num_workers=self.cfg.data.num_workers, progress=progress)
        summaries = [result.get(f"{t}_summary", "") for t in ("bbox", "segm")]
        result["table"] = "\n".join(s for s in summaries if s)
        return result

    def checkpoint_meta(self, dataset) -> dict[str, Any]:
        # Category id of each contiguous label, so results map back to the JSON's ids.
        return {"classes": list(dataset.class_names), "cat_ids": list(dataset.cat_ids)}


def make_task(cfg: Config, model: nn.Module) -> SegmentationTask | DetectionTask:
    """The task of ``cfg.model.task`` (a choice checked when the config loads)."""
    if cfg.model.task == "segmentation":
        return SegmentationTask(cfg, model)
    return DetectionTask(cfg, model)
