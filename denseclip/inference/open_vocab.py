"""Open-vocabulary score maps: class names you type, scored by a DenseCLIP segmentor.

The text encoder embeds each class text behind the learned contexts, the context decoder
refines the embeddings against the image (as in training), and the cosine similarity to
every pixel embedding (stride 32, 16 for ViT) is upsampled bilinearly to the image. The
decode head is not involved: it keeps predicting the trained classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..classes import ClassListError, as_class_dict, read_classes
from ..models.guidance import DenseFeatures, TextGuidance
from ..models.segmentor import Segmentor
from ..models.text_encoder import tokenize
from ..tasks.results import PredictionError

__all__ = ["OpenVocabulary", "read_open_classes"]


def read_open_classes(path: str | Path) -> dict[str, str]:
    """A class file (the format of :mod:`denseclip.classes`) as ``{name: text to embed}``;
    problems raise :class:`PredictionError` naming the file."""
    try:
        return read_classes(path)
    except (ClassListError, FileNotFoundError) as e:
        raise PredictionError(str(e)) from None


class OpenVocabulary:
    """A class list scored by a model's text guidance: names (shown), texts (embedded),
    their tokens, and the text embeddings cached per class list and weight version.

    ``classes`` is a comma-separated string, a sequence of names or a mapping
    ``{name: text to embed}``; texts too long for the text context raise
    :class:`PredictionError` naming the class and the limit.
    """

    def __init__(self, guidance: TextGuidance, classes: Any, device: torch.device) -> None:
        try:
            mapping = as_class_dict(classes)
        except ClassListError as e:
            raise PredictionError(str(e)) from None
        length = guidance.text_encoder.context_length - guidance.n_ctx
        try:
            tokens = tokenize(list(mapping.values()), length)
        except ValueError as e:
            detail = ", ".join(f"{n!r} → {t!r}" for n, t in mapping.items() if n != t)
            extra = f" (class texts: {detail})" if detail else ""
            raise PredictionError(f"{e}{extra}") from None
        self.guidance = guidance
        self.names = list(mapping)
        self.texts = list(mapping.values())
        self.tokens = tokens.to(device)
        self._cache: tuple | None = None

    def __len__(self) -> int:
        return len(self.names)

    def clear_cache(self) -> None:
        self._cache = None

    def text_embeddings(self) -> torch.Tensor:
        """Text embeddings (1, K', D) behind the learned contexts (post-model prompting),
        computed once and reused for every image and window until the weights change."""
        guidance = self.guidance
        key = guidance.cache_key(self.texts, self.tokens.device)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                text = guidance.text_encoder(self.tokens, guidance.contexts)
            self._cache = (key, text)
        return self._cache[1]

    def scores(self, model: Segmentor, dense: DenseFeatures, size) -> torch.Tensor:
        """Score maps (B, K', *size) for the images behind ``dense``."""
        if self.guidance.prompting == "post":
            return model.forward_scores(dense, size, text=self.text_embeddings())
        return model.forward_scores(dense, size, tokens=self.tokens)
