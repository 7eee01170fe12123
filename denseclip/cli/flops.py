"""``denseclip flops``: parameters and multiply-adds of a config's model."""

from __future__ import annotations

import argparse
import json

from ..tasks import build_model, get_task
from ..tools.flops import complexity, format_report
from .common import load_cli_config


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
