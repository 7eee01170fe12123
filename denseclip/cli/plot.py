"""``denseclip plot``: a training run's loss, learning rate and validation metrics as PNGs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..evaluation.plots import plot_training_curves, read_metrics_log

HELP = "draw the loss, learning rate and validation metrics of a training run (PNG files)"
LOG_NAME = "metrics.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("work_dir", metavar="WORK_DIR",
                        help=f"a training work dir holding {LOG_NAME} (or that file itself)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where the PNGs go (default: WORK_DIR/plots)")


def run(args: argparse.Namespace) -> int:
    source = Path(args.work_dir)
    log_path = source if source.is_file() else source / LOG_NAME
    out = Path(args.out) if args.out else log_path.parent / "plots"
    records = read_metrics_log(log_path)
    try:
        written = plot_training_curves(records, out)
    except ImportError as e:
        print(f"denseclip plot: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        raise ValueError(f"{log_path}: {e}") from e
    for path in written:
        print(path)
    return 0
