"""The ``denseclip`` command line (also ``python -m denseclip``).

One module per command (:mod:`.train` for train/test/quickstart, :mod:`.predict`,
:mod:`.export`, :mod:`.demo`, :mod:`.flops` for flops/presets, :mod:`.bench`), each with an
``add_arguments``-style function that fills its subparser and a ``run`` function that returns
the exit status; :data:`COMMANDS` lists them. Subcommands that take a config also accept
trailing ``section.key=value`` overrides, anywhere after the config name. Library modules
log through :mod:`logging`; :func:`main` sends the package's INFO messages to stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..config import ConfigError
from . import bench, demo, download, export, flops, plot, predict, train

EXIT_USAGE = 2  # bad arguments or config, like argparse's own errors


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: list[Command] = [
    Command("train", train.TRAIN_HELP, train.add_train_arguments, train.run_train),
    Command("test", train.TEST_HELP, train.add_test_arguments, train.run_test),
    Command("quickstart", train.QUICKSTART_HELP, train.add_quickstart_arguments,
            train.run_quickstart),
    Command("predict", predict.HELP, predict.add_arguments, predict.run),
    Command("export", export.HELP, export.add_arguments, export.run),
    Command("demo", demo.HELP, demo.add_arguments, demo.run),
    Command("flops", flops.HELP, flops.add_arguments, flops.run),
    Command("presets", flops.PRESETS_HELP, flops.add_presets_arguments, flops.run_presets),
    Command("bench", bench.HELP, bench.add_arguments, bench.run),
    Command("plot", plot.HELP, plot.add_arguments, plot.run),
    Command("download", download.HELP, download.add_arguments, download.run),
]


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
        p.set_defaults(_run=command.run, _parser=p)
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
        return args._run(args)
    except ConfigError as e:
        print(f"{sub.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        # Bad data, checkpoints or a diverging run: the message names the file/problem.
        print(f"{sub.prog}: error: {e}", file=sys.stderr)
        return 1


