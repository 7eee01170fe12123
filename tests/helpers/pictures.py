"""Checks that a file is a picture someone could look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def assert_picture(path: Path, min_size: tuple[int, int] = (300, 200),
                   max_size: tuple[int, int] = (3000, 3000), max_bytes: int = 400_000) -> None:
    """``path`` is a PNG of a sensible size (width, height in pixels) that is not blank: it
    has several colours, some of them saturated (data drawn in colour, not only black axes
    and text on white)."""
    assert path.is_file(), f"{path} was not written"
    assert path.stat().st_size <= max_bytes, f"{path} is {path.stat().st_size} bytes"
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert min_size[0] <= width <= max_size[0] and min_size[1] <= height <= max_size[1], \
        f"{path} is {width}x{height}"
    colours = np.unique(rgb.reshape(-1, 3), axis=0)
    assert len(colours) > 1, f"{path} is one flat colour"
    saturation = rgb.max(axis=2) - rgb.min(axis=2)
    assert (saturation > 60).mean() > 0.001, f"{path} shows no coloured data"
