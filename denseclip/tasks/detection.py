"""Detection and instance segmentation (RetinaNet, Mask R-CNN on COCO-format data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..classes import load_class_names
from ..config import Config, ConfigError
from ..data.coco import build_coco_dataset, collate_detection, move_detection_batch
from ..dist import DistEnv
from ..evaluation.coco import METRIC_NAMES, evaluate_detection, format_per_category_table
from ..models.build import build_detector
from ..models.detection import DETECTORS
from .base import Task


class DetectionTask(Task):
    """COCO-style detection: RetinaNet (boxes) and Mask R-CNN (boxes and masks)."""

    name = "detection"
    official_batch_size = 16  # 8 GPUs x 2 images (DESIGN §9)
    main_metric = "bbox_mAP"
    summary_keys = tuple(f"bbox_{k}" for k in METRIC_NAMES)

    @staticmethod
    def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
        """The backbone's BatchNorm becomes SyncBatchNorm, as the official detection
        training script does after building the detector (DESIGN §9)."""
        model.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)
        return model

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.with_masks = DETECTORS[cfg.model.task].WITH_MASKS
        if self.with_masks:
            self.summary_keys = (*self.summary_keys, *(f"segm_{k}" for k in METRIC_NAMES))
        self.class_names = load_class_names(cfg.model.classes)

    def build_model(self) -> nn.Module:
        if self.cfg.model.zeroshot:
            raise ConfigError(f"model.zeroshot segments: it needs model.task: segmentation, "
                              f"got {self.cfg.model.task!r}")
        # the detector normalises its uint8 input itself, with the data config's statistics
        return build_detector(self.cfg.model, image_mean=tuple(self.cfg.data.mean),
                              image_std=tuple(self.cfg.data.std))

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
