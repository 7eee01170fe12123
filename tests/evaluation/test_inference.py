import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from denseclip.config import CLIP_MEAN, CLIP_STD, EvalConfig
from denseclip.models.seg_inference import (
    aug_inference,
    aug_scales,
    aug_views,
    inference,
    slide_inference,
    slide_windows,
    whole_inference,
)
from denseclip.utils import keep_ratio_size
from tests.helpers.images import random_image
from tests.helpers.official import official_view

K = 5
MEAN, STD = list(CLIP_MEAN), list(CLIP_STD)


def pixel_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Conv2d(3, K, kernel_size=1).eval()


def context_model(symmetric: bool = False, seed: int = 0) -> nn.Module:
    """A 3x3 convolution: its output depends on neighbours and on the zero border."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, K, kernel_size=3, padding=1)
    if symmetric:  # a horizontally symmetric kernel makes the model flip-equivariant
        with torch.no_grad():
            conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
    return conv.eval()


class Recorder(nn.Module):
    """Wraps a model and records the batches it sees (and their shapes)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.shapes = []
        self.inputs = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        self.inputs.append(x.clone())
        return self.inner(x)


class Ones(nn.Module):
    def forward(self, x):
        return x.new_ones(x.shape[0], K, *x.shape[-2:])


def reference_slide(model, img, crop, stride, num_classes):
    """A literal transcription of the per-window loop (one forward per window, padded sums)."""
    (ch, cw), (sh, sw) = crop, stride
    b, _, h, w = img.shape
    h_grids = max(h - ch + sh - 1, 0) // sh + 1
    w_grids = max(w - cw + sw - 1, 0) // sw + 1
    preds = img.new_zeros((b, num_classes, h, w))
    count = img.new_zeros((b, 1, h, w))
    for i in range(h_grids):
        for j in range(w_grids):
            y1, x1 = i * sh, j * sw
            y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            out = model(img[:, :, y1:y2, x1:x2])
            preds += F.pad(out, (x1, w - x2, y1, h - y2))
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


@pytest.mark.parametrize(
    ("hw", "scale", "expected"),
    [
        ((683, 512), (2048, 512), (683, 512)),  # factor min(2048/683, 512/512) = 1
        ((512, 683), (2048, 512), (512, 683)),
        ((375, 500), (2048, 512), (512, 683)),  # factor 512/375: 500*1.3653 = 682.67 -> 683
        ((375, 500), (512, 2048), (512, 683)),  # bound order does not matter
        ((375, 500), (1024, 256), (256, 341)),  # 500*256/375 = 341.33 -> 341
        ((100, 1000), (2048, 512), (205, 2048)),  # long edge binds: factor 2.048, 204.8 -> 205
        ((1024, 1536), (2048, 512), (512, 768)),  # downscale by 0.5
        ((5, 10), (5, 3), (3, 5)),  # 5*0.5 = 2.5 rounds half up to 3 (int(x + 0.5))
    ],
)
def test_keep_ratio_scale(hw, scale, expected):
    assert keep_ratio_size(*hw, scale) == expected


def test_aug_scales():
    ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    assert aug_scales((2048, 512), ratios) == [
        (1024, 256),
        (1536, 384),
        (2048, 512),
        (2560, 640),
        (3072, 768),
        (3584, 896),
    ]


def test_slide_windows_official_case():
    # An ADE20K image at test scale: one row of two windows, the second shifted to the edge.
    assert slide_windows(512, 683, (512, 512), (341, 341)) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    assert len(slide_windows(1000, 1000, (512, 512), (341, 341))) == 9


