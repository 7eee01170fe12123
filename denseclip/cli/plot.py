"""``denseclip plot``: a training run's loss, learning rate and validation metrics as PNGs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..evaluation.plots import plot_training_curves, read_metrics_log, skipped_figures
from .arguments import METRICS_LOG


def run(args: argparse.Namespace) -> int:
    source = Path(args.work_dir)
    log_path = source if source.is_file() else source / METRICS_LOG
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
    for name, reason in skipped_figures(records):
        print(f"denseclip plot: skipped {name}: {reason}", file=sys.stderr)
    return 0
