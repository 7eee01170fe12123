"""Inputs of the predictor: images as arrays, and the files a command line names."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.io import check_image_size, load_image, pil_to_rgb
from ..tasks.results import PredictionError

__all__ = ["IMAGE_SUFFIXES", "collect_inputs", "to_rgb"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                  ".ppm", ".pgm", ".pbm", ".pnm"}


def to_rgb(image: Any, max_pixels: int | None = None) -> np.ndarray:
    """An ``H × W × 3`` uint8 RGB array from a path, a PIL image or a uint8 array.

    Files are decoded by :func:`denseclip.data.io.load_image` (grayscale, palette, RGBA,
    16-bit and EXIF orientation handled); PIL images get the same treatment; arrays may be
    ``H × W`` (grey), ``H × W × 3`` (RGB) or ``H × W × 4`` (RGBA, alpha dropped). Files
    and PIL images (which may not be decoded yet) larger than ``max_pixels`` (see
    :func:`denseclip.data.io.max_image_pixels`) are refused before decoding.
    """
    if isinstance(image, (str, Path)):
        return load_image(image, max_pixels)
    if isinstance(image, Image.Image):
        check_image_size(*image.size, getattr(image, "filename", "") or "the image",
                         max_pixels)
        return pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise PredictionError(
                f"image arrays must be uint8 (0..255), got {image.dtype}; convert with "
                f"np.clip(x, 0, 255).astype(np.uint8)"
            )
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        elif image.ndim == 3 and image.shape[2] == 4:
            image = image[:, :, :3]
        if image.ndim != 3 or image.shape[2] != 3:
            raise PredictionError(
                f"image arrays must be H x W x 3 (RGB), got shape {image.shape}"
            )
        return np.ascontiguousarray(image)
    raise PredictionError(
        f"cannot read an image from {type(image).__name__}; pass a path, a PIL image or an "
        f"H x W x 3 uint8 array"
    )


def collect_inputs(specs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]], int]:
    """Expand files, folders (recursively, image suffixes only) and glob patterns.

    Returns (image paths in order without duplicates, [(spec, reason)] for specs that
    matched nothing, number of non-image files skipped in folders)."""
    paths: list[Path] = []
    failures: list[tuple[str, str]] = []
    skipped = 0
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            paths.append(path)

    for spec in specs:
        path = Path(spec)
        if path.is_file():
            add(path)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            for p in files:
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    add(p)
                else:
                    skipped += 1
            if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
                failures.append((spec, "folder holds no image files"))
        elif glob.has_magic(spec):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                failures.append((spec, "pattern matches no files"))
            for m in files:
                add(m)
        else:
            failures.append((spec, "no such file or folder"))
    return paths, failures, skipped
