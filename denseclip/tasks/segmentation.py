"""Semantic segmentation: what the shared engine, evaluation and tools ask of it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..classes import load_class_names
from ..config import Config, ConfigError
from ..data.generated import write_ade20k_set
from ..data.samplers import collate_segmentation
from ..data.segmentation import ADE20KDataset, build_segmentation_dataset
from ..data.transforms import build_train_transforms
from ..dist import DistEnv
from ..evaluation.plots import write_segmentation_figures
from ..evaluation.segmentation import evaluate
from ..models.build import build_segmentor
from ..models.zeroshot import build_zeroshot_segmentor
from .base import Task
from .results import SegmentationPrediction
from .writers import write_segmentation

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

    # ------------------------------------------------------------------ tools
    verb = "Segment"
    supports_open_vocabulary = True
    onnx_export = True
    slide_inference = True
    bench_data = "ADE20K-sized"

    def needs_probs(self, heatmaps: bool, open_classes: bool) -> bool:
        """Probability heatmaps of the trained classes (open classes draw their scores)."""
        return heatmaps and not open_classes

    def write_result(self, result: SegmentationPrediction, image: np.ndarray, out: Path,
                     stem: str, *, heatmaps: bool = False, score_thr: float = 0.3) -> list[Path]:
        return write_segmentation(result, image, out, stem, heatmaps)

    def bench_size(self) -> tuple[int, int]:
        h, w = self.cfg.data.crop_size
        return int(h), int(w)

    def bench_inputs(self, num_classes: int, size: Sequence[int], batch: int,
                     device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A ``B×3×H×W`` batch of normal noise (normalised images) and ``B×H×W`` class
        indices."""
        gen = torch.Generator().manual_seed(seed)
        h, w = int(size[0]), int(size[1])
        images = torch.randn(batch, 3, h, w, generator=gen)
        targets = torch.randint(0, num_classes, (batch, h, w), generator=gen)
        return images.to(device), targets.to(device)

    def bench_training_set(self, root: Path, num_images: int, rng: np.random.Generator):
        write_ade20k_set(root, num_images, rng)
        return ADE20KDataset(root, "training", transforms=build_train_transforms(
            self.cfg.data, self.cfg.model.ignore_index))

    def flops_size(self, given: Sequence[int] | None = None) -> list[int]:
        """``given``, else ``data.crop_size``."""
        size = list(given) if given else list(self.cfg.data.crop_size)
        if len(size) != 2 or min(size) <= 0:
            raise ConfigError(f"input size must be two positive integers (H W), got {size}")
        return size

