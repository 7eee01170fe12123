"""Writing predictions to disk: overlays, label maps, heatmaps (segmentation) and an
overlay plus JSON (detection), named after each input image."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from .render import render_detections, render_heatmap, render_overlay, to_pil
from .results import DetectionPrediction, SegmentationPrediction

__all__ = ["detection_record", "frame_overlays", "write_detection", "write_frame_data",
           "write_segmentation"]


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "class"


def _label_png(labels: np.ndarray, path: Path) -> None:
    if labels.size and labels.max() > 255:
        Image.fromarray(labels.astype(np.uint16)).save(path)
    else:
        Image.fromarray(labels.astype(np.uint8), "L").save(path)


def write_segmentation(result: SegmentationPrediction, image, out: Path,
                       stem: str, heatmaps: bool = False) -> list[Path]:
    """Write ``<stem>_overlay.png`` and ``<stem>_labels.png`` (trained classes, decode
    head), with open classes also ``<stem>_open_overlay.png``/``<stem>_open_labels.png``
    (score map), and with ``heatmaps`` one ``<stem>_heatmap_<class>.png`` per open class
    (cosine scores, one colour scale for all classes of the image) or, without open
    classes, per trained class present in the labels (probabilities 0..1); each heatmap
    names its class and shows its colour bar with the scale's ends. ``image``: a path, a PIL
    image or a uint8 array."""
    image = np.asarray(to_pil(image))
    out = Path(out)
    written = []

    def save(img: Image.Image, suffix: str) -> None:
        path = out / f"{stem}_{suffix}.png"
        img.save(path)
        written.append(path)

    save(render_overlay(image, result.labels, result.class_names), "overlay")
    _label_png(result.labels, out / f"{stem}_labels.png")
    written.append(out / f"{stem}_labels.png")
    if result.open_labels is not None:
        save(render_overlay(image, result.open_labels, result.open_class_names), "open_overlay")
        _label_png(result.open_labels, out / f"{stem}_open_labels.png")
        written.append(out / f"{stem}_open_labels.png")
    if heatmaps:
        used: set[str] = set()
        if result.open_scores is not None:
            lo, hi = float(result.open_scores.min()), float(result.open_scores.max())
            maps = [(n, result.open_scores[i], lo, hi, "cosine score")
                    for i, n in enumerate(result.open_class_names)]
        else:
            if result.probs is None:
                raise ValueError("trained-class heatmaps need the probabilities")
            present = np.unique(result.labels)
            maps = [(result.class_names[c], result.probs[c], 0.0, 1.0, "probability")
                    for c in present]
        for name, values, lo, hi, unit in maps:
            safe = safe_name(name)
            while safe in used:
                safe += "_"
            used.add(safe)
            save(render_heatmap(image, values, name, lo, hi, unit), f"heatmap_{safe}")
    return written


def write_detection(result: DetectionPrediction, image, out: Path, stem: str,
                    score_thr: float) -> list[Path]:
    """Write ``<stem>_overlay.png`` (boxes, masks, names and scores ≥ ``score_thr``) and
    ``<stem>.json`` (the same detections); ``image``: a path, a PIL image or a uint8 array."""
    image = np.asarray(to_pil(image))
    out = Path(out)
    overlay = out / f"{stem}_overlay.png"
    render_detections(image, result.boxes, result.labels, result.scores, result.class_names,
                      result.masks, score_thr).save(overlay)
    record = detection_record(result, score_thr, image.shape[:2])
    path = out / f"{stem}.json"
    path.write_text(json.dumps(record, indent=2))
    return [overlay, path]


def detection_record(result: DetectionPrediction, score_thr: float,
                     image_size: tuple[int, int]) -> dict:
    """The JSON record of ``result``: ``image_size`` [H, W], ``score_thr`` and the
    detections scoring at least ``score_thr``, best first."""
    keep = np.flatnonzero(result.scores >= score_thr)
    keep = keep[np.argsort(-result.scores[keep], kind="stable")]
    detections = []
    for i in keep:
        c = int(result.labels[i])
        detections.append({
            "label": c,
            "class": result.class_names[c] if 0 <= c < len(result.class_names) else str(c),
            "score": round(float(result.scores[i]), 5),
            "box": [round(float(v), 2) for v in result.boxes[i]],
            **({"mask_area": int(result.masks[i].sum())} if result.masks is not None else {}),
        })
    H, W = image_size
    return {"image_size": [int(H), int(W)], "score_thr": score_thr, "detections": detections}


def frame_overlays(result: SegmentationPrediction | DetectionPrediction, image: np.ndarray,
                   score_thr: float = 0.3) -> dict[str, np.ndarray]:
    """Pictures of one video frame's ``result`` at the frame's size (``H × W × 3`` uint8
    RGB, no legend panel): ``overlay`` (trained classes, or the detections scoring at least
    ``score_thr``) and, with open classes, ``open_overlay``."""
    if isinstance(result, DetectionPrediction):
        picture = render_detections(image, result.boxes, result.labels, result.scores,
                                    result.class_names, result.masks, score_thr)
        return {"overlay": np.asarray(picture)}
    pictures = {"overlay": np.asarray(render_overlay(image, result.labels, result.class_names,
                                                     legend=False))}
    if result.open_labels is not None:
        pictures["open_overlay"] = np.asarray(render_overlay(
            image, result.open_labels, result.open_class_names, legend=False))
    return pictures


def write_frame_data(result: SegmentationPrediction | DetectionPrediction, out: Path,
                     name: str, image_size: tuple[int, int],
                     score_thr: float = 0.3) -> list[Path]:
    """Write the data of one video frame (``image_size`` [H, W]) in ``out``:
    ``<name>_labels.png`` (and, with open classes, ``<name>_open_labels.png``) for
    segmentation, ``<name>.json`` (as :func:`write_detection`'s) for detection; their
    paths."""
    out = Path(out)
    if isinstance(result, DetectionPrediction):
        path = out / f"{name}.json"
        path.write_text(json.dumps(detection_record(result, score_thr, image_size), indent=2))
        return [path]
    written = [out / f"{name}_labels.png"]
    _label_png(result.labels, written[0])
    if result.open_labels is not None:
        written.append(out / f"{name}_open_labels.png")
        _label_png(result.open_labels, written[1])
    return written
