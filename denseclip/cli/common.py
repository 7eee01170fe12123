"""Arguments and set-up shared by several commands."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from ..config import Config, load_config
from ..inference import Predictor, read_open_classes
from ..runtime import PRECISIONS
from ..weights import resolve


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The config (preset name or YAML file) and its dotted overrides."""
    parser.add_argument("config", help="preset name (see `denseclip presets`) or a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. data.crop_size=[256,256]")


def load_cli_config(args: argparse.Namespace) -> Config:
    return load_config(args.config, [*args.overrides, *max_pixels_overrides(args)])


def _positive_int(text: str) -> int:
    value = int(text.replace("_", ""))
    if value < 1:
        raise ValueError(text)
    return value


_positive_int.__name__ = "positive whole number"  # what argparse's error message says


def add_max_pixels_argument(parser: argparse.ArgumentParser) -> None:
    """``--max-image-pixels N``: the ``data.max_image_pixels`` override."""
    parser.add_argument("--max-image-pixels", type=_positive_int, metavar="N",
                        help="refuse images (and label maps) with more pixels, width x height, "
                             "before decoding them (default: data.max_image_pixels, else "
                             "$DENSECLIP_MAX_IMAGE_PIXELS, else 89478485)")


def max_pixels_overrides(args: argparse.Namespace) -> list[str]:
    """The config override of ``--max-image-pixels``, if given."""
    value = getattr(args, "max_image_pixels", None)
    return [] if value is None else [f"data.max_image_pixels={value}"]


def add_class_arguments(parser: argparse.ArgumentParser, help_names: str) -> None:
    """``--classes`` / ``--classes-file`` (mutually exclusive)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--classes", metavar="NAMES", help=help_names)
    group.add_argument("--classes-file", metavar="FILE",
                       help="open-vocabulary classes, one 'name' or 'name: text to embed' "
                            "per line")


def add_precision_argument(parser: argparse.ArgumentParser, default: str | None = None,
                           note: str = "") -> None:
    """``--precision fp32|bf16|fp16|auto``."""
    what = f"default {default}" if default else "default: the config's precision, auto"
    parser.add_argument("--precision", default=default, choices=PRECISIONS,
                        help=f"inference precision; auto = the fastest one this hardware runs "
                             f"natively ({what}){note}")


def predictor_from_args(args: argparse.Namespace, cfg: Config, command: str,
                        **kwargs: Any) -> Predictor:
    """A :class:`Predictor` for a command's ``checkpoint`` (see :func:`~denseclip.weights.resolve`;
    ``none``/``random``: random weights, with a warning) and, where the command has them,
    ``--classes`` / ``--classes-file``."""
    classes = getattr(args, "classes", None)  # comma-separated, checked by the predictor
    if getattr(args, "classes_file", None) is not None:
        classes = read_open_classes(args.classes_file)
    checkpoint = resolve(args.checkpoint, cfg.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        predictor = Predictor(cfg, checkpoint, precision=getattr(args, "precision", None),
                              **kwargs)
    if checkpoint is None:
        print(f"denseclip {command}: warning: no checkpoint, {cfg.name} has random weights; "
              f"its outputs are meaningless", file=sys.stderr)
    predictor.set_classes(classes)
    return predictor