@pytest.mark.parametrize(
    ("h", "w", "crop", "stride"),
    [
        (5, 7, (8, 8), (3, 3)),  # smaller than the crop in both directions
        (20, 6, (8, 8), (5, 5)),  # smaller in one direction only
        (23, 31, (8, 8), (5, 5)),  # not a multiple of the stride
        (8, 8, (8, 8), (5, 5)),  # exactly one crop
        (17, 29, (8, 6), (7, 4)),  # non-square crop and stride
        (30, 30, (8, 8), (8, 8)),  # stride == crop (no overlap), last window shifted
    ],
)
def test_slide_windows_cover_every_pixel(h, w, crop, stride):
    boxes = slide_windows(h, w, crop, stride)
    count = torch.zeros(h, w)
    for y1, y2, x1, x2 in boxes:
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert (y2 - y1, x2 - x1) == (min(crop[0], h), min(crop[1], w))
        count[y1:y2, x1:x2] += 1
    assert bool((count > 0).all())

    # Through slide_inference: a constant model must average to exactly one everywhere.
    img = torch.randn(2, 3, h, w)
    out = slide_inference(Ones(), img, crop, stride, K, (h, w), max_batch=3)
    assert torch.equal(out, torch.ones(2, K, h, w))


def test_image_smaller_than_crop_is_one_window():
    model = Recorder(pixel_model())
    img = torch.randn(1, 3, 6, 9)
    slide_inference(model, img, (16, 16), (10, 10), K, (6, 9))
    assert model.shapes == [(1, 3, 6, 9)]


def test_slide_equals_whole_for_per_pixel_model():
    model = pixel_model()
    img = torch.randn(2, 3, 37, 53)
    for out_size in [(37, 53), (50, 41)]:
        whole = whole_inference(model, img, out_size)
        slide = slide_inference(model, img, (16, 16), (11, 11), K, out_size, max_batch=5)
        assert slide.shape == (2, K, *out_size)
        torch.testing.assert_close(slide, whole, atol=1e-5, rtol=0)


def test_slide_matches_per_window_loop_and_batches_windows():
    model = Recorder(context_model())
    img = torch.randn(2, 3, 29, 40)
    crop, stride = (16, 16), (10, 10)
    expected = reference_slide(model.inner, img, crop, stride, K)
    n_windows = len(slide_windows(29, 40, crop, stride))  # 3 x 4
    assert n_windows == 12
    out = slide_inference(model, img, crop, stride, K, (29, 40), max_batch=7)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # 24 crops (12 windows x 2 images) in chunks of at most 7.
    assert [s[0] for s in model.shapes] == [7, 7, 7, 3]
    assert all(s[1:] == (3, 16, 16) for s in model.shapes)


def test_whole_inference_resizes_logits():
    model = context_model()
    img = torch.randn(3, 12, 18)  # a single unbatched image is accepted
    out = whole_inference(model, img, (24, 9))
    with torch.no_grad():
        expected = F.interpolate(model(img[None]), size=(24, 9), mode="bilinear")
    torch.testing.assert_close(out, expected)


