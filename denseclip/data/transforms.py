"""Segmentation augmentations with the 8-bit arithmetic of mmseg 0.19 / mmcv 1.3 (OpenCV).

A sample is a dict: ``image`` an ``H × W × 3`` uint8 numpy array (RGB) and, optionally,
``target`` an ``H × W`` uint8 label map (class indices, 255 = ignore). Every step up to
:class:`Normalize255` keeps the image uint8 and computes it exactly as the official pipeline
does (which works on BGR images; each step below gives the same pixels on RGB), so a sample
equals mmseg's to the bit for the same random draws:

* :class:`RandomRescale` — target bounds ``(int(long·r), int(short·r))``, ``r ~ U(ratio_range)``
  (mmseg ``Resize`` with ``ratio_range`` and ``keep_ratio=True``); size by mmcv's rule
  (:func:`denseclip.utils.keep_ratio_size`), the image through ``cv2.resize`` bilinear and
  the label map nearest (:func:`denseclip.data.image_ops.imresize`, as ``mmcv.imrescale``).
  :class:`KeepRatioResize` is the deterministic test-time version.
* :class:`RandomCropCatMax` — mmseg's ``RandomCrop``: up to 10 crops are checked against
  ``cat_max_ratio``; if all 10 fail, an 11th is drawn and used unchecked.
* :class:`RandomFlip` — horizontal flip of image and label map with probability ``prob``.
* :class:`PhotoMetricDistortion` — mmseg's brightness, contrast, saturation and hue jitter
  on uint8: ``clip(float32(x)·α + β, 0, 255)`` truncated to uint8 after each step, and
  saturation and hue on OpenCV's 8-bit HSV (``cv2.COLOR_RGB2HSV`` on RGB equals mmcv's
  ``bgr2hsv`` on BGR; hue in 0..179).
* :class:`Normalize255` — the first float step: ``mmcv.imnormalize``'s OpenCV arithmetic
  (float32 image, ``cv2.subtract`` of ``255·mean``, ``cv2.multiply`` by ``1 / (255·std)``).
* :class:`PadTo` — pad bottom/right to the crop size, image with 0 and label map with 255.
* :class:`ToTensor` — image → float32 tensor 3×H×W, label map → int64 tensor H×W.

:class:`SegCompose` chains steps (plain callables over the sample dict); called with a bare
uint8 array it returns the bare image result (what :class:`~denseclip.inference.Predictor`
uses). :func:`build_train_transforms` / :func:`build_test_transforms` build the pipelines.

Randomness comes only from torch's default CPU generator (``torch.rand``/``torch.randint``),
in the order of the steps above (flip: one ``torch.rand(1) < prob``), so seeding it before a
call makes the augmentation reproducible; the datasets do exactly that per sample (see
:mod:`denseclip.data.segmentation`). The draws are not NumPy's, so a given seed does not
give the official run's parameters, but any given parameters give the official pixels.

:class:`KeepRatioResize` also remains a ``torchvision.transforms.v2`` transform for
``tv_tensors`` inputs (the detection pipeline builds on it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..config import DataConfig
from ..utils import keep_ratio_size
from .image_ops import imresize

IGNORE_INDEX = 255

__all__ = [
    "IGNORE_INDEX",
    "KeepRatioResize",
    "Normalize255",
    "PadTo",
    "PhotoMetricDistortion",
    "RandomCropCatMax",
    "RandomFlip",
    "RandomRescale",
    "SegCompose",
    "ToTensor",
    "apply_seeded",
    "build_test_transforms",
    "build_train_transforms",
    "convert_lut",
    "to_chw_tensor",
]

Sample = dict[str, Any]
_LEVELS = np.arange(256, dtype=np.float32)  # the uint8 values, for look-up tables
_IDENTITY = np.arange(256, dtype=np.uint8)


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _coin() -> bool:
    return bool(torch.rand(()) < 0.5)


def _image_size(sample: Sample) -> tuple[int, int]:
    image = sample["image"]
    return int(image.shape[0]), int(image.shape[1])


def _resize_sample(sample: Sample, size: Sequence[int]) -> Sample:
    """Image bilinear and label map nearest to ``size`` (H, W), as ``mmcv.imresize``."""
    out = dict(sample)
    out["image"] = imresize(sample["image"], size, "bilinear")
    if sample.get("target") is not None:
        out["target"] = imresize(sample["target"], size, "nearest")
    return out


def _is_array_sample(inpt: Any) -> bool:
    return isinstance(inpt, dict) and isinstance(inpt.get("image"), np.ndarray)


class SegCompose:
    """Run ``steps`` in order over a sample dict (see the module docstring). A bare
    ``H × W × 3`` uint8 array is wrapped as ``{"image": array}`` and the final image is
    returned alone."""

    def __init__(self, steps: Sequence[Callable[[Sample], Sample]]):
        self.steps = list(steps)

    def __call__(self, sample: Sample | np.ndarray) -> Any:
        bare = isinstance(sample, np.ndarray)
        current: Sample = {"image": sample} if bare else dict(sample)
        image = current.get("image")
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                and image.shape[2] == 3):
            raise TypeError("the segmentation pipeline takes an H x W x 3 uint8 RGB array, got "
                            f"{type(image).__name__} {getattr(image, 'dtype', '')} "
                            f"{tuple(getattr(image, 'shape', ()))}")
        target = current.get("target")
        if target is not None and not (isinstance(target, np.ndarray)
                                       and target.dtype == np.uint8 and target.ndim == 2):
            raise TypeError("the label map must be an H x W uint8 array (255 = ignore), got "
                            f"{type(target).__name__} {getattr(target, 'dtype', '')}")
        for step in self.steps:
            current = step(current)
        return current["image"] if bare else current

    def __repr__(self) -> str:
        inner = "".join(f"\n    {step!r}," for step in self.steps)
        return f"{type(self).__name__}([{inner}\n])"


class RandomRescale:
    """Keep-ratio resize to the bounds ``(int(scale[0]·r), int(scale[1]·r))``,
    ``r ~ U(ratio_range)`` (one ``torch.rand`` unless the range is a single value): mmseg's
    ``Resize`` with ``ratio_range`` and ``keep_ratio=True``. Image bilinear, label map
    nearest, both through OpenCV on uint8 (``mmcv.imrescale``)."""

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float] = (1.0, 1.0)):
        if len(scale) != 2 or len(ratio_range) != 2:
            raise ValueError(f"scale and ratio_range must be pairs, got {scale}, {ratio_range}")
        self.scale = (int(scale[0]), int(scale[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))

    def bounds(self) -> tuple[int, int]:
        """Draw the rescale bounds (mmseg's ``random_sample_ratio``)."""
        low, high = self.ratio_range
        ratio = low if low == high else _uniform(low, high)
        return int(self.scale[0] * ratio), int(self.scale[1] * ratio)

    def __call__(self, sample: Sample) -> Sample:
        bounds = self.bounds()
        return _resize_sample(sample, keep_ratio_size(*_image_size(sample), bounds))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale}, ratio_range={self.ratio_range})"


