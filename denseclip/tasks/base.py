"""The interface every task implements: one object per config that owns what differs
between tasks, so that the engine, evaluation, predictor and tools never compare task
names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..classes import load_class_names
from ..config import Config
from ..dist import DistEnv
from ..models.segmentor import MIN_INPUT_SIZE
from ..utils import keep_ratio_size
from .results import PredictionError, Prepared


class Task:
    """What differs between tasks, for one config.

    Class attributes: ``name``; ``official_batch_size``, the global batch of the official
    recipe (images per optimiser step over all GPUs); ``main_metric``, the metric that picks
    the best checkpoint (higher is better); ``summary_keys``, the headline metrics logged
    after each evaluation."""

    name: ClassVar[str]
    official_batch_size: ClassVar[int]
    main_metric: ClassVar[str]
    summary_keys: tuple[str, ...]

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        """The task's model for ``cfg`` with freshly initialised weights."""
        raise NotImplementedError

    @staticmethod
    def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
        """The model with BatchNorm turned into SyncBatchNorm where the official recipe does."""
        raise NotImplementedError

    # ------------------------------------------------------------------ data and training
    def dataset(self, split: str, train: bool):
        """The ``split`` of ``cfg.data`` with the training or the test pipeline."""
        raise NotImplementedError

    def group_flags(self, dataset) -> list[int] | None:
        """Group ids for the training sampler (None: plain shuffling)."""
        return None

    @property
    def collate(self):
        """The collate function of the training loader."""
        raise NotImplementedError

    def to_device(self, batch: dict[str, Any], device: torch.device):
        """``(inputs, targets)`` of a collated batch on ``device``."""
        raise NotImplementedError

    def checkpoint_meta(self, dataset) -> dict[str, Any]:
        """What a checkpoint records about the training data (class names, ids)."""
        return {"classes": list(dataset.class_names)}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module, dataset, env: DistEnv, aug_test: bool = False,
                 out_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
        """Metrics of ``model`` on ``dataset`` (with the summary keys and a ``table``)."""
        raise NotImplementedError

    def write_figures(self, metrics: dict[str, Any], out_dir: str | Path) -> list[Path]:
        """Figures of :meth:`evaluate`'s metrics in ``out_dir``; their paths."""
        return []

    # ------------------------------------------------------------------ tools
    # what the demo's button says; whether its results are filtered by a score threshold;
    # whether ONNX export and the slide-inference benchmark apply; what the benchmark's
    # generated training images imitate
    verb: ClassVar[str]
    score_threshold: ClassVar[bool] = False
    onnx_export: ClassVar[bool] = False
    slide_inference: ClassVar[bool] = False
    bench_data: ClassVar[str]

    def needs_probs(self, heatmaps: bool, open_classes: bool) -> bool:
        """Whether ``denseclip predict`` needs class probabilities for what it writes."""
        return False

    def write_result(self, result: Any, image: np.ndarray, out: Path, stem: str, *,
                     heatmaps: bool = False, score_thr: float = 0.3) -> list[Path]:
        """Write ``result`` of ``image`` as ``denseclip predict`` does: pictures and data
        files named ``<stem>_*`` in ``out``; their paths."""
        raise NotImplementedError

    def bench_size(self) -> tuple[int, int]:
        """The input size (H, W) ``denseclip bench`` measures unless told otherwise."""
        raise NotImplementedError

    def bench_inputs(self, num_classes: int, size: Sequence[int], batch: int,
                     device: torch.device, seed: int = 0) -> tuple[Any, Any]:
        """Random ``(images, targets)`` of ``batch`` images of ``size`` as a user passes them
        to the model."""
        raise NotImplementedError

    def bench_training_set(self, root: Path, num_images: int, rng: np.random.Generator):
        """``num_images`` generated images in the task's data layout under ``root``, as a
        training dataset (with the training transforms of ``cfg.data``)."""
        raise NotImplementedError

    def flops_size(self, given: Sequence[int] | None = None) -> list[int]:
        """The input size (H, W) that ``denseclip flops`` counts: ``given`` (checked), else
        the task's default."""
        raise NotImplementedError

    # ------------------------------------------------------------------ prediction
    #: whether :meth:`open_vocabulary` scores class lists typed at prediction time
    supports_open_vocabulary: ClassVar[bool] = False

    def configure_model(self, model: nn.Module) -> nn.Module:
        """Give ``model`` the test-time settings of ``cfg`` (:meth:`build_model` does; the
        predictor does for a model it is handed); returns ``model``."""
        return model

    @cached_property
    def class_names(self) -> list[str]:
        """The names of ``cfg.model.classes`` (read once per task)."""
        return load_class_names(self.cfg.model.classes)

    def model_class_names(self, model: nn.Module) -> list[str]:
        """The names of ``model``'s classes: its own list, else ``cfg.model.classes``."""
        names = getattr(model, "class_names", None)
        return list(names) if names else list(self.class_names)

    def open_vocabulary(self, model: nn.Module, classes: Any) -> OpenVocabulary:
        """``classes`` (a comma-separated string, a list of names or a mapping ``{name: text
        to embed}``) checked for ``model``: :class:`PredictionError` saying why they cannot
        be scored."""
        raise PredictionError(f"open-vocabulary classes need a segmentation preset; "
                              f"{self.cfg.name} is a {self.cfg.model.task} model")

    def prepare(self, rgb: np.ndarray) -> Prepared:
        """One decoded ``H x W x 3`` uint8 RGB image (not empty) preprocessed as the test
        pipeline does; :class:`PredictionError` for an image the network cannot take."""
        raise NotImplementedError

    def predict(self, model: nn.Module, items: Sequence[Prepared], *, batch_size: int = 8,
                return_probs: bool = True, open_vocabulary: OpenVocabulary | None = None,
                device: torch.device | None = None) -> list:
        """Predictions of ``model`` (in eval mode, on ``device``) for prepared images, one
        result (:mod:`.results`) per item, at most ``batch_size`` images (and sliding
        windows) per forward call. ``return_probs=False`` may skip class probabilities;
        ``open_vocabulary`` adds the score maps of typed classes (see
        :attr:`supports_open_vocabulary`). Runs in the caller's precision and grad mode."""
        raise NotImplementedError


@dataclass(frozen=True)
class OpenVocabulary:
    """Classes typed at prediction time: the ``names`` shown (legend, file names, JSON)
    and the ``texts`` the model embeds for them."""

    names: tuple[str, ...]
    texts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)


def check_test_size(H: int, W: int, scale: Sequence[int]) -> None:
    """Raise :class:`PredictionError` unless an ``H x W`` image resized (keeping its ratio)
    to ``scale`` is at least the network stride on both sides."""
    h, w = keep_ratio_size(H, W, scale)
    if min(h, w) < MIN_INPUT_SIZE:
        raise PredictionError(
            f"the image is {H}x{W} (HxW) pixels; resized to the test scale "
            f"{list(scale)} it becomes {h}x{w}, smaller than the network stride "
            f"{MIN_INPUT_SIZE} on one side: the image is too elongated for this model"
        )
