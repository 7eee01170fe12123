"""Pictures of predictions: a deterministic palette, segmentation overlays with a legend,
detection boxes and score heatmaps (with the class name and a colour bar). Every function
takes the image as a path, a PIL image or a uint8 array, and returns a PIL image.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.io import load_image

__all__ = [
    "colorize",
    "format_share",
    "heatmap_overlay",
    "legend_font",
    "palette",
    "render_detections",
    "render_heatmap",
    "render_overlay",
    "to_pil",
]

_GOLDEN = 0.6180339887498949
_SATURATIONS = (0.85, 0.6, 0.95)
_VALUES = (0.95, 0.75)


def palette(n: int) -> np.ndarray:
    """``n`` RGB colours (``n × 3`` uint8), the same for a given index whatever ``n`` is.

    Hues advance by the golden ratio so consecutive classes get distant hues; saturation and
    brightness cycle with co-prime periods so classes with similar hues still differ.
    """
    if n < 0:
        raise ValueError(f"palette size must be non-negative, got {n}")
    colours = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        hue = (0.07 + i * _GOLDEN) % 1.0
        sat = _SATURATIONS[i % len(_SATURATIONS)]
        val = _VALUES[(i // len(_SATURATIONS)) % len(_VALUES)]
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        colours[i] = (round(r * 255), round(g * 255), round(b * 255))
    return colours


def to_pil(image) -> Image.Image:
    """An RGB PIL image from an image file's path (decoded as
    :func:`denseclip.data.io.load_image` does for prediction: EXIF orientation applied,
    size checked before decoding), a PIL image or an ``H × W × 3`` / ``H × W`` uint8 array."""
    if isinstance(image, (str, os.PathLike)):
        return Image.fromarray(load_image(os.fspath(image)), "RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"expected an image path, a PIL image or a uint8 image array, got an "
                        f"array of {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def format_share(percent: float) -> str:
    """A class's share of the image for a legend: ``42%``, ``<1%``, ``>99%``, ``100%``."""
    if 0 < percent < 1:
        return "<1%"
    if 99 < percent < 100:
        return ">99%"
    return f"{percent:.0f}%"


def legend_font(height: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font, scaled with the image height where FreeType is available."""
    size = int(np.clip(height / 40, 11, 48))
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # bitmap-only Pillow builds
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font,
               fill="black") -> None:
    """Draw ``text`` so that its ink's top-left corner lands on ``xy`` (no anchors: bitmap
    fonts do not support them)."""
    left, top, _, _ = draw.textbbox((0, 0), text, font=font)
    draw.text((xy[0] - left, xy[1] - top), text, fill=fill, font=font)


def _legend(entries: list[tuple[str, tuple[int, int, int]]], height: int, font) -> Image.Image:
    """A white panel listing ``(text, colour)`` entries in columns at most ``height`` tall."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = max(_text_size(probe, "Ag", font)[1], 8)
    swatch = line
    pad = max(line // 2, 4)
    row = line + pad
    per_column = max(1, (height - pad) // row)
    columns = [entries[i : i + per_column] for i in range(0, len(entries), per_column)]
    widths = [
        swatch + pad + max(_text_size(probe, text, font)[0] for text, _ in column)
        for column in columns
    ]
    panel = Image.new("RGB", (sum(widths) + pad * (len(columns) + 1), height), "white")
    draw = ImageDraw.Draw(panel)
    x = pad
    for column, width in zip(columns, widths, strict=True):
        y = pad
        for text, colour in column:
            draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=colour, outline="black")
            th = _text_size(draw, text, font)[1]
            _draw_text(draw, (x + swatch + pad, y + (swatch - th) / 2), text, font)
            y += row
        x += width + pad
    return panel


def render_overlay(image, labels: np.ndarray, class_names: Sequence[str], alpha: float = 0.5,
                   colors: np.ndarray | None = None, legend: bool = True) -> Image.Image:
    """Blend a label map over ``image`` and append a legend of the classes present.

    Args:
        image: the ``H × W`` RGB image (a path, a PIL image or a uint8 array).
        labels: ``H × W`` class indices into ``class_names``; any other value (e.g. 255,
            ignore) is left uncoloured.
        class_names: one name per class index.
        alpha: weight of the class colour (0 = image only, 1 = colours only).
        colors: ``K × 3`` uint8 colours; default :func:`palette`.
        legend: append a panel on the right listing the classes present, largest area
            first, each with its colour swatch, name and share of the image.
    """
    base = to_pil(image)
    labels = np.asarray(labels)
    if labels.shape != (base.height, base.width):
        raise ValueError(
            f"labels of shape {labels.shape} do not match the image {base.height}x{base.width}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    k = len(class_names)
    colors = palette(k) if colors is None else np.asarray(colors, dtype=np.uint8)
    if len(colors) < k:
        raise ValueError(f"{len(colors)} colours for {k} classes")
    valid = (labels >= 0) & (labels < k)
    index = np.where(valid, labels, 0).astype(np.int64)
    pixels = np.asarray(base, dtype=np.float32)
    tint = colors[index].astype(np.float32)
    blended = np.where(valid[:, :, None], (1 - alpha) * pixels + alpha * tint, pixels)
    out = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), "RGB")
    if not legend:
        return out
    counts = np.bincount(index[valid].ravel(), minlength=k)
    present = sorted(np.flatnonzero(counts), key=lambda c: (-counts[c], c))
    if not present:
        return out
    total = labels.size
    entries = []
    for c in present:
        share = format_share(100.0 * counts[c] / total)
        entries.append((f"{class_names[c]} ({share})", tuple(int(v) for v in colors[c])))
    panel = _legend(entries, out.height, legend_font(out.height))
    canvas = Image.new("RGB", (out.width + panel.width, out.height), "white")
    canvas.paste(out, (0, 0))
    canvas.paste(panel, (out.width, 0))
    return canvas


