"""Decoding images and label maps from disk (and PIL images) into numpy arrays.

Grayscale and palette images become RGB, RGBA drops its alpha, 16-bit images are scaled to
8 bits, and the EXIF orientation tag is applied to images (not to label maps). Problems
raise :class:`DatasetError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["DatasetError", "load_image", "load_label_map", "pil_to_rgb"]

_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_LABEL_MODES = ("L", "P", "1", *_SIXTEEN_BIT_MODES)


class DatasetError(ValueError):
    """The data on disk is missing, unreadable or inconsistent; the message names the file."""


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A PIL image as an (H, W, 3) uint8 RGB array: EXIF orientation applied, grayscale and
    palette expanded, alpha dropped, 16-bit and float grayscale scaled to 8 bits."""
    img = ImageOps.exif_transpose(img)
    if img.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(img).astype(np.float64)
        gray = np.clip(np.rint(wide * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode == "F":
        gray = np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    return np.array(img.convert("RGB"), dtype=np.uint8)


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to an RGB ``uint8`` array (H, W, 3), EXIF orientation applied."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_rgb(img)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except _READ_ERRORS as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


def load_label_map(path: str | Path) -> np.ndarray:
    """Decode a single-channel label map (PNG mode L, P, 1 or 16/32-bit I) to an integer
    array (H, W) of the raw stored values (palette indices for mode P)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in _LABEL_MODES:
                raise DatasetError(
                    f"label map {path} has mode {img.mode}; expected a single-channel "
                    "image of class indices (mode L, P or I)"
                )
            arr = np.asarray(img)
    except FileNotFoundError:
        raise FileNotFoundError(f"label map {path} does not exist") from None
    except DatasetError:
        raise
    except _READ_ERRORS as e:
        raise DatasetError(f"cannot read label map {path}: {e}") from e
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return arr
