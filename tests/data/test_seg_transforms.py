"""The segmentation pipeline against the official arithmetic, written out here with direct
NumPy/OpenCV calls following mmseg 0.19 / mmcv 1.3 (which work on BGR images), equal to the
bit; plus the geometric bookkeeping (alignment, crop rule, padding, determinism)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from denseclip.config import DataConfig
from denseclip.data.transforms import (
    KeepRatioResize,
    Normalize255,
    PadTo,
    PhotoMetricDistortion,
    RandomCropCatMax,
    RandomFlip,
    RandomRescale,
    SegCompose,
    apply_seeded,
    build_test_transforms,
    build_train_transforms,
)
from denseclip.utils import keep_ratio_size
from tests.helpers.images import PALETTE, block_labels, random_image
from tests.helpers.official import OFFICIAL_MEAN, OFFICIAL_STD

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
# The official configs' img_norm_cfg (255 x the CLIP values above, as written there).


# ----------------------------------------------------------- the official code, restated
def mmcv_rescale_size(h: int, w: int, scale) -> tuple[int, int]:
    """mmcv.rescale_size for a (w, h) image and a tuple scale; returns (new_w, new_h)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)


def mmcv_imrescale(img: np.ndarray, scale, interpolation=cv2.INTER_LINEAR) -> np.ndarray:
    size = mmcv_rescale_size(img.shape[0], img.shape[1], scale)
    return cv2.resize(img, size, interpolation=interpolation)


def mmcv_imnormalize_bgr(bgr: np.ndarray) -> np.ndarray:
    """mmseg's Normalize(mean, std, to_rgb=True) with the official values: RGB float32."""
    img = bgr.copy().astype(np.float32)
    mean = np.float64(OFFICIAL_MEAN.reshape(1, -1))
    stdinv = 1 / np.float64(OFFICIAL_STD.reshape(1, -1))
    cv2.cvtColor(img, cv2.COLOR_BGR2RGB, img)
    cv2.subtract(img, mean, img)
    cv2.multiply(img, stdinv, img)
    return img


def mm_convert(img: np.ndarray, alpha=1, beta=0) -> np.ndarray:
    # NumPy keeps float32 for a float32 array and a Python float (as 1.x did for mmseg).
    img = img.astype(np.float32) * alpha + beta
    img = np.clip(img, 0, 255)
    return img.astype(np.uint8)


def mm_saturation(bgr: np.ndarray, alpha: float) -> np.ndarray:
    img = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)  # mmcv.bgr2hsv
    img[:, :, 1] = mm_convert(img[:, :, 1], alpha=alpha)
    return cv2.cvtColor(img, cv2.COLOR_HSV2BGR)  # mmcv.hsv2bgr


def mm_hue(bgr: np.ndarray, delta: int) -> np.ndarray:
    img = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    img[:, :, 0] = (img[:, :, 0].astype(int) + delta) % 180
    return cv2.cvtColor(img, cv2.COLOR_HSV2BGR)


def mm_photometric(bgr: np.ndarray, p: dict) -> np.ndarray:
    img = bgr
    if p["brightness"] is not None:
        img = mm_convert(img, beta=p["brightness"])
    if p["contrast_first"] and p["contrast"] is not None:  # mode == 1
        img = mm_convert(img, alpha=p["contrast"])
    if p["saturation"] is not None:
        img = mm_saturation(img, p["saturation"])
    if p["hue"] is not None:
        img = mm_hue(img, p["hue"])
    if not p["contrast_first"] and p["contrast"] is not None:  # mode == 0
        img = mm_convert(img, alpha=p["contrast"])
    return img


def coin() -> bool:  # numpy.random.randint(2), from torch's generator
    return bool(torch.rand(()) < 0.5)


def uniform(low: float, high: float) -> float:  # numpy.random.uniform
    return low + (high - low) * float(torch.rand(()))