def render_detections(image, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                      class_names: Sequence[str], masks: np.ndarray | None = None,
                      score_thr: float = 0.3, colors: np.ndarray | None = None,
                      mask_alpha: float = 0.45) -> Image.Image:
    """Draw detections with ``score >= score_thr``: masks (if given) tinted in the class
    colour, boxes outlined, and ``name score`` written above each box.

    ``image`` is a path, a PIL image or a uint8 array; ``boxes`` are ``N × 4`` (x1, y1, x2,
    y2) in pixels, ``labels`` class indices into ``class_names``, ``masks`` ``N × H × W``
    booleans or probabilities (thresholded at 0.5).
    """
    base = to_pil(image)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if not len(boxes) == len(labels) == len(scores):
        raise ValueError(f"{len(boxes)} boxes, {len(labels)} labels and {len(scores)} scores")
    k = len(class_names)
    colors = palette(k) if colors is None else np.asarray(colors, dtype=np.uint8)
    keep = np.flatnonzero(scores >= score_thr)
    keep = keep[np.argsort(-scores[keep], kind="stable")][::-1]  # best drawn last (on top)
    pixels = np.asarray(base, dtype=np.float32).copy()
    if masks is not None:
        masks = np.asarray(masks)
        for i in keep:
            m = masks[i] >= 0.5 if masks.dtype != bool else masks[i]
            colour = colors[int(labels[i]) % max(k, 1)].astype(np.float32)
            pixels[m] = (1 - mask_alpha) * pixels[m] + mask_alpha * colour
    out = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    font = legend_font(out.height)
    width = max(2, round(min(out.size) / 250))
    for i in keep:
        c = int(labels[i])
        name = class_names[c] if 0 <= c < k else str(c)
        colour = tuple(int(v) for v in colors[c % max(k, 1)])
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        text = f"{name} {scores[i]:.2f}"
        tw, th = _text_size(draw, text, font)
        ty = y1 - th - 2 * width if y1 - th - 2 * width >= 0 else y1
        draw.rectangle([x1, ty, x1 + tw + 2 * width, ty + th + 2 * width], fill=colour)
        _draw_text(draw, (x1 + width, ty + width), text, font)
    return out


# Anchor colours of the heatmap colour scale, low to high (dark blue → red → yellow).
_HEAT_ANCHORS = np.array(
    [[10, 10, 60], [60, 20, 140], [170, 40, 120], [235, 90, 50], [250, 200, 40],
     [255, 255, 200]],
    dtype=np.float32,
)


