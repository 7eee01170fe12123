"""Set-up shared by several commands (their arguments are in :mod:`.arguments`)."""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, load_config
from ..inference import Predictor, read_open_classes
from ..inference.int8 import DEFAULT_CALIBRATION_IMAGES, Calibration
from ..weights import resolve
from ..weights.checkpoint import CheckpointError, ClassMismatchError
from ..weights.resolver import describe

_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")


def is_override(item: str) -> bool:
    """Whether a positional argument is a ``section.key=value`` override (an existing path
    of that shape stays a path)."""
    return bool(_OVERRIDE.match(item)) and not Path(item).exists()


def model_config(args: argparse.Namespace, items: Sequence[str], command: str,
                 extra_overrides: Sequence[str] = ()) -> tuple[Config, list[str]]:
    """The config of a command's ``MODEL`` argument (``args.config``) and the positional
    ``items`` after it that are not overrides; sets ``args.checkpoint``.

    A ``MODEL`` that describes itself (:func:`~denseclip.weights.resolver.describe`: a
    work dir, one of our checkpoints, a saved model directory) brings its weights, config
    and trained classes; a preset name or YAML file takes the first non-override item as
    its checkpoint (``predict PRESET CKPT photo.jpg``). The overrides in
    ``items`` and ``extra_overrides`` apply to the config either way."""
    overrides = [i for i in items if is_override(i)] + list(extra_overrides)
    rest = [i for i in items if not is_override(i)]
    described = describe(args.config, overrides)
    if described is not None:
        args.checkpoint = str(described.checkpoint)
        return described.config, rest
    if not rest:
        raise ConfigError(f"{args.config} needs weights after it: denseclip {command} "
                          f"{args.config} CHECKPOINT …, or give a work dir or one of its "
                          f"checkpoints alone: denseclip {command} work_dirs/NAME …")
    args.checkpoint = rest[0]
    return load_config(args.config, overrides), rest[1:]


def model_config_only(args: argparse.Namespace, command: str,
                      extra_overrides: Sequence[str] = ()) -> Config:
    """:func:`model_config` for commands whose positionals after ``MODEL`` are only the
    checkpoint and overrides (``test``, ``demo``, ``export``)."""
    cfg, rest = model_config(args, args.overrides, command, extra_overrides)
    if rest:
        raise ConfigError(f"unexpected argument {rest[0]!r} (the weights are "
                          f"{args.checkpoint}; overrides look like section.key=value)")
    return cfg


def checkpoint_message(error: CheckpointError, command: str) -> str:
    """A checkpoint problem in words, its example written for ``denseclip COMMAND``."""
    return error.for_command(command) if isinstance(error, ClassMismatchError) else str(error)


def warn_untrained(message: str | None, command: str) -> None:
    """The one stderr line about untrained parts (:mod:`denseclip.weights.provenance`)."""
    if message:
        print(f"denseclip {command}: warning: {message}", file=sys.stderr)


def load_cli_config(args: argparse.Namespace) -> Config:
    """The config of a command's arguments: its config (or, for commands that take a
    ``MODEL``, :func:`model_config_only`), overrides and ``--max-image-pixels``."""
    if getattr(args, "_positionals_anywhere", False):
        return model_config_only(args, getattr(args, "command", None) or "test",
                                 max_pixels_overrides(args))
    return load_config(args.config, [*args.overrides, *max_pixels_overrides(args)])


def max_pixels_overrides(args: argparse.Namespace) -> list[str]:
    """The config override of ``--max-image-pixels``, if given."""
    value = getattr(args, "max_image_pixels", None)
    return [] if value is None else [f"data.max_image_pixels={value}"]


def calibration_from_args(args: argparse.Namespace) -> Calibration:
    """The int8 calibration of ``--calibration`` / ``--calibration-images``."""
    return Calibration(getattr(args, "calibration", None),
                       getattr(args, "calibration_images", DEFAULT_CALIBRATION_IMAGES))


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
        warnings.simplefilter("ignore", UserWarning)  # said below, as one line each
        try:
            predictor = Predictor(cfg, checkpoint, precision=getattr(args, "precision", None),
                                  calibration=calibration_from_args(args), **kwargs)
        except ClassMismatchError as e:
            raise CheckpointError(e.for_command(command)) from None
        predictor.set_classes(classes)
    if checkpoint is None:
        print(f"denseclip {command}: warning: no checkpoint, {cfg.name} has random weights; "
              f"its outputs are meaningless", file=sys.stderr)
    # the demo takes class names on its page: its warning covers them from the start
    typed = classes is not None or (command == "demo"
                                    and predictor.task_object.supports_open_vocabulary)
    warn_untrained(predictor.untrained_message(typed), command)
    return predictor
