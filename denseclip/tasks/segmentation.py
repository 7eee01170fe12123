"""Semantic segmentation: what the shared engine, evaluation and tools ask of it."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..classes import ClassListError, as_class_dict
from ..config import Config, ConfigError
from ..data.generated import write_ade20k_set
from ..data.samplers import collate_segmentation
from ..data.segmentation import ADE20KDataset, build_segmentation_dataset
from ..data.transforms import build_test_transforms, build_train_transforms
from ..dist import DistEnv
from ..evaluation.plots import write_segmentation_figures
from ..evaluation.segmentation import evaluate
from ..models.build import build_segmentor
from ..models.seg_inference import InferenceSettings
from ..models.zeroshot import build_zeroshot_segmentor
from ..utils import model_device, resize
from .base import OpenVocabulary, Task, check_test_size
from .results import PredictionError, Prepared, SegmentationPrediction
from .writers import write_segmentation

FIGURES_DIR = "plots"  # out_dir's top level holds the label PNGs, one per image
_ARGMAX_CHUNK = 16  # classes resized together for labels without probabilities

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
        self.num_classes = len(self.class_names)

    def build_model(self) -> nn.Module:
        if self.cfg.model.zeroshot:
            return self.configure_model(build_zeroshot_segmentor(self.cfg.model))
        return self.configure_model(build_segmentor(self.cfg.model))

    def dataset(self, split: str, train: bool):
        return build_segmentation_dataset(self.cfg.data, split, self.num_classes, train,
                                          seed=self.cfg.seed)

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

    # ------------------------------------------------------------------ prediction
    supports_open_vocabulary = True

    def configure_model(self, model: nn.Module) -> nn.Module:
        """The segmentor's test-time inference follows ``cfg.evaluation`` (whole or sliding
        windows, multi-scale ratios and flip) with ``cfg.data``'s test scale and
        normalisation."""
        model.inference_settings = InferenceSettings.from_config(self.cfg)
        return model

    def open_vocabulary(self, model: nn.Module, classes: Any) -> OpenVocabulary:
        """Typed classes scored by the model's text guidance (DenseCLIP) or its prompt
        ensemble (zero-shot CLIP): each text must fit the model's text context."""
        if getattr(model, "guidance", None) is None:
            raise PredictionError(
                f"{self.cfg.name} has no text guidance (a plain CLIP baseline), so it has no "
                f"score maps for open-vocabulary classes; use a DenseCLIP preset"
            )
        try:
            mapping = as_class_dict(classes)
        except ClassListError as e:
            raise PredictionError(str(e)) from None
        try:
            model.guidance.tokenize(list(mapping.values()))
        except ValueError as e:
            detail = ", ".join(f"{n!r} → {t!r}" for n, t in mapping.items() if n != t)
            extra = f" (class texts: {detail})" if detail else ""
            raise PredictionError(f"{e}{extra}") from None
        return OpenVocabulary(tuple(mapping), tuple(mapping.values()))

    def prepare(self, rgb: np.ndarray) -> Prepared:
        """Keep-ratio resize to ``data.test_scale`` (OpenCV bilinear on the uint8 image, as
        mmcv) and normalisation with ``data.mean``/``data.std`` on the 0..255 scale."""
        H, W = rgb.shape[:2]
        check_test_size(H, W, self.cfg.data.test_scale)
        return Prepared(rgb, self._test_transforms(rgb).contiguous())

    @cached_property
    def _test_transforms(self):
        return build_test_transforms(self.cfg.data)

    def predict(self, model: nn.Module, items: Sequence[Prepared], *, batch_size: int = 8,
                return_probs: bool = True, open_vocabulary: OpenVocabulary | None = None,
                device: torch.device | None = None) -> list[SegmentationPrediction]:
        """Images of equal preprocessed size share forward calls; the model's
        ``inference`` (whole or sliding windows, with the open classes' score maps) gives
        logits at the preprocessed size, resized to each original size and soft-maxed.
        ``return_probs=False`` finds the labels class-chunk by class-chunk instead (far less
        memory for large images and many classes)."""
        device = model_device(model) if device is None else device
        names = self.model_class_names(model)
        texts = None if open_vocabulary is None else list(open_vocabulary.texts)
        results: list[SegmentationPrediction | None] = [None] * len(items)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[tuple(item.tensor.shape[-2:])].append(i)
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                batch = torch.stack([items[i].tensor for i in chunk]).to(device)
                raw = model.inference(batch, batch.shape[-2:], open_texts=texts,
                                      max_batch=batch_size)
                for j, i in enumerate(chunk):
                    results[i] = self._finish(model, raw[j : j + 1], items[i].image.shape[:2],
                                              names, return_probs, open_vocabulary)
        return results

    def _finish(self, model: nn.Module, raw: torch.Tensor, size: tuple[int, int],
                names: list[str], return_probs: bool,
                open_vocabulary: OpenVocabulary | None) -> SegmentationPrediction:
        K = len(names)
        align = model.align_corners
        logits = raw[:, :K]
        probs = None
        if return_probs:
            p = resize(logits, size, align).softmax(dim=1)
            labels = p.argmax(dim=1)[0]
            probs = p[0].float().cpu().numpy()
        else:
            labels = _chunked_argmax(logits, size, align)
        result = SegmentationPrediction(labels.cpu().numpy().astype(np.int64), probs,
                                        list(names))
        if open_vocabulary is not None:
            scores = resize(raw[:, K:].float(), size, align)[0]
            result.open_scores = scores.cpu().numpy().astype(np.float32)
            result.open_labels = scores.argmax(dim=0).cpu().numpy().astype(np.int64)
            result.open_class_names = list(open_vocabulary.names)
        return result


def _chunked_argmax(logits: torch.Tensor, size: tuple[int, int],
                    align: bool) -> torch.Tensor:
    """The argmax over classes of ``logits`` resized to ``size``, resizing at most
    :data:`_ARGMAX_CHUNK` classes at a time (ties keep the first class, as argmax does)."""
    best_val = best_idx = None
    for start in range(0, logits.shape[1], _ARGMAX_CHUNK):
        val, idx = resize(logits[:, start : start + _ARGMAX_CHUNK], size, align).max(dim=1)
        idx = idx + start
        if best_val is None:
            best_val, best_idx = val, idx
        else:
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx, best_idx)
    return best_idx[0]
