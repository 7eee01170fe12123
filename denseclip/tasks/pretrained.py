"""``denseclip.from_pretrained``: a ready model from a
:func:`~denseclip.weights.pretrained.save_pretrained` directory or from a registered release's
name (:mod:`denseclip.weights.hub`), e.g.
``denseclip.from_pretrained("denseclip_fpn_res50_512x512_80k")``. Finding the config and the
weights is :func:`denseclip.weights.resolve_pretrained`'s job; this adds the model."""

from __future__ import annotations

import os

from torch import nn

from ..weights import load_checkpoint, resolve_pretrained
from . import build_model


def from_pretrained(name_or_dir: str | os.PathLike[str], *, progress: bool = True) -> nn.Module:
    """A model in eval mode, with its weights, from a :func:`save_pretrained` directory or
    a registered release's name (downloaded into the cache and built with its preset; see
    ``denseclip download --list``). The model's config is ``model.config``."""
    cfg, weights = resolve_pretrained(name_or_dir, progress=progress)
    model = build_model(cfg)
    load_checkpoint(model, weights)
    return model.eval()
