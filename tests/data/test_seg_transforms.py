from __future__ import annotations

import colorsys

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
    RandomRescale,
    build_test_transforms,
    build_train_transforms,
    hsv_to_rgb,
    rgb_to_hsv,
)
from denseclip.utils import keep_ratio_size
from tests.helpers.images import PALETTE, block_labels

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]




def _sample(label: np.ndarray) -> dict:
    image = torch.from_numpy(PALETTE[label]).permute(2, 0, 1).float()
    return {
        "image": tv_tensors.Image(image),
        "target": tv_tensors.Mask(torch.from_numpy(label.astype(np.int64))),
    }


def _decode(image: torch.Tensor) -> torch.Tensor:
    """Nearest palette entry per pixel of a normalised image (H×W indices)."""
    pixels = image * (255 * torch.tensor(STD)[:, None, None]) + 255 * torch.tensor(MEAN)[:, None,
                                                                                          None]
    palette = torch.from_numpy(PALETTE).float()
    dist = ((pixels.permute(1, 2, 0)[:, :, None, :] - palette) ** 2).sum(-1)
    return dist.argmin(-1)


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


def test_random_rescale_ratio_range_and_nearest_mask():
    label = np.kron(np.array([[1, 2], [3, 4]]), np.ones((10, 15), np.int64)).astype(np.uint8)
    sample = _sample(label)  # 20x30
    sizes = set()
    for seed in range(30):
        torch.manual_seed(seed)
        out = RandomRescale((60, 40), (0.5, 2.0))(sample)
        h, w = out["image"].shape[-2:]
        assert out["target"].shape == (h, w)
        # Factor = min(60r/30, 40r/20) = 2r in [1, 4]; aspect ratio kept.
        assert 20 <= h <= 80 and abs(w / h - 1.5) < 0.06
        assert set(out["target"].unique().tolist()) == {1, 2, 3, 4}  # nearest: no new values
        sizes.add(h)
    assert len(sizes) > 10
    out = KeepRatioResize((60, 40))(sample)
    assert out["image"].shape[-2:] == (40, 60)
    assert torch.equal(out["target"][::2, ::2], sample["target"])


def test_train_pipeline_keeps_image_and_mask_aligned():
    cfg = DataConfig(scale=[96, 48], crop_size=[40, 40], photometric=False, cat_max_ratio=0.75)
    pipeline = build_train_transforms(cfg)
    rng = np.random.default_rng(1)
    flipped_any = False
    for seed in range(12):
        label = block_labels(rng, (60, 80), list(range(8)), block=10)
        sample = _sample(label)
        torch.manual_seed(seed)
        out = pipeline(sample)
        image, target = out["image"], out["target"]
        assert image.shape == (3, 40, 40) and target.shape == (40, 40)
        assert isinstance(target, tv_tensors.Mask) and target.dtype == torch.int64
        # Pixels whose 3x3 neighbourhood has one label: bilinear and nearest sampling
        # read the same source block there, so the colour must decode to the label.
        # (Border pixels have unknown neighbours outside the crop: never interior.)
        padded = torch.nn.functional.pad(target[None, None].float(), (1, 1, 1, 1), value=-1.0)
        windows = torch.nn.functional.unfold(padded, 3).view(9, 40, 40)
        interior = (windows == target.float()).all(0) & (target != 255)
        assert interior.sum() > 200
        decoded = _decode(image)
        assert torch.equal(decoded[interior], target[interior]), f"seed {seed}"
        # A mirrored reading of the same image does not match: the check can fail.
        mirrored = decoded.flip(-1)[interior] == target[interior]
        flipped_any |= bool(mirrored.float().mean() < 0.9)
    assert flipped_any


def test_flip_moves_image_and_mask_together():
    label = block_labels(np.random.default_rng(2), (16, 24), list(range(8)), block=4)
    sample = _sample(label)
    out = v2.RandomHorizontalFlip(1.0)(sample)
    assert torch.equal(out["target"], sample["target"].flip(-1))
    assert torch.equal(out["image"], sample["image"].flip(-1))


def _ratio_ok(target: torch.Tensor, ratio: float = 0.75) -> bool:
    vals = target[target != 255]
    if vals.numel() == 0:
        return False
    counts = torch.bincount(vals)
    counts = counts[counts > 0]
    return counts.numel() > 1 and counts.max().item() / counts.sum().item() < ratio


