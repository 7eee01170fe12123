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

Size limit: before any pixel is decoded, the header is read (Pillow reads only the header
until asked for pixels) and an image of more than :func:`max_image_pixels` pixels (width ×
height) is refused with :class:`ImageTooLargeError`, so a small file that claims a huge size
(a "decompression bomb") costs no memory. Only the formats whose header Pillow reads
(:data:`READABLE_FORMATS`) are decoded; other bytes are refused as not an image, since
their size cannot be checked first. The limit is, in this order, the ``max_pixels``
argument (``data.max_image_pixels`` in a config, ``--max-image-pixels`` on the command
line), the ``DENSECLIP_MAX_IMAGE_PIXELS`` environment variable, and
:data:`MAX_IMAGE_PIXELS` (Pillow's own default, about 89.5 M pixels).

Label maps (:func:`load_label_map`) are read as mmseg's ``LoadAnnotations`` does (Pillow,
``flag='unchanged'``): the stored values (palette indices for mode P), no EXIF rotation.
mmseg then casts to uint8; here 16/32-bit values are kept, so a value above 255 is reported
by the dataset instead of wrapping around, and colour label maps are refused. They are
checked against the same size limit before decoding.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import cv2
import numpy as np
from PIL import (  # noqa: F401 - importing a plugin registers its format
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    PpmImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

__all__ = [
    "MAX_IMAGE_PIXELS",
    "MAX_PIXELS_ENV",
    "READABLE_FORMATS",
    "DatasetError",
    "ImageTooLargeError",
    "UnknownImageFormatError",
    "check_image_size",
    "decode_image",
    "load_image",
    "load_label_map",
    "max_image_pixels",
    "open_image",
    "pil_to_rgb",
]

MAX_IMAGE_PIXELS = 89_478_485  # width x height; as PIL.Image.MAX_IMAGE_PIXELS (1 GiB / 4 / 3)
MAX_PIXELS_ENV = "DENSECLIP_MAX_IMAGE_PIXELS"
LIMIT_HINT = f"--max-image-pixels / data.max_image_pixels / {MAX_PIXELS_ENV}"
# Pillow format ids whose header gives the size before decoding (PPM covers PGM/PBM/PNM;
# Pillow opens JPEGs with several pictures as MPO through the JPEG entry).
READABLE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM")
FORMAT_NAMES = "JPEG, PNG, WebP, BMP, TIFF, GIF, PPM"

_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# What a Pillow format plugin raises when the bytes are not (a valid header of) its format.
_HEADER_ERRORS = (SyntaxError, IndexError, TypeError, ValueError, KeyError, EOFError,
                  OSError, struct.error)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_LABEL_MODES = ("L", "P", "1", *_SIXTEEN_BIT_MODES)


class DatasetError(ValueError):
    """The data on disk is missing, unreadable or inconsistent; the message names the file."""


class ImageTooLargeError(DatasetError):
    """An image whose header declares more pixels than the limit (refused undecoded)."""


class UnknownImageFormatError(DatasetError):
    """Bytes that are not an image of one of :data:`READABLE_FORMATS`."""


def max_image_pixels(value: int | None = None) -> int:
    """The pixel limit in force: ``value`` when given, else the
    ``DENSECLIP_MAX_IMAGE_PIXELS`` environment variable, else :data:`MAX_IMAGE_PIXELS`.
    Raises ``ValueError`` for a limit that is not a positive whole number."""
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"the image pixel limit (data.max_image_pixels / "
                             f"--max-image-pixels) must be a positive number, got {value!r}")
        return value
    text = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not text:
        return MAX_IMAGE_PIXELS
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise ValueError(f"{MAX_PIXELS_ENV}={os.environ[MAX_PIXELS_ENV]!r} is not a positive "
                         "number of pixels")
    return int(text)


def _pixels_text(n: int) -> str:
    return f"{n / 1e6:.1f} M pixels" if n >= 100_000 else f"{n} pixels"


def check_image_size(width: int, height: int, name: str | Path,
                     max_pixels: int | None = None) -> None:
    """Raise :class:`ImageTooLargeError` (one line naming ``name``, the size and the limit)
    if a ``width`` × ``height`` image exceeds :func:`max_image_pixels` (``max_pixels``)."""
    limit = max_image_pixels(max_pixels)
    pixels = int(width) * int(height)
    if pixels > limit:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} image ({_pixels_text(pixels)}) exceeds the limit of "
            f"{_pixels_text(limit)} ({LIMIT_HINT})")


