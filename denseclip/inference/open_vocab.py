"""Open-vocabulary class lists: class names you type, scored by a segmentor's text guidance.

The model owns the scoring (``model.inference(images, out_size, open_texts=...)``, with the
text embeddings cached by its guidance, :meth:`denseclip.models.TextGuidance.embed`); the
segmentation task checks a list against the model
(:meth:`denseclip.tasks.SegmentationTask.open_vocabulary`). What is left here is reading a
class file for it.
"""

from __future__ import annotations

from pathlib import Path

from ..classes import ClassListError, read_classes
from ..tasks.base import OpenVocabulary
from ..tasks.results import PredictionError

__all__ = ["OpenVocabulary", "read_open_classes"]


def read_open_classes(path: str | Path) -> dict[str, str]:
    """A class file (the format of :mod:`denseclip.classes`) as ``{name: text to embed}``;
    problems raise :class:`PredictionError` naming the file."""
    try:
        return read_classes(path)
    except (ClassListError, FileNotFoundError) as e:
        raise PredictionError(str(e)) from None
