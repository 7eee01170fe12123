"""Test-time inference for segmentation: whole image, sliding window and multi-scale + flip.

Semantics follow mmsegmentation 0.19 ``EncoderDecoder`` (``whole_inference``,
``slide_inference``, ``inference``, ``aug_test``); multi-scale testing starts, as mmseg's
``MultiScaleFlipAug``, from the original uint8 image, rescaled once per scale with OpenCV
(:func:`aug_views`), so its views equal the official ones to the bit.

The segmentors own this machinery through :class:`SegInference`: each holds its
:class:`InferenceSettings` (mode, crop, stride, multi-scale ratios and flip, the normalisation of
the multi-scale views), set from the config when the task builds the model, and answers
``model.inference(images, out_size)`` (logits, optionally with the score maps of an open
class list appended) and ``model.aug_inference(image)`` (probabilities).

The functions take any callable that maps a normalised image batch ``B x 3 x h x w`` to
class logits ``B x K x h x w`` at the *input* resolution (the segmentor upsamples its output
itself), in eval mode: sliding windows of one or several images are stacked into shared
forward calls. Everything runs under ``torch.no_grad()`` (not ``inference_mode``, so that
tensors a model may cache during evaluation remain usable for training afterwards) and
stays on the image's device (multi-scale testing: on the model's device, or the one given).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import numpy as np
import torch

from ..config import CLIP_MEAN, CLIP_STD, Config, ConfigError
from ..data.image_ops import imrescale
from ..data.transforms import Normalize255, to_chw_tensor
from ..utils import model_device, resize

Model = Callable[[torch.Tensor], torch.Tensor]
Size = Sequence[int]


class EvalSettings(Protocol):
    """What the functions read of the test settings (an :class:`~denseclip.config.EvalConfig`
    or an :class:`InferenceSettings`)."""

    mode: str
    crop_size: Sequence[int]
    stride: Sequence[int]
    aug_ratios: Sequence[float]
    aug_flip: bool


def aug_scales(test_scale: Size, ratios: Sequence[float]) -> list[tuple[int, int]]:
    """The rescale bounds of multi-scale testing: ``(int(a * r), int(b * r))`` per ratio ``r``
    (mmseg's ``MultiScaleFlipAug`` with ``img_ratios``)."""
    a, b = test_scale
    return [(int(a * r), int(b * r)) for r in ratios]


def _as_batch(image: torch.Tensor) -> torch.Tensor:
    if image.dim() == 3:
        return image.unsqueeze(0)
    if image.dim() != 4:
        raise ValueError(f"expected an image 3xHxW or a batch Bx3xHxW, got {tuple(image.shape)}")
    return image


@torch.no_grad()
def whole_inference(
    model: Model, image: torch.Tensor, out_size: Size, align_corners: bool = False
) -> torch.Tensor:
    """Run ``model`` on the whole ``B x 3 x h x w`` image; return logits resized bilinearly to
    ``out_size`` (``B x K x H_out x W_out``)."""
    logits = model(_as_batch(image))
    return resize(logits, out_size, align_corners)


def slide_windows(h: int, w: int, crop_size: Size, stride: Size) -> list[tuple[int, int, int, int]]:
    """The ``(y1, y2, x1, x2)`` crop boxes of mmseg's sliding-window test, row-major.

    ``grids = max(H - crop + stride - 1, 0) // stride + 1`` per axis; a window starts at
    ``i * stride`` and is shifted back to end inside the image, so all windows have the size
    ``min(crop, H) x min(crop, W)`` and together they cover every pixel.
    """
    crop_h, crop_w = int(crop_size[0]), int(crop_size[1])
    stride_h, stride_w = int(stride[0]), int(stride[1])
    if min(crop_h, crop_w, stride_h, stride_w) <= 0:
        raise ValueError(f"crop size {crop_size} and stride {stride} must be positive")
    h_grids = max(h - crop_h + stride_h - 1, 0) // stride_h + 1
    w_grids = max(w - crop_w + stride_w - 1, 0) // stride_w + 1
    boxes = []
    for i in range(h_grids):
        for j in range(w_grids):
            y2 = min(i * stride_h + crop_h, h)
            x2 = min(j * stride_w + crop_w, w)
            y1 = max(y2 - crop_h, 0)
            x1 = max(x2 - crop_w, 0)
            boxes.append((y1, y2, x1, x2))
    return boxes


@torch.no_grad()
def slide_inference(
    model: Model,
    image: torch.Tensor,
    crop_size: Size,
    stride: Size,
    num_classes: int,
    out_size: Size,
    max_batch: int = 8,
    align_corners: bool = False,
) -> torch.Tensor:
    """Sliding-window logits of a ``B x 3 x H x W`` batch, resized to ``out_size``.

    Window logits are summed into an ``H x W`` buffer and divided by the number of windows
    that covered each pixel, as in mmseg. The windows of all images in the batch go through
    the model together, at most ``max_batch`` crops per forward call. The buffer is float32
    (or float64 if the model returns float64) whatever precision the model computes in.
    """
    image = _as_batch(image)
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    b, _, h, w = image.shape
    boxes = slide_windows(h, w, crop_size, stride)
    # Every window has the same size, so crops stack; order: window-major, then image.
    crops = [(box, n) for box in boxes for n in range(b)]
    count = torch.zeros((1, 1, h, w), dtype=torch.float32, device=image.device)
    for y1, y2, x1, x2 in boxes:
        count[..., y1:y2, x1:x2] += 1
    total: torch.Tensor | None = None
    for start in range(0, len(crops), max_batch):
        chunk = crops[start : start + max_batch]
        batch = torch.stack([image[n, :, y1:y2, x1:x2] for (y1, y2, x1, x2), n in chunk])
        logits = model(batch)
        if logits.dim() != 4 or logits.shape[1] != num_classes:
            raise ValueError(
                f"model returned {tuple(logits.shape)}; expected N x {num_classes} x h x w"
            )
        if tuple(logits.shape[-2:]) != tuple(batch.shape[-2:]):
            raise ValueError(
                f"model returned logits of size {tuple(logits.shape[-2:])} for crops of size "
                f"{tuple(batch.shape[-2:])}; logits must be at the input resolution"
            )
        if total is None:
            dtype = torch.promote_types(logits.dtype, torch.float32)
            total = torch.zeros((b, num_classes, h, w), dtype=dtype, device=image.device)
        for k, ((y1, y2, x1, x2), n) in enumerate(chunk):
            total[n, :, y1:y2, x1:x2] += logits[k].to(total.dtype)
    assert total is not None
    total.div_(count.to(total.dtype))  # in place: no second image-sized buffer
    return resize(total, out_size, align_corners)


@torch.no_grad()
def mode_logits(model: Model, image: torch.Tensor, eval_cfg: EvalSettings, num_classes: int,
                out_size: Size, max_batch: int = 8, align_corners: bool = False) -> torch.Tensor:
    """Logits ``B x K x H_out x W_out`` from :func:`slide_inference` or
    :func:`whole_inference`, as ``eval_cfg.mode`` says."""
    if eval_cfg.mode == "slide":
        return slide_inference(model, image, eval_cfg.crop_size, eval_cfg.stride, num_classes,
                               out_size, max_batch=max_batch, align_corners=align_corners)
    if eval_cfg.mode == "whole":
        return whole_inference(model, image, out_size, align_corners=align_corners)
    raise ConfigError(
        f"evaluation.mode: unknown evaluation mode {eval_cfg.mode!r}; expected 'slide' or 'whole'"
    )


@torch.no_grad()
def inference(model: Model, image: torch.Tensor, eval_cfg: EvalSettings, num_classes: int,
              out_size: Size, max_batch: int = 8, align_corners: bool = False) -> torch.Tensor:
    """Class probabilities ``B x K x H_out x W_out`` of one test view (mmseg ``inference``):
    :func:`mode_logits` resized to ``out_size``, then soft-maxed over classes."""
    return mode_logits(model, image, eval_cfg, num_classes, out_size, max_batch,
                       align_corners).softmax(dim=1)


def aug_views(image: np.ndarray, test_scale: Size, ratios: Sequence[float],
              mean: Sequence[float], std: Sequence[float]) -> Iterator[torch.Tensor]:
    """The unflipped views of multi-scale testing, one ``3 x h x w`` float32 tensor per
    ratio: the original uint8 RGB ``image`` (``H x W x 3``) rescaled to the bounds of
    :func:`aug_scales` by :func:`~denseclip.data.image_ops.imrescale` (``mmcv.imrescale``,
    OpenCV bilinear on uint8) and normalised by
    :class:`~denseclip.data.transforms.Normalize255` — mmseg's ``MultiScaleFlipAug`` views
    to the bit. (A flipped view is the flip of the normalised view: normalising is
    per pixel, so flipping before or after it is the same.)"""
    normalize = Normalize255(mean, std)
    for bounds in aug_scales(test_scale, ratios):
        yield to_chw_tensor(normalize.normalize(imrescale(image, bounds)))


@torch.no_grad()
def aug_inference(
    model: Model,
    image: np.ndarray | torch.Tensor,
    test_scale: Size,
    eval_cfg: EvalSettings,
    num_classes: int,
    out_size: Size | None = None,
    max_batch: int = 8,
    align_corners: bool = False,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Multi-scale (+ flip) test of one image, as mmseg's ``aug_test``; ``1 x K x H x W``.

    ``image`` is the original decoded image, ``H x W x 3`` uint8 RGB (array or tensor), and
    ``mean``/``std`` the normalisation of the test pipeline (0..1 units, e.g.
    ``cfg.data.mean``). As mmseg's ``MultiScaleFlipAug``, each ratio ``r`` in
    ``eval_cfg.aug_ratios`` rescales the original uint8 image, keeping its aspect ratio, to
    the bounds ``(int(test_scale[0] * r), int(test_scale[1] * r))`` and normalises it
    (:func:`aug_views`); that view, and its horizontal mirror when ``eval_cfg.aug_flip``, is
    run through :func:`inference` on ``device`` (default: the model's; the two share
    forward calls), the mirrored probabilities are flipped back, and the probabilities of
    all views at ``out_size`` (default: the original size) are averaged.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("aug_inference takes one original image, H x W x 3 uint8 RGB; got "
                         f"{image.dtype} {tuple(image.shape)}")
    h, w = image.shape[:2]
    if out_size is None:
        out_size = (h, w)
    ratios = list(eval_cfg.aug_ratios)
    if not ratios:
        raise ValueError("eval_cfg.aug_ratios is empty")
    device = model_device(model) if device is None else torch.device(device)
    total: torch.Tensor | None = None
    views = 0
    for view in aug_views(image, test_scale, ratios, mean, std):
        view = view.to(device)[None]
        if eval_cfg.aug_flip:
            view = torch.cat([view, view.flip(-1)], dim=0)
        probs = inference(model, view, eval_cfg, num_classes, out_size, max_batch=max_batch,
                          align_corners=align_corners)
        if eval_cfg.aug_flip:
            probs = torch.cat([probs[:1], probs[1:].flip(-1)], dim=0)
        summed = probs.sum(dim=0, keepdim=True)
        total = summed if total is None else total + summed
        views += probs.shape[0]
    assert total is not None
    return total / views


# ------------------------------------------------------------------------------ the model's
@dataclass(frozen=True)
class InferenceSettings:
    """A segmentor's test settings: ``mode`` (``"slide"`` or ``"whole"``), the sliding
    ``crop_size`` and ``stride``; for multi-scale testing the ``test_scale`` the ratios
    ``aug_ratios`` multiply, ``aug_flip``, and the normalisation (``mean``/``std``, 0..1
    units) of the views rescaled from the original image. The defaults are the config's."""

    mode: str = "slide"
    crop_size: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)
    aug_ratios: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    aug_flip: bool = True
    test_scale: tuple[int, int] = (2048, 512)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_config(cls, cfg: Config) -> InferenceSettings:
        """The settings of ``cfg.evaluation`` with ``cfg.data``'s test scale and
        normalisation."""
        ev, data = cfg.evaluation, cfg.data
        return cls(mode=ev.mode, crop_size=tuple(ev.crop_size), stride=tuple(ev.stride),
                   aug_ratios=tuple(ev.aug_ratios), aug_flip=bool(ev.aug_flip),
                   test_scale=tuple(data.test_scale), mean=tuple(data.mean),
                   std=tuple(data.std))


class SegInference:
    """Test-time inference owned by a segmentor (mixed into ``nn.Module`` subclasses whose
    eval forward maps normalised images ``B x 3 x h x w`` to logits ``B x K x h x w`` and
    that set ``num_classes`` and ``align_corners``).

    ``inference_settings`` (:class:`InferenceSettings`) chooses whole-image or sliding-window
    inference and the multi-scale views; the task sets it from the config when it builds
    the model. A model that scores class lists other than its own (open vocabulary)
    implements :meth:`open_scores`, and its ``forward_features``/``forward_head``."""

    inference_settings: InferenceSettings = InferenceSettings()
    align_corners: bool = False
    num_classes: int

    def open_scores(self, dense, texts: Sequence[str], size: Size) -> torch.Tensor:
        """Score maps ``B x K' x *size`` of the class texts ``texts`` for the images behind
        ``dense`` (what ``forward_features`` returned)."""
        raise ValueError(f"a {type(self).__name__} has no score maps for other class lists")

    def window_logits(self, images: torch.Tensor,
                      open_texts: Sequence[str] | None = None) -> torch.Tensor:
        """Logits ``N x K x h x w`` of normalised crops at their size, followed, with
        ``open_texts``, by the score maps of those texts ``N x K' x h x w``."""
        if open_texts is None:
            return self(images)
        dense = self.forward_features(images)  # the model's own classes guide as usual
        logits = self.forward_head(dense.features, images.shape[-2:])
        score = self.open_scores(dense, open_texts, images.shape[-2:])
        return torch.cat([logits, score.to(logits.dtype)], dim=1)

    @torch.no_grad()
    def inference(self, images: torch.Tensor, out_size: Size | None = None, *,
                  open_texts: Sequence[str] | None = None, max_batch: int = 8) -> torch.Tensor:
        """Logits ``B x K x H_out x W_out`` of a normalised batch, by whole-image or
        sliding-window inference as :attr:`inference_settings` say (:func:`mode_logits`),
        resized to ``out_size`` (default: the batch's size); with ``open_texts``, the score
        maps of those class texts follow as ``K'`` more channels, from the same forward
        calls. At most ``max_batch`` sliding windows go through one forward call."""
        texts = None if open_texts is None else list(open_texts)
        window = self.window_logits if texts is None else partial(self.window_logits,
                                                                  open_texts=texts)
        channels = self.num_classes + (0 if texts is None else len(texts))
        size = images.shape[-2:] if out_size is None else out_size
        return mode_logits(window, images, self.inference_settings, channels, size, max_batch,
                           self.align_corners)

    @torch.no_grad()
    def aug_inference(self, image: np.ndarray | torch.Tensor, out_size: Size | None = None, *,
                      max_batch: int = 8,
                      device: torch.device | str | None = None) -> torch.Tensor:
        """Multi-scale (+ flip) class probabilities ``1 x K x H x W`` of one original
        ``H x W x 3`` uint8 RGB image, as :func:`aug_inference` with
        :attr:`inference_settings` (``device``: default the model's)."""
        s = self.inference_settings
        return aug_inference(self, image, s.test_scale, s, self.num_classes, out_size,
                             max_batch, self.align_corners, mean=s.mean, std=s.std,
                             device=device)
