"""Segmentation augmentations on ``torchvision.transforms.v2``.

Images travel as ``tv_tensors.Image`` (float32, 3×H×W, RGB, values 0..255 until
:class:`Normalize255`) and label maps as ``tv_tensors.Mask`` (int64, H×W, 255 = ignore), so
every geometric step moves both together: images are resized bilinearly and masks with
nearest neighbour.

The steps follow mmseg 0.x semantics (the pipeline of the official DenseCLIP configs):

* :class:`RandomRescale` — target scale ``(long·r, short·r)`` with ``r ~ U(ratio_range)``; the
  image is rescaled by ``min(long_target / long_side, short_target / short_side)``.
* :class:`RandomCropCatMax` — random crop that retries (up to 10 times) crops dominated by
  one class.
* :class:`PhotoMetricDistortion` — brightness, contrast, saturation and hue jitter in
  mmseg's order and ranges, implemented on tensors.
* :class:`Normalize255` — ``(x - 255·mean) / (255·std)``.
* :class:`PadTo` — pad bottom/right to the crop size, image with 0 and mask with 255.

Randomness comes only from torch's default CPU generator (``torch.rand``/``torch.randint``),
so seeding it before a call makes the augmentation reproducible; the datasets do exactly
that per sample (see :mod:`denseclip.data.segmentation`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from denseclip.config import DataConfig
from denseclip.utils import keep_ratio_size

IGNORE_INDEX = 255

__all__ = [
    "IGNORE_INDEX",
    "KeepRatioResize",
    "Normalize255",
    "PadTo",
    "PhotoMetricDistortion",
    "RandomCropCatMax",
    "RandomRescale",
    "build_test_transforms",
    "build_train_transforms",
    "hsv_to_rgb",
    "rgb_to_hsv",
]


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _coin() -> bool:
    return bool(torch.rand(()) < 0.5)


def _spatial_size(flat_inputs: list[Any]) -> tuple[int, int]:
    for inpt in flat_inputs:
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return int(inpt.shape[-2]), int(inpt.shape[-1])
    raise TypeError("expected a tv_tensors.Image or tv_tensors.Mask among the inputs")


class _SegTransform(v2.Transform):
    """Base class that works with both spellings of the v2 hooks (``make_params`` /
    ``transform`` from torchvision 0.21 on, ``_get_params`` / ``_transform`` before)."""

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask)

    def params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {}

    def apply(self, inpt: Any, params: dict[str, Any]) -> Any:
        raise NotImplementedError

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return self.params(flat_inputs)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self.apply(inpt, params)

    _get_params = make_params
    _transform = transform


class RandomRescale(_SegTransform):
    """Keep-ratio resize to ``scale × r``, ``r ~ U(ratio_range)`` (mmseg ``Resize`` with
    ``ratio_range`` and ``keep_ratio=True``). Image bilinear, mask nearest."""

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float] = (1.0, 1.0)):
        super().__init__()
        if len(scale) != 2 or len(ratio_range) != 2:
            raise ValueError(f"scale and ratio_range must be pairs, got {scale}, {ratio_range}")
        self.scale = (int(scale[0]), int(scale[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))

    def params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        low, high = self.ratio_range
        ratio = low if low == high else _uniform(low, high)
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        height, width = _spatial_size(flat_inputs)
        return {"size": list(keep_ratio_size(height, width, target))}

    def apply(self, inpt: Any, params: dict[str, Any]) -> Any:
        # antialias=False matches the plain bilinear interpolation of the reference (cv2).
        return F.resize(
            inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR, antialias=False
        )


class KeepRatioResize(RandomRescale):
    """Deterministic keep-ratio resize to ``scale`` (the test-time rescale)."""

    def __init__(self, scale: Sequence[int]):
        super().__init__(scale, (1.0, 1.0))


class RandomCropCatMax(_SegTransform):
    """Random crop to ``crop_size`` (H, W) avoiding crops dominated by one class.

    A crop is accepted when its label map holds more than one non-ignore class and the most
    frequent one covers less than ``cat_max_ratio`` of the labelled pixels. Up to
    ``max_tries`` crops are checked; if none passes, the last one checked is used. Images
    smaller than the crop are cropped to their own size along that axis (and padded later).
    ``cat_max_ratio >= 1`` disables the check.
    """

    def __init__(
        self,
        crop_size: Sequence[int],
        cat_max_ratio: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        max_tries: int = 10,
    ):
        super().__init__()
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        if min(self.crop_size) <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = ignore_index
        self.max_tries = max_tries

    def _random_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        crop_h, crop_w = self.crop_size
        top = int(torch.randint(0, max(height - crop_h, 0) + 1, ()))
        left = int(torch.randint(0, max(width - crop_w, 0) + 1, ()))
        return top, left, min(crop_h, height), min(crop_w, width)

    def _accept(self, mask: torch.Tensor) -> bool:
        labels = mask.flatten()
        labels = labels[labels != self.ignore_index]
        if labels.numel() == 0:
            return False
        counts = torch.bincount(labels)
        counts = counts[counts > 0]
        return counts.numel() > 1 and float(counts.max()) / float(counts.sum()) < self.cat_max_ratio

    def params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _spatial_size(flat_inputs)
        box = self._random_box(height, width)
        masks = [x for x in flat_inputs if isinstance(x, tv_tensors.Mask)]
        if self.cat_max_ratio < 1.0 and masks:
            mask = masks[0].as_subclass(torch.Tensor)
            for attempt in range(self.max_tries):
                top, left, h, w = box
                if self._accept(mask[..., top : top + h, left : left + w]):
                    break
                if attempt + 1 < self.max_tries:
                    box = self._random_box(height, width)
        return {"box": box}

    def apply(self, inpt: Any, params: dict[str, Any]) -> Any:
        top, left, h, w = params["box"]
        return F.crop(inpt, top, left, h, w)


def rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """RGB (3×H×W, 0..255) to HSV with OpenCV's 8-bit ranges: H in [0, 180), S and V in
    [0, 255] (kept as floats)."""
    r, g, b = image.unbind(-3)
    maxc = image.amax(-3)
    minc = image.amin(-3)
    delta = maxc - minc
    sat = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc)) * 255.0
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue_r = torch.remainder((g - b) / safe, 6.0)
    hue_g = (b - r) / safe + 2.0
    hue_b = (r - g) / safe + 4.0
    hue = torch.where(maxc == r, hue_r, torch.where(maxc == g, hue_g, hue_b))
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue)) * 30.0  # 60° per sextant, halved
    return torch.stack([torch.remainder(hue, 180.0), sat, maxc], dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    hue, sat, val = hsv.unbind(-3)
    sextant = hue / 30.0  # 0..6
    chroma_frac = sat / 255.0
    channels = []
    for n in (5.0, 3.0, 1.0):  # R, G, B
        k = torch.remainder(n + sextant, 6.0)
        weight = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
        channels.append(val - val * chroma_frac * weight)
    return torch.stack(channels, dim=-3)


class PhotoMetricDistortion(_SegTransform):
    """mmseg's photometric distortion on float images in 0..255 (masks pass through).

    In order, each step applied with probability 0.5 and its result clipped to 0..255:
    brightness ``+U(-32, 32)``; contrast ``×U(0.5, 1.5)`` either here or last (chosen with
    probability 0.5 per image); saturation ``×U(0.5, 1.5)`` in HSV; hue shift by a random
    integer in ``[-18, 18)`` on the 0..180 scale (as ``numpy.random.randint``); then contrast
    if it was not applied earlier. Unlike the 8-bit reference, values stay float between steps.
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        super().__init__()
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = int(hue_delta)

    def params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        # Draws in the reference's order, so one seed always yields one set of factors.
        p: dict[str, Any] = {"brightness": None, "contrast": None, "saturation": None, "hue": None}
        if _coin():
            p["brightness"] = _uniform(-self.brightness_delta, self.brightness_delta)
        p["contrast_first"] = _coin()
        if p["contrast_first"] and _coin():
            p["contrast"] = _uniform(*self.contrast_range)
        if _coin():
            p["saturation"] = _uniform(*self.saturation_range)
        if _coin():
            p["hue"] = int(torch.randint(-self.hue_delta, self.hue_delta, ()))
        if not p["contrast_first"] and _coin():
            p["contrast"] = _uniform(*self.contrast_range)
        return p

    def apply(self, inpt: Any, params: dict[str, Any]) -> Any:
        img = inpt.as_subclass(torch.Tensor).float()
        if params["brightness"] is not None:
            img = (img + params["brightness"]).clamp(0.0, 255.0)
        if params["contrast_first"] and params["contrast"] is not None:
            img = (img * params["contrast"]).clamp(0.0, 255.0)
        if params["saturation"] is not None:
            hsv = rgb_to_hsv(img)
            sat = (hsv[1] * params["saturation"]).clamp(0.0, 255.0)
            img = hsv_to_rgb(torch.stack([hsv[0], sat, hsv[2]])).clamp(0.0, 255.0)
        if params["hue"] is not None:
            hsv = rgb_to_hsv(img)
            hue = torch.remainder(hsv[0] + params["hue"], 180.0)
            img = hsv_to_rgb(torch.stack([hue, hsv[1], hsv[2]])).clamp(0.0, 255.0)
        if not params["contrast_first"] and params["contrast"] is not None:
            img = (img * params["contrast"]).clamp(0.0, 255.0)
        return tv_tensors.wrap(img, like=inpt)


