"""``denseclip export``: a segmentation model as ONNX with its text features baked in
(see :mod:`denseclip.export`)."""

from __future__ import annotations

import argparse
import sys

from ..checkpoint import CheckpointError
from ..config import load_config
from ..export import ExportError, export_precision, export_predictor
from ..inference import PredictionError
from .common import add_class_arguments, add_precision_argument, predictor_from_args

HELP = "export a segmentation model to ONNX with its text features baked in"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``denseclip export``."""
    parser.add_argument("config", help="preset name (see `denseclip presets`) or a YAML file")
    parser.add_argument("checkpoint", help="weights to export (a file, a weights name or "
                        "'pretrained'); 'none' for random weights")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. evaluation.crop_size=[640,640]")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="output format")
    parser.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    add_class_arguments(parser, "also output score maps for these comma-separated classes")
    add_precision_argument(parser, "fp32", note="; the file stores fp32 or fp16 (auto "
                                                "means fp32 for a portable file; bf16 is "
                                                "refused)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")


def run(args: argparse.Namespace) -> int:
    """``denseclip export``: 0 on success, 2 when the model cannot be exported as asked."""
    cfg = load_config(args.config, args.overrides)
    try:
        stored = export_precision(args.precision)
        predictor = predictor_from_args(args, cfg, "export", device="cpu")
        path = export_predictor(predictor, args.out, args.opset, precision=stored)
    except (ExportError, PredictionError, CheckpointError, FileNotFoundError) as e:
        print(f"denseclip export: error: {e}", file=sys.stderr)
        return 2
    outputs = "logits" + (", open_scores" if predictor.open_class_names else "")
    print(f"wrote {path} ({stored}): images (B, 3, H, W) -> {outputs}")
    return 0
