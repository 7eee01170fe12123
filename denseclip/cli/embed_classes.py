"""``denseclip embed-classes``: the text embeddings of a class list (.npy, K x D float32)
for a segmentor exported with ``denseclip export --dynamic-classes``, and the class names
beside them (.txt, a class file); see :func:`denseclip.inference.embed_classes`."""

from __future__ import annotations

import argparse
import sys

from ..inference import PredictionError, embed_classes
from ..weights.checkpoint import CheckpointError
from .common import checkpoint_message, model_config_only, predictor_from_args


def run(args: argparse.Namespace) -> int:
    """``denseclip embed-classes``: 0 on success, 2 for a model or class list that cannot
    be embedded."""
    try:
        cfg = model_config_only(args, "embed-classes")
        # the predictor reads --classes / --classes-file and checks them against the model
        predictor = predictor_from_args(args, cfg, "embed-classes", device="cpu")
        classes = dict(zip(predictor.open_class_names, predictor.open_texts, strict=True))
        result = embed_classes(predictor, classes)
        npy, names = result.save(args.out)
    except (PredictionError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"denseclip embed-classes: error: {checkpoint_message(e, 'embed-classes')}",
              file=sys.stderr)
        return 2
    K, D = result.embeddings.shape
    print(f"wrote {npy} ({K} x {D} float32) and {names} ({K} class names)")
    return 0
