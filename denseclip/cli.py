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
from pathlib import Path

from . import demo, export, predict
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
                        help="input size (default: the config's data.crop_size; for detection, "
                             "where it is the raw tensor, not resized: 1280 800, or the padded "
                             "model.detection max_size x min_size when the backbone's stored "
                             "position grid is smaller)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--device", default="meta",
                        help="device to count on (default: meta, shapes only, no arithmetic)")
    parser.add_argument("--transposed-conv", choices=("input", "output"), default=None,
                        help="count a transposed convolution per input position (correct) or "
                             "per output position (fvcore < 2021, as the official detection "
                             "figures did); default: input for segmentation, output for "
                             "detection")


def run_flops(args: argparse.Namespace) -> int:
    from .flops import DETECTION_INPUT_SIZE, complexity, format_report
    from .models import build_model

    cfg = load_cli_config(args)
    cfg.model.pretrained = None  # weights do not change the counts
    detection = cfg.model.task != "segmentation"
    divisor = cfg.model.detection.size_divisor
    if args.size:
        size = list(args.size)
    elif not detection:
        size = list(cfg.data.crop_size)
    else:
        # mmdet's FLOPs default, unless the backbone crops a stored position grid too small
        # for it (the tiny presets): then the largest padded test input
        backbone = cfg.model.backbone
        size = list(DETECTION_INPUT_SIZE)
        if backbone.pos_embed == "crop" and max(size) > backbone.input_resolution:
            det = cfg.model.detection
            size = [-(-det.max_size // divisor) * divisor, -(-det.min_size // divisor) * divisor]
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(f"input size must be two positive integers (H W), got {size}")
    if detection and (size[0] % divisor or size[1] % divisor):
        raise ConfigError(f"detectors are counted on the raw input tensor: the size must be "
                          f"a multiple of model.detection.size_divisor ({divisor}), got {size}")
    model = build_model(cfg).to(args.device)
    result = {"config": cfg.name, **complexity(model, size,
                                               transposed_conv=args.transposed_conv)}
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

# --- train / test / quickstart --------------------------------------------------------------

def _train_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--work-dir", help="checkpoints and logs (default: work_dirs/<config>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in the work dir")
    parser.add_argument("--load-from", metavar="CKPT",
                        help="initialise weights only (e.g. OpenAI RN50.pt or a release)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_train(args: argparse.Namespace) -> int:
    from .engine.dist import cleanup, init_distributed
    from .engine.trainer import train

    cfg = load_cli_config(args)
    env = init_distributed(args.device)
    work_dir = args.work_dir or f"work_dirs/{cfg.name}"
    try:
        metrics = train(cfg, work_dir, resume=args.resume, load_from=args.load_from, env=env,
                        progress=not args.no_progress)
    finally:
        cleanup()
    if metrics and env.is_main:
        print(metrics["table"])
    return 0


def _test_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="preset name or a YAML file")
    parser.add_argument("checkpoint", help="our checkpoint, a state dict or an official release")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--aug-test", action="store_true",
                        help="multi-scale + flip test-time augmentation")
    parser.add_argument("--out-dir", help="write predicted label PNGs and metrics.json here")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_test(args: argparse.Namespace) -> int:
    from .engine.dist import cleanup, init_distributed
    from .engine.trainer import test

    cfg = load_cli_config(args)
    env = init_distributed(args.device)
    try:
        metrics = test(cfg, args.checkpoint, aug_test=args.aug_test, out_dir=args.out_dir,
                       env=env, progress=not args.no_progress)
    finally:
        cleanup()
    if env.is_main:
        print(metrics["table"])
        print(json.dumps({k: round(v, 4) for k, v in metrics["summary"].items()}))
    return 0


def _quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides of the quickstart preset")
    parser.add_argument("--work-dir", default="work_dirs/quickstart")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-val", type=int, default=50)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_quickstart(args: argparse.Namespace) -> int:
    import time

    from .data import make_synthetic_dataset
    from .engine.dist import DistEnv
    from .engine.trainer import test, train

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


COMMANDS: list[Command] = [
    Command("train", "train a model (single process, or many under torchrun)",
            _train_arguments, run_train),
    Command("test", "evaluate a checkpoint on the validation split", _test_arguments, run_test),
    Command("quickstart", "generate synthetic data, train a tiny DenseCLIP on CPU, evaluate",
            _quickstart_arguments, run_quickstart),
    Command("predict", "segment or detect images: overlays, label maps, heatmaps, JSON",
            predict.add_arguments, predict.run),
    Command("export", "export a segmentation model to ONNX with its text features baked in",
            export.add_arguments, export.run),
    Command("demo", "serve a local web page to try a model on your own images",
            demo.add_arguments, demo.run),
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
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        # Bad data, checkpoints or a diverging run: the message names the file/problem.
        print(f"{sub.prog}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
