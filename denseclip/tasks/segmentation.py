"""Semantic segmentation: what the shared engine, evaluation and tools ask of it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..classes import load_class_names
from ..config import Config
from ..data.samplers import collate_segmentation
from ..data.segmentation import build_segmentation_dataset
from ..dist import DistEnv
from ..evaluation.plots import write_segmentation_figures
from ..evaluation.segmentation import evaluate
from ..models.build import build_segmentor
from ..models.zeroshot import build_zeroshot_segmentor
from .base import Task

FIGURES_DIR = "plots"  # out_dir's top level holds the label PNGs, one per image

_log = logging.getLogger(__name__)


class SegmentationTask(Task):
    """Semantic segmentation (Semantic FPN, and the zero-shot segmentor)."""

    name = "segmentation"
    official_batch_size = 32  # 8 GPUs x 4 images (DESIGN §8)
    main_metric = "mIoU"
    summary_keys = ("mIoU", "mAcc", "aAcc")

    @staticmethod
    def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
        """Every BatchNorm becomes SyncBatchNorm (the official segmentation runs)."""
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.num_classes = len(load_class_names(cfg.model.classes))

    def build_model(self) -> nn.Module:
        if self.cfg.model.zeroshot:
            return build_zeroshot_segmentor(self.cfg.model)
        return build_segmentor(self.cfg.model)

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
