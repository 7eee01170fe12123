"""``denseclip export``: a segmentation model as ONNX with its text features baked in
(see :mod:`denseclip.tools.export`), with the classes as an input (``--dynamic-classes``)
or its text encoder alone (``--text-encoder``, see :mod:`denseclip.tools.export_onnx_dynamic`),
or any model (ours, an official release, OpenAI CLIP) as a
safetensors directory (:func:`denseclip.save_pretrained`)."""

from __future__ import annotations

import argparse
import sys

from ..config import Config
from ..inference import PredictionError
from ..tasks import build_model
from ..tools.export import ExportError, export_precision, export_predictor, export_predictor_int8
from ..tools.export_onnx_dynamic import export_dynamic_classes, export_text_encoder
from ..weights import resolve
from ..weights.checkpoint import CheckpointError, load_checkpoint
from ..weights.pretrained import save_pretrained
from .common import (
    calibration_from_args,
    checkpoint_message,
    model_config_only,
    predictor_from_args,
)


def run(args: argparse.Namespace) -> int:
    """``denseclip export``: 0 on success, 2 when the model cannot be exported as asked."""
    try:
        cfg = model_config_only(args, "export")
    except CheckpointError as e:
        print(f"denseclip export: error: {e}", file=sys.stderr)
        return 2
    if args.format == "safetensors":
        if args.dynamic_classes or args.text_encoder:
            flag = "--dynamic-classes" if args.dynamic_classes else "--text-encoder"
            print(f"denseclip export: error: {flag} is an ONNX export; use --format onnx",
                  file=sys.stderr)
            return 2
        return _export_safetensors(args, cfg)
    if args.dynamic_classes or args.text_encoder:
        if args.precision == "int8":
            print("denseclip export: error: --precision int8 exports the model with its "
                  "trained classes; --dynamic-classes and --text-encoder take fp32 or fp16",
                  file=sys.stderr)
            return 2
        return _export_vocabulary_input(args, cfg)
    try:
        if args.precision == "int8":  # quantised from the fp32 model, calibrated first
            stored = "int8"
            float_args = argparse.Namespace(**{**vars(args), "precision": "fp32"})
            predictor = predictor_from_args(float_args, cfg, "export", device="cpu")
            path = export_predictor_int8(predictor, args.out, calibration_from_args(args),
                                         args.opset)
        else:
            stored = export_precision(args.precision)
            predictor = predictor_from_args(args, cfg, "export", device="cpu")
            path = export_predictor(predictor, args.out, args.opset, precision=stored)
    except (ExportError, PredictionError, CheckpointError, FileNotFoundError) as e:
        print(f"denseclip export: error: {checkpoint_message(e, 'export')}", file=sys.stderr)
        return 2
    outputs = "logits" + (", open_scores" if predictor.open_class_names else "")
    print(f"wrote {path} ({stored}): images (B, 3, H, W) -> {outputs}")
    return 0


def _export_vocabulary_input(args: argparse.Namespace, cfg: Config) -> int:
    """``--dynamic-classes`` (the image model, classes as an input) or ``--text-encoder``."""
    flag = "--dynamic-classes" if args.dynamic_classes else "--text-encoder"
    if args.classes is not None or args.classes_file is not None:
        print(f"denseclip export: error: {flag} exports no class list; embed one with "
              f"`denseclip embed-classes` instead of --classes/--classes-file",
              file=sys.stderr)
        return 2
    try:
        stored = export_precision(args.precision)
        if args.text_encoder and stored != "fp32":
            raise ExportError("--text-encoder exports fp32 only (its embeddings feed the "
                              "image model as float32)")
        predictor = predictor_from_args(args, cfg, "export", device="cpu")
        if args.text_encoder:
            path = export_text_encoder(predictor, args.out, args.opset)
        else:
            path = export_dynamic_classes(predictor, args.out, args.opset, precision=stored)
    except (ExportError, PredictionError, CheckpointError, FileNotFoundError) as e:
        print(f"denseclip export: error: {checkpoint_message(e, 'export')}", file=sys.stderr)
        return 2
    if args.text_encoder:
        print(f"wrote {path}: tokens (K, L) int64 -> class_embeddings (K, D)")
    else:
        print(f"wrote {path} ({stored}): images (B, 3, H, W), class_embeddings (K, D) -> "
              f"logits, open_scores")
    return 0


def _export_safetensors(args: argparse.Namespace, cfg: Config) -> int:
    """Convert any checkpoint the loader accepts into a save_pretrained directory."""
    checkpoint = resolve(args.checkpoint, cfg.name)
    model = build_model(cfg)
    if checkpoint is None:
        print(f"denseclip export: warning: no checkpoint, {cfg.name} has random weights",
              file=sys.stderr)
    else:
        try:
            print(load_checkpoint(model, checkpoint))
        except CheckpointError as e:
            print(f"denseclip export: error: {checkpoint_message(e, 'export')}",
                  file=sys.stderr)
            return 2
    out = save_pretrained(model, args.out, cfg, metrics=args.metrics)
    print(f"wrote {out}: model.safetensors, config.yaml, classes.txt, README.md")
    return 0