def colorize(values: np.ndarray, vmin: float | None = None,
             vmax: float | None = None) -> np.ndarray:
    """Map a 2-D array to RGB (``H × W × 3`` uint8) on a dark-blue → yellow scale;
    ``vmin``/``vmax`` default to the array's range."""
    values = np.asarray(values, dtype=np.float32)
    lo = float(values.min()) if vmin is None else float(vmin)
    hi = float(values.max()) if vmax is None else float(vmax)
    t = np.clip((values - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(values)
    pos = t * (len(_HEAT_ANCHORS) - 1)
    low = np.floor(pos).astype(np.int64).clip(0, len(_HEAT_ANCHORS) - 2)
    frac = (pos - low)[..., None]
    rgb = (1 - frac) * _HEAT_ANCHORS[low] + frac * _HEAT_ANCHORS[low + 1]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def heatmap_overlay(image, values: np.ndarray, vmin: float | None = None,
                    vmax: float | None = None, alpha: float = 0.6) -> Image.Image:
    """:func:`colorize` ``values`` (``H × W``) and blend it over a grey copy of ``image``
    (a path, a PIL image or a uint8 array); the picture alone, without a scale (see
    :func:`render_heatmap`)."""
    grey = np.asarray(to_pil(image).convert("L").convert("RGB"), dtype=np.float32)
    heat = colorize(values, vmin, vmax).astype(np.float32)
    if heat.shape != grey.shape:
        raise ValueError(f"heatmap {heat.shape[:2]} does not match the image {grey.shape[:2]}")
    mixed = (1 - alpha) * grey + alpha * heat
    return Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8), "RGB")


def _format_value(value: float) -> str:
    return f"{value:.3g}"


def render_heatmap(image, values: np.ndarray, name: str, vmin: float | None = None,
                   vmax: float | None = None, unit: str = "", alpha: float = 0.6) -> Image.Image:
    """:func:`heatmap_overlay` with a panel on the right: the class ``name`` and a vertical
    colour bar from ``vmin`` (bottom) to ``vmax`` (top) labelled with both values (and
    ``unit``, e.g. ``probability``, under the name). ``vmin``/``vmax`` default to the range
    of ``values``. The picture keeps the image's height unless the panel needs more."""
    values = np.asarray(values, dtype=np.float32)
    lo = float(values.min()) if vmin is None else float(vmin)
    hi = float(values.max()) if vmax is None else float(vmax)
    heat = heatmap_overlay(image, values, lo, hi, alpha)
    font = legend_font(heat.height)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = max(_text_size(probe, "Ag", font)[1], 8)
    pad = max(line // 2, 4)
    bar_width = max(line, 10)
    title = [name] + ([unit] if unit else [])
    ticks = [_format_value(hi), _format_value(lo)]
    text_height = len(title) * (line + pad)
    min_bar = 2 * line + pad  # room for the two tick labels
    height = max(heat.height, pad + text_height + min_bar + pad)
    bar_top = pad + text_height
    bar_bottom = height - pad - 1
    tick_width = max(_text_size(probe, t, font)[0] for t in ticks)
    width = pad + max(max(_text_size(probe, t, font)[0] for t in title),
                      bar_width + pad + tick_width) + pad
    panel = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(panel)
    for i, text in enumerate(title):
        _draw_text(draw, (pad, pad + i * (line + pad)), text, font,
                   fill="black" if i == 0 else (90, 90, 90))
    steps = np.linspace(hi, lo, bar_bottom - bar_top + 1, dtype=np.float32)[:, None]
    column = colorize(np.repeat(steps, bar_width, axis=1), lo, hi)
    panel.paste(Image.fromarray(column, "RGB"), (pad, bar_top))
    draw.rectangle([pad, bar_top, pad + bar_width - 1, bar_bottom], outline="black")
    tick_x = pad + bar_width + pad
    _draw_text(draw, (tick_x, bar_top), ticks[0], font)
    _draw_text(draw, (tick_x, bar_bottom - _text_size(draw, ticks[1], font)[1]), ticks[1], font)
    canvas = Image.new("RGB", (heat.width + width, height), "white")
    canvas.paste(heat, (0, 0))
    canvas.paste(panel, (heat.width, 0))
    return canvas
