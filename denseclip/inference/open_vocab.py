"""Open-vocabulary class lists: class names you type, scored by a segmentor's text guidance.

The model owns the scoring (``model.inference(images, out_size, open_texts=...)``, with the
text embeddings cached by its guidance, :meth:`denseclip.models.TextGuidance.embed`); the
segmentation task checks a list against the model
(:meth:`denseclip.tasks.SegmentationTask.open_vocabulary`). What is left here is reading a
class file for it, and :func:`embed_classes`: the text embeddings of a class list as an
array, for an exported model that takes them as an input (``denseclip export
--dynamic-classes``, ``denseclip embed-classes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..classes import ClassListError, read_classes
from ..runtime import run_mode
from ..tasks.base import OpenVocabulary
from ..tasks.results import PredictionError

__all__ = ["ClassEmbeddings", "OpenVocabulary", "embed_classes", "read_open_classes"]


def read_open_classes(path: str | Path) -> dict[str, str]:
    """A class file (the format of :mod:`denseclip.classes`) as ``{name: text to embed}``;
    problems raise :class:`PredictionError` naming the file."""
    try:
        return read_classes(path)
    except (ClassListError, FileNotFoundError) as e:
        raise PredictionError(str(e)) from None


@dataclass(frozen=True)
class ClassEmbeddings:
    """The text embeddings ``embeddings`` (K, D) float32 of K classes: ``names`` (what
    labels show) and the ``texts`` embedded for them, row i for label i."""

    names: tuple[str, ...]
    texts: tuple[str, ...]
    embeddings: np.ndarray

    def class_file(self) -> str:
        """The classes as a class file (:mod:`denseclip.classes`): one ``name`` per line,
        ``name: text`` where the embedded text differs."""
        lines = [name if name == text else f"{name}: {text}"
                 for name, text in zip(self.names, self.texts, strict=True)]
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write the embeddings to ``path`` (``.npy``, no pickled objects) and the class
        file beside it (the same name with ``.txt``); returns both paths."""
        path = Path(path)
        names = path.with_suffix(".txt")
        if names == path:
            raise ValueError(f"{path}: the embeddings file needs another suffix than .txt "
                             f"(its class names are written to {names.name})")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:  # np.save on a name would append .npy
            np.save(f, self.embeddings, allow_pickle=False)
        names.write_text(self.class_file(), encoding="utf-8")
        return path, names


def embed_classes(predictor: Any, classes: Any) -> ClassEmbeddings:
    """The text embeddings of ``classes`` (a comma-separated string, a list of names or
    ``{name: text to embed}``) with the model of ``predictor`` (a
    :class:`~denseclip.inference.Predictor`): its text encoder behind its
    learned contexts, in the predictor's precision and kernels — exactly the embeddings
    ``Predictor(..., classes=classes)`` scores images with (before the context decoder
    refines them per image). Raises :class:`PredictionError` for a model without
    image-independent text embeddings (no text guidance, pre-model prompting, zero-shot
    prompt ensembles) or a class text that does not fit the text context."""
    vocabulary = predictor.task_object.open_vocabulary(predictor.model, classes)
    guidance = predictor.guidance
    if getattr(guidance, "prompting", None) != "post" or getattr(guidance, "contexts",
                                                                 None) is None:
        raise PredictionError(f"{predictor.cfg.name} has no image-independent class "
                              f"embeddings: only post-model prompting DenseCLIP models have")
    with torch.no_grad(), run_mode(predictor.precision, predictor.cfg.kernels,
                                   predictor.device):
        text = guidance.embed(list(vocabulary.texts))  # (1, K, D)
    array = text[0].float().cpu().numpy().astype(np.float32)
    return ClassEmbeddings(tuple(vocabulary.names), tuple(vocabulary.texts), array)