def test_inference_modes_return_softmax():
    model = pixel_model()
    img = torch.randn(1, 3, 21, 26)
    whole_cfg = EvalConfig(mode="whole")
    slide_cfg = EvalConfig(mode="slide", crop_size=[12, 12], stride=[8, 8])
    p_whole = inference(model, img, whole_cfg, K, (30, 20))
    p_slide = inference(model, img, slide_cfg, K, (30, 20))
    expected = whole_inference(model, img, (30, 20)).softmax(dim=1)
    torch.testing.assert_close(p_whole, expected)
    torch.testing.assert_close(p_slide, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(p_whole.sum(dim=1), torch.ones(1, 30, 20))
    assert not p_whole.requires_grad
    with pytest.raises(ValueError, match="mode"):
        inference(model, img, EvalConfig(mode="sliding"), K, (30, 20))


def test_bad_model_output_is_reported():
    def half_res(x):
        return torch.zeros(x.shape[0], K, x.shape[2] // 2, x.shape[3] // 2)

    with pytest.raises(ValueError, match="input resolution"):
        slide_inference(half_res, torch.randn(1, 3, 20, 20), (8, 8), (8, 8), K, (20, 20))
    with pytest.raises(ValueError, match="expected N x 4"):
        slide_inference(Ones(), torch.randn(1, 3, 20, 20), (8, 8), (8, 8), 4, (20, 20))


def test_aug_views_rescale_the_original_image_as_mmseg():
    rng = np.random.default_rng(0)
    ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    for seed in range(8):
        h, w = (int(v) for v in rng.integers(10, 200, 2))
        image = random_image(h, w, seed)
        scale = (int(rng.integers(40, 300)), int(rng.integers(20, 150)))
        views = list(aug_views(image, scale, ratios, MEAN, STD))
        assert len(views) == len(ratios)
        for view, bounds in zip(views, aug_scales(scale, ratios), strict=True):
            assert view.dtype == torch.float32
            assert torch.equal(view, official_view(image, bounds))


@pytest.mark.parametrize(
    ("mode", "model"),
    [("whole", context_model(symmetric=True)), ("slide", pixel_model())],
)
def test_flip_tta_with_flip_equivariant_model(mode, model):
    img = random_image(26, 35)
    cfg = dict(mode=mode, crop_size=[16, 16], stride=[10, 10], aug_ratios=[0.75, 1.0, 1.5])
    no_flip = aug_inference(model, img, (40, 30), EvalConfig(**cfg, aug_flip=False), K,
                            mean=MEAN, std=STD)
    flip = aug_inference(model, img, (40, 30), EvalConfig(**cfg, aug_flip=True), K,
                         mean=MEAN, std=STD)
    assert flip.shape == (1, K, 26, 35)
    torch.testing.assert_close(flip, no_flip, atol=1e-5, rtol=0)
    torch.testing.assert_close(flip.sum(dim=1), torch.ones(1, 26, 35))


def test_flip_tta_changes_asymmetric_model():
    model = context_model(symmetric=False)
    img = random_image(20, 24, 1)
    cfg = dict(mode="whole", aug_ratios=[1.0])
    no_flip = aug_inference(model, img, (24, 20), EvalConfig(**cfg, aug_flip=False), K,
                            mean=MEAN, std=STD)
    flip = aug_inference(model, torch.from_numpy(img), (24, 20),  # a uint8 tensor works too
                         EvalConfig(**cfg, aug_flip=True), K, mean=MEAN, std=STD)
    x = official_view(img, (24, 20))[None]  # (24, 20) bounds leave a 20x24 image as is
    with torch.no_grad():
        p = model(x).softmax(1)
        p_mirror = model(x.flip(-1)).softmax(1).flip(-1)
    torch.testing.assert_close(no_flip, p)
    torch.testing.assert_close(flip, (p + p_mirror) / 2)
    assert not torch.allclose(flip, no_flip, atol=1e-4)


def test_aug_inference_scales_and_output_size():
    model = Recorder(pixel_model())
    img = random_image(30, 40, 2)
    cfg = EvalConfig(mode="whole", aug_ratios=[0.5, 1.0], aug_flip=True)
    out = aug_inference(model, img, (80, 20), cfg, K, out_size=(15, 16), mean=MEAN, std=STD)
    # ratio 0.5: bounds (40, 10), factor 1/3 -> (10, 13); ratio 1: (80, 20), factor 2/3 -> (20, 27)
    assert model.shapes == [(2, 3, 10, 13), (2, 3, 20, 27)]
    assert out.shape == (1, K, 15, 16)

    with torch.no_grad():
        views = []
        for batch, bounds in zip(model.inputs, [(40, 10), (80, 20)], strict=True):
            # each view is the original uint8 image rescaled once (not a resampled float
            # image), and its mirror
            x = official_view(img, bounds)[None]
            assert torch.equal(batch, torch.cat([x, x.flip(-1)]))
            for flip in (False, True):
                xi = x.flip(-1) if flip else x
                p = F.interpolate(model.inner(xi), size=(15, 16), mode="bilinear").softmax(1)
                views.append(p.flip(-1) if flip else p)
    torch.testing.assert_close(out, torch.stack(views).mean(0), atol=1e-6, rtol=0)

    with pytest.raises(ValueError, match="one original image"):
        aug_inference(model, np.zeros((2, 8, 8, 3), np.uint8), (8, 8), cfg, K, mean=MEAN,
                      std=STD)
    with pytest.raises(ValueError, match="uint8"):
        aug_inference(model, torch.randn(3, 8, 8), (8, 8), cfg, K, mean=MEAN, std=STD)
