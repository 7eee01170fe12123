"""Tasks: one object per config owns everything that differs between semantic
segmentation, RetinaNet and Mask R-CNN (building the model, data, batching, evaluation,
the main metric, the official batch). Callers ask :func:`get_task` instead of comparing
task names."""

from __future__ import annotations

from torch import nn

from ..config import Config, ConfigError
from ..weights import load_checkpoint, resolve
from .base import Task
from .detection import DetectionTask
from .segmentation import SegmentationTask

__all__ = ["TASKS", "DetectionTask", "SegmentationTask", "Task", "build_model", "get_task"]

# model.task → the class that owns it (a choice checked when the config loads)
TASKS: dict[str, type[Task]] = {
    "segmentation": SegmentationTask,
    "retinanet": DetectionTask,
    "mask_rcnn": DetectionTask,
}


def get_task(cfg: Config) -> Task:
    """The task object of ``cfg.model.task``."""
    try:
        cls = TASKS[cfg.model.task]
    except KeyError:
        raise ConfigError(f"model.task: unknown task {cfg.model.task!r}; expected one of "
                          f"{', '.join(TASKS)}") from None
    return cls(cfg)


def build_model(cfg: Config) -> nn.Module:
    """Build the model described by ``cfg`` (and load ``model.pretrained`` if set: any
    weights argument :func:`denseclip.weights.resolve` takes, e.g. a file or ``RN50``)."""
    model = get_task(cfg).build_model()
    pretrained = resolve(cfg.model.pretrained, cfg.name) if cfg.model.pretrained else None
    if pretrained is not None:
        model.pretrained_report = load_checkpoint(model, pretrained)  # what it initialised
    model.config = cfg  # what save_pretrained writes next to the weights
    return model
