"""Inference for people: :class:`Predictor` turns images into numpy predictions, and the
``denseclip predict`` command writes overlays, label maps, heatmaps and JSON for files,
folders and globs.

Two segmentations, and what to expect from each
-----------------------------------------------
A DenseCLIP segmentor has a decode head trained for a fixed class list (K classes, e.g.
the 150 ADE20K classes), and pixel-text score maps computed from CLIP text embeddings of
class names. :class:`Predictor` always returns the first and, when you give it class names
of your own (``classes=``, ``--classes``, ``--classes-file``), also the second:

* ``labels`` / ``probs`` — the **decode head**, over the trained classes. This is the
  model's real output: its accuracy is the trained model's (e.g. the mIoU of its model-zoo
  row), and it can only ever answer with trained classes.
* ``open_labels`` / ``open_scores`` — the **score map** for your class names: the text
  encoder embeds each name behind the learned contexts, the context decoder refines the
  embeddings against the image (as in training), and the cosine similarity to every pixel
  embedding at stride 32 (stride 16 for ViT) is upsampled bilinearly to the image. It is
  coarse (one score per 32 × 32 block, blurred by the upsampling) and zero-shot: how well it
  works depends on how well CLIP's pre-training knows the words, and on how far your names
  are from the trained ones. Expect rough blobs in the right places for common objects and
  stuff, not the head's boundaries or accuracy. With random weights (no checkpoint) both
  outputs are meaningless.

The neck of a DenseCLIP model always receives the score map of the *trained* classes (it
was trained with K channels), so your class names never change the head's output.

Open-vocabulary class lists: ``--classes "cat,dog,grass"`` embeds each name as written.
``--classes-file`` reads one class per line; a line ``name: text`` shows ``name`` (legend,
file names, JSON) but embeds ``text``, which lets you pick the wording the text encoder
sees. Blank lines and lines starting with ``#`` are skipped. The text context is short:
in the official presets a class text may use at most 3 BPE tokens (``text.context_length -
text.n_ctx - 2``); longer texts are an error naming the class and the limit.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import re
import sys
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import tv_tensors

from .checkpoint import CheckpointError, load_checkpoint
from .classes import load_class_names
from .config import Config, load_config
from .data.transforms import build_test_transforms
from .engine.inference import keep_ratio_scale, mode_logits
from .models import build_model
from .models.detection import DETECTION_TASKS
from .models.guidance import TextGuidance
from .models.segmentor import MIN_INPUT_SIZE
from .models.text_encoder import tokenize

__all__ = [
    "DetectionPrediction",
    "PredictionError",
    "Predictor",
    "SegmentationPrediction",
    "add_arguments",
    "collect_inputs",
    "parse_class_list",
    "read_open_classes",
    "run",
    "to_rgb",
]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                  ".ppm", ".pgm", ".pbm", ".pnm"}
# Classes resized together when only the label map is wanted (bounds memory for big images).
_ARGMAX_CHUNK = 16


class PredictionError(ValueError):
    """An input the predictor cannot use (image, class list); the message says why."""


# ------------------------------------------------------------------------------ inputs
def to_rgb(image: Any) -> np.ndarray:
    """An ``H × W × 3`` uint8 RGB array from a path, a PIL image or a uint8 array.

    Files are decoded by :func:`denseclip.data.segmentation.load_image` (grayscale, palette,
    RGBA, 16-bit and EXIF orientation handled); PIL images get the same treatment; arrays
    may be ``H × W`` (grey), ``H × W × 3`` (RGB) or ``H × W × 4`` (RGBA, alpha dropped).
    """
    if isinstance(image, (str, Path)):
        from .data.segmentation import load_image

        return load_image(image)
    if isinstance(image, Image.Image):
        from .data.segmentation import pil_to_rgb

        return pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise PredictionError(
                f"image arrays must be uint8 (0..255), got {image.dtype}; convert with "
                f"np.clip(x, 0, 255).astype(np.uint8)"
            )
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        elif image.ndim == 3 and image.shape[2] == 4:
            image = image[:, :, :3]
        if image.ndim != 3 or image.shape[2] != 3:
            raise PredictionError(
                f"image arrays must be H x W x 3 (RGB), got shape {image.shape}"
            )
        return np.ascontiguousarray(image)
    raise PredictionError(
        f"cannot read an image from {type(image).__name__}; pass a path, a PIL image or an "
        f"H x W x 3 uint8 array"
    )


def parse_class_list(text: str) -> dict[str, str]:
    """``"cat, dog,grass"`` → ``{name: text to embed}`` (the names themselves)."""
    names = [part.strip() for part in text.split(",")]
    if not any(names):
        raise PredictionError("the class list is empty; give names like --classes 'cat,dog'")
    empty = [i + 1 for i, name in enumerate(names) if not name]
    if empty:
        raise PredictionError(f"the class list {text!r} has an empty name at position(s) {empty}")
    return _unique({name: name for name in names}, names)


def read_open_classes(path: str | Path) -> dict[str, str]:
    """Read an open-vocabulary class file: one ``name`` or ``name: text`` per line (the
    text, when given, is what the text encoder embeds); blank and ``#`` lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise PredictionError(f"class file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PredictionError(f"cannot read class file {path}: {e}") from None
    classes: dict[str, str] = {}
    order = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, text = line.partition(":")
        name, text = name.strip(), text.strip()
        if not name:
            raise PredictionError(f"{path}, line {number}: no class name before ':'")
        order.append(name)
        classes[name] = text or name
    if not classes:
        raise PredictionError(f"class file {path} lists no classes")
    return _unique(classes, order)


