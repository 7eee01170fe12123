"""Pixel parity of the data pipelines with the official code (mmcv 1.3.17, mmseg 0.19.0).

    PYTHONPATH=REF/deps:REF/mmcv-1.3.17:REF/mmseg python benchmarks/official_parity.py

The official packages no longer install with current PyTorch, but their pure-Python parts
import from their source trees: REF/mmcv-1.3.17 is the unpacked mmcv 1.3.17 sdist (no
compiled ops needed), REF/mmseg the unpacked mmsegmentation 0.19.0 wheel, and REF/deps holds
their small dependencies (``pip install --target REF/deps addict yapf prettytable``).

On random JPEGs of ADE20K-like and random sizes the script runs the official transforms
and ours and prints, per check, how many arrays were compared and the fraction of values
that are bit-identical (1.0 = every value of every array), plus the largest difference:

* decoding (``LoadImageFromFile``), single-scale test input (``MultiScaleFlipAug`` with
  ``Resize``, ``RandomFlip``, ``Normalize``, ``ImageToTensor``), multi-scale + flip views;
* training steps with the same random parameters: ``Resize`` (ratio), ``RandomCrop``
  (offsets), ``PhotoMetricDistortion`` (every draw), fed by a stub of NumPy's generator;
* the detection test input: ``mmcv.imrescale`` to (1333, 800), ``mmcv.imnormalize`` and
  ``mmcv.impad_to_multiple`` against our predictor's resize plus the detector's own
  normalise-and-pad (expected to differ by float32 rounding only: it normalises ``x/255``).
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import cv2
import mmcv
import numpy as np
import torch
from mmseg.datasets.pipelines import (
    LoadImageFromFile,
    MultiScaleFlipAug,
    PhotoMetricDistortion,
    RandomCrop,
    Resize,
)
from mmseg.datasets.pipelines import transforms as mmseg_transforms

import denseclip
from denseclip.data.io import load_image
from denseclip.data.transforms import (
    PhotoMetricDistortion as OurDistortion,
)
from denseclip.data.transforms import (
    RandomCropCatMax,
    RandomRescale,
    build_test_transforms,
)
from denseclip.models.seg_inference import aug_views

MEAN = [0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255]
STD = [0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255]
RATIOS = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]


class Draws:
    """Stands in for ``numpy.random`` inside mmseg's transforms: returns planned values."""

    def __init__(self, values):
        self.values = list(values)

    def _next(self, *args, **kwargs):
        return self.values.pop(0)

    randint = uniform = random_sample = rand = _next


class Tally:
    def __init__(self) -> None:
        self.rows: dict[str, list[float]] = {}

    def add(self, name: str, ours, ref) -> None:
        ours, ref = np.asarray(ours), np.asarray(ref)
        assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
        row = self.rows.setdefault(name, [0, 0, 0, 0.0])
        row[0] += 1
        row[1] += int((ours == ref).sum())
        row[2] += ours.size
        row[3] = max(row[3], float(np.abs(ours.astype(np.float64) - ref).max()))

    def print(self) -> None:
        print(f"{'check':44s} {'arrays':>6s} {'identical':>10s} {'max diff':>10s}")
        for name, (n, same, total, diff) in self.rows.items():
            print(f"{name:44s} {n:6d} {same / total:10.6f} {diff:10.3g}")