def _spatial_size(flat_inputs: list[Any]) -> tuple[int, int]:
    for inpt in flat_inputs:
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return int(inpt.shape[-2]), int(inpt.shape[-1])
    raise TypeError("expected a tv_tensors.Image or tv_tensors.Mask among the inputs")


class _TvTransform(v2.Transform):
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


class KeepRatioResize(_TvTransform):
    """Deterministic keep-ratio resize to the bounds ``scale`` (the test-time rescale).

    On a sample dict of uint8 arrays it is the OpenCV rescale of :class:`RandomRescale`
    (``mmcv.imrescale``). It is also a ``torchvision.transforms.v2`` transform for
    ``tv_tensors`` (:meth:`params` gives the size, :meth:`apply` resizes with torchvision;
    the detection pipeline subclasses it)."""

    def __init__(self, scale: Sequence[int]):
        super().__init__()
        if len(scale) != 2:
            raise ValueError(f"scale must be a pair, got {scale}")
        self.scale = (int(scale[0]), int(scale[1]))

    def forward(self, *inputs: Any) -> Any:
        if len(inputs) == 1 and _is_array_sample(inputs[0]):
            sample = inputs[0]
            return _resize_sample(sample, keep_ratio_size(*_image_size(sample), self.scale))
        return super().forward(*inputs)

    def params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _spatial_size(flat_inputs)
        return {"size": list(keep_ratio_size(height, width, self.scale))}

    def apply(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(
            inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR, antialias=False
        )

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class RandomCropCatMax:
    """mmseg's ``RandomCrop`` to ``crop_size`` (H, W), avoiding crops dominated by one class.

    A crop passes when its label map holds more than one class besides ``ignore_index`` and
    the most frequent covers less than ``cat_max_ratio`` of those pixels. The first box is
    drawn, then up to ``max_tries`` times: check it, stop if it passes, else draw the next
    one. So if all ``max_tries`` (10) fail, the box used is an 11th, unchecked one (as mmseg).
    A box is ``(top, left)`` with ``top ~ randint(0, H - crop_h + 1)`` (0 when the image is
    smaller; same for ``left``); images smaller than the crop keep their own size along that
    axis (padded later). ``cat_max_ratio >= 1`` (or no label map) disables the check.
    """

    def __init__(
        self,
        crop_size: Sequence[int],
        cat_max_ratio: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        max_tries: int = 10,
    ):
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        if min(self.crop_size) <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = int(ignore_index)
        self.max_tries = int(max_tries)

    def _random_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        crop_h, crop_w = self.crop_size
        top = int(torch.randint(0, max(height - crop_h, 0) + 1, ()))
        left = int(torch.randint(0, max(width - crop_w, 0) + 1, ()))
        return top, left, min(crop_h, height), min(crop_w, width)

    def _accept(self, labels: np.ndarray) -> bool:
        counts = np.bincount(labels.ravel(), minlength=256)
        if 0 <= self.ignore_index < counts.size:
            counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return counts.size > 1 and int(counts.max()) / int(counts.sum()) < self.cat_max_ratio

    def box(self, sample: Sample) -> tuple[int, int, int, int]:
        """Draw the crop box ``(top, left, height, width)`` for ``sample``."""
        height, width = _image_size(sample)
        box = self._random_box(height, width)
        target = sample.get("target")
        if self.cat_max_ratio < 1.0 and target is not None:
            for _ in range(self.max_tries):
                top, left, h, w = box
                if self._accept(target[top : top + h, left : left + w]):
                    break
                box = self._random_box(height, width)
        return box

    def __call__(self, sample: Sample) -> Sample:
        top, left, h, w = self.box(sample)
        out = dict(sample)
        out["image"] = sample["image"][top : top + h, left : left + w]
        if sample.get("target") is not None:
            out["target"] = sample["target"][top : top + h, left : left + w]
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(crop_size={self.crop_size}, "
                f"cat_max_ratio={self.cat_max_ratio}, ignore_index={self.ignore_index})")


class RandomFlip:
    """Horizontal flip of image and label map when ``torch.rand(1) < prob`` (mmseg's
    ``RandomFlip``; the same draw as ``v2.RandomHorizontalFlip``)."""

    def __init__(self, prob: float = 0.5):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.prob = float(prob)

    def __call__(self, sample: Sample) -> Sample:
        if not bool(torch.rand(1) < self.prob):
            return sample
        out = dict(sample)
        out["image"] = np.ascontiguousarray(sample["image"][:, ::-1])
        if sample.get("target") is not None:
            out["target"] = np.ascontiguousarray(sample["target"][:, ::-1])
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prob={self.prob})"


