"""Images and label maps for tests: noise images, colour-coded block labels and the
ADE20K on-disk layout (``images/<split>``, ``annotations/<split>``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A reproducible (h, w, 3) uint8 noise image."""
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


# Colours that stay far apart, one per raw label value used by the colour-coded images.
PALETTE = np.array(
    [
        [0, 0, 0],
        [255, 0, 0],
        [0, 255, 0],
        [0, 0, 255],
        [255, 255, 0],
        [255, 0, 255],
        [0, 255, 255],
        [255, 255, 255],
    ],
    dtype=np.uint8,
)


def block_labels(rng: np.random.Generator, shape: tuple[int, int], values: list[int],
                 block: int = 8) -> np.ndarray:
    """A label map made of ``block``×``block`` cells of random values."""
    h, w = shape
    cells = rng.choice(values, size=(-(-h // block), -(-w // block)))
    return np.kron(cells, np.ones((block, block), dtype=np.int64))[:h, :w].astype(np.uint8)


def write_pair(root: Path, split: str, name: str, image, label: np.ndarray | None,
          img_suffix: str = ".jpg", **save_kwargs) -> tuple[Path, Path]:
    img_dir = root / "images" / split
    ann_dir = root / "annotations" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    img_path = img_dir / f"{name}{img_suffix}"
    ann_path = ann_dir / f"{name}.png"
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    if img_suffix == ".jpg" and "quality" not in save_kwargs:
        save_kwargs["quality"] = 95
    pil.save(img_path, **save_kwargs)
    if label is not None:
        Image.fromarray(label).save(ann_path)
    return img_path, ann_path