def _unique(classes: dict[str, str], order: list[str]) -> dict[str, str]:
    seen, dupes = set(), []
    for name in order:
        if name in seen and name not in dupes:
            dupes.append(name)
        seen.add(name)
    if dupes:
        raise PredictionError(f"duplicate class name(s) {dupes}; each class needs its own name")
    return classes


def _as_class_dict(classes: Any) -> dict[str, str]:
    if isinstance(classes, str):
        return parse_class_list(classes)
    if isinstance(classes, Mapping):
        out = {str(k).strip(): str(v).strip() for k, v in classes.items()}
        if not out:
            raise PredictionError("the class list is empty")
        if any(not k or not v for k, v in out.items()):
            raise PredictionError(f"class names and texts must be non-empty, got {classes!r}")
        return out
    names = [str(n).strip() for n in classes]
    if not names:
        raise PredictionError("the class list is empty")
    if any(not n for n in names):
        raise PredictionError(f"class names must be non-empty, got {list(classes)!r}")
    return _unique({n: n for n in names}, names)


# ------------------------------------------------------------------------------ results
@dataclass
class SegmentationPrediction:
    """One image's segmentation, at the image's original size (H × W).

    ``labels``/``probs`` come from the decode head (trained classes, the model's accuracy);
    ``open_labels``/``open_scores`` from the text score maps for the open-vocabulary class
    list, if one is set (coarse, zero-shot; see the module documentation).
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
class _Prepared:
    image: np.ndarray  # original RGB uint8 (H, W, 3)
    tensor: torch.Tensor  # segmentation: normalised (3, h, w) at the test scale;
    #                       detection: (3, H, W) float 0..255 at the original size


def _resize(x: torch.Tensor, size: Sequence[int], align_corners: bool) -> torch.Tensor:
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


# ------------------------------------------------------------------------------ predictor
class Predictor:
    """Run a DenseCLIP model on images the way the test pipeline does.

    Args:
        config: a preset name, a YAML file or a :class:`~denseclip.config.Config`.
        checkpoint: weights in any format :func:`denseclip.checkpoint.load_checkpoint`
            accepts; ``None`` keeps random weights (with a warning: the predictions are
            then meaningless; ``model.pretrained`` of the config is still loaded if set).
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        classes: open-vocabulary classes for the score-map segmentation (segmentation
            presets with text guidance): a comma-separated string, a list of names, or a
            mapping ``{name: text to embed}``. ``None`` for trained classes only.
        batch_size: images and sliding windows per forward call.

    Segmentation follows the test pipeline: keep-ratio resize to ``data.test_scale``
    (bilinear, no antialiasing), normalisation with ``data.mean``/``data.std`` on the 0..255
    scale, sliding-window (``evaluation.mode: slide``) or whole-image inference, logits
    resized to the original size, softmax. Detection presets return the model's boxes,
    labels, scores (and masks) in original pixels.
    """

    def __init__(self, config: str | Path | Config, checkpoint: str | Path | None = None,
                 device: str | torch.device = "cpu", classes: Any = None,
                 batch_size: int = 8) -> None:
        if isinstance(config, Config):
            cfg = copy.deepcopy(config)
        else:
            cfg = load_config(config)
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
        self._setup(model, cfg, device, classes, batch_size)

    @classmethod
    def from_model(cls, model: nn.Module, config: str | Path | Config,
                   device: str | torch.device = "cpu", classes: Any = None,
                   batch_size: int = 8) -> Predictor:
        """A predictor around a model you already have (its weights are used as they are)."""
        cfg = copy.deepcopy(config) if isinstance(config, Config) else load_config(config)
        self = cls.__new__(cls)
        self.load_report = None
        self._setup(model, cfg, device, classes, batch_size)
        return self

    def _setup(self, model: nn.Module, cfg: Config, device, classes, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.cfg = cfg
        self.task = cfg.model.task
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = int(batch_size)
        names = getattr(model, "class_names", None)
        self.class_names: list[str] = list(names) if names else load_class_names(
            cfg.model.classes)
        self._transforms = build_test_transforms(cfg.data)
        self.open_class_names: list[str] | None = None
        self.open_texts: list[str] | None = None
        self._open_tokens: torch.Tensor | None = None
        self._open_cache: tuple | None = None
        self.set_classes(classes)

    # -------------------------------------------------------------- class lists
    @property
    def guidance(self) -> TextGuidance | None:
        return getattr(self.model, "guidance", None)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def set_classes(self, classes: Any) -> None:
        """Set (or with ``None`` clear) the open-vocabulary class list; see the class doc.
        The trained class list behind the decode head is never changed."""
        if classes is None:
            self.open_class_names = self.open_texts = self._open_tokens = None
            self._open_cache = None
            return
        if self.task != "segmentation":
            raise PredictionError(
                f"open-vocabulary classes need a segmentation preset; {self.cfg.name} is a "
                f"{self.task} model"
            )
        guidance = self.guidance
        if guidance is None:
            raise PredictionError(
                f"{self.cfg.name} has no text guidance (a plain CLIP baseline), so it has no "
                f"score maps for open-vocabulary classes; use a DenseCLIP preset"
            )
        mapping = _as_class_dict(classes)
        length = guidance.text_encoder.context_length - guidance.n_ctx
        try:
            tokens = tokenize(list(mapping.values()), length)
        except ValueError as e:
            detail = ", ".join(f"{n!r} → {t!r}" for n, t in mapping.items() if n != t)
            extra = f" (class texts: {detail})" if detail else ""
            raise PredictionError(f"{e}{extra}") from None
        self.open_class_names = list(mapping)
        self.open_texts = list(mapping.values())
        self._open_tokens = tokens.to(self.device)
        self._open_cache = None

    def clear_cache(self) -> None:
        """Forget the cached text embeddings of both class lists (the open ones here, the
        trained ones in the model's guidance); they are recomputed on the next image."""
        self._open_cache = None
        if self.guidance is not None:
            self.guidance.clear_cache()

    def open_text_embeddings(self) -> torch.Tensor:
        """Text embeddings (1, K', D) of the open classes behind the learned contexts,
        computed once per class list and reused for every image and window until the
        class list or the weights change."""
        guidance = self.guidance
        assert guidance is not None and self._open_tokens is not None
        key = guidance.cache_key(self.open_texts or (), self._open_tokens.device)
        if self._open_cache is None or self._open_cache[0] != key:
            with torch.no_grad():
                text = guidance.text_encoder(self._open_tokens, guidance.contexts)
            self._open_cache = (key, text)
        return self._open_cache[1]

    # -------------------------------------------------------------- preprocessing
    def prepare(self, image: Any) -> _Prepared:
        """Decode and preprocess one image (raises :class:`PredictionError` for images the
        network cannot take)."""
        rgb = to_rgb(image)
        H, W = rgb.shape[:2]
        if H == 0 or W == 0:
            raise PredictionError(f"the image is empty ({H}x{W} pixels)")
        pixels = torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1).float()
        if self.task in DETECTION_TASKS:
            det = self.cfg.model.detection
            scale = (det.max_size, det.min_size)
            self._check_size(H, W, scale)
            return _Prepared(rgb, pixels)
        self._check_size(H, W, self.cfg.data.test_scale)
        tensor = self._transforms(tv_tensors.Image(pixels)).as_subclass(torch.Tensor)
        return _Prepared(rgb, tensor.contiguous())

    @staticmethod
    def _check_size(H: int, W: int, scale: Sequence[int]) -> None:
        h, w = keep_ratio_scale(H, W, scale)
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
    def predict_prepared(self, items: Sequence[_Prepared], return_probs: bool = True) -> list:
        """Predict images already passed through :meth:`prepare`."""
        if self.task in DETECTION_TASKS:
            return self._detect(items)
        if self.task != "segmentation":
            raise PredictionError(f"model.task {self.task!r} is not supported by the predictor")
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

    def _window(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of the head (N, K, h, w) for normalised crops, followed by the open
        classes' score maps (N, K', h, w) upsampled bilinearly to the crop, if any."""
        if self._open_tokens is None:
            return self.model(images)
        captured: list = []
        handle = self.model.backbone.register_forward_hook(
            lambda module, args, output: captured.append(output[1]))
        try:
            logits = self.model(images)  # the trained classes' guidance runs as usual
        finally:
            handle.remove()
        global_embed, dense_embed = captured[-1]
        guidance = self.guidance
        text = self.open_text_embeddings() if guidance.prompting == "post" else None
        score = guidance(global_embed, dense_embed, text=text, tokens=self._open_tokens).score
        score = _resize(score.float(), images.shape[-2:], self.cfg.model.align_corners)
        return torch.cat([logits, score.to(logits.dtype)], dim=1)

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Merged window outputs (B, K + K', h, w) at the preprocessed size."""
        channels = self.num_classes + len(self.open_class_names or ())
        return mode_logits(self._window, batch, self.cfg.evaluation, channels, batch.shape[-2:],
                           self.batch_size, self.cfg.model.align_corners)

    def _finish(self, raw: torch.Tensor, size: tuple[int, int],
                return_probs: bool) -> SegmentationPrediction:
        K = self.num_classes
        align = self.cfg.model.align_corners
        logits = raw[:, :K]
        probs = None
        if return_probs:
            p = _resize(logits, size, align).softmax(dim=1)
            labels = p.argmax(dim=1)[0]
            probs = p[0].float().cpu().numpy()
        else:
            labels = self._chunked_argmax(logits, size)
        result = SegmentationPrediction(labels.cpu().numpy().astype(np.int64), probs,
                                        list(self.class_names))
        if self.open_class_names:
            scores = _resize(raw[:, K:].float(), size, align)[0]
            result.open_scores = scores.cpu().numpy().astype(np.float32)
            result.open_labels = scores.argmax(dim=0).cpu().numpy().astype(np.int64)
            result.open_class_names = list(self.open_class_names)
        return result

    def _chunked_argmax(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        align = self.cfg.model.align_corners
        best_val = best_idx = None
        for start in range(0, logits.shape[1], _ARGMAX_CHUNK):
            val, idx = _resize(logits[:, start : start + _ARGMAX_CHUNK], size, align).max(dim=1)
            idx = idx + start
            if best_val is None:
                best_val, best_idx = val, idx
            else:
                better = val > best_val  # ties keep the first class, as argmax does
                best_val = torch.where(better, val, best_val)
                best_idx = torch.where(better, idx, best_idx)
        return best_idx[0]

    def _detect(self, items: Sequence[_Prepared]) -> list[DetectionPrediction]:
        """Detectors follow torchvision's interface: a list of 3 × H × W images in, a list
        of dicts with ``boxes`` (x1, y1, x2, y2), ``labels``, ``scores`` (and ``masks``
        N × 1 × H × W) out. A model with its own ``transform`` (torchvision's
        ``GeneralizedRCNNTransform``) gets 0..1 images at their original size and returns
        original coordinates; otherwise each image is resized keeping its ratio to
        ``(detection.max_size, detection.min_size)`` and normalised here, and boxes and
        masks are mapped back."""
        det = self.cfg.model.detection
        mean = torch.tensor(self.cfg.data.mean, device=self.device).view(3, 1, 1) * 255
        std = torch.tensor(self.cfg.data.std, device=self.device).view(3, 1, 1) * 255
        own_transform = hasattr(self.model, "transform")
        results = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            inputs, scales = [], []
            for item in chunk:
                pixels = item.tensor.to(self.device)
                H, W = pixels.shape[-2:]
                if own_transform:
                    inputs.append(pixels / 255.0)
                    scales.append((1.0, 1.0))
                    continue
                h, w = keep_ratio_scale(H, W, (det.max_size, det.min_size))
                resized = _resize(pixels[None], (h, w), False)[0]
                inputs.append((resized - mean) / std)
                scales.append((W / w, H / h))
            outputs = self.model(inputs)
            for item, out, (sx, sy) in zip(chunk, outputs, scales, strict=True):
                H, W = item.image.shape[:2]
                boxes = out["boxes"].detach().float().cpu().reshape(-1, 4)
                boxes = boxes * torch.tensor([sx, sy, sx, sy])
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
                masks = out.get("masks")
                if masks is not None:
                    masks = masks.detach().float()
                    if masks.ndim == 3:
                        masks = masks[:, None]
                    if masks.shape[0]:
                        masks = (_resize(masks, (H, W), False)[:, 0] >= 0.5).cpu().numpy()
                    else:
                        masks = np.zeros((0, H, W), dtype=bool)
                results.append(DetectionPrediction(
                    boxes.numpy().astype(np.float32),
                    out["labels"].detach().cpu().numpy().astype(np.int64),
                    out["scores"].detach().float().cpu().numpy().astype(np.float32),
                    list(self.class_names), masks))
        return results


# ------------------------------------------------------------------------------ CLI
def collect_inputs(specs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]], int]:
    """Expand files, folders (recursively, image suffixes only) and glob patterns.

    Returns (image paths in order without duplicates, [(spec, reason)] for specs that
    matched nothing, number of non-image files skipped in folders)."""
    paths: list[Path] = []
    failures: list[tuple[str, str]] = []
    skipped = 0
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            paths.append(path)

    for spec in specs:
        path = Path(spec)
        if path.is_file():
            add(path)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            for p in files:
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    add(p)
                else:
                    skipped += 1
            if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
                failures.append((spec, "folder holds no image files"))
        elif glob.has_magic(spec):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                failures.append((spec, "pattern matches no files"))
            for m in files:
                add(m)
        else:
            failures.append((spec, "no such file or folder"))
    return paths, failures, skipped


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "class"


