"""``denseclip flops`` (parameters and multiply-adds) and ``denseclip presets``."""

from __future__ import annotations

import argparse
import json

from ..config import available_presets
from ..tasks import build_model, get_task
from ..tools.flops import complexity, format_report
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
    size = get_task(cfg).flops_size(args.size)
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
