"""Fixtures writing tiny datasets in the real ADE20K on-disk layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


WritePair = Callable[..., tuple[Path, Path]]


@pytest.fixture
def write_pair() -> WritePair:
    """``write_pair(root, split, name, image, label, img_suffix=".jpg")`` writes one image and
    its label map under ``root/{images,annotations}/split`` and returns both paths."""

    def write(root: Path, split: str, name: str, image, label: np.ndarray | None,
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

    return write


@pytest.fixture
def colour_dataset(tmp_path: Path, write_pair: WritePair) -> Path:
    """Four PNG images whose colours encode their labels (raw 1..7 → PALETTE[1..7]), plus
    raw 0 (unlabelled, black) cells; lossless so colour and label agree exactly."""
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(48, 64), (64, 48), (40, 40), (72, 96)]):
        label = block_labels(rng, shape, list(range(8)))
        write_pair(tmp_path, "training", f"img{i}", PALETTE[label], label, img_suffix=".png")
    (tmp_path / "classes.txt").write_text("\n".join(f"c{k}" for k in range(1, 8)) + "\n")
    return tmp_path
