"""The :class:`Predictor`: images in, numpy predictions out, the way the test pipeline runs."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import Config, load_config
from ..models.guidance import TextGuidance
from ..runtime import prepare_model, resolve_precision, run_mode
from ..tasks import Task, build_model, get_task
from ..tasks.base import OpenVocabulary
from ..tasks.results import PredictionError, Prepared
from ..weights.checkpoint import load_checkpoint
from ..weights.provenance import UntrainedPartsWarning, untrained_message
from ..weights.resolver import describe
from .inputs import to_rgb
from .int8 import OPEN_CLASSES_MESSAGE, Calibration, quantize_model
from .open_vocab import embed_classes

__all__ = ["Predictor"]


class Predictor:
    """Run a DenseCLIP model on images the way the test pipeline does.

    Args:
        config: a preset name, a YAML file or a :class:`~denseclip.config.Config`; or,
            without ``checkpoint``, a model that describes itself: a work dir of
            ``denseclip train`` (newest checkpoint), one of its checkpoints or a saved
            model directory (:func:`denseclip.weights.resolver.describe`).
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
            choice. ``int8`` (segmentation on the CPU, opt-in) quantises the model with
            ONNX Runtime (:mod:`denseclip.inference.int8`), calibrated on ``calibration``
            (a :class:`~denseclip.inference.int8.Calibration`; default: 32 images of the
            config's training split); it scores the trained classes only.

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
                 batch_size: int = 8, precision: str | None = None,
                 calibration: Calibration | None = None) -> None:
        described = None if isinstance(config, Config) or checkpoint is not None \
            else describe(config)
        if described is not None:  # a work dir, our checkpoint or a saved model alone
            cfg, checkpoint = described.config, described.checkpoint
        else:
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
        self._setup(model, cfg, device, classes, batch_size, precision, calibration)

    @classmethod
    def from_model(cls, model: nn.Module, config: str | Path | Config,
                   device: str | torch.device = "cpu", classes: Any = None,
                   batch_size: int = 8, precision: str | None = None,
                   calibration: Calibration | None = None) -> Predictor:
        """A predictor around a model you already have (its weights are used as they are;
        with ``kernels: fast`` its convolution weights move to channels_last in place)."""
        cfg = copy.deepcopy(config) if isinstance(config, Config) else load_config(config)
        self = cls.__new__(cls)
        self.load_report = None
        self._setup(model, cfg, device, classes, batch_size, precision, calibration)
        return self

    def _setup(self, model: nn.Module, cfg: Config, device, classes, batch_size: int,
               precision: str | None, calibration: Calibration | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.cfg = cfg
        self.task = cfg.model.task
        #: the :class:`~denseclip.tasks.Task` of the config: preprocessing and prediction
        self.task_object: Task = get_task(cfg)
        self.device = torch.device(device)
        self.precision = resolve_precision(precision or cfg.precision, self.device)
        model = self.task_object.configure_model(model)
        self.model = prepare_model(model.to(self.device), cfg.kernels).eval()
        self.batch_size = int(batch_size)
        self.class_names: list[str] = self.task_object.model_class_names(model)
        if self.precision == "int8":
            self.model = self._int8_model(calibration)
        self.open_vocabulary: OpenVocabulary | None = None
        self._warned: set[str] = set()
        self.set_classes(classes)

    def _int8_model(self, calibration: Calibration | None) -> nn.Module:
        """The model quantised to int8 (:func:`~denseclip.inference.int8.quantize_model`)."""
        return quantize_model(self.model, self.cfg, calibration)

    # -------------------------------------------------------------- class lists
    @property
    def guidance(self) -> TextGuidance | None:
        """The model's text guidance (zero-shot CLIP: its prompt ensemble), if any: it
        embeds, and caches, the texts of both class lists."""
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
        elif self.precision == "int8":
            raise PredictionError(OPEN_CLASSES_MESSAGE)
        else:
            self.open_vocabulary = self.task_object.open_vocabulary(self.model, classes)
        message = self.untrained_message()
        if message and message not in self._warned:  # once per predictor and message
            self._warned.add(message)
            warnings.warn(message, UntrainedPartsWarning, stacklevel=2)

    def untrained_message(self, open_vocabulary: bool | None = None) -> str | None:
        """One line naming the parts the outputs depend on that were never trained or
        loaded (see :mod:`denseclip.weights.provenance`), or ``None``. ``open_vocabulary``:
        whether the outputs include scores of typed class names (default: whether open
        classes are set). Emitted as an :class:`UntrainedPartsWarning` when the classes
        are set; unknown (``None``) for :meth:`from_model` and without a checkpoint, which
        warns on its own."""
        if open_vocabulary is None:
            open_vocabulary = self.open_vocabulary is not None
        return untrained_message(self.load_report, open_vocabulary,
                                 num_classes=self.num_classes)

    def clear_cache(self) -> None:
        """Forget the cached text embeddings of both class lists (the trained ones and the
        open ones, both kept by the model's text guidance); they are recomputed on the next
        image."""
        if self.guidance is not None:
            self.guidance.clear_cache()

    def open_text_embeddings(self) -> torch.Tensor:
        """Text embeddings (1, K', D) of the open classes behind the learned contexts,
        computed once per class list and reused until the class list or weights change."""
        if self.open_vocabulary is None:
            raise PredictionError("no open-vocabulary classes are set")
        return self.guidance.embed(self.open_vocabulary.texts)

    def embed_classes(self, classes: Any) -> np.ndarray:
        """Text embeddings (K, D) float32 of ``classes`` (as ``classes=``), the input
        ``class_embeddings`` of a ``--dynamic-classes`` ONNX export; see
        :func:`denseclip.inference.embed_classes`."""
        return embed_classes(self, classes).embeddings

    # -------------------------------------------------------------- preprocessing
    def prepare(self, image: Any) -> Prepared:
        """Decode and preprocess one image (raises :class:`PredictionError` for images the
        network cannot take)."""
        rgb = to_rgb(image, self.cfg.data.max_image_pixels)
        H, W = rgb.shape[:2]
        if H == 0 or W == 0:
            raise PredictionError(f"the image is empty ({H}x{W} pixels)")
        return self.task_object.prepare(rgb)

    # -------------------------------------------------------------- prediction
    def predict(self, image: Any, return_probs: bool = True):
        """Predict one image (path, PIL image or H × W × 3 uint8 array); returns a
        :class:`SegmentationPrediction` or :class:`DetectionPrediction`.

        ``return_probs=False`` skips the K × H × W probabilities (``probs`` is None) and
        finds the labels class-chunk by class-chunk, which needs far less memory for
        large images and many classes."""
        return self.predict_prepared([self.prepare(image)], return_probs)[0]

    def predict_batch(self, images: Sequence[Any] | np.ndarray | torch.Tensor,
                      return_probs: bool = True, *, exact: bool = True) -> list:
        """Predict several images, one result each, in order.

        ``images``: a sequence of anything :meth:`predict` takes, or one uint8 RGB batch
        (numpy array or tensor) ``B × H × W × 3`` or ``B × 3 × H × W`` (a batch whose last
        axis is 3 is read as ``B × H × W × 3``).

        ``exact=True`` (default): every image gets the forward calls :meth:`predict` gives
        it, so each result equals ``predict(image)`` bit for bit on every device and
        precision; several images in one forward call change the last bits in fp32 on CPU
        (other kernels, other summation order). ``exact=False``: images of equal
        preprocessed size share forward calls (faster on GPUs; results may differ from
        :meth:`predict` by rounding)."""
        items = [self.prepare(im) for im in _batch_images(images)]
        return self._predict_items(items, return_probs, exact)

    def stream(self, frames: Iterable[Any], batch_size: int | None = None,
               return_probs: bool = True, *, exact: bool = True) -> Iterator:
        """Predict an iterable of frames (e.g. a video's), lazily: yields one result per
        frame, in order, reading at most ``batch_size`` (default :attr:`batch_size`) frames
        ahead. Each batch is decoded and preprocessed together and then predicted as
        :meth:`predict_batch` does (``exact``: results equal ``predict(frame)`` bit for
        bit). The text embeddings of both class lists are computed once, on the first
        frame, and reused for the whole stream (and later ones) while the class list and
        weights stay the same (the model's text guidance caches them). A frame that cannot
        be predicted raises :class:`PredictionError`, which ends the stream."""
        size = self.batch_size if batch_size is None else int(batch_size)
        if size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        batch: list[Prepared] = []
        for frame in frames:
            batch.append(self.prepare(frame))
            if len(batch) == size:
                yield from self._predict_items(batch, return_probs, exact)
                batch = []
        if batch:
            yield from self._predict_items(batch, return_probs, exact)

    def _predict_items(self, items: Sequence[Prepared], return_probs: bool,
                       exact: bool) -> list:
        if not exact:
            return self.predict_prepared(items, return_probs)
        return [r for item in items for r in self.predict_prepared([item], return_probs)]

    @torch.no_grad()
    def predict_prepared(self, items: Sequence[Prepared], return_probs: bool = True) -> list:
        """Predict images already passed through :meth:`prepare` (in :attr:`precision`)."""
        with run_mode(self.precision, self.cfg.kernels, self.device):
            return self._predict_prepared(items, return_probs)

    def _predict_prepared(self, items: Sequence[Prepared], return_probs: bool) -> list:
        return self.task_object.predict(self.model, items, batch_size=self.batch_size,
                                        return_probs=return_probs,
                                        open_vocabulary=self.open_vocabulary,
                                        device=self.device)

    def window(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of the head (N, K, h, w) for normalised crops, followed by the open
        classes' score maps (N, K', h, w) upsampled bilinearly to the crop, if any."""
        return self.model.window_logits(images, self.open_texts)


def _batch_images(images: Any) -> Sequence[Any]:
    """The images of a batch: a 4-D uint8 array or tensor split into ``H × W × 3`` arrays;
    any other sequence as it is."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        if isinstance(images, (str, Path)):
            raise PredictionError("predict_batch takes several images; for one, use predict")
        return images
    if images.ndim != 4:
        raise PredictionError(f"a batch array must be B x H x W x 3 or B x 3 x H x W, got "
                              f"shape {images.shape}; for one image use predict")
    if images.shape[3] != 3:
        if images.shape[1] != 3:
            raise PredictionError(f"a batch array must be B x H x W x 3 or B x 3 x H x W, "
                                  f"got shape {images.shape}")
        images = images.transpose(0, 2, 3, 1)
    return list(images)
