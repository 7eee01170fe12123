"""``denseclip finetune DATA [PRESET] --work-dir DIR``: train on a data folder with the
official recipe fitted to it (:mod:`denseclip.tools.finetune`), printing the recipe first."""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError
from ..dist import cleanup, init_distributed
from ..engine.guard import TrainingStopped
from ..engine.trainer import train
from ..tools.finetune import build_recipe, inspect_data, resolve_load_from
from .common import is_override


def split_positionals(items: list[str]) -> tuple[str | None, list[str]]:
    """``(PRESET or None, overrides)`` of the positionals after ``DATA``."""
    overrides = [i for i in items if is_override(i)]
    rest = [i for i in items if not is_override(i)]
    if len(rest) > 1:
        raise ConfigError(f"unexpected argument {rest[1]!r} after the preset {rest[0]!r} "
                          f"(overrides look like section.key=value)")
    return (rest[0] if rest else None), overrides


def run(args: argparse.Namespace) -> int:
    preset, overrides = split_positionals(list(args.overrides))
    info = inspect_data(args.data)
    env = init_distributed(args.device)
    try:
        recipe = build_recipe(info, preset, overrides, env.world_size, args.epochs)
        # every process resolves; a named download runs once (a lock) and is then cached
        load_from, weights = resolve_load_from(args.load_from, recipe.cfg)
        if env.is_main:
            print("\n".join(recipe.lines(weights)), flush=True)
        metrics = train(recipe.cfg, args.work_dir, load_from=load_from, env=env,
                        progress=not args.no_progress)
    except TrainingStopped as e:
        if env.is_main:
            print(f"denseclip finetune: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        cleanup()
    if env.is_main:
        if metrics:
            print(metrics["table"])
        print(finished_message(args.work_dir, recipe.cfg.schedule.save_model,
                               bool(recipe.cfg.schedule.eval_interval)))
    return 0


def finished_message(work_dir: str, saved: bool, evaluated: bool) -> str:
    """Where the trained weights are and how to use them."""
    lines = []
    if evaluated:
        lines.append(f"best weights: {work_dir}/best.pth")
    if saved:
        lines += [f"trained model: {work_dir}/model (use it: denseclip predict "
                  f"{work_dir}/model IMAGE --out out/)"]
    return "\n".join(lines)
