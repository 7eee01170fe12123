"""``denseclip predict``: segment or detect images, write overlays, label maps, heatmaps
and JSON (see :mod:`denseclip.inference`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from ..inference import PredictionError, collect_inputs
from ..weights.checkpoint import CheckpointError
from .common import is_override, max_pixels_overrides, model_config, predictor_from_args


def _error(message: str) -> int:
    print(f"denseclip predict: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """``denseclip predict MODEL [CHECKPOINT] INPUT...``: exit status 0 when every image was
    written, 1 when some failed (each listed with its reason on stderr), 2 for a bad
    config, checkpoint or class list (nothing is predicted)."""
    if args.batch_size < 1:
        return _error(f"--batch-size must be positive, got {args.batch_size}")
    given = [*args.inputs, *getattr(args, "overrides", [])]  # the latter: after options
    items = [i for i in given if not is_override(i)]
    overrides = [*(i for i in given if is_override(i)), *max_pixels_overrides(args)]
    try:  # the checkpoint, then images (a work dir or our checkpoint: images only)
        cfg, specs = model_config(args, items, "predict", overrides)  # ConfigError → 2
    except (CheckpointError, FileNotFoundError) as e:
        return _error(str(e))
    if not specs:
        return _error("no input images given")
    try:
        predictor = predictor_from_args(args, cfg, "predict", device=args.device,
                                        batch_size=args.batch_size)
    except (PredictionError, CheckpointError, FileNotFoundError) as e:
        where = f"--classes-file {args.classes_file}: " if args.classes_file and isinstance(
            e, PredictionError) else ""
        return _error(f"{where}{e}")

    paths, failures, skipped = collect_inputs(specs)
    for spec, reason in failures:
        print(f"failed: {spec}: {reason}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = {"classes": predictor.class_names}
    if predictor.open_class_names:
        names["open_classes"] = predictor.open_class_names
        names["open_texts"] = predictor.open_texts
    (out / "classes.json").write_text(json.dumps(names, indent=2))
    if skipped:
        print(f"denseclip predict: skipped {skipped} non-image file(s) in folders",
              file=sys.stderr)

    task = predictor.task_object
    want_probs = task.needs_probs(args.heatmaps, bool(predictor.open_class_names))
    stems: set[str] = set()
    written = 0
    bar = tqdm(total=len(paths), unit="img", desc="predict", dynamic_ncols=True)

    def fail(path: Path, reason: str) -> None:
        failures.append((str(path), reason))
        bar.write(f"failed: {path}: {reason}", file=sys.stderr)

    def stem_for(path: Path) -> str:
        stem, n = path.stem, 1
        while stem in stems:
            n += 1
            stem = f"{path.stem}_{n}"
        stems.add(stem)
        return stem

    for start in range(0, len(paths), args.batch_size):
        batch = []
        for path in paths[start : start + args.batch_size]:
            try:
                batch.append((path, predictor.prepare(path)))
            except (ValueError, OSError) as e:  # unreadable, unsupported or too small
                fail(path, str(e))
                bar.update(1)
        try:
            results = predictor.predict_prepared([item for _, item in batch], want_probs)
        except (RuntimeError, ValueError) as e:
            if len(batch) == 1:
                fail(batch[0][0], f"prediction failed: {e}")
                bar.update(1)
                continue
            results = []
            for _path, item in batch:  # find the image that fails, keep the others
                try:
                    results.append(predictor.predict_prepared([item], want_probs)[0])
                except (RuntimeError, ValueError) as e2:
                    results.append(e2)
        for (path, item), result in zip(batch, results, strict=True):
            bar.update(1)
            if isinstance(result, Exception):
                fail(path, f"prediction failed: {result}")
                continue
            stem = stem_for(path)
            try:
                task.write_result(result, item.image, out, stem, heatmaps=args.heatmaps,
                                  score_thr=args.score_thr)
                written += 1
            except (OSError, ValueError) as e:
                fail(path, f"cannot write outputs: {e}")
    bar.close()
    print(f"{written} image(s) written to {out}" + (f", {len(failures)} failed" if failures
                                                    else ""))
    return 1 if failures else 0