def _read_header(data: bytes, name: str | Path, what: str = "image") -> Image.Image:
    """A Pillow image of ``data`` with only its header read (no pixels decoded yet), for the
    formats of :data:`READABLE_FORMATS`. The formats are tried directly rather than through
    ``Image.open``, whose own decompression-bomb check would refuse large images before
    their size is known (and would ignore a raised limit)."""
    fp = io.BytesIO(data)
    prefix = fp.read(16)
    reason = "empty file" if not prefix else f"not an image file ({FORMAT_NAMES})"
    for fmt in READABLE_FORMATS:
        factory, accept = Image.OPEN[fmt]
        accepted = accept(prefix) if accept else True
        if isinstance(accepted, str):  # Pillow says why it cannot (e.g. no WebP support)
            reason = accepted
            continue
        if not accepted:
            continue
        fp.seek(0)
        try:
            return factory(fp, "")
        except Image.DecompressionBombError as e:  # a GIF frame larger than its screen
            raise ImageTooLargeError(f"{name}: {e} ({LIMIT_HINT})") from None
        except _HEADER_ERRORS as e:
            reason = f"broken {fmt} header: {e}" if str(e) else f"broken {fmt} header"
    raise UnknownImageFormatError(f"cannot read {what} {name}: {reason}")


def open_image(source: str | Path | bytes, max_pixels: int | None = None,
               name: str | Path | None = None) -> Image.Image:
    """A lazily decoded Pillow image of a file (or its bytes) whose size was checked
    against the limit (:func:`check_image_size`); use it as a context manager, and call
    ``load()`` or convert it for the pixels. ``name`` (default: the path) is what errors
    say. Raises ``FileNotFoundError``, :class:`ImageTooLargeError` or
    :class:`DatasetError` (not one of :data:`READABLE_FORMATS`)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = "the image" if name is None else name
    else:
        name = source if name is None else name
        data = _read_file(Path(source))
    img = _read_header(data, name)
    check_image_size(*img.size, name, max_pixels)
    return img


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except OSError as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


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


def _opencv_rgb(data: bytes) -> np.ndarray | None:
    """OpenCV's decoding (``IMREAD_COLOR``, BGR → RGB) of bytes, or None if it cannot."""
    try:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_image(data: bytes | np.ndarray, max_pixels: int | None = None,
                 name: str | Path = "the image") -> np.ndarray:
    """Encoded image bytes to an RGB uint8 (H, W, 3) array as mmcv's ``imfrombytes`` with
    OpenCV (``IMREAD_COLOR``, then BGR → RGB), Pillow for what OpenCV cannot decode (see
    the module docstring). The size in the header is checked first (``max_pixels``, see
    :func:`max_image_pixels`): raises :class:`ImageTooLargeError`,
    :class:`UnknownImageFormatError` for bytes that are no readable image, or
    :class:`DatasetError` for a broken one; ``name`` is what the messages call it."""
    data = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    with _read_header(data, name) as img:
        check_image_size(*img.size, name, max_pixels)
        rgb = _opencv_rgb(data)
        if rgb is not None:
            return rgb
        try:  # a format OpenCV cannot read (or a broken file: Pillow says what is wrong)
            img.load()
            return pil_to_rgb(img)
        except _READ_ERRORS as e:
            raise DatasetError(f"cannot read image {name}: {e}") from e


def load_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file to an RGB ``uint8`` array (H, W, 3) as the official pipeline
    does (OpenCV; see the module docstring), EXIF orientation applied; images over the
    pixel limit (``max_pixels``, see :func:`max_image_pixels`) are refused undecoded."""
    path = Path(path)
    return decode_image(_read_file(path), max_pixels, path)


def load_label_map(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Decode a single-channel label map (PNG mode L, P, 1 or 16/32-bit I) to an integer
    array (H, W) of the raw stored values (palette indices for mode P); label maps over the
    pixel limit (``max_pixels``) are refused undecoded."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"label map {path} does not exist") from None
    except OSError as e:
        raise DatasetError(f"cannot read label map {path}: {e}") from e
    try:
        with _read_header(data, path, "label map") as img:
            check_image_size(*img.size, path, max_pixels)
            img.load()
            if img.mode not in _LABEL_MODES:
                raise DatasetError(
                    f"label map {path} has mode {img.mode}; expected a single-channel "
                    "image of class indices (mode L, P or I)"
                )
            arr = np.asarray(img)
    except DatasetError:
        raise
    except _READ_ERRORS as e:
        raise DatasetError(f"cannot read label map {path}: {e}") from e
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return arr
