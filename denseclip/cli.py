"""The ``denseclip`` command line (also ``python -m denseclip``).

Every subcommand is a :class:`Command` in :data:`COMMANDS`: a function that adds its
arguments to a subparser and a function that runs it and returns the exit status.
Subcommands that take a config also accept trailing ``section.key=value`` overrides,
anywhere after the config name.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .config import Config, ConfigError, load_config

EXIT_USAGE = 2  # bad arguments or config, like argparse's own errors


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The config (preset name or YAML file) and its dotted overrides."""
    parser.add_argument("config", help="preset name (see `denseclip presets`) or a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. data.crop_size=[256,256]")


def load_cli_config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


# --- flops -------------------------------------------------------------------------------

def _flops_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                        help="input size (default: the config's data.crop_size)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--device", default="meta",
                        help="device to count on (default: meta, shapes only, no arithmetic)")


def run_flops(args: argparse.Namespace) -> int:
    from .flops import complexity, format_report
    from .models import build_model

    cfg = load_cli_config(args)
    cfg.model.pretrained = None  # weights do not change the counts
    size = list(args.size) if args.size else list(cfg.data.crop_size)
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(f"input size must be two positive integers (H W), got {size}")
    model = build_model(cfg).to(args.device)
    result = {"config": cfg.name, **complexity(model, size)}
    if args.json:
        print(json.dumps(result))
    else:
        print(format_report(result, title=cfg.name))
    return 0


# --- presets -----------------------------------------------------------------------------

def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run_presets(args: argparse.Namespace) -> int:
    from .config import available_presets

    print("\n".join(available_presets()))
    return 0


COMMANDS: list[Command] = [
    Command("flops", "count parameters and multiply-adds (GMACs) of a config's model",
            _flops_arguments, run_flops),
    Command("presets", "list the bundled config presets", _no_arguments, run_presets),
]


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
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    sub = args._parser
    if extra:
        # argparse stops filling a "*" positional at the first option, so overrides given
        # after options arrive here.
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = list(args.overrides) + extra
        else:
            sub.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args._run(args)
    except ConfigError as e:
        print(f"{sub.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