class Normalize255(_SegTransform):
    """``(x - 255·mean) / (255·std)`` per channel for images in 0..255; masks pass through."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean}, {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        self.mean = [255.0 * float(m) for m in mean]
        self.std = [255.0 * float(s) for s in std]

    def apply(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.normalize(inpt, mean=self.mean, std=self.std)


class PadTo(_SegTransform):
    """Pad bottom and right up to ``size`` (H, W): images with ``image_fill``, masks with
    ``mask_fill``. Larger inputs are left as they are."""

    def __init__(self, size: Sequence[int], image_fill: float = 0.0, mask_fill: int = IGNORE_INDEX):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.image_fill = float(image_fill)
        self.mask_fill = int(mask_fill)

    def params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _spatial_size(flat_inputs)
        return {"bottom": max(self.size[0] - height, 0), "right": max(self.size[1] - width, 0)}

    def apply(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["bottom"] == 0 and params["right"] == 0:
            return inpt
        fill = self.mask_fill if isinstance(inpt, tv_tensors.Mask) else self.image_fill
        return F.pad(inpt, [0, 0, params["right"], params["bottom"]], fill=fill)


def build_train_transforms(cfg: DataConfig, ignore_index: int = IGNORE_INDEX) -> v2.Compose:
    """The training pipeline of DESIGN §7 from ``cfg``: random rescale, cat-max crop, flip,
    photometric distortion (if ``cfg.photometric``), normalise, pad to ``cfg.crop_size``."""
    steps: list[v2.Transform] = [
        RandomRescale(cfg.scale, cfg.ratio_range),
        RandomCropCatMax(cfg.crop_size, cfg.cat_max_ratio, ignore_index),
        v2.RandomHorizontalFlip(cfg.flip_prob),
    ]
    if cfg.photometric:
        steps.append(PhotoMetricDistortion())
    steps += [Normalize255(cfg.mean, cfg.std), PadTo(cfg.crop_size, 0.0, ignore_index)]
    return v2.Compose(steps)


def build_test_transforms(cfg: DataConfig) -> v2.Compose:
    """The test pipeline: keep-ratio resize to ``cfg.test_scale`` and normalise (no crop)."""
    return v2.Compose([KeepRatioResize(cfg.test_scale), Normalize255(cfg.mean, cfg.std)])


def apply_seeded(transforms: Callable[[Any], Any], sample: Any, seed: int | None) -> Any:
    """Run ``transforms`` on ``sample``; with a ``seed``, torch's generator is seeded for
    the call and restored afterwards, so the augmentation is fixed by the seed alone."""
    if seed is None:
        return transforms(sample)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        return transforms(sample)
