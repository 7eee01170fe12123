"""``denseclip predict``: segment or detect images and videos, write overlays, label maps,
heatmaps and JSON (see :mod:`denseclip.inference`; videos, cameras and streams:
:mod:`denseclip.inference.video`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from ..inference import PredictionError, collect_inputs
from ..inference.video import (
    VideoSource,
    is_video,
    open_source,
    open_video,
    predict_video,
    quiet_opencv,
)
from ..weights.checkpoint import CheckpointError
from .common import is_override, max_pixels_overrides, model_config, predictor_from_args


def _error(message: str) -> int:
    print(f"denseclip predict: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """``denseclip predict MODEL [CHECKPOINT] INPUT... [--source SOURCE]``: exit status 0
    when every image and video frame was written, 1 when some failed (each listed with its
    reason on stderr; an unreadable video frame is skipped), 2 for a bad config,
    checkpoint, class list or ``--source`` (nothing is predicted)."""
    if args.batch_size < 1:
        return _error(f"--batch-size must be positive, got {args.batch_size}")
    given = [*args.inputs, *getattr(args, "overrides", [])]  # the latter: after options
    items = [i for i in given if not is_override(i)]
    overrides = [*(i for i in given if is_override(i)), *max_pixels_overrides(args)]
    try:  # the checkpoint, then images (a work dir or our checkpoint: images only)
        cfg, specs = model_config(args, items, "predict", overrides)  # ConfigError → 2
    except (CheckpointError, FileNotFoundError) as e:
        return _error(str(e))
    if not specs and not args.source:
        return _error("no input images given")
    source = None
    if args.source is not None:
        quiet_opencv()
        try:
            source = open_source(args.source, cfg.data.max_image_pixels)
        except ValueError as e:  # VideoError, a frame size over the limit
            return _error(f"--source {e}")
    try:
        predictor = predictor_from_args(args, cfg, "predict", device=args.device,
                                        batch_size=args.batch_size)
    except (PredictionError, CheckpointError, FileNotFoundError) as e:
        if source is not None:
            source.close()
        where = f"--classes-file {args.classes_file}: " if args.classes_file and isinstance(
            e, PredictionError) else ""
        return _error(f"{where}{e}")

    found, failures, skipped = collect_inputs(specs)
    paths = [p for p in found if not is_video(p)]
    videos = [p for p in found if is_video(p)]
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
    bar = tqdm(total=len(paths), unit="img", desc="predict", dynamic_ncols=True,
               disable=not paths)

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
    if videos or source is not None:
        quiet_opencv()
    video_stems: set[str] = set()  # clip.mp4 and other/clip.mp4: clip, clip_2
    for video in videos:
        try:
            opened = open_video(video, cfg.data.max_image_pixels)
        except ValueError as e:
            failures.append((str(video), str(e)))
            print(f"failed: {e}", file=sys.stderr)
            continue
        _video(predictor, opened, out, args, failures, video_stems)
    if source is not None:
        _video(predictor, source, out, args, failures, video_stems)
    if paths or not (videos or source):
        print(f"{written} image(s) written to {out}" + (f", {len(failures)} failed"
                                                        if failures else ""))
    return 1 if failures else 0


def _video(predictor, source: VideoSource, out: Path, args: argparse.Namespace,
           failures: list[tuple[str, str]], stems: set[str]) -> None:
    """Predict one video or live source with a frames/s progress bar; an unreadable frame
    is one ``failed:`` line with its index, then skipped."""
    total = source.frame_count
    if args.max_frames is not None:
        total = args.max_frames if total is None else min(total, args.max_frames)
    stem, n = source.stem, 1
    while stem in stems:
        n += 1
        stem = f"{source.stem}_{n}"
    stems.add(stem)
    bar = tqdm(total=total, unit="frame", desc=stem, dynamic_ncols=True)

    def skip(index: int, reason: str) -> None:
        failures.append((f"{source.name} frame {index}", reason))
        bar.write(f"failed: {source.name}: frame {index}: {reason}", file=sys.stderr)
        bar.update(1)

    try:
        with source:
            summary = predict_video(predictor, source, out, stem, batch_size=args.batch_size,
                                    save_frames=args.save_frames, max_frames=args.max_frames,
                                    score_thr=args.score_thr,
                                    on_frame=lambda _: bar.update(1), on_skip=skip)
    except (ValueError, OSError, RuntimeError) as e:  # e.g. frames too elongated
        bar.close()
        failures.append((source.name, str(e)))
        print(f"failed: {source.name}: {e}", file=sys.stderr)
        return
    bar.close()
    videos = ", ".join(str(p) for p in summary.written if p.suffix == ".mp4")
    print(f"{source.name}: {summary.frames} frame(s) written to {videos or out}"
          + (f", {len(summary.skipped)} skipped" if summary.skipped else ""))
