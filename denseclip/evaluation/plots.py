"""Figures of results: a segmentation confusion matrix, per-class IoU, and the curves of a
training run's ``metrics.jsonl`` (loss, learning rate, validation metrics).

matplotlib is an optional dependency (the ``plot`` extra) imported on first use; without it
every drawing function raises ``ImportError`` saying ``pip install 'denseclip[plot]'``.
Figures are drawn through matplotlib's object-oriented API onto an Agg canvas, never through
``pyplot``: no display is needed and the process-wide backend is left as it is.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..optional import require

__all__ = [
    "PLOT_EXTRA_HINT",
    "metric_series",
    "most_confused_classes",
    "plot_confusion_matrix",
    "plot_per_class_iou",
    "plot_training_curves",
    "read_metrics_log",
    "write_segmentation_figures",
]

PLOT_EXTRA_HINT = "pip install 'denseclip[plot]'"
DPI = 100
LOG_FLOOR = 1e-3  # the confusion heatmap's lowest colour: 0.1 % of a class's pixels
SMOOTH_FROM = 40  # training curves with this many points get a moving average


def _figure(width: float, height: float, **kwargs: Any):
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches on an Agg canvas."""
    canvas = require("matplotlib.backends.backend_agg", "drawing figures").FigureCanvasAgg
    figure = require("matplotlib.figure", "drawing figures").Figure
    fig = figure(figsize=(width, height), dpi=DPI, layout="constrained", **kwargs)
    canvas(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ------------------------------------------------------------------ segmentation
def most_confused_classes(confusion: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` class indices, sorted, taken from the largest off-diagonal entries of
    the row-normalised ``confusion`` (both the ground-truth class and the class it is
    mistaken for), then, if room is left, the classes with the lowest recall."""
    cm = np.asarray(confusion, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.nan_to_num(cm / cm.sum(axis=1, keepdims=True))
    off = norm.copy()
    np.fill_diagonal(off, 0.0)
    chosen: list[int] = []
    for flat in np.argsort(-off, axis=None, kind="stable"):
        if len(chosen) >= count or off.flat[flat] <= 0:
            break
        for c in np.unravel_index(flat, off.shape):
            if int(c) not in chosen and len(chosen) < count:
                chosen.append(int(c))
    has_pixels = cm.sum(axis=1) > 0
    for c in np.argsort(np.where(has_pixels, norm.diagonal(), np.inf), kind="stable"):
        if len(chosen) >= count:
            break
        if int(c) not in chosen:
            chosen.append(int(c))
    return sorted(chosen)


def plot_confusion_matrix(confusion: np.ndarray, class_names: Sequence[str],
                          path: str | Path, max_classes: int = 30) -> Path:
    """Draw ``confusion`` (``K x K`` counts, rows: ground truth, columns: prediction) as a
    row-normalised heatmap in ``path`` (PNG): each cell is the fraction of a class's
    ground-truth pixels predicted as the column's class.

    The colour scale is logarithmic from 0.1 % (and below) to 100 %, so that the small
    confusions that decide a class's IoU stay visible next to the large diagonal. With more
    than ``max_classes`` classes (ADE20K's 150), names on a full matrix would be unreadable:
    the figure then shows the ``max_classes`` classes of :func:`most_confused_classes` (the
    largest confusions, both sides of each) on both axes, in class order so that the
    diagonal stays the diagonal, plus an "other classes" column holding each row's share
    predicted as any class not shown; rows still sum to 100 %. Small matrices (up to 15
    classes) print each cell's percentage too. Rows of classes without ground-truth pixels
    are grey."""
    cm = np.asarray(confusion, dtype=np.float64)
    k = cm.shape[0]
    if cm.ndim != 2 or cm.shape[1] != k:
        raise ValueError(f"the confusion matrix must be square, got shape {cm.shape}")
    if len(class_names) != k:
        raise ValueError(f"got {len(class_names)} class names for {k} classes")
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = cm / cm.sum(axis=1, keepdims=True)  # NaN rows: no ground truth
    subset = k > max_classes
    idx = most_confused_classes(cm, max_classes) if subset else list(range(k))
    shown = norm[np.ix_(idx, idx)]
    columns = [str(class_names[i]) for i in idx]
    if subset:
        other = np.clip(1.0 - shown.sum(axis=1, keepdims=True), 0.0, 1.0)
        shown = np.concatenate([shown, other], axis=1)
        columns.append("(other classes)")
    rows = [str(class_names[i]) for i in idx]

    n = len(rows)
    longest = max(len(name) for name in columns)
    side = 0.3 * n + 0.07 * longest + 2.0
    fig = _figure(side + 1.2, side)  # first: says what to install without matplotlib
    colormaps = require("matplotlib", "drawing figures").colormaps
    LogNorm = require("matplotlib.colors", "drawing figures").LogNorm  # noqa: N806

    ax = fig.add_subplot()
    cmap = colormaps["Blues"].with_extremes(bad="#c8c8c8")
    scale = LogNorm(vmin=LOG_FLOOR, vmax=1.0)
    data = np.ma.masked_invalid(np.clip(shown, LOG_FLOOR, 1.0))
    image = ax.imshow(data, cmap=cmap, norm=scale, aspect="equal", interpolation="nearest")
    ax.set_xticks(range(len(columns)), columns, rotation=90)
    ax.set_yticks(range(n), rows)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth class")
    ax.tick_params(labelsize=8 if n > 15 else 10)
    if subset:
        ax.axvline(n - 0.5, color="black", linewidth=1.0)
        ax.set_title(f"Confusion matrix: the {n} most confused of {k} classes\n"
                     f"(rows normalised; last column: any class not shown)", fontsize=11)
    else:
        ax.set_title("Confusion matrix (rows normalised to 100 %)", fontsize=11)
    if n <= 15:
        for (r, c), value in np.ndenumerate(shown):
            if np.isfinite(value) and value >= 0.0005:
                colour = "white" if scale(max(value, LOG_FLOOR)) > 0.65 else "black"
                ax.text(c, r, f"{value * 100:.1f}", ha="center", va="center", fontsize=8,
                        color=colour)
    bar = fig.colorbar(image, ax=ax, shrink=min(1.0, 6.0 / max(side, 1.0)) if n > 15 else 0.8)
    bar.set_ticks([1e-3, 1e-2, 1e-1, 1.0], labels=["≤0.1 %", "1 %", "10 %", "100 %"])
    bar.set_label("share of the ground-truth class's pixels")
    return _save(fig, path)


def plot_per_class_iou(iou: Sequence[float], class_names: Sequence[str], path: str | Path,
                       worst: int = 30) -> Path:
    """Horizontal bars of the per-class IoU (percent) in ``path`` (PNG), sorted with the
    worst class on top, each labelled with its name and value, and the mIoU as a dashed
    line. With more than ``worst`` classes only the ``worst`` lowest get a bar (those are
    the ones to read by name) and a histogram beside them shows how all classes are
    distributed. Classes whose IoU is NaN (no pixel in the ground truth or the predictions)
    are left out and counted in the title."""
    values = np.asarray(iou, dtype=np.float64)
    if len(class_names) != len(values):
        raise ValueError(f"got {len(class_names)} class names for {len(values)} IoU values")
    valid = np.flatnonzero(~np.isnan(values))
    if valid.size == 0:
        raise ValueError("no class has an IoU (no ground-truth or predicted pixel at all)")
    order = valid[np.argsort(values[valid], kind="stable")]
    bars = order[:worst]
    mean = float(values[valid].mean())
    split = len(order) > worst
    height = 0.26 * len(bars) + 1.6
    fig = _figure(11.0 if split else 7.0, max(height, 3.5 if split else 2.5))
    axes = fig.subplots(1, 2, width_ratios=[3, 2]) if split else [fig.add_subplot()]
    ax = axes[0]
    positions = np.arange(len(bars))
    colours = np.where(values[bars] < mean, "#d9534f", "#4a7ebb")
    ax.barh(positions, values[bars], color=colours, height=0.75)
    ax.set_yticks(positions, [str(class_names[i]) for i in bars], fontsize=9)
    ax.invert_yaxis()  # worst on top
    ax.set_xlim(0, 112)
    ax.set_xlabel("IoU (%)")
    for y, value in zip(positions, values[bars], strict=True):
        ax.text(value + 1, y, f"{value:.1f}", va="center", fontsize=8)
    ax.axvline(mean, color="black", linestyle="--", linewidth=1)
    left_out = len(values) - len(valid)
    note = f"; {left_out} without pixels left out" if left_out else ""
    ax.set_title((f"IoU of the {len(bars)} lowest of {len(order)} classes" if split
                  else f"Per-class IoU, {len(order)} classes")
                 + f"\n(dashed: mIoU {mean:.1f}; red: below it{note})", fontsize=11)
    if split:
        hist = axes[1]
        hist.hist(values[valid], bins=np.arange(0, 105, 5), color="#4a7ebb", edgecolor="white")
        hist.axvline(mean, color="black", linestyle="--", linewidth=1)
        hist.set_xlim(0, 100)
        hist.set_xlabel("IoU (%)")
        hist.set_ylabel("classes")
        hist.set_title(f"Distribution of all {len(order)} classes\n(dashed: mIoU)",
                       fontsize=11)
    return _save(fig, path)


def write_segmentation_figures(out_dir: str | Path, confusion: np.ndarray,
                               class_names: Sequence[str], iou: Sequence[float]
                               ) -> list[Path]:
    """``confusion_matrix.png`` (:func:`plot_confusion_matrix`) and ``per_class_iou.png``
    (:func:`plot_per_class_iou`, ``iou`` in percent) in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    # first: it refuses data without any IoU before a file is written
    bars = plot_per_class_iou(iou, class_names, out / "per_class_iou.png")
    return [plot_confusion_matrix(confusion, class_names, out / "confusion_matrix.png"), bars]


# ------------------------------------------------------------------ training logs
def read_metrics_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a training run's ``metrics.jsonl``: one JSON object per line with
    ``mode`` (``"train"``, ``"val"``, ...), ``iter`` and the logged values. Raises
    ``FileNotFoundError`` naming a missing file and ``ValueError`` naming the file and line of
    an empty or corrupt line, or a file without records."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (training writes metrics.jsonl into "
                                f"its work dir)")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            where = f"{path}, line {number}"
            if not line.strip():
                raise ValueError(f"{where}: empty line (each line must be one JSON record)")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                                 f"a run killed while writing leaves a cut last line") from e
            if not isinstance(record, dict) or not isinstance(record.get("mode"), str) \
                    or not isinstance(record.get("iter"), int):
                raise ValueError(f"{where}: a record is an object with a 'mode' string and "
                                 f"an 'iter' integer, got {line.strip()[:80]}")
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def metric_series(records: list[dict[str, Any]], mode: str) -> dict[str, tuple[list, list]]:
    """``{key: (iterations, values)}`` of the numeric values that :func:`read_metrics_log`'s
    ``records`` hold for ``mode``, sorted by iteration; an iteration logged twice (a resumed
    run repeats the ones after its last checkpoint) keeps its last record."""
    latest = {r["iter"]: r for r in records if r["mode"] == mode}
    series: dict[str, tuple[list, list]] = {}
    for step in sorted(latest):
        for key, value in latest[step].items():
            if key in ("mode", "iter") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(step)
                ys.append(float(value))
    return series


def _smooth(values: list[float]) -> np.ndarray:
    """A centred moving average over about a twentieth of the points (NaN-aware)."""
    y = np.asarray(values, dtype=np.float64)
    width = max(1, len(y) // 20) | 1
    if width == 1:
        return y
    pad = width // 2
    finite = np.isfinite(y)
    kernel = np.ones(width)
    total = np.convolve(np.pad(np.where(finite, y, 0.0), pad, mode="edge"), kernel, "valid")
    count = np.convolve(np.pad(finite.astype(float), pad, mode="edge"), kernel, "valid")
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


def _panels(keys: list[str]) -> list[tuple[str, list[str]]]:
    """``keys`` grouped by the prefix before their first ``_`` when every key has one and
    there are several (detection's ``bbox_*`` and ``segm_*``), else one group."""
    prefixes = list(dict.fromkeys(k.split("_", 1)[0] for k in keys))
    if len(prefixes) > 1 and all("_" in k for k in keys):
        return [(p, [k for k in keys if k.split("_", 1)[0] == p]) for p in prefixes]
    return [("", keys)]


def _curves(series: dict[str, tuple[list, list]], keys: list[str], path: Path, title: str,
            ylabel: str, emphasise: str | None = None, markers: bool = False,
            smooth: bool = False) -> Path:
    panels = _panels(keys)
    legend = len(keys) > 1
    fig = _figure(8.0 + (1.6 if legend else 0.0), 4.5 * len(panels) ** 0.75)
    axes = fig.subplots(len(panels), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    smoothed = False
    for ax, (prefix, group) in zip(axes, panels, strict=True):
        for key in group:
            xs, ys = series[key]
            wide = key == emphasise
            style = {"linewidth": 2.2 if wide else 1.3, "marker": "o" if markers else None,
                     "markersize": 4, "color": "black" if wide else None}
            if smooth and len(ys) >= SMOOTH_FROM:
                (line,) = ax.plot(xs, ys, alpha=0.25, linewidth=0.8, color=style["color"])
                style["color"] = line.get_color()
                ys = _smooth(ys)
                smoothed = True
            ax.plot(xs, ys, label=key[len(prefix) + 1:] if prefix else key, **style)
        ax.set_ylabel(f"{prefix} {ylabel}".strip())
        ax.grid(True, alpha=0.3)
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
        if legend:  # beside the axes: never over a curve
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    axes[-1].set_xlabel("iteration")
    if smoothed:
        title += "\n(faint: logged values; solid: their moving average)"
    axes[0].set_title(title, fontsize=11)
    return _save(fig, path)


def plot_training_curves(records: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Draw the records of :func:`read_metrics_log` against the iteration into ``out_dir``:
    ``loss.png`` (every ``loss*`` key of the training records, the total in black; with
    :data:`SMOOTH_FROM` or more points the logged values are faint and a moving average over
    about a twentieth of them is drawn on top),
    ``lr.png`` (the learning rate) and, for every other mode (``val``, ...), ``<mode>.png``
    with each of its metrics (one panel per prefix, e.g. ``bbox_*`` above ``segm_*``). A
    file whose values were never logged is not drawn. Returns the paths written."""
    out = Path(out_dir)
    written: list[Path] = []
    train = metric_series(records, "train")
    losses = sorted((k for k in train if k.startswith("loss")), key=lambda k: (k != "loss", k))
    if losses:
        written.append(_curves(train, losses, out / "loss.png", "Training loss", "loss",
                               emphasise="loss", smooth=True))
    if "lr" in train:
        written.append(_curves(train, ["lr"], out / "lr.png", "Learning rate",
                               "learning rate"))
    for mode in sorted({r["mode"] for r in records} - {"train"}):
        series = metric_series(records, mode)
        keys = [k for k, (_, ys) in series.items() if any(math.isfinite(v) for v in ys)]
        if keys:
            title = "Validation metrics" if mode == "val" else f"'{mode}' metrics"
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", mode).lstrip(".") or "metrics"
            written.append(_curves(series, keys, out / f"{name}.png", title,
                                   "metric (%)" if mode == "val" else "value", markers=True))
    if not written:
        raise ValueError("the records hold no loss, learning rate or metric to draw")
    return written


def skipped_figures(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The figures :func:`plot_training_curves` leaves out for ``records``, each with the
    reason in words: ``loss.png`` and ``lr.png`` without training records, ``val.png``
    without evaluation records (a run with ``schedule.eval_interval=0``, or stopped before
    its first evaluation), and any mode whose values are all missing or not finite."""
    train = metric_series(records, "train")
    skipped = []
    if not any(k.startswith("loss") for k in train):
        skipped.append(("loss.png", "no training loss was logged"))
    if "lr" not in train:
        skipped.append(("lr.png", "no learning rate was logged"))
    modes = {r["mode"] for r in records} - {"train"}
    if "val" not in modes:
        skipped.append(("val.png", "the log has no evaluation ('val' record): the run "
                                   "evaluated nothing (schedule.eval_interval=0) or stopped "
                                   "before its first evaluation"))
    for mode in sorted(modes):
        if not any(math.isfinite(v) for _, ys in metric_series(records, mode).values()
                   for v in ys):
            skipped.append((f"{mode}.png", f"no finite value in the '{mode}' records"))
    return skipped
