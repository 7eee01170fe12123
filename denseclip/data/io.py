"""Decoding images and label maps from disk (and PIL images) into numpy arrays.

Images (:func:`load_image`) are decoded as mmseg 0.19's ``LoadImageFromFile`` does
(``mmcv.imfrombytes`` with the ``cv2`` backend and ``flag='color'``, i.e.
``cv2.imdecode(bytes, cv2.IMREAD_COLOR)``) and returned in RGB order, so a file gives the
official pipeline's pixels. What ``IMREAD_COLOR`` does (checked by the tests):

* grayscale (also 1-bit) and palette images become three equal / palette-expanded channels;
* an alpha channel (RGBA, LA, palette transparency) is dropped, not composited;
* 16-bit images keep the high byte of each value (``v >> 8``, libpng's ``strip_16``);
* the EXIF orientation tag is applied (JPEG, PNG, WebP, TIFF);
* CMYK JPEGs use OpenCV's CMYK → RGB conversion.

Files OpenCV cannot decode at all (e.g. float TIFF) fall back to Pillow with the same rules
(:func:`pil_to_rgb`); if neither can, :class:`DatasetError` names the file (a truncated
file, which OpenCV refuses, gives Pillow's message).

Label maps (:func:`load_label_map`) are read as mmseg's ``LoadAnnotations`` does (Pillow,
``flag='unchanged'``): the stored values (palette indices for mode P), no EXIF rotation.
mmseg then casts to uint8; here 16/32-bit values are kept, so a value above 255 is reported
by the dataset instead of wrapping around, and colour label maps are refused.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

__all__ = ["DatasetError", "decode_image", "load_image", "load_label_map", "pil_to_rgb"]

_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_LABEL_MODES = ("L", "P", "1", *_SIXTEEN_BIT_MODES)


class DatasetError(ValueError):
    """The data on disk is missing, unreadable or inconsistent; the message names the file."""


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A PIL image as an (H, W, 3) uint8 RGB array by the rules of :func:`load_image`: EXIF
    orientation applied, grayscale and palette expanded, alpha dropped, 16-bit values to
    their high byte (as OpenCV), float grayscale rounded and clipped to 0..255."""
    img = ImageOps.exif_transpose(img)
    if img.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(img).astype(np.int64)
        gray = np.clip(wide >> 8, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode == "F":
        gray = np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    return np.array(img.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes | np.ndarray) -> np.ndarray | None:
    """Encoded image bytes to an RGB uint8 (H, W, 3) array as mmcv's ``imfrombytes`` with
    OpenCV (``IMREAD_COLOR``, then BGR → RGB); None if OpenCV cannot decode them."""
    buffer = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    if buffer.size == 0:
        return None
    try:
        bgr = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    if bgr is None:
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to an RGB ``uint8`` array (H, W, 3) as the official pipeline
    does (OpenCV; see the module docstring), EXIF orientation applied."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except OSError as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e
    rgb = decode_image(data)
    if rgb is not None:
        return rgb
    try:  # a format OpenCV cannot read (or a broken file: Pillow says what is wrong)
        with Image.open(path) as img:
            img.load()
            return pil_to_rgb(img)
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