def draw_photometric() -> dict:
    """PhotoMetricDistortion.__call__'s draws, in mmseg's order."""
    p = {"brightness": None, "contrast": None, "saturation": None, "hue": None}
    if coin():
        p["brightness"] = uniform(-32, 32)
    p["contrast_first"] = coin()
    if p["contrast_first"] and coin():
        p["contrast"] = uniform(0.5, 1.5)
    if coin():
        p["saturation"] = uniform(0.5, 1.5)
    if coin():
        p["hue"] = int(torch.randint(-18, 18, ()))
    if not p["contrast_first"] and coin():
        p["contrast"] = uniform(0.5, 1.5)
    return p


def mm_crop_bbox(shape, crop) -> tuple[int, int, int, int]:
    margin_h = max(shape[0] - crop[0], 0)
    margin_w = max(shape[1] - crop[1], 0)
    offset_h = int(torch.randint(0, margin_h + 1, ()))
    offset_w = int(torch.randint(0, margin_w + 1, ()))
    return offset_h, offset_h + crop[0], offset_w, offset_w + crop[1]


def mm_random_crop(img, seg, crop, cat_max_ratio, ignore_index=255):
    """mmseg's RandomCrop.__call__ (the draws from torch)."""
    bbox = mm_crop_bbox(img.shape, crop)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = bbox
            labels, cnt = np.unique(seg[y1:y2, x1:x2], return_counts=True)
            cnt = cnt[labels != ignore_index]
            if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio:
                break
            bbox = mm_crop_bbox(img.shape, crop)
    y1, y2, x1, x2 = bbox
    return img[y1:y2, x1:x2, ...], seg[y1:y2, x1:x2]


