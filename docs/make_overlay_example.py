"""Redraw ``docs/overlay_example.png``: the quickstart model's overlay of a synthetic
validation scene, as ``denseclip predict`` writes it.

Run ``make demo`` (or ``denseclip quickstart``) first, then from the repository root::

    python docs/make_overlay_example.py [--work-dir work_dirs/quickstart] [--out PATH]

The scene (96 × 128, the quickstart's size) is enlarged 4× before prediction so the legend
is readable; the prediction itself runs at the config's test scale as usual.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

import denseclip
from denseclip.inference import Predictor, render_overlay

ENLARGE = 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("work_dirs/quickstart"))
    parser.add_argument("--image", default="synthetic_validation_00000.jpg",
                        help="a validation image of the work dir's data")
    parser.add_argument("--out", type=Path, default=Path("docs/overlay_example.png"))
    args = parser.parse_args(argv)
    checkpoints = sorted(args.work_dir.glob("iter_*.pth"),
                         key=lambda p: int(p.stem.split("_")[1]))
    if not checkpoints:
        print(f"no iter_*.pth in {args.work_dir}: run `make demo` first", file=sys.stderr)
        return 1
    cfg = denseclip.load_config(args.work_dir / "config.yaml")
    predictor = Predictor(cfg, checkpoints[-1])
    scene = Image.open(Path(cfg.data.root) / "images" / "validation" / args.image).convert("RGB")
    image = scene.resize((scene.width * ENLARGE, scene.height * ENLARGE), Image.BICUBIC)
    result = predictor.predict(image)
    render_overlay(image, result.labels, result.class_names).save(args.out)
    print(f"{args.out}: {checkpoints[-1]} on {args.image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
