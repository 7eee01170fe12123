"""The :class:`Predictor`: images in, numpy predictions out, the way the test pipeline runs."""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..classes import load_class_names
from ..config import Config, load_config
from ..data.image_ops import imrescale
from ..data.transforms import build_test_transforms
from ..evaluation.inference import mode_logits
from ..models.guidance import TextGuidance
from ..models.segmentor import MIN_INPUT_SIZE
from ..runtime import prepare_model, resolve_precision, run_mode
from ..tasks import DetectionTask, build_model, get_task
from ..tasks.results import DetectionPrediction, PredictionError, Prepared, SegmentationPrediction
from ..utils import keep_ratio_size, resize
from ..weights.checkpoint import load_checkpoint
from .inputs import to_rgb
from .open_vocab import OpenVocabulary

__all__ = ["Predictor"]

# Classes resized together when only the label map is wanted (bounds memory for big images).
_ARGMAX_CHUNK = 16


class Predictor:
    """Run a DenseCLIP model on images the way the test pipeline does.

    Args:
        config: a preset name, a YAML file or a :class:`~denseclip.config.Config`.
        checkpoint: weights in any format :func:`denseclip.weights.load_checkpoint`
            accepts; ``None`` keeps random weights (with a warning: the predictions are
            then meaningless; ``model.pretrained`` of the config is still loaded if set).
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        classes: open-vocabulary classes for the score-map segmentation (segmentation
            presets with text guidance): a comma-separated string, a list of names, or a
            mapping ``{name: text to embed}``. ``None`` for trained classes only.
        batch_size: images and sliding windows per forward call.
        precision: ``fp32``, ``bf16``, ``fp16`` or ``auto`` (the fastest precision this
            hardware runs natively, see :mod:`denseclip.runtime`); ``None`` takes the
            config's ``precision`` (``auto`` by default). :attr:`precision` is the resolved
            choice.

    Segmentation follows the test pipeline: keep-ratio resize to ``data.test_scale``
    (OpenCV bilinear on the uint8 image, as mmcv), normalisation with
    ``data.mean``/``data.std`` on the 0..255 scale, sliding-window
    (``evaluation.mode: slide``) or whole-image inference, logits resized to the original
    size, softmax. Detection presets return the model's boxes,
    labels, scores (and masks) in original pixels; the image is resized as uint8 to the
    detection scale before the model, as mmdet's test pipeline does.
    """

    def __init__(self, config: str | Path | Config, checkpoint: str | Path | None = None,
                 device: str | torch.device = "cpu", classes: Any = None,
                 batch_size: int = 8, precision: str | None = None) -> None:
        cfg = copy.deepcopy(config) if isinstance(config, Config) else load_config(config)
        if checkpoint is not None:
            cfg.model.pretrained = None  # the checkpoint holds every weight
        model = build_model(cfg)
        self.load_report = None
        if checkpoint is not None:
            self.load_report = load_checkpoint(model, checkpoint)
        else:
            what = ("the decode head and context decoder are untrained"
                    if cfg.model.pretrained else "every weight is random")
            warnings.warn(
                f"no checkpoint given for {cfg.name}: {what}, so predictions are meaningless",
                UserWarning, stacklevel=2,
            )
        self._setup(model, cfg, device, classes, batch_size, precision)

    @classmethod
    def from_model(cls, model: nn.Module, config: str | Path | Config,
                   device: str | torch.device = "cpu", classes: Any = None,
                   batch_size: int = 8, precision: str | None = None) -> Predictor:
        """A predictor around a model you already have (its weights are used as they are;
        with ``kernels: fast`` its convolution weights move to channels_last in place)."""
        cfg = copy.deepcopy(config) if isinstance(config, Config) else load_config(config)
        self = cls.__new__(cls)
        self.load_report = None
        self._setup(model, cfg, device, classes, batch_size, precision)
        return self

    def _setup(self, model: nn.Module, cfg: Config, device, classes, batch_size: int,
               precision: str | None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.cfg = cfg
        self.task = cfg.model.task
        self._detects = isinstance(get_task(cfg), DetectionTask)
        self.device = torch.device(device)
        self.precision = resolve_precision(precision or cfg.precision, self.device)
        self.model = prepare_model(model.to(self.device), cfg.kernels).eval()
        self.batch_size = int(batch_size)
        names = getattr(model, "class_names", None)
        self.class_names: list[str] = list(names) if names else load_class_names(
            cfg.model.classes)
        self._transforms = build_test_transforms(cfg.data)
        self.open_vocabulary: OpenVocabulary | None = None
        self.set_classes(classes)

    # -------------------------------------------------------------- class lists
    @property
    def guidance(self) -> TextGuidance | None:
        return getattr(self.model, "guidance", None)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def open_class_names(self) -> list[str] | None:
        """Names of the open-vocabulary classes (``None`` when none are set)."""
        return None if self.open_vocabulary is None else list(self.open_vocabulary.names)

    @property
    def open_texts(self) -> list[str] | None:
        """What the text encoder embeds for each open class."""
        return None if self.open_vocabulary is None else list(self.open_vocabulary.texts)

    def set_classes(self, classes: Any) -> None:
        """Set (or with ``None`` clear) the open-vocabulary class list; see the class doc.
        The trained class list behind the decode head is never changed."""
        if classes is None:
            self.open_vocabulary = None
            return
        if self.task != "segmentation":
            raise PredictionError(
                f"open-vocabulary classes need a segmentation preset; {self.cfg.name} is a "
                f"{self.task} model"
            )
        make = getattr(self.model, "make_open_vocabulary", None)
        if make is not None:  # a model that scores typed classes itself (zero-shot CLIP)
            try:
                self.open_vocabulary = make(classes)
            except ValueError as e:
                raise PredictionError(str(e)) from None
            return
        if self.guidance is None:
            raise PredictionError(
                f"{self.cfg.name} has no text guidance (a plain CLIP baseline), so it has no "
                f"score maps for open-vocabulary classes; use a DenseCLIP preset"
            )
        self.open_vocabulary = OpenVocabulary(self.guidance, classes, self.device)

    def clear_cache(self) -> None:
        """Forget the cached text embeddings of both class lists (the open ones here, the
        trained ones in the model's guidance); they are recomputed on the next image."""
        if self.open_vocabulary is not None:
            self.open_vocabulary.clear_cache()
        if self.guidance is not None:
            self.guidance.clear_cache()

    def open_text_embeddings(self) -> torch.Tensor:
        """Text embeddings (1, K', D) of the open classes behind the learned contexts,
        computed once per class list and reused until the class list or weights change."""
        if self.open_vocabulary is None:
            raise PredictionError("no open-vocabulary classes are set")
        return self.open_vocabulary.text_embeddings()

    # -------------------------------------------------------------- preprocessing
    def prepare(self, image: Any) -> Prepared:
        """Decode and preprocess one image (raises :class:`PredictionError` for images the
        network cannot take)."""
        rgb = to_rgb(image, self.cfg.data.max_image_pixels)
        H, W = rgb.shape[:2]
        if H == 0 or W == 0:
            raise PredictionError(f"the image is empty ({H}x{W} pixels)")
        if self._detects:
            det = self.cfg.model.detection
            self._check_size(H, W, (det.max_size, det.min_size))
            # mmdet's test Resize: the uint8 image through OpenCV (mmcv.imrescale)
            resized = imrescale(rgb, (det.max_size, det.min_size))
            return Prepared(rgb, torch.from_numpy(resized).permute(2, 0, 1).float())
        self._check_size(H, W, self.cfg.data.test_scale)
        # the test pipeline on the uint8 RGB array: OpenCV rescale, mmcv's normalisation
        tensor = self._transforms(rgb)
        return Prepared(rgb, tensor.contiguous())

    @staticmethod
    def _check_size(H: int, W: int, scale: Sequence[int]) -> None:
        h, w = keep_ratio_size(H, W, scale)
        if min(h, w) < MIN_INPUT_SIZE:
            raise PredictionError(
                f"the image is {H}x{W} (HxW) pixels; resized to the test scale "
                f"{list(scale)} it becomes {h}x{w}, smaller than the network stride "
                f"{MIN_INPUT_SIZE} on one side: the image is too elongated for this model"
            )

    # -------------------------------------------------------------- prediction
    def predict(self, image: Any, return_probs: bool = True):
        """Predict one image (path, PIL image or H × W × 3 uint8 array); returns a
        :class:`SegmentationPrediction` or :class:`DetectionPrediction`.

        ``return_probs=False`` skips the K × H × W probabilities (``probs`` is None) and
        finds the labels class-chunk by class-chunk, which needs far less memory for
        large images and many classes."""
        return self.predict_prepared([self.prepare(image)], return_probs)[0]

    def predict_batch(self, images: Sequence[Any], return_probs: bool = True) -> list:
        """Predict several images; images of equal preprocessed size share forward calls."""
        return self.predict_prepared([self.prepare(im) for im in images], return_probs)

    @torch.no_grad()
    def predict_prepared(self, items: Sequence[Prepared], return_probs: bool = True) -> list:
        """Predict images already passed through :meth:`prepare` (in :attr:`precision`)."""
        with run_mode(self.precision, self.cfg.kernels, self.device):
            return self._predict_prepared(items, return_probs)

    def _predict_prepared(self, items: Sequence[Prepared], return_probs: bool) -> list:
        if self._detects:
            return self._detect(items)
        results: list[SegmentationPrediction | None] = [None] * len(items)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[tuple(item.tensor.shape[-2:])].append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = torch.stack([items[i].tensor for i in chunk]).to(self.device)
                raw = self._logits(batch)
                for j, i in enumerate(chunk):
                    results[i] = self._finish(raw[j : j + 1], items[i].image.shape[:2],
                                              return_probs)
        return results

    def window(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of the head (N, K, h, w) for normalised crops, followed by the open
        classes' score maps (N, K', h, w) upsampled bilinearly to the crop, if any."""
        if self.open_vocabulary is None:
            return self.model(images)
        dense = self.model.forward_features(images)  # the trained classes' guidance as usual
        logits = self.model.forward_head(dense.features, images.shape[-2:])
        score = self.open_vocabulary.scores(self.model, dense, images.shape[-2:])
        return torch.cat([logits, score.to(logits.dtype)], dim=1)

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Merged window outputs (B, K + K', h, w) at the preprocessed size."""
        channels = self.num_classes + len(self.open_vocabulary or ())
        return mode_logits(self.window, batch, self.cfg.evaluation, channels, batch.shape[-2:],
                           self.batch_size, self.cfg.model.align_corners)

    def _finish(self, raw: torch.Tensor, size: tuple[int, int],
                return_probs: bool) -> SegmentationPrediction:
        K = self.num_classes
        align = self.cfg.model.align_corners
        logits = raw[:, :K]
        probs = None
        if return_probs:
            p = resize(logits, size, align).softmax(dim=1)
            labels = p.argmax(dim=1)[0]
            probs = p[0].float().cpu().numpy()
        else:
            labels = self._chunked_argmax(logits, size)
        result = SegmentationPrediction(labels.cpu().numpy().astype(np.int64), probs,
                                        list(self.class_names))
        if self.open_vocabulary is not None:
            scores = resize(raw[:, K:].float(), size, align)[0]
            result.open_scores = scores.cpu().numpy().astype(np.float32)
            result.open_labels = scores.argmax(dim=0).cpu().numpy().astype(np.int64)
            result.open_class_names = list(self.open_vocabulary.names)
        return result

    def _chunked_argmax(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        align = self.cfg.model.align_corners
        best_val = best_idx = None
        for start in range(0, logits.shape[1], _ARGMAX_CHUNK):
            val, idx = resize(logits[:, start : start + _ARGMAX_CHUNK], size, align).max(dim=1)
            idx = idx + start
            if best_val is None:
                best_val, best_idx = val, idx
            else:
                better = val > best_val  # ties keep the first class, as argmax does
                best_val = torch.where(better, val, best_val)
                best_idx = torch.where(better, idx, best_idx)
        return best_idx[0]

    def _detect(self, items: Sequence[Prepared]) -> list[DetectionPrediction]:
        """The detectors take 0..1 images resized by :meth:`prepare` and the original sizes
        (they normalise and pad themselves) and return boxes (x1, y1, x2, y2), labels,
        scores (and masks N × 1 × H × W probabilities) in original pixels, rescaled
        before NMS as mmdet does."""
        results = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            outputs = self.model([item.tensor.to(self.device) / 255.0 for item in chunk],
                                 original_sizes=[item.image.shape[:2] for item in chunk])
            for item, out in zip(chunk, outputs, strict=True):
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
                results.append(DetectionPrediction(
                    boxes.numpy().astype(np.float32),
                    out["labels"].detach().cpu().numpy().astype(np.int64),
                    out["scores"].detach().float().cpu().numpy().astype(np.float32),
                    list(self.class_names), masks))
        return results
