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
from ..runtime import PRECISIONS
from ..weights import resolve
from ..weights.checkpoint import CheckpointError, ClassMismatchError
from ..weights.provenance import UntrainedPartsWarning
from .common import (
    add_config_arguments,
    add_max_pixels_argument,
    add_model_arguments,
    add_precision_argument,
    load_cli_config,
    max_pixels_overrides,
    model_config_only,
    warn_untrained,
)

TRAIN_HELP = "train a model (single process, or many under torchrun)"
TRAIN_EPILOG = ("SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 stop training after the current iteration "
                "with a checkpoint; the exit status is then 128 + the signal's number (143, "
                "130, 138) and --resume continues exactly where it stopped. A work dir takes "
                "one training at a time.")
TEST_HELP = "evaluate a checkpoint on the validation split"
QUICKSTART_HELP = "generate synthetic data, train a tiny DenseCLIP on CPU, evaluate"


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = TRAIN_EPILOG
    add_config_arguments(parser)
    parser.add_argument("--work-dir", help="checkpoints and logs (default: work_dirs/<config>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in the work dir; overrides "
                             "may change only the schedule's length and intervals, "
                             "evaluation, logging and data.num_workers")
    parser.add_argument("--load-from", metavar="CKPT",
                        help="initialise weights only: OpenAI CLIP (RN50.pt, or the name "
                             "RN50), an ImageNet torchvision/timm state dict, a release or "
                             "our checkpoint")
    parser.add_argument("--text-weights", metavar="CKPT",
                        help="load only CLIP's text tower from this OpenAI CLIP file (for "
                             "ImageNet backbones; its image tower is ignored)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


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


def add_test_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, "our checkpoint, a state dict, an official release, a "
                                "weights name (`denseclip download --list`) or 'pretrained'",
                        "test")
    parser.add_argument("--aug-test", action="store_true",
                        help="multi-scale + flip test-time augmentation")
    parser.add_argument("--out-dir", help="write predicted label PNGs and metrics.json here")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    add_precision_argument(parser, "fp32", note=", so that reproduced numbers are "
                                               "reproducible")
    parser.add_argument("--compare-precision", metavar="PRECISION", choices=PRECISIONS,
                        help="evaluate again in this precision and print how far it moves "
                             "each metric")
    add_max_pixels_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


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
                           env=env, progress=not args.no_progress, precision=args.precision)
        for warning in caught:  # one line; other warnings as Python shows them
            if issubclass(warning.category, UntrainedPartsWarning):
                warn_untrained(str(warning.message), "test")
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                       warning.lineno)
        other = None
        if args.compare_precision:
            other = test(cfg, checkpoint, aug_test=args.aug_test, env=env,
                         progress=not args.no_progress, precision=args.compare_precision)
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


def add_quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides of the quickstart preset")
    parser.add_argument("--work-dir", default="work_dirs/quickstart")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-val", type=int, default=50)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_quickstart(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    work_dir = Path(args.work_dir)
    root = make_synthetic_dataset(work_dir / "data", args.num_train, args.num_val, seed=0)
    print(f"synthetic ADE20K-layout data: {args.num_train} training and {args.num_val} "
          f"validation images in {root}")
    cfg = load_config("quickstart", [f"data.root={root}", f"model.classes={root}/classes.txt",
                                     "schedule.eval_interval=0", *args.overrides])
    env = DistEnv()
    train(cfg, work_dir, env=env, progress=not args.no_progress)
    last = work_dir / f"iter_{cfg.schedule.max_iters}.pth"
    metrics = test(cfg, last, env=env, progress=not args.no_progress)
    print(metrics["table"])
    print(f"quickstart finished in {time.perf_counter() - start:.0f} s: "
          f"validation mIoU {metrics['mIoU']:.2f} %")
    return 0
