"""``denseclip flops`` (parameters and multiply-adds) and ``denseclip presets``."""

from __future__ import annotations

import argparse
import json

from ..config import ConfigError, available_presets
from ..flops import DETECTION_INPUT_SIZE, complexity, format_report
from ..tasks import build_model
from .common import add_config_arguments, load_cli_config

HELP = "count parameters and multiply-adds (GMACs) of a config's model"
PRESETS_HELP = "list the bundled config presets"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                        help="input size (default: the config's data.crop_size; for detection, "
                             "where it is the raw tensor, not resized: 1280 800, or the padded "
                             "model.detection max_size x min_size when the backbone's stored "
                             "position grid is smaller)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--device", default="meta",
                        help="device to count on (default: meta, shapes only, no arithmetic)")
    parser.add_argument("--transposed-conv", choices=("input", "output"), default=None,
                        help="count a transposed convolution per input position (correct) or "
                             "per output position (fvcore < 2021, as the official detection "
                             "figures did); default: input for segmentation, output for "
                             "detection")


def run(args: argparse.Namespace) -> int:
    cfg = load_cli_config(args)
    cfg.model.pretrained = None  # weights do not change the counts
    detection = cfg.model.task != "segmentation"
    divisor = cfg.model.detection.size_divisor
    if args.size:
        size = list(args.size)
    elif not detection:
        size = list(cfg.data.crop_size)
    else:
        # mmdet's FLOPs default, unless the backbone crops a stored position grid too small
        # for it (the tiny presets): then the largest padded test input
        backbone = cfg.model.backbone
        size = list(DETECTION_INPUT_SIZE)
        if backbone.pos_embed == "crop" and max(size) > backbone.input_resolution:
            det = cfg.model.detection
            size = [-(-det.max_size // divisor) * divisor, -(-det.min_size // divisor) * divisor]
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(f"input size must be two positive integers (H W), got {size}")
    if detection and (size[0] % divisor or size[1] % divisor):
        raise ConfigError(f"detectors are counted on the raw input tensor: the size must be "
                          f"a multiple of model.detection.size_divisor ({divisor}), got {size}")
    model = build_model(cfg).to(args.device)
    result = {"config": cfg.name, **complexity(model, size,
                                               transposed_conv=args.transposed_conv)}
    if args.json:
        print(json.dumps(result))
    else:
        print(format_report(result, title=cfg.name))
    return 0


def add_presets_arguments(parser: argparse.ArgumentParser) -> None:
    """``denseclip presets`` takes no arguments."""


def run_presets(args: argparse.Namespace) -> int:
    print("\n".join(available_presets()))
    return 0