def _label_png(labels: np.ndarray, path: Path) -> None:
    if labels.size and labels.max() > 255:
        Image.fromarray(labels.astype(np.uint16)).save(path)
    else:
        Image.fromarray(labels.astype(np.uint8), "L").save(path)


def write_segmentation(result: SegmentationPrediction, image: np.ndarray, out: Path,
                       stem: str, heatmaps: bool = False) -> list[Path]:
    """Write ``<stem>_overlay.png`` and ``<stem>_labels.png`` (trained classes, decode
    head), with open classes also ``<stem>_open_overlay.png``/``<stem>_open_labels.png``
    (score map), and with ``heatmaps`` one ``<stem>_heatmap_<class>.png`` per open class
    (cosine scores, one colour scale for all classes of the image) or, without open
    classes, per trained class present in the labels (probabilities 0..1)."""
    from .visualize import heatmap_overlay, render_overlay

    written = []

    def save(img: Image.Image, suffix: str) -> None:
        path = out / f"{stem}_{suffix}.png"
        img.save(path)
        written.append(path)

    save(render_overlay(image, result.labels, result.class_names), "overlay")
    _label_png(result.labels, out / f"{stem}_labels.png")
    written.append(out / f"{stem}_labels.png")
    if result.open_labels is not None:
        save(render_overlay(image, result.open_labels, result.open_class_names), "open_overlay")
        _label_png(result.open_labels, out / f"{stem}_open_labels.png")
        written.append(out / f"{stem}_open_labels.png")
    if heatmaps:
        used: set[str] = set()
        if result.open_scores is not None:
            lo, hi = float(result.open_scores.min()), float(result.open_scores.max())
            maps = [(n, result.open_scores[i], lo, hi)
                    for i, n in enumerate(result.open_class_names)]
        else:
            if result.probs is None:
                raise ValueError("trained-class heatmaps need the probabilities")
            present = np.unique(result.labels)
            maps = [(result.class_names[c], result.probs[c], 0.0, 1.0) for c in present]
        for name, values, lo, hi in maps:
            safe = _safe_name(name)
            while safe in used:
                safe += "_"
            used.add(safe)
            save(heatmap_overlay(image, values, lo, hi), f"heatmap_{safe}")
    return written


