"""``denseclip train``, ``test`` and ``quickstart``: the training engine's commands."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from ..config import load_config
from ..data.synthetic import make_synthetic_dataset
from ..dist import DistEnv, cleanup, init_distributed
from ..engine.guard import TrainingStopped
from ..engine.trainer import test, train
from ..weights import resolve
from ..weights.checkpoint import CheckpointError, ClassMismatchError
from ..weights.provenance import UntrainedPartsWarning
from .common import (
    calibration_from_args,
    load_cli_config,
    max_pixels_overrides,
    model_config_only,
    warn_untrained,
)


def run_train(args: argparse.Namespace) -> int:
    cfg = load_cli_config(args)
    # names (RN50, a release) are fetched into the cache; every process may ask, the
    # download itself runs once (a lock file) and a cached file needs no network
    load_from = resolve(args.load_from, cfg.name)
    text_weights = resolve(args.text_weights, cfg.name)
    env = init_distributed(args.device)
    work_dir = args.work_dir or f"work_dirs/{cfg.name}"
    try:
        metrics = train(cfg, work_dir, resume=args.resume, load_from=load_from, env=env,
                        progress=not args.no_progress, text_weights=text_weights)
    except TrainingStopped as e:
        if env.is_main:
            print(f"denseclip train: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        cleanup()
    if metrics and env.is_main:
        print(metrics["table"])
    return 0


def run_test(args: argparse.Namespace) -> int:
    cfg = model_config_only(args, "test", max_pixels_overrides(args))
    checkpoint = resolve(args.checkpoint, cfg.name)
    if checkpoint is None:
        raise ValueError(f"denseclip test needs weights, got {args.checkpoint!r}")
    env = init_distributed(args.device)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UntrainedPartsWarning)
            metrics = test(cfg, checkpoint, aug_test=args.aug_test, out_dir=args.out_dir,
                           env=env, progress=not args.no_progress, precision=args.precision,
                           calibration=calibration_from_args(args))
        for warning in caught:  # one line; other warnings as Python shows them
            if issubclass(warning.category, UntrainedPartsWarning):
                warn_untrained(str(warning.message), "test")
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                       warning.lineno)
        other = None
        if args.compare_precision:
            other = test(cfg, checkpoint, aug_test=args.aug_test, env=env,
                         progress=not args.no_progress, precision=args.compare_precision,
                         calibration=calibration_from_args(args))
    except ClassMismatchError as e:
        raise CheckpointError(e.for_command("test")) from None
    finally:
        cleanup()
    if env.is_main:
        print(metrics["table"])
        print(json.dumps({k: round(v, 4) for k, v in metrics["summary"].items()}))
        if other is not None:
            print(precision_comparison(metrics, other))
    return 0


def precision_comparison(base: dict, other: dict) -> str:
    """One line per summary metric: its value in each precision and the difference."""
    a, b = base["precision"], other["precision"]
    lines = [f"{a} vs {b}:"]
    for key, value in base["summary"].items():
        delta = other["summary"][key] - value
        lines.append(f"  {key}: {value:.2f} ({a}) {other['summary'][key]:.2f} ({b}) "
                     f"delta {delta:+.2f}")
    return "\n".join(lines)


def run_quickstart(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    work_dir = Path(args.work_dir)
    root = make_synthetic_dataset(work_dir / "data", args.num_train, args.num_val, seed=0)
    print(f"synthetic ADE20K-layout data: {args.num_train} training and {args.num_val} "
          f"validation images in {root}")
    cfg = load_config("quickstart", [f"data.root={root}", f"model.classes={root}/classes.txt",
                                     *args.overrides])
    # the training evaluates at its last step (and every schedule.eval_interval), so the
    # result is a `val` record of metrics.jsonl that `denseclip plot` draws
    metrics = train(cfg, work_dir, env=DistEnv(), progress=not args.no_progress)
    if not metrics:
        raise ValueError("the quickstart evaluated nothing: schedule.eval_interval must not "
                         "be 0")
    print(metrics["table"])
    print(f"quickstart finished in {time.perf_counter() - start:.0f} s: "
          f"validation mIoU {metrics['mIoU']:.2f} %")
    return 0
