"""The ``denseclip`` command line (also ``python -m denseclip``).

:data:`COMMANDS` is the table of commands. Each names its help and the function that fills
its subparser, both in :mod:`.arguments` (which imports no PyTorch), and its ``run`` function
as ``"module:function"`` below this package (:mod:`.train` for train/test/quickstart,
:mod:`.finetune`, :mod:`.predict`, :mod:`.export`, :mod:`.embed_classes`, :mod:`.demo`,
:mod:`.flops` for flops/presets, :mod:`.bench`, :mod:`.plot`, :mod:`.download`).
:func:`load_run` is the one place that imports a command's module, and only for the command
that runs: ``denseclip --help``, ``denseclip CMD --help``,
``presets`` and ``download --list`` start without importing torch or the models (see
``benchmarks/startup.py``). ``run`` returns the exit status. Subcommands that take a config
also accept trailing ``section.key=value`` overrides, anywhere after the config name. Library
modules log through :mod:`logging`; :func:`main` sends the package's INFO messages to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..config import ConfigError
from . import arguments as a

EXIT_USAGE = 2  # bad arguments or config, like argparse's own errors


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: str  # "module:function" in this package, imported when the command runs (load_run)


COMMANDS: list[Command] = [
    Command("train", a.TRAIN_HELP, a.add_train_arguments, "train:run_train"),
    Command("finetune", a.FINETUNE_HELP, a.add_finetune_arguments, "finetune:run"),
    Command("test", a.TEST_HELP, a.add_test_arguments, "train:run_test"),
    Command("quickstart", a.QUICKSTART_HELP, a.add_quickstart_arguments, "train:run_quickstart"),
    Command("predict", a.PREDICT_HELP, a.add_predict_arguments, "predict:run"),
    Command("export", a.EXPORT_HELP, a.add_export_arguments, "export:run"),
    Command("embed-classes", a.EMBED_CLASSES_HELP, a.add_embed_classes_arguments,
            "embed_classes:run"),
    Command("demo", a.DEMO_HELP, a.add_demo_arguments, "demo:run"),
    Command("flops", a.FLOPS_HELP, a.add_flops_arguments, "flops:run"),
    Command("presets", a.PRESETS_HELP, a.add_presets_arguments, "presets:run"),
    Command("bench", a.BENCH_HELP, a.add_bench_arguments, "bench:run"),
    Command("plot", a.PLOT_HELP, a.add_plot_arguments, "plot:run"),
    Command("download", a.DOWNLOAD_HELP, a.add_download_arguments, "download:run"),
]


def load_run(command: Command) -> Callable[[argparse.Namespace], int]:
    """Import ``command``'s module and return its run function: the command line's only
    deferred import, so that parsing arguments and ``--help`` never load PyTorch."""
    module, _, function = command.run.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)


def configure_logging() -> None:
    """Send the package's log messages (INFO and above) to stdout, once per process."""
    log = logging.getLogger("denseclip")
    if not any(getattr(h, "_denseclip_cli", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._denseclip_cli = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="denseclip",
        description="DenseCLIP: language-guided dense prediction with CLIP.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_command=command, _parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad arguments/config)."""
    configure_logging()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    sub = args._parser
    if extra:
        # argparse stops filling a "*" positional at the first option, so overrides given
        # after options arrive here.
        # Commands with _positionals_anywhere sort out their positionals themselves.
        anywhere = getattr(args, "_positionals_anywhere", False)
        if hasattr(args, "overrides") and all(("=" in a or anywhere) and not a.startswith("-")
                                              for a in extra):
            args.overrides = list(args.overrides) + extra
        else:
            sub.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return load_run(args._command)(args)
    except ConfigError as e:
        print(f"{sub.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        # Bad data, checkpoints or a diverging run: the message names the file/problem.
        print(f"{sub.prog}: error: {e}", file=sys.stderr)
        return 1