def write_detection(result: DetectionPrediction, image: np.ndarray, out: Path, stem: str,
                    score_thr: float) -> list[Path]:
    """Write ``<stem>_overlay.png`` (boxes, masks, names and scores ≥ ``score_thr``) and
    ``<stem>.json`` (the same detections)."""
    from .visualize import render_detections

    overlay = out / f"{stem}_overlay.png"
    render_detections(image, result.boxes, result.labels, result.scores, result.class_names,
                      result.masks, score_thr).save(overlay)
    keep = np.flatnonzero(result.scores >= score_thr)
    keep = keep[np.argsort(-result.scores[keep], kind="stable")]
    detections = []
    for i in keep:
        c = int(result.labels[i])
        detections.append({
            "label": c,
            "class": result.class_names[c] if 0 <= c < len(result.class_names) else str(c),
            "score": round(float(result.scores[i]), 5),
            "box": [round(float(v), 2) for v in result.boxes[i]],
            **({"mask_area": int(result.masks[i].sum())} if result.masks is not None else {}),
        })
    H, W = image.shape[:2]
    record = {"image_size": [H, W], "score_thr": score_thr, "detections": detections}
    path = out / f"{stem}.json"
    path.write_text(json.dumps(record, indent=2))
    return [overlay, path]


_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+=")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``denseclip predict``."""
    parser.add_argument("config", help="preset name (see `denseclip presets`) or a YAML file")
    parser.add_argument("checkpoint",
                        help="weights (our checkpoint, a state dict or an official release); "
                             "'none' for random weights (meaningless output, for trying out)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders (searched recursively) or glob patterns "
                             "(quote them); section.key=value items are config overrides")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="images and sliding windows per forward call (default 4)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--classes", metavar="NAMES",
                       help="open-vocabulary classes, comma-separated: 'cat,dog,grass'")
    group.add_argument("--classes-file", metavar="FILE",
                       help="open-vocabulary classes, one 'name' or 'name: text to embed' "
                            "per line")
    parser.add_argument("--heatmaps", action="store_true",
                        help="also write <stem>_heatmap_<class>.png per open class (or per "
                             "trained class present, without open classes)")
    parser.add_argument("--score-thr", type=float, default=0.3,
                        help="detection: draw and list detections scoring at least this")
    parser.set_defaults(overrides=[])