def write_jpeg(path: Path, h: int, w: int, rng: np.random.Generator) -> None:
    """A smooth image with texture, so resizing has something to round."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                     ((xx + yy) * 7) % 256], -1).astype(np.float64)
    noise = rng.normal(0, 25, (h, w, 3))
    image = np.clip(base + noise, 0, 255).astype(np.uint8)
    cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])


def official_load(path: Path) -> dict:
    return LoadImageFromFile()({"img_prefix": None, "img_info": {"filename": str(path)}})


def check_segmentation(path: Path, rng: np.random.Generator, tally: Tally) -> None:
    cfg = denseclip.load_config("denseclip_fpn_res50_512x512_80k")
    ref = official_load(path)
    ours_rgb = load_image(path)
    tally.add("decode (LoadImageFromFile)", ours_rgb, ref["img"][:, :, ::-1])

    single = MultiScaleFlipAug(
        transforms=[dict(type="Resize", keep_ratio=True), dict(type="RandomFlip"),
                    dict(type="Normalize", mean=MEAN, std=STD, to_rgb=True),
                    dict(type="ImageToTensor", keys=["img"])],
        img_scale=(2048, 512), flip=False)(dict(ref))
    tally.add("test input, single scale", build_test_transforms(cfg.data)(ours_rgb),
              single["img"][0].numpy())

    multi = MultiScaleFlipAug(
        transforms=[dict(type="Resize", keep_ratio=True), dict(type="RandomFlip"),
                    dict(type="Normalize", mean=MEAN, std=STD, to_rgb=True),
                    dict(type="ImageToTensor", keys=["img"])],
        img_scale=(2048, 512), img_ratios=RATIOS, flip=True)(dict(ref))
    views = list(aug_views(ours_rgb, (2048, 512), RATIOS, cfg.data.mean, cfg.data.std))
    for i, view in enumerate(views):  # the official list alternates unflipped / flipped
        tally.add("multi-scale view", view, multi["img"][2 * i].numpy())
        tally.add("multi-scale view, flipped", view.flip(-1), multi["img"][2 * i + 1].numpy())

    # training: Resize with ratio range, RandomCrop, PhotoMetricDistortion, same draws
    label = rng.integers(0, 150, ref["img"].shape[:2], dtype=np.uint8)
    draw = float(rng.random())
    ratio = draw * (2.0 - 0.5) + 0.5  # mmseg's random_sample_ratio of that draw
    sample = dict(ref, gt_semantic_seg=label, seg_fields=["gt_semantic_seg"])
    saved = mmseg_transforms.np.random
    try:
        mmseg_transforms.np.random = Draws([draw])
        resized = Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0))(dict(sample))
        h, w = resized["img"].shape[:2]
        offsets = [int(rng.integers(0, max(h - 512, 0) + 1)),
                   int(rng.integers(0, max(w - 512, 0) + 1))]
        mmseg_transforms.np.random = Draws(offsets)
        cropped = RandomCrop(crop_size=(512, 512))(dict(resized))
    finally:
        mmseg_transforms.np.random = saved
    ours = RandomRescale((2048, 512), (ratio, ratio))({"image": ours_rgb, "target": label})
    tally.add("train rescale, image", ours["image"], resized["img"][:, :, ::-1])
    tally.add("train rescale, label map", ours["target"], resized["gt_semantic_seg"])
    crop = RandomCropCatMax((512, 512))
    crop._random_box = lambda height, width: (offsets[0], offsets[1], min(512, height),
                                              min(512, width))  # the same offsets
    ours_crop = crop(ours)["image"]
    tally.add("train crop, image", ours_crop, cropped["img"][:, :, ::-1])

    params = {"brightness": float(rng.uniform(-32, 32)), "contrast_first": bool(rng.integers(2)),
              "contrast": float(rng.uniform(0.5, 1.5)), "saturation": float(rng.uniform(0.5, 1.5)),
              "hue": int(rng.integers(-18, 18))}
    draws = [1, params["brightness"], int(params["contrast_first"])]
    if params["contrast_first"]:
        draws += [1, params["contrast"]]
    draws += [1, params["saturation"], 1, params["hue"]]
    if not params["contrast_first"]:
        draws += [1, params["contrast"]]
    saved = mmseg_transforms.random
    try:
        mmseg_transforms.random = Draws(draws)
        distorted = PhotoMetricDistortion()({"img": cropped["img"].copy()})["img"]
    finally:
        mmseg_transforms.random = saved
    tally.add("photometric distortion", OurDistortion().apply(ours_crop, params),
              distorted[:, :, ::-1])


def check_detection(path: Path, predictor: denseclip.Predictor, tally: Tally) -> None:
    bgr = official_load(path)["img"]
    resized = mmcv.imrescale(bgr, (1333, 800))
    ours = predictor.prepare(load_image(path)).tensor  # (3, h, w) float 0..255
    tally.add("detection resize (mmcv.imrescale)", ours.permute(1, 2, 0).numpy(),
              resized[:, :, ::-1].astype(np.float32))
    normalised = mmcv.impad_to_multiple(mmcv.imnormalize(resized, np.array(MEAN),
                                                         np.array(STD), to_rgb=True), 32)
    with torch.no_grad():
        batch = predictor.model.transform([ours / 255.0])[0].tensors[0]
    tally.add("detection input (normalise, pad 32)", batch.permute(1, 2, 0).numpy(),
              normalised)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sizes = [(512, 683), (683, 512)] + [tuple(int(v) for v in rng.integers(200, 900, 2))
                                        for _ in range(max(args.images - 2, 0))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        predictor = denseclip.Predictor("retinanet_denseclip_r50_fpn_1x_coco")
    tally = Tally()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (h, w) in enumerate(sizes):
            path = Path(tmp) / f"{i}.jpg"
            write_jpeg(path, h, w, rng)
            check_segmentation(path, rng, tally)
            check_detection(path, predictor, tally)
    print(f"{len(sizes)} JPEGs, OpenCV {cv2.__version__}, mmcv {mmcv.__version__}")
    tally.print()


if __name__ == "__main__":
    main()
