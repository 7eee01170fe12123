"""A small synthetic outdoor-scene dataset in the ADE20K on-disk layout, for the quickstart.

Each image is a street/landscape sketch: sky above a horizon, buildings standing on it,
grass or water below, often a road in perspective, and a few unlabelled blobs. Every class
has its own shape and a distinct colour and texture (noisy grass, gradient sky, windowed
buildings, rippled water, a road with a dashed centre line), so a tiny network learns to
segment it within minutes on a CPU.

:func:`make_shapes_dataset` writes an even easier set for trying ``denseclip finetune``: filled
circles, squares and triangles (each class in shades of its own hue) on noise (folder layout,
labels 0..3).

Labels of the scenes follow the ADE20K convention: 0 = unlabelled/other, 1..5 = the classes of
``classes.txt`` in order. Output is deterministic for a given seed (and Pillow's JPEG encoder).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPE_CLASSES", "SYNTHETIC_CLASSES", "make_shapes_dataset", "make_synthetic_dataset",
           "shapes_sample", "synthetic_sample"]

SYNTHETIC_CLASSES = ("sky", "grass", "road", "building", "water")
OTHER, SKY, GRASS, ROAD, BUILDING, WATER = range(6)


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    return rng.normal(0.0, sigma, size=shape)[:, :, None]


def synthetic_sample(
    rng: np.random.Generator, size: tuple[int, int] = (96, 128)
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: an RGB ``uint8`` image (H, W, 3) and its label map (H, W) ``uint8``."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    label = np.zeros((h, w), dtype=np.uint8)

    # Layout, painted back to front.
    horizon = int(rng.uniform(0.25, 0.5) * h)
    above = yy < horizon
    label[above] = SKY if rng.random() < 0.9 else BUILDING
    label[~above] = GRASS if rng.random() < 0.65 else WATER

    for _ in range(rng.integers(0, 4)):
        bw = int(rng.uniform(0.1, 0.3) * w)
        left = int(rng.integers(-bw // 2, w - bw // 2))
        top = int(rng.uniform(0.05, 0.8) * horizon)
        label[(yy >= top) & (yy < horizon) & (xx >= left) & (xx < left + bw)] = BUILDING

    if label[h - 1, 0] == GRASS and rng.random() < 0.4:  # a pond
        cy, cx = rng.uniform(horizon + 0.2 * (h - horizon), h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.1, 0.25) * h, rng.uniform(0.15, 0.35) * w
        label[(~above) & (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0)] = WATER

    road_centre = None
    if rng.random() < 0.65:  # a road narrowing towards a vanishing point on the horizon
        vx = rng.uniform(0.2, 0.8) * w
        half_bottom = rng.uniform(0.2, 0.45) * w
        bottom_cx = vx + rng.uniform(-0.2, 0.2) * w
        t = np.clip((yy - horizon) / max(h - horizon, 1), 0.0, 1.0)  # 0 at horizon, 1 at bottom
        centre = vx + (bottom_cx - vx) * t
        half = 1.0 + half_bottom * t
        label[(~above) & (np.abs(xx - centre) < half)] = ROAD
        road_centre = centre

    blobs = []
    for _ in range(rng.integers(0, 3)):  # unlabelled things (people, cars, signs...)
        cy, cx = rng.uniform(0.2 * h, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.03, 0.09) * h, rng.uniform(0.03, 0.09) * w
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0
        label[blob] = OTHER
        blobs.append(blob)

    # Textures, one full-size layer per class, selected by the label map.
    image = np.zeros((h, w, 3), dtype=np.float64)
    shape = (h, w)
    top_sky = np.array([95.0, 160.0, 235.0]) + rng.uniform(-15, 15, 3)
    low_sky = np.array([190.0, 215.0, 245.0]) + rng.uniform(-10, 10, 3)
    frac = np.clip(yy / max(horizon, 1), 0.0, 1.0)[:, :, None]
    sky = top_sky * (1 - frac) + low_sky * frac + _noise(rng, shape, 3.0)

    grass_base = np.array([70.0, 140.0, 45.0]) + rng.uniform(-15, 15, 3)
    grass = grass_base + rng.normal(0.0, 22.0, size=(h, w, 3)) * np.array([0.6, 1.0, 0.5])

    road = np.array([115.0, 112.0, 110.0]) + rng.uniform(-15, 15) + _noise(rng, shape, 7.0)
    if road_centre is not None:
        dashes = (np.abs(xx - road_centre) < 1.2) & ((yy.astype(int) // 5) % 2 == 0)
        road[dashes] = (235.0, 235.0, 225.0)

    facade = np.array([(160.0, 80.0, 55.0), (205.0, 175.0, 120.0), (190.0, 110.0, 60.0)])
    building = facade[rng.integers(0, len(facade))] + _noise(rng, shape, 5.0)
    step_y, step_x = int(rng.integers(6, 10)), int(rng.integers(6, 10))
    windows = ((yy.astype(int) % step_y) < step_y // 2) & ((xx.astype(int) % step_x) < step_x // 2)
    building[windows] = building[windows] * 0.35 + np.array([20.0, 30.0, 45.0])

    water_base = np.array([25.0, 65.0, 125.0]) + rng.uniform(-10, 10, 3)
    phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.2)
    ripple = 18.0 * np.sin(freq * yy + 0.15 * np.sin(0.3 * xx) + phase)[:, :, None]
    water = water_base + ripple * np.array([0.6, 0.8, 1.0]) + _noise(rng, shape, 4.0)

    layers = {SKY: sky, GRASS: grass, ROAD: road, BUILDING: building, WATER: water}
    for cls, layer in layers.items():
        sel = label == cls
        image[sel] = layer[sel]
    for blob in blobs:
        sel = blob & (label == OTHER)
        colour = rng.uniform(0, 255, 3)
        image[sel] = colour + rng.normal(0.0, 10.0, size=(int(sel.sum()), 3))

    # Per-image photographic variation that keeps the classes apart.
    image = image * rng.uniform(0.9, 1.1, 3) + rng.uniform(-12, 12)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def make_synthetic_dataset(
    root: str | Path,
    num_train: int = 200,
    num_val: int = 50,
    size: Sequence[int] = (96, 128),
    seed: int = 0,
) -> Path:
    """Write ``num_train`` + ``num_val`` scenes of ``size`` (H, W) to ``root`` in the ADE20K
    layout (``images/{training,validation}/*.jpg`` at JPEG quality 95,
    ``annotations/{training,validation}/*.png``) plus ``root/classes.txt`` (the five names of
    :data:`SYNTHETIC_CLASSES`). Files of the same names are overwritten. Returns ``root``."""
    root = Path(root)
    height, width = int(size[0]), int(size[1])
    if height < 16 or width < 16:
        raise ValueError(f"size must be at least 16x16, got {tuple(size)}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be >= 0, got {num_train}, {num_val}")
    for split_id, (split, count) in enumerate((("training", num_train), ("validation", num_val))):
        img_dir = root / "images" / split
        ann_dir = root / "annotations" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng([seed, split_id, i])
            image, label = synthetic_sample(rng, (height, width))
            name = f"synthetic_{split}_{i:05d}"
            Image.fromarray(image).save(img_dir / f"{name}.jpg", quality=95)
            Image.fromarray(label).save(ann_dir / f"{name}.png")
    (root / "classes.txt").write_text("\n".join(SYNTHETIC_CLASSES) + "\n", encoding="utf-8")
    return root


#: the classes of :func:`make_shapes_dataset`, as ``name: text to embed`` lines
SHAPE_CLASSES = {"noise": "random noise", "circle": "a filled circle",
                 "square": "a filled square", "triangle": "a filled triangle"}


SHAPE_HUES = np.array([[230, 60, 60], [60, 200, 60], [60, 90, 230]])


def shapes_sample(rng: np.random.Generator,
                  size: Sequence[int] = (96, 96)) -> tuple[np.ndarray, np.ndarray]:
    """One image of one to three filled shapes (circle, square, triangle), each in a shade
    of its class's hue, on uniform RGB noise, and its label map (0 noise, 1 circle, 2 square,
    3 triangle; a later shape covers an earlier one)."""
    height, width = int(size[0]), int(size[1])
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    label = Image.new("L", (width, height), 0)
    paint, mark = ImageDraw.Draw(image), ImageDraw.Draw(label)
    side = min(height, width)
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(1, 4))
        r = float(rng.uniform(0.18, 0.32)) * side  # half the shape's extent
        cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
        # each class in shades of its own hue (reddish circles, greenish squares, bluish
        # triangles), so that a tiny network learns the set in minutes
        shade = SHAPE_HUES[kind - 1] * rng.uniform(0.6, 1.1) + rng.integers(-30, 31, 3)
        colour = tuple(int(c) for c in np.clip(shade, 0, 255))
        if kind == 1:
            box = [cx - r, cy - r, cx + r, cy + r]
            paint.ellipse(box, fill=colour)
            mark.ellipse(box, fill=kind)
            continue
        angle = rng.uniform(0, 2 * np.pi)  # squares and triangles at any rotation
        corners = 4 if kind == 2 else 3
        points = [(cx + r * np.cos(angle + 2 * np.pi * k / corners),
                   cy + r * np.sin(angle + 2 * np.pi * k / corners)) for k in range(corners)]
        paint.polygon(points, fill=colour)
        mark.polygon(points, fill=kind)
    return np.asarray(image), np.asarray(label)


def make_shapes_dataset(root: str | Path, num_train: int = 200, num_val: int = 40,
                        size: Sequence[int] = (96, 96), seed: int = 0) -> Path:
    """An easy segmentation set in the folder layout (:func:`shapes_sample` images as JPEG
    quality 95, label PNGs with values 0..3, ``classes.txt`` with a description per class,
    see :data:`SHAPE_CLASSES`): what ``denseclip finetune`` can be tried on. Deterministic
    for a seed; returns ``root``."""
    root = Path(root)
    if min(int(s) for s in size) < 16:
        raise ValueError(f"size must be at least 16x16, got {tuple(size)}")
    for split_id, (split, count) in enumerate((("training", num_train), ("validation", num_val))):
        if count < 0:
            raise ValueError(f"image counts must be >= 0, got {num_train}, {num_val}")
        img_dir, ann_dir = root / "images" / split, root / "annotations" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, label = shapes_sample(np.random.default_rng([seed, 7, split_id, i]), size)
            Image.fromarray(image).save(img_dir / f"shapes_{split}_{i:05d}.jpg", quality=95)
            Image.fromarray(label).save(ann_dir / f"shapes_{split}_{i:05d}.png")
    (root / "classes.txt").write_text(
        "".join(f"{name}: {text}\n" for name, text in SHAPE_CLASSES.items()), encoding="utf-8")
    return root