def _error(message: str) -> int:
    print(f"denseclip predict: error: {message}", file=sys.stderr)
    return 2


def predictor_from_args(args: argparse.Namespace, cfg, command: str,
                        **kwargs: Any) -> Predictor:
    """A :class:`Predictor` for a command's ``checkpoint`` (``none``/``random``: random
    weights, with a warning) and ``--classes``/``--classes-file`` arguments."""
    classes = None
    if args.classes is not None:
        classes = parse_class_list(args.classes)
    elif args.classes_file is not None:
        classes = read_open_classes(args.classes_file)
    checkpoint = None if args.checkpoint.lower() in ("none", "random") else args.checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        predictor = Predictor(cfg, checkpoint, **kwargs)
    if checkpoint is None:
        print(f"denseclip {command}: warning: no checkpoint, {cfg.name} has random weights; "
              f"its outputs are meaningless", file=sys.stderr)
    predictor.set_classes(classes)
    return predictor


def run(args: argparse.Namespace) -> int:
    """``denseclip predict``: exit status 0 when every image was written, 1 when some
    failed (each listed with its reason on stderr), 2 for a bad config, checkpoint or class
    list (nothing is predicted)."""
    from tqdm import tqdm

    specs, overrides = [], list(getattr(args, "overrides", []))
    for item in args.inputs:
        if _OVERRIDE.match(item) and not Path(item).exists():
            overrides.append(item)
        else:
            specs.append(item)
    if not specs:
        return _error("no input images given")
    if args.batch_size < 1:
        return _error(f"--batch-size must be positive, got {args.batch_size}")
    cfg = load_config(args.config, overrides)  # ConfigError → exit status 2 in the CLI
    try:
        predictor = predictor_from_args(args, cfg, "predict", device=args.device,
                                        batch_size=args.batch_size)
    except (PredictionError, CheckpointError, FileNotFoundError) as e:
        where = f"--classes-file {args.classes_file}: " if args.classes_file and isinstance(
            e, PredictionError) else ""
        return _error(f"{where}{e}")

    paths, failures, skipped = collect_inputs(specs)
    for spec, reason in failures:
        print(f"failed: {spec}: {reason}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = {"classes": predictor.class_names}
    if predictor.open_class_names:
        names["open_classes"] = predictor.open_class_names
        names["open_texts"] = predictor.open_texts
    (out / "classes.json").write_text(json.dumps(names, indent=2))
    if skipped:
        print(f"denseclip predict: skipped {skipped} non-image file(s) in folders",
              file=sys.stderr)

    detection = predictor.task in DETECTION_TASKS
    want_probs = args.heatmaps and not predictor.open_class_names and not detection
    stems: set[str] = set()
    written = 0
    bar = tqdm(total=len(paths), unit="img", desc="predict", dynamic_ncols=True)

    def fail(path: Path, reason: str) -> None:
        failures.append((str(path), reason))
        bar.write(f"failed: {path}: {reason}", file=sys.stderr)

    def stem_for(path: Path) -> str:
        stem, n = path.stem, 1
        while stem in stems:
            n += 1
            stem = f"{path.stem}_{n}"
        stems.add(stem)
        return stem

    for start in range(0, len(paths), args.batch_size):
        batch = []
        for path in paths[start : start + args.batch_size]:
            try:
                batch.append((path, predictor.prepare(path)))
            except (ValueError, OSError) as e:  # unreadable, unsupported or too small
                fail(path, str(e))
                bar.update(1)
        try:
            results = predictor.predict_prepared([item for _, item in batch], want_probs)
        except (RuntimeError, ValueError) as e:
            if len(batch) == 1:
                fail(batch[0][0], f"prediction failed: {e}")
                bar.update(1)
                continue
            results = []
            for _path, item in batch:  # find the image that fails, keep the others
                try:
                    results.append(predictor.predict_prepared([item], want_probs)[0])
                except (RuntimeError, ValueError) as e2:
                    results.append(e2)
        for (path, item), result in zip(batch, results, strict=True):
            bar.update(1)
            if isinstance(result, Exception):
                fail(path, f"prediction failed: {result}")
                continue
            stem = stem_for(path)
            try:
                if detection:
                    write_detection(result, item.image, out, stem, args.score_thr)
                else:
                    write_segmentation(result, item.image, out, stem, args.heatmaps)
                written += 1
            except (OSError, ValueError) as e:
                fail(path, f"cannot write outputs: {e}")
    bar.close()
    print(f"{written} image(s) written to {out}" + (f", {len(failures)} failed" if failures
                                                    else ""))
    return 1 if failures else 0
