"""Detection and instance segmentation (RetinaNet, Mask R-CNN on COCO-format data)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import Config, ConfigError
from ..data.coco import (
    CocoDetection,
    build_coco_dataset,
    build_coco_train_transforms,
    collate_detection,
    move_detection_batch,
)
from ..data.generated import random_detection_target, write_coco_set
from ..data.image_ops import imrescale
from ..dist import DistEnv
from ..evaluation.coco import METRIC_NAMES, evaluate_detection, format_per_category_table
from ..models.build import build_detector
from ..models.detection import DETECTORS
from ..utils import model_device, resize
from .base import OpenVocabulary, Task, check_test_size
from .results import DetectionPrediction, Prepared
from .writers import write_detection

#: Default (H, W) for counting detectors: the ``--shape 1280 800`` default of mmdet's FLOPs
#: script.
DETECTION_INPUT_SIZE = (1280, 800)


class DetectionTask(Task):
    """COCO-style detection: RetinaNet (boxes) and Mask R-CNN (boxes and masks)."""

    name = "detection"
    official_batch_size = 16  # 8 GPUs x 2 images (DESIGN §9)
    main_metric = "bbox_AP"
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
                                  test_scale=(det.max_size, det.min_size),
                                  seed=self.cfg.seed)

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

    # ------------------------------------------------------------------ tools
    verb = "Detect"
    score_threshold = True
    bench_data = "COCO-sized"

    def write_result(self, result: DetectionPrediction, image: np.ndarray, out: Path,
                     stem: str, *, heatmaps: bool = False, score_thr: float = 0.3) -> list[Path]:
        return write_detection(result, image, out, stem, score_thr)

    def bench_size(self) -> tuple[int, int]:
        """``(detection.min_size, detection.max_size)``: 800×1333 for the official presets,
        the scale they resize to."""
        det = self.cfg.model.detection
        return det.min_size, det.max_size

    def bench_inputs(self, num_classes: int, size: Sequence[int], batch: int,
                     device: torch.device, seed: int = 0) -> tuple[list, list]:
        """A list of ``3×H×W`` images in 0..1 and one target dict per image (a few random
        boxes; filled box masks for Mask R-CNN)."""
        gen = torch.Generator().manual_seed(seed)
        h, w = int(size[0]), int(size[1])
        images = [torch.rand(3, h, w, generator=gen).to(device) for _ in range(batch)]
        targets = [{k: v.to(device) for k, v in random_detection_target(
            h, w, num_classes, self.with_masks, gen).items()} for _ in range(batch)]
        return images, targets

    def bench_training_set(self, root: Path, num_images: int, rng: np.random.Generator):
        img_dir, ann_file = write_coco_set(root, num_images, rng)
        return CocoDetection(img_dir, ann_file, train=True, with_masks=self.with_masks,
                             transforms=build_coco_train_transforms(self.cfg.data))

    def flops_size(self, given: Sequence[int] | None = None) -> list[int]:
        """``given``, else mmdet's FLOPs default (:data:`DETECTION_INPUT_SIZE`), unless the
        backbone crops a stored position grid too small for it (the tiny presets): then the
        largest padded test input. Detectors are counted on the raw input tensor, so the size
        must be a multiple of ``model.detection.size_divisor``."""
        det, backbone = self.cfg.model.detection, self.cfg.model.backbone
        divisor = det.size_divisor
        if given:
            size = list(given)
        else:
            size = list(DETECTION_INPUT_SIZE)
            if backbone.pos_embed == "crop" and max(size) > backbone.input_resolution:
                size = [-(-det.max_size // divisor) * divisor,
                        -(-det.min_size // divisor) * divisor]
        if len(size) != 2 or min(size) <= 0:
            raise ConfigError(f"input size must be two positive integers (H W), got {size}")
        if size[0] % divisor or size[1] % divisor:
            raise ConfigError(f"detectors are counted on the raw input tensor: the size must "
                              f"be a multiple of model.detection.size_divisor ({divisor}), "
                              f"got {size}")
        return size

    # ------------------------------------------------------------------ prediction
    def prepare(self, rgb: np.ndarray) -> Prepared:
        """mmdet's test Resize: the uint8 image rescaled (OpenCV, as ``mmcv.imrescale``) to
        the detection scale, as a float 0..255 tensor; the detector normalises and pads."""
        det = self.cfg.model.detection
        H, W = rgb.shape[:2]
        check_test_size(H, W, (det.max_size, det.min_size))
        resized = imrescale(rgb, (det.max_size, det.min_size))
        return Prepared(rgb, torch.from_numpy(resized).permute(2, 0, 1).float())

    def predict(self, model: nn.Module, items: Sequence[Prepared], *, batch_size: int = 8,
                return_probs: bool = True, open_vocabulary: OpenVocabulary | None = None,
                device: torch.device | None = None) -> list[DetectionPrediction]:
        """The detector takes the 0..1 images of :meth:`prepare` and the original sizes and
        returns boxes (x1, y1, x2, y2), labels, scores (and masks N x 1 x H x W
        probabilities) in original pixels, rescaled before NMS as mmdet does; boxes are
        clipped to the image and masks thresholded at 0.5. ``return_probs`` and
        ``open_vocabulary`` do not apply."""
        device = model_device(model) if device is None else device
        names = self.model_class_names(model)
        results = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            outputs = model([item.tensor.to(device) / 255.0 for item in chunk],
                            original_sizes=[item.image.shape[:2] for item in chunk])
            for item, out in zip(chunk, outputs, strict=True):
                results.append(_detection_result(item, out, names))
        return results


def _detection_result(item: Prepared, out: dict[str, torch.Tensor],
                      names: list[str]) -> DetectionPrediction:
    H, W = item.image.shape[:2]
    boxes = out["boxes"].detach().float().cpu().reshape(-1, 4)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
    masks = out.get("masks")
    if masks is not None:
        masks = masks.detach().float()
        if masks.ndim == 3:
            masks = masks[:, None]
        if masks.shape[0]:
            masks = (resize(masks, (H, W))[:, 0] >= 0.5).cpu().numpy()
        else:
            masks = np.zeros((0, H, W), dtype=bool)
    return DetectionPrediction(
        boxes.numpy().astype(np.float32),
        out["labels"].detach().cpu().numpy().astype(np.int64),
        out["scores"].detach().float().cpu().numpy().astype(np.float32),
        list(names), masks)
