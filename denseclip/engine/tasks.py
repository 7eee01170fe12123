"""What differs between segmentation and detection for the shared training engine:
datasets, batching, moving a batch to the device, evaluation, its headline numbers and the
figures ``denseclip test`` draws of it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..classes import load_class_names
from ..config import Config
from ..data.coco import build_coco_dataset, collate_detection, move_detection_batch
from ..data.samplers import collate_segmentation
from ..data.segmentation import build_segmentation_dataset
from ..evaluation.coco import METRIC_NAMES, evaluate_detection, format_per_category_table
from ..evaluation.plots import write_segmentation_figures
from ..evaluation.segmentation import evaluate
from .dist import DistEnv

FIGURES_DIR = "plots"  # out_dir's top level holds the label PNGs, one per image

_log = logging.getLogger(__name__)


class SegmentationTask:
    name = "segmentation"
    summary_keys = ("mIoU", "mAcc", "aAcc")

    @staticmethod
    def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
        """Every BatchNorm becomes SyncBatchNorm (the official segmentation runs)."""
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def __init__(self, cfg: Config, model: nn.Module) -> None:
        self.cfg = cfg
        self.num_classes = model.num_classes

    def dataset(self, split: str, train: bool):
        return build_segmentation_dataset(self.cfg.data, split, self.num_classes, train)

    def group_flags(self, dataset) -> list[int] | None:
        return None  # mmseg samples without grouping

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

    def write_figures(self, metrics: dict[str, Any], out_dir: str | Path) -> list[Path]:
        """Draw the confusion matrix and the per-class IoU of :meth:`evaluate`'s ``metrics``
        as ``confusion_matrix.png`` and ``per_class_iou.png`` in ``out_dir/plots`` (the
        label PNGs fill ``out_dir`` itself); returns their paths. Without matplotlib, or
        without a single labelled pixel to draw, logs a warning (saying what to install) and
        returns ``[]``: the evaluation's data files (``metrics.json``,
        ``confusion_matrix.npy``) are written either way."""
        names = [row["name"] for row in metrics["per_class"]]
        iou = [row["IoU"] for row in metrics["per_class"]]
        try:
            return write_segmentation_figures(Path(out_dir) / FIGURES_DIR,
                                              metrics["confusion"], names, iou)
        except (ImportError, ValueError) as e:
            _log.warning("%s; no figures drawn (metrics.json and confusion_matrix.npy are "
                         "written)", e)
            return []

    def checkpoint_meta(self, dataset) -> dict[str, Any]:
        return {"classes": list(dataset.class_names)}


class DetectionTask:
    name = "detection"
    summary_keys = tuple(f"bbox_{k}" for k in METRIC_NAMES)

    @staticmethod
    def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
        """The backbone's BatchNorm becomes SyncBatchNorm, as the official detection
        training script does after building the detector (DESIGN §9)."""
        model.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)
        return model

    def __init__(self, cfg: Config, model: nn.Module) -> None:
        self.cfg = cfg
        self.with_masks = cfg.model.task == "mask_rcnn"
        if self.with_masks:
            self.summary_keys = (*self.summary_keys, *(f"segm_{k}" for k in METRIC_NAMES))
        self.class_names = load_class_names(cfg.model.classes)

    def dataset(self, split: str, train: bool):
        # Masks are only needed to train Mask R-CNN; evaluation reads them from the JSON.
        # The test pipeline resizes to the model's own scale (no second resize in it).
        det = self.cfg.model.detection
        return build_coco_dataset(self.cfg.data, split, train,
                                  with_masks=self.with_masks and train,
                                  class_names=self.class_names,
                                  test_scale=(det.max_size, det.min_size))

    def group_flags(self, dataset) -> list[int] | None:
        """Aspect-ratio flags for the training loader's group sampler (mmdet's
        ``GroupSampler``), unless ``data.group_by_aspect_ratio`` is off."""
        return list(dataset.aspect_ratio_flags) if self.cfg.data.group_by_aspect_ratio \
            else None

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
        per_category = {t: result[f"{t}_per_category"] for t in ("bbox", "segm")
                        if f"{t}_per_category" in result}
        result["table"] = "\n".join(s for s in summaries if s)
        if per_category:
            result["table"] += "\n\nAP per category (%):\n" + \
                format_per_category_table(per_category)
        return result

    def write_figures(self, metrics: dict[str, Any], out_dir: str | Path) -> list[Path]:
        """Detection draws no figure: its per-category AP tables are written by
        :meth:`evaluate` (``per_category_ap.json`` and ``.md``)."""
        return []

    def checkpoint_meta(self, dataset) -> dict[str, Any]:
        # Category id of each contiguous label, so results map back to the JSON's ids.
        return {"classes": list(dataset.class_names), "cat_ids": list(dataset.cat_ids)}


def make_task(cfg: Config, model: nn.Module) -> SegmentationTask | DetectionTask:
    """The task of ``cfg.model.task`` (a choice checked when the config loads)."""
    if cfg.model.task == "segmentation":
        return SegmentationTask(cfg, model)
    return DetectionTask(cfg, model)