def test_cat_max_ratio_rejects_dominated_crops():
    # Class 0 on the left half, 4-pixel stripes of classes 0/1 on the right half: only
    # 20x20 crops reaching far enough right pass the 0.75 test.
    label = np.zeros((40, 100), np.uint8)
    label[:, 50:] = (np.arange(50) // 4 % 2)[None, :]
    sample = _sample(label)
    checked = RandomCropCatMax((20, 20), cat_max_ratio=0.75)
    unchecked = RandomCropCatMax((20, 20), cat_max_ratio=1.0)
    passed_checked = passed_unchecked = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out = checked(sample)
        assert out["image"].shape == (3, 20, 20)
        passed_checked += _ratio_ok(out["target"])
        torch.manual_seed(seed)
        passed_unchecked += _ratio_ok(unchecked(sample)["target"])
        # Image and mask are cut at the same place.
        assert torch.equal(_decode_raw(out["image"]), out["target"])
    assert passed_checked >= 39
    assert passed_unchecked <= 25


def _decode_raw(image: torch.Tensor) -> torch.Tensor:
    palette = torch.from_numpy(PALETTE).float()
    dist = ((image.permute(1, 2, 0)[:, :, None, :] - palette) ** 2).sum(-1)
    return dist.argmin(-1)


def test_cat_max_ratio_counts_labelled_pixels_only_and_gives_up_after_tries():
    label = np.full((30, 30), 255, np.uint8)
    label[:, :5] = 2
    label[:, 5:8] = 3  # among labelled pixels 2 covers 5/8 < 0.75 wherever both appear
    sample = _sample(label % 8)
    sample["target"] = tv_tensors.Mask(torch.from_numpy(label.astype(np.int64)))
    torch.manual_seed(0)
    out = RandomCropCatMax((30, 30), cat_max_ratio=0.75)(sample)
    assert _ratio_ok(out["target"])  # ignore pixels do not count towards the ratio

    single = _sample(np.ones((50, 50), np.uint8))  # no crop can pass
    calls = []
    crop = RandomCropCatMax((10, 10), cat_max_ratio=0.75)
    original = crop._random_box

    def counting(h, w):
        calls.append(1)
        return original(h, w)

    crop._random_box = counting
    out = crop(single)
    assert out["target"].shape == (10, 10) and len(calls) == 10


def test_pad_fills_image_with_zero_and_mask_with_ignore():
    cfg = DataConfig(scale=[32, 16], ratio_range=[1.0, 1.0], crop_size=[40, 50],
                     photometric=False, flip_prob=0.0)
    label = np.ones((16, 24), np.uint8)
    out = build_train_transforms(cfg)(_sample(label))  # 16x24 stays 16x24, padded to 40x50
    image, target = out["image"], out["target"]
    assert image.shape == (3, 40, 50) and target.shape == (40, 50)
    assert (target[:16, :24] == 1).all()
    assert (target[16:] == 255).all() and (target[:, 24:] == 255).all()
    assert (image[:, 16:] == 0).all() and (image[:, :, 24:] == 0).all()
    assert (image[:, :16, :24] != 0).all()
    direct = PadTo((20, 20))(_sample(np.full((25, 10), 3, np.uint8)))
    assert direct["target"].shape == (25, 20) and (direct["target"][:, 10:] == 255).all()


def test_normalise_uses_255_scaled_mean_and_std():
    image = tv_tensors.Image(torch.rand(3, 4, 5) * 255)
    out = Normalize255(MEAN, STD)(image)
    for c in range(3):
        expected = (image[c] - 255 * MEAN[c]) / (255 * STD[c])
        assert torch.allclose(out[c], expected, atol=1e-5)


def test_hsv_conversion_matches_colorsys_and_round_trips():
    rgb = torch.rand(3, 8, 8) * 255
    rgb[:, 0, 0] = torch.tensor([50.0, 50.0, 50.0])  # grey: hue and saturation 0
    rgb[:, 0, 1] = 0.0
    hsv = rgb_to_hsv(rgb)
    for y, x in [(0, 0), (0, 1), (3, 4), (7, 7), (5, 2)]:
        h, s, v = colorsys.rgb_to_hsv(*(rgb[:, y, x] / 255).tolist())
        assert hsv[0, y, x].item() == pytest.approx(h * 180, abs=1e-3)
        assert hsv[1, y, x].item() == pytest.approx(s * 255, abs=1e-3)
        assert hsv[2, y, x].item() == pytest.approx(v * 255, abs=1e-3)
    assert torch.allclose(hsv_to_rgb(hsv), rgb, atol=1e-3)


def test_photometric_distortion_ranges_and_determinism():
    image = tv_tensors.Image(torch.rand(3, 16, 16) * 255)
    mask = tv_tensors.Mask(torch.randint(0, 5, (16, 16)))
    t = PhotoMetricDistortion()
    applied = {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}
    hues = set()
    for seed in range(200):
        torch.manual_seed(seed)
        p = t.make_params([image])
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
    assert hues <= set(range(-18, 18)) and len(hues) > 25

    torch.manual_seed(7)
    a = t({"image": image, "target": mask})
    torch.manual_seed(7)
    b = t({"image": image, "target": mask})
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], mask)
    assert a["image"].min() >= 0 and a["image"].max() <= 255
    assert isinstance(a["image"], tv_tensors.Image)


def test_photometric_steps_have_their_effect():
    image = torch.rand(3, 8, 8) * 200 + 20
    t = PhotoMetricDistortion()
    base = {"brightness": None, "contrast": None, "saturation": None, "hue": None,
            "contrast_first": True}
    img = tv_tensors.Image(image)
    assert torch.allclose(t.transform(img, base), image, atol=1e-3)
    out = t.transform(img, {**base, "brightness": 300.0})
    assert torch.equal(out, torch.full_like(image, 255.0))  # clipped
    out = t.transform(img, {**base, "contrast": 0.5, "contrast_first": False})
    assert torch.allclose(out, image * 0.5, atol=1e-4)
    out = t.transform(img, {**base, "saturation": 0.0})
    assert torch.allclose(out[0], out[1], atol=1e-3) and torch.allclose(out[1], out[2], atol=1e-3)
    out = t.transform(img, {**base, "hue": 10})
    shift = (rgb_to_hsv(out)[0] - rgb_to_hsv(image)[0]) % 180
    assert torch.allclose(shift, torch.full_like(shift, 10.0), atol=1e-2)


def test_test_pipeline_is_deterministic_resize_and_normalise():
    cfg = DataConfig(test_scale=[64, 32])
    pipeline = build_test_transforms(cfg)
    sample = _sample(block_labels(np.random.default_rng(3), (48, 64), list(range(8))))
    a, b = pipeline(sample), pipeline(sample)
    assert a["image"].shape == (3, 32, 43) and a["target"].shape == (32, 43)
    assert torch.equal(a["image"], b["image"])