def convert_lut(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """The 256-entry uint8 table of mmseg's ``PhotoMetricDistortion.convert``:
    ``clip(float32(v) · α + β, 0, 255)`` truncated to uint8 (α and β rounded to float32, as
    NumPy does for a Python scalar with a float32 array)."""
    values = _LEVELS * np.float32(alpha) + np.float32(beta)
    return np.clip(values, 0, 255).astype(np.uint8)


def _hsv_lut(hue: np.ndarray = _IDENTITY, sat: np.ndarray = _IDENTITY) -> np.ndarray:
    return np.ascontiguousarray(np.stack([hue, sat, _IDENTITY], axis=-1)[None])  # 1×256×3


class PhotoMetricDistortion:
    """mmseg 0.19's ``PhotoMetricDistortion`` on a uint8 RGB image (the label map passes).

    In order, each step with probability 0.5: brightness ``+U(-32, 32)``; contrast
    ``×U(0.5, 1.5)`` either here or last (mmseg's ``mode``, a coin per image); saturation
    ``×U(0.5, 1.5)`` on the S channel of OpenCV's 8-bit HSV; hue ``(H + d) mod 180`` with
    ``d`` a random integer in ``[-18, 18)`` (``numpy.random.randint(-18, 18)``); then
    contrast if it was not applied earlier. Each step ends in uint8 as mmseg's: brightness,
    contrast and saturation are ``clip(float32(x)·α + β, 0, 255)`` truncated, and saturation
    and hue convert to HSV and back (``cv2.COLOR_RGB2HSV`` / ``COLOR_HSV2RGB``, the RGB
    spelling of mmcv's ``bgr2hsv`` / ``hsv2bgr``) separately, as mmseg does.
    """

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = int(hue_delta)

    def params(self) -> dict[str, Any]:
        """Draw the parameters in mmseg's order (``None``: step not applied)."""
        p: dict[str, Any] = {"brightness": None, "contrast": None, "saturation": None, "hue": None}
        if _coin():
            p["brightness"] = _uniform(-self.brightness_delta, self.brightness_delta)
        p["contrast_first"] = _coin()  # mmseg's mode == 1
        if p["contrast_first"] and _coin():
            p["contrast"] = _uniform(*self.contrast_range)
        if _coin():
            p["saturation"] = _uniform(*self.saturation_range)
        if _coin():
            p["hue"] = int(torch.randint(-self.hue_delta, self.hue_delta, ()))
        if not p["contrast_first"] and _coin():
            p["contrast"] = _uniform(*self.contrast_range)
        return p

    def apply(self, image: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        """``image`` (H × W × 3 uint8 RGB) distorted with the given parameters."""
        img = image
        if params["brightness"] is not None:
            img = cv2.LUT(img, convert_lut(beta=params["brightness"]))
        if params["contrast_first"] and params["contrast"] is not None:
            img = cv2.LUT(img, convert_lut(alpha=params["contrast"]))
        if params["saturation"] is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv = cv2.LUT(hsv, _hsv_lut(sat=convert_lut(alpha=params["saturation"])))
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if params["hue"] is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            shifted = ((np.arange(256) + params["hue"]) % 180).astype(np.uint8)
            hsv = cv2.LUT(hsv, _hsv_lut(hue=shifted))
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if not params["contrast_first"] and params["contrast"] is not None:
            img = cv2.LUT(img, convert_lut(alpha=params["contrast"]))
        return img

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        out["image"] = self.apply(sample["image"], self.params())
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(brightness_delta={self.brightness_delta}, "
                f"contrast_range={self.contrast_range}, "
                f"saturation_range={self.saturation_range}, hue_delta={self.hue_delta})")


class Normalize255:
    """``(x - 255·mean) · (1 / (255·std))`` per channel (mean and std in 0..1 units, RGB),
    computed as mmseg's ``Normalize`` and ``mmcv.imnormalize``: means and deviations
    rounded to float32, the uint8 image as float32, ``cv2.subtract`` of the (widened)
    means and ``cv2.multiply`` by the float64 inverse deviations. The image becomes
    a float32 ``H × W × 3`` array; the label map passes."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean}, {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        # float32 first, as mmseg's Normalize stores them, then float64 as imnormalize uses
        self.mean = np.array([255.0 * float(m) for m in mean], np.float32).reshape(1, -1)
        self.std = np.array([255.0 * float(s) for s in std], np.float32).reshape(1, -1)
        self.mean, self.std = self.mean.astype(np.float64), self.std.astype(np.float64)
        self._stdinv = 1 / self.std

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """The normalised float32 ``H × W × 3`` array of a uint8 ``image``."""
        out = image.astype(np.float32)
        cv2.subtract(out, self.mean, out)
        cv2.multiply(out, self._stdinv, out)
        return out

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        out["image"] = self.normalize(sample["image"])
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(mean={self.mean.ravel().tolist()}, "
                f"std={self.std.ravel().tolist()})")


class PadTo:
    """Pad bottom and right up to ``size`` (H, W): the image with ``image_fill``, the label
    map with ``mask_fill`` (``mmcv.impad``). Larger inputs are left as they are."""

    def __init__(self, size: Sequence[int], image_fill: float = 0.0, mask_fill: int = IGNORE_INDEX):
        self.size = (int(size[0]), int(size[1]))
        self.image_fill = float(image_fill)
        self.mask_fill = int(mask_fill)

    @staticmethod
    def _pad(array: np.ndarray, height: int, width: int, fill: float) -> np.ndarray:
        h, w = array.shape[:2]
        if h >= height and w >= width:
            return array
        out = np.full((max(h, height), max(w, width), *array.shape[2:]), fill, dtype=array.dtype)
        out[:h, :w] = array
        return out

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        out["image"] = self._pad(sample["image"], *self.size, self.image_fill)
        if sample.get("target") is not None:
            out["target"] = self._pad(sample["target"], *self.size, self.mask_fill)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """An ``H × W × C`` array as a contiguous ``C × H × W`` tensor (same dtype)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class ToTensor:
    """The image as a ``3 × H × W`` tensor (float32 after :class:`Normalize255`) and the
    label map as an int64 ``H × W`` tensor."""

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        out["image"] = to_chw_tensor(sample["image"])
        if sample.get("target") is not None:
            out["target"] = torch.from_numpy(sample["target"].astype(np.int64))
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def build_train_transforms(cfg: DataConfig, ignore_index: int = IGNORE_INDEX) -> SegCompose:
    """The training pipeline of DESIGN §7 from ``cfg``: random rescale, cat-max crop, flip,
    photometric distortion (if ``cfg.photometric``), normalise, pad to ``cfg.crop_size``,
    to tensors."""
    steps: list[Callable[[Sample], Sample]] = [
        RandomRescale(cfg.scale, cfg.ratio_range),
        RandomCropCatMax(cfg.crop_size, cfg.cat_max_ratio, ignore_index),
        RandomFlip(cfg.flip_prob),
    ]
    if cfg.photometric:
        steps.append(PhotoMetricDistortion())
    steps += [Normalize255(cfg.mean, cfg.std), PadTo(cfg.crop_size, 0.0, ignore_index),
              ToTensor()]
    return SegCompose(steps)


def build_test_transforms(cfg: DataConfig) -> SegCompose:
    """The test pipeline: keep-ratio resize to ``cfg.test_scale``, normalise, to tensors
    (no crop). A bare uint8 array in gives the normalised ``3 × H × W`` tensor out."""
    return SegCompose([KeepRatioResize(cfg.test_scale), Normalize255(cfg.mean, cfg.std),
                       ToTensor()])


def apply_seeded(transforms: Callable[[Any], Any], sample: Any, seed: int | None) -> Any:
    """Run ``transforms`` on ``sample``; with a ``seed``, torch's generator is seeded for
    the call and restored afterwards, so the augmentation is fixed by the seed alone."""
    if seed is None:
        return transforms(sample)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        return transforms(sample)