def mm_train_pipeline(rgb: np.ndarray, seg: np.ndarray, cfg: DataConfig, seed: int):
    """The official training pipeline (Resize, RandomCrop, RandomFlip,
    PhotoMetricDistortion, Normalize, Pad) on the BGR image, drawing from torch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        img = np.ascontiguousarray(rgb[:, :, ::-1])  # LoadImageFromFile gives BGR
        min_ratio, max_ratio = cfg.ratio_range
        ratio = float(torch.rand(())) * (max_ratio - min_ratio) + min_ratio
        scale = int(cfg.scale[0] * ratio), int(cfg.scale[1] * ratio)
        img = mmcv_imrescale(img, scale)
        seg = mmcv_imrescale(seg, scale, cv2.INTER_NEAREST)
        img, seg = mm_random_crop(img, seg, tuple(cfg.crop_size), cfg.cat_max_ratio)
        if float(torch.rand(1)) < cfg.flip_prob:
            img = np.flip(img, axis=1)
            seg = np.flip(seg, axis=1).copy()
        if cfg.photometric:
            img = mm_photometric(img, draw_photometric())
        img = mmcv_imnormalize_bgr(img)
        h, w = img.shape[:2]
        ch, cw = cfg.crop_size
        img = cv2.copyMakeBorder(img, 0, ch - h, 0, cw - w, cv2.BORDER_CONSTANT, value=0)
        seg = cv2.copyMakeBorder(seg, 0, ch - h, 0, cw - w, cv2.BORDER_CONSTANT, value=255)
    return img, seg


def as_hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


def rand_pair(rng: np.random.Generator, h: int, w: int, classes: int = 6):
    img = random_image(h, w, int(rng.integers(1 << 30)))
    img = cv2.GaussianBlur(img, (5, 5), 1.5)  # smooth-ish, so resampling matters
    seg = block_labels(rng, (h, w), list(range(classes)) + [255], block=7)
    return img, seg


# --------------------------------------------------------------------------- rescale
@pytest.mark.parametrize(
    ("hw", "scale", "expected"),
    [
        ((512, 683), (2048, 512), (512, 683)),  # short side bound: factor 1
        ((100, 200), (2048, 512), (512, 1024)),  # factor min(10.24, 5.12)
        ((100, 2000), (2048, 512), (102, 2048)),  # long side bound: factor 1.024
        ((300, 200), (512, 2048), (768, 512)),  # the pair may come in either order
    ],
)
def test_rescale_size_follows_keep_ratio_rule(hw, scale, expected):
    assert keep_ratio_size(*hw, scale) == expected


def test_train_rescale_equals_opencv_on_uint8():
    rng = np.random.default_rng(0)
    for trial in range(40):
        h, w = (int(v) for v in rng.integers(5, 160, 2))
        img, seg = rand_pair(rng, h, w)
        scale = (int(rng.integers(40, 400)), int(rng.integers(20, 200)))
        ratio_range = (0.5, 2.0)
        torch.manual_seed(trial)
        out = RandomRescale(scale, ratio_range)({"image": img, "target": seg})
        torch.manual_seed(trial)
        ratio = float(torch.rand(())) * 1.5 + 0.5
        bounds = int(scale[0] * ratio), int(scale[1] * ratio)
        assert out["image"].dtype == np.uint8 and out["target"].dtype == np.uint8
        np.testing.assert_array_equal(out["image"], mmcv_imrescale(img, bounds))
        np.testing.assert_array_equal(out["target"],
                                      mmcv_imrescale(seg, bounds, cv2.INTER_NEAREST))


def test_random_rescale_ratio_range_and_nearest_mask():
    label = np.kron(np.array([[1, 2], [3, 4]]), np.ones((10, 15), np.int64)).astype(np.uint8)
    sample = {"image": PALETTE[label], "target": label}  # 20x30
    sizes = set()
    for seed in range(30):
        torch.manual_seed(seed)
        out = RandomRescale((60, 40), (0.5, 2.0))(sample)
        h, w = out["image"].shape[:2]
        assert out["target"].shape == (h, w)
        # Factor = min(60r/30, 40r/20) = 2r in [1, 4]; aspect ratio kept.
        assert 20 <= h <= 80 and abs(w / h - 1.5) < 0.06
        assert set(np.unique(out["target"]).tolist()) == {1, 2, 3, 4}  # nearest: no new values
        sizes.add(h)
    assert len(sizes) > 10
    out = KeepRatioResize((60, 40))(sample)
    assert out["image"].shape[:2] == (40, 60)
    np.testing.assert_array_equal(out["target"][::2, ::2], label)


def test_test_rescale_and_pipeline_equal_the_official_ones():
    rng = np.random.default_rng(1)
    for _ in range(25):
        h, w = (int(v) for v in rng.integers(5, 300, 2))
        scale = [int(rng.integers(30, 500)), int(rng.integers(30, 500))]
        img, seg = rand_pair(rng, h, w)
        out = KeepRatioResize(scale)({"image": img, "target": seg})
        np.testing.assert_array_equal(out["image"], mmcv_imrescale(img, tuple(scale)))
        np.testing.assert_array_equal(out["target"],
                                      mmcv_imrescale(seg, tuple(scale), cv2.INTER_NEAREST))
        # The whole test pipeline: a bare uint8 array in, the normalised tensor out.
        tensor = build_test_transforms(DataConfig(test_scale=scale))(img)
        assert tensor.dtype == torch.float32 and tensor.is_contiguous()
        expected = mmcv_imnormalize_bgr(mmcv_imrescale(img[:, :, ::-1], tuple(scale)))
        np.testing.assert_array_equal(as_hwc(tensor), expected)


def test_keep_ratio_resize_still_transforms_tv_tensors():
    # The detection pipeline (DetectionResize) builds on the v2 side of KeepRatioResize.
    image = tv_tensors.Image(torch.from_numpy(random_image(20, 30)).permute(2, 0, 1))
    mask = tv_tensors.Mask(torch.zeros(20, 30, dtype=torch.int64))
    out = KeepRatioResize((60, 40))({"image": image, "target": mask})
    assert isinstance(out["image"], tv_tensors.Image) and out["image"].shape == (3, 40, 60)
    assert isinstance(out["target"], tv_tensors.Mask) and out["target"].shape == (40, 60)


# --------------------------------------------------------------------------- normalise
def test_normalise_equals_mmcv_imnormalize_to_the_bit():
    a, b = np.meshgrid(np.arange(256), np.arange(256))
    every = np.stack([a, b[::-1], (a + 7 * b) % 256], -1).astype(np.uint8)  # all levels
    norm = Normalize255(MEAN, STD)
    np.testing.assert_array_equal(norm.normalize(every),
                                  mmcv_imnormalize_bgr(every[:, :, ::-1]))
    odd = random_image(37, 101, 3)  # widths off the SIMD lanes
    out = norm({"image": odd, "target": None})["image"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, mmcv_imnormalize_bgr(odd[:, :, ::-1]))
    for c in range(3):  # and it is the usual formula, up to float32 rounding
        expected = (odd[:, :, c] - 255 * MEAN[c]) / (255 * STD[c])
        np.testing.assert_allclose(out[:, :, c], expected, atol=1e-5)


# --------------------------------------------------------------------------- photometric
def test_opencv_hsv_of_rgb_equals_mmcv_bgr2hsv_of_bgr():
    codes = np.arange(1 << 24, dtype=np.uint32)  # every 24-bit colour
    rgb = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], -1).astype(np.uint8)
    rgb = rgb.reshape(4096, 4096, 3)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    np.testing.assert_array_equal(hsv, cv2.cvtColor(rgb[:, :, ::-1].copy(), cv2.COLOR_BGR2HSV))
    assert hsv[:, :, 0].max() == 179
    # and back, for HSV triples as the distortion leaves them (hue 0..179, any S and V)
    rand = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    rand[:, :, 0] %= 180
    np.testing.assert_array_equal(cv2.cvtColor(rand, cv2.COLOR_HSV2RGB),
                                  cv2.cvtColor(rand, cv2.COLOR_HSV2BGR)[:, :, ::-1])


@pytest.mark.parametrize("step", ["brightness", "contrast_first", "contrast_last",
                                  "saturation", "hue"])
def test_each_photometric_step_equals_mmseg(step):
    rng = np.random.default_rng(hash(step) % 1000)
    t = PhotoMetricDistortion()
    none = {"brightness": None, "contrast": None, "saturation": None, "hue": None,
            "contrast_first": True}
    values = {
        "brightness": [-32.0, 32.0, -0.4999, 0.5, *rng.uniform(-32, 32, 30).tolist()],
        "contrast_first": [0.5, 1.5, *rng.uniform(0.5, 1.5, 30).tolist()],
        "contrast_last": [0.5, 1.5, *rng.uniform(0.5, 1.5, 30).tolist()],
        "saturation": [0.5, 1.5, *rng.uniform(0.5, 1.5, 30).tolist()],
        "hue": list(range(-18, 18)),
    }[step]
    for i, value in enumerate(values):
        h, w = (int(v) for v in rng.integers(3, 70, 2))
        img = random_image(h, w, i) if i % 2 else rand_pair(rng, h, w)[0]
        if step == "contrast_first":
            p = {**none, "contrast": value}
        elif step == "contrast_last":
            p = {**none, "contrast": value, "contrast_first": False}
        else:
            p = {**none, step: value}
        out = t.apply(img, p)
        assert out.dtype == np.uint8 and out.shape == img.shape
        np.testing.assert_array_equal(out, mm_photometric(img[:, :, ::-1], p)[:, :, ::-1],
                                      err_msg=f"{step}={value}")


def test_composed_photometric_distortion_equals_mmseg():
    rng = np.random.default_rng(5)
    t = PhotoMetricDistortion()
    for seed in range(120):
        h, w = (int(v) for v in rng.integers(3, 60, 2))
        img = random_image(h, w, seed)
        torch.manual_seed(seed)
        out = t({"image": img, "target": None})["image"]
        torch.manual_seed(seed)
        p = draw_photometric()
        np.testing.assert_array_equal(out, mm_photometric(img[:, :, ::-1], p)[:, :, ::-1],
                                      err_msg=f"seed {seed}: {p}")


def test_photometric_distortion_ranges_and_determinism():
    t = PhotoMetricDistortion()
    applied = {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}
    hues = set()
    for seed in range(200):
        torch.manual_seed(seed)
        p = t.params()
        for key in applied:
            applied[key] += p[key] is not None
        if p["brightness"] is not None:
            assert -32 <= p["brightness"] <= 32
        if p["contrast"] is not None:
            assert 0.5 <= p["contrast"] <= 1.5
        if p["saturation"] is not None:
            assert 0.5 <= p["saturation"] <= 1.5
        if p["hue"] is not None:
            hues.add(p["hue"])
    for key, count in applied.items():
        assert 70 <= count <= 130, (key, count)
    assert hues <= set(range(-18, 18)) and len(hues) > 25  # randint(-18, 18): 18 excluded

    image = random_image(16, 16)
    mask = np.random.default_rng(0).integers(0, 5, (16, 16)).astype(np.uint8)
    torch.manual_seed(7)
    a = t({"image": image, "target": mask})
    torch.manual_seed(7)
    b = t({"image": image, "target": mask})
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["target"] is mask and a["image"].dtype == np.uint8


def test_photometric_steps_truncate_to_uint8():
    t = PhotoMetricDistortion()
    base = {"brightness": None, "contrast": None, "saturation": None, "hue": None,
            "contrast_first": True}
    img = np.array([[[0, 1, 100], [200, 254, 255]]], dtype=np.uint8)
    np.testing.assert_array_equal(t.apply(img, base), img)
    # truncation, not rounding: 100 + 0.9 -> 100, 1 - 0.9 -> 0; clipped at 255
    np.testing.assert_array_equal(t.apply(img, {**base, "brightness": 0.9}),
                                  [[[0, 1, 100], [200, 254, 255]]])
    np.testing.assert_array_equal(t.apply(img, {**base, "brightness": -0.9}),
                                  [[[0, 0, 99], [199, 253, 254]]])
    np.testing.assert_array_equal(t.apply(img, {**base, "contrast": 1.5}),
                                  [[[0, 1, 150], [255, 255, 255]]])
    grey = t.apply(random_image(8, 8), {**base, "saturation": 0.0})
    assert (grey[:, :, 0] == grey[:, :, 1]).all() and (grey[:, :, 1] == grey[:, :, 2]).all()


# --------------------------------------------------------------------------- crop and flip
def test_crop_draws_as_mmseg_random_crop():
    rng = np.random.default_rng(2)
    for seed in range(60):
        h, w = (int(v) for v in rng.integers(8, 90, 2))
        img, seg = rand_pair(rng, h, w, classes=3)
        seg[: h // 2] = 1  # a dominated half, so some boxes fail the check
        crop = (int(rng.integers(5, 40)), int(rng.integers(5, 40)))
        ratio = [0.6, 0.75, 1.0][seed % 3]
        torch.manual_seed(seed)
        out = RandomCropCatMax(crop, cat_max_ratio=ratio)({"image": img, "target": seg})
        after = torch.rand(())
        torch.manual_seed(seed)
        exp_img, exp_seg = mm_random_crop(img, seg, crop, ratio)
        np.testing.assert_array_equal(out["image"], exp_img)
        np.testing.assert_array_equal(out["target"], exp_seg)
        assert torch.equal(torch.rand(()), after)  # the same number of draws


def test_crop_takes_an_unchecked_eleventh_box_when_ten_fail():
    img = random_image(50, 50)
    seg = np.ones((50, 50), np.uint8)  # one class everywhere: no crop can pass
    crop = RandomCropCatMax((10, 10), cat_max_ratio=0.75)
    torch.manual_seed(3)
    boxes = [(int(torch.randint(0, 41, ())), int(torch.randint(0, 41, ()))) for _ in range(12)]
    torch.manual_seed(3)
    out = crop({"image": img, "target": seg})
    top, left = boxes[10]  # the 11th box
    np.testing.assert_array_equal(out["image"], img[top:top + 10, left:left + 10])
    assert (int(torch.randint(0, 41, ())), int(torch.randint(0, 41, ()))) == boxes[11]


def _ratio_ok(target: np.ndarray, ratio: float = 0.75) -> bool:
    vals = target[target != 255]
    if vals.size == 0:
        return False
    counts = np.bincount(vals)
    counts = counts[counts > 0]
    return counts.size > 1 and counts.max() / counts.sum() < ratio


def _decode_raw(image: np.ndarray) -> np.ndarray:
    dist = ((image[:, :, None, :].astype(int) - PALETTE.astype(int)) ** 2).sum(-1)
    return dist.argmin(-1)


def test_cat_max_ratio_rejects_dominated_crops():
    # Class 0 on the left half, 4-pixel stripes of classes 0/1 on the right half: only
    # 20x20 crops reaching far enough right pass the 0.75 test.
    label = np.zeros((40, 100), np.uint8)
    label[:, 50:] = (np.arange(50) // 4 % 2)[None, :]
    sample = {"image": PALETTE[label], "target": label}
    checked = RandomCropCatMax((20, 20), cat_max_ratio=0.75)
    unchecked = RandomCropCatMax((20, 20), cat_max_ratio=1.0)
    passed_checked = passed_unchecked = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out = checked(sample)
        assert out["image"].shape == (20, 20, 3)
        passed_checked += _ratio_ok(out["target"])
        torch.manual_seed(seed)
        passed_unchecked += _ratio_ok(unchecked(sample)["target"])
        # Image and mask are cut at the same place.
        np.testing.assert_array_equal(_decode_raw(out["image"]), out["target"])
    assert passed_checked >= 39
    assert passed_unchecked <= 25


def test_cat_max_ratio_counts_labelled_pixels_only():
    label = np.full((30, 30), 255, np.uint8)
    label[:, :5] = 2
    label[:, 5:8] = 3  # among labelled pixels 2 covers 5/8 < 0.75 wherever both appear
    torch.manual_seed(0)
    out = RandomCropCatMax((30, 30), cat_max_ratio=0.75)({"image": PALETTE[label % 8],
                                                          "target": label})
    assert _ratio_ok(out["target"])  # ignore pixels do not count towards the ratio


def test_flip_moves_image_and_mask_together_with_v2s_draw():
    label = block_labels(np.random.default_rng(2), (16, 24), list(range(8)), block=4)
    sample = {"image": PALETTE[label], "target": label}
    out = RandomFlip(1.0)(sample)
    np.testing.assert_array_equal(out["target"], label[:, ::-1])
    np.testing.assert_array_equal(out["image"], sample["image"][:, ::-1])
    assert RandomFlip(0.0)(sample) is sample
    tv = {"target": tv_tensors.Mask(torch.from_numpy(label.astype(np.int64)))}
    for seed in range(20):  # the same draw as torchvision's RandomHorizontalFlip
        torch.manual_seed(seed)
        ours = RandomFlip(0.5)(sample)["target"]
        torch.manual_seed(seed)
        theirs = v2.RandomHorizontalFlip(0.5)(tv)["target"].numpy()
        np.testing.assert_array_equal(ours, theirs)


# --------------------------------------------------------------------------- pipelines
def test_train_pipeline_equals_the_official_pipeline():
    cfg = DataConfig(scale=[160, 48], crop_size=[40, 56], cat_max_ratio=0.75)
    pipeline = build_train_transforms(cfg)
    rng = np.random.default_rng(4)
    for seed in range(40):
        h, w = (int(v) for v in rng.integers(20, 120, 2))
        img, seg = rand_pair(rng, h, w, classes=4)
        out = apply_seeded(pipeline, {"image": img, "target": seg}, seed)
        exp_img, exp_seg = mm_train_pipeline(img, seg, cfg, seed)
        assert out["image"].shape == (3, 40, 56) and out["image"].dtype == torch.float32
        assert out["target"].dtype == torch.int64
        np.testing.assert_array_equal(as_hwc(out["image"]), exp_img, err_msg=f"seed {seed}")
        np.testing.assert_array_equal(out["target"].numpy(), exp_seg)


def test_train_pipeline_keeps_image_and_mask_aligned():
    cfg = DataConfig(scale=[96, 48], crop_size=[40, 40], photometric=False, cat_max_ratio=0.75)
    pipeline = build_train_transforms(cfg)
    rng = np.random.default_rng(1)
    flipped_any = False
    palette = torch.from_numpy(PALETTE).float()
    for seed in range(12):
        label = block_labels(rng, (60, 80), list(range(8)), block=10)
        torch.manual_seed(seed)
        out = pipeline({"image": PALETTE[label], "target": label})
        image, target = out["image"], out["target"]
        assert image.shape == (3, 40, 40) and target.shape == (40, 40)
        assert isinstance(target, torch.Tensor) and target.dtype == torch.int64
        # Pixels whose 3x3 neighbourhood has one label: bilinear and nearest sampling
        # read the same source block there, so the colour must decode to the label.
        # (Border pixels have unknown neighbours outside the crop: never interior.)
        padded = torch.nn.functional.pad(target[None, None].float(), (1, 1, 1, 1), value=-1.0)
        windows = torch.nn.functional.unfold(padded, 3).view(9, 40, 40)
        interior = (windows == target.float()).all(0) & (target != 255)
        assert interior.sum() > 200
        pixels = image * (255 * torch.tensor(STD)[:, None, None]) + \
            255 * torch.tensor(MEAN)[:, None, None]
        dist = ((pixels.permute(1, 2, 0)[:, :, None, :] - palette) ** 2).sum(-1)
        decoded = dist.argmin(-1)
        assert torch.equal(decoded[interior], target[interior]), f"seed {seed}"
        # A mirrored reading of the same image does not match: the check can fail.
        mirrored = decoded.flip(-1)[interior] == target[interior]
        flipped_any |= bool(mirrored.float().mean() < 0.9)
    assert flipped_any


def test_pad_fills_image_with_zero_and_mask_with_ignore():
    cfg = DataConfig(scale=[32, 16], ratio_range=[1.0, 1.0], crop_size=[40, 50],
                     photometric=False, flip_prob=0.0)
    label = np.ones((16, 24), np.uint8)
    out = build_train_transforms(cfg)({"image": PALETTE[label], "target": label})
    image, target = out["image"], out["target"]  # 16x24 stays 16x24, padded to 40x50
    assert image.shape == (3, 40, 50) and target.shape == (40, 50)
    assert (target[:16, :24] == 1).all()
    assert (target[16:] == 255).all() and (target[:, 24:] == 255).all()
    assert (image[:, 16:] == 0).all() and (image[:, :, 24:] == 0).all()
    assert (image[:, :16, :24] != 0).all()
    direct = PadTo((20, 20))({"image": random_image(25, 10), "target": np.full((25, 10), 3,
                                                                              np.uint8)})
    assert direct["target"].shape == (25, 20) and (direct["target"][:, 10:] == 255).all()
    assert direct["image"].shape == (25, 20, 3) and (direct["image"][:, 10:] == 0).all()


def test_test_pipeline_is_deterministic_resize_and_normalise():
    cfg = DataConfig(test_scale=[64, 32])
    pipeline = build_test_transforms(cfg)
    label = block_labels(np.random.default_rng(3), (48, 64), list(range(8)))
    sample = {"image": PALETTE[label], "target": label}
    a, b = pipeline(sample), pipeline(sample)
    assert a["image"].shape == (3, 32, 43) and a["target"].shape == (32, 43)
    assert torch.equal(a["image"], b["image"])


def test_pipeline_refuses_float_images():
    with pytest.raises(TypeError, match="uint8"):
        build_test_transforms(DataConfig())(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(TypeError, match="label map"):
        SegCompose([])({"image": random_image(4, 4), "target": np.zeros((4, 4), np.int64)})
