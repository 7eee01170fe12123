"""Predictor: the test pipeline reproduced, inputs of every kind, checkpoints, detection."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import denseclip
from denseclip.data.transforms import build_test_transforms
from denseclip.inference import (
    DetectionPrediction,
    PredictionError,
    Predictor,
    SegmentationPrediction,
)
from denseclip.models.seg_inference import inference
from denseclip.runtime import run_mode
from denseclip.tasks import get_task
from denseclip.weights import CheckpointError, save_checkpoint
from tests.helpers.images import random_image

PRESET = "tiny_denseclip_res"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = denseclip.build_model(denseclip.load_config(PRESET))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", model)


@pytest.fixture(scope="module")
def predictor(checkpoint):
    # fp32: compared with the evaluation's fp32 numbers (reduced precision: test_fast_path.py)
    return Predictor(PRESET, checkpoint, precision="fp32")


def test_matches_the_test_pipeline(predictor):
    """Keep-ratio resize + normalise (the dataset's test transforms, on the uint8 image),
    sliding windows, logits resized to the original size, softmax: exactly the evaluation's
    numbers."""
    image = random_image(100, 300)
    result = predictor.predict(image)
    assert isinstance(result, SegmentationPrediction)
    assert result.labels.shape == (100, 300) and result.labels.dtype == np.int64
    assert result.probs.shape == (150, 100, 300) and result.probs.dtype == np.float32
    assert result.class_names == predictor.class_names and len(result.class_names) == 150
    assert result.open_labels is None and result.open_scores is None

    cfg = predictor.cfg
    normalised = build_test_transforms(cfg.data)(image)  # the uint8 array: OpenCV resize
    assert tuple(normalised.shape[-2:]) == (43, 128)  # keep-ratio to the (128, 64) test scale
    assert torch.equal(predictor.prepare(image).tensor, normalised)
    expected = inference(predictor.model, normalised[None], cfg.evaluation, 150, (100, 300))[0]
    # Exact: the predictor runs the evaluation's own windows and kernels in fp32 (the same
    # operations on the same batch), so on any one machine the bits agree.
    np.testing.assert_array_equal(result.probs, expected.numpy())
    np.testing.assert_array_equal(result.labels, expected.argmax(0).numpy())
    np.testing.assert_allclose(result.probs.sum(0), 1.0, atol=1e-5)


def test_sliding_windows_are_used_for_large_images(predictor):
    shapes = []
    handle = predictor.model.register_forward_pre_hook(
        lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        predictor.predict(random_image(100, 300))
    finally:
        handle.remove()
    # 43 x 128 after resizing: three 43 x 64 windows (crop 64, stride 43), one forward call.
    assert shapes == [(3, 3, 43, 64)]


def test_labels_without_probabilities_are_the_same(predictor):
    image = random_image(70, 90, seed=1)
    full = predictor.predict(image)
    lean = predictor.predict(image, return_probs=False)
    assert lean.probs is None
    np.testing.assert_array_equal(lean.labels, full.labels)


def test_batch_equals_single_images(predictor):
    images = [random_image(64, 64, 1), random_image(50, 80, 2), random_image(64, 64, 3)]
    batch = predictor.predict_batch(images)
    assert [r.labels.shape for r in batch] == [(64, 64), (50, 80), (64, 64)]
    for image, result in zip(images, batch, strict=True):
        single = predictor.predict(image)
        # Exact: each image gets predict's own forward calls (exact=False shares them, and
        # differs by rounding: tests/inference/test_stream.py).
        np.testing.assert_array_equal(result.probs, single.probs)


def test_input_kinds(predictor, tmp_path):
    rgb = random_image(48, 64)
    expected = predictor.predict(rgb).probs
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    for image in (tmp_path / "rgb.png", str(tmp_path / "rgb.png"), Image.fromarray(rgb)):
        np.testing.assert_array_equal(predictor.predict(image).probs, expected)
    rgba = np.concatenate([rgb, np.full((48, 64, 1), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(predictor.predict(rgba).probs, expected)

    grey = rgb[:, :, 0]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    wide = (grey.astype(np.uint16) * 257)
    Image.fromarray(wide).save(tmp_path / "wide.png")  # 16-bit greyscale
    grey_probs = predictor.predict(grey).probs
    for name in ("grey.png", "wide.png"):
        np.testing.assert_array_equal(predictor.predict(tmp_path / name).probs, grey_probs)

    # EXIF orientation 6 (rotate 90° clockwise to display) is applied, for files and PIL.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "turned.jpg", exif=exif.tobytes())
    assert predictor.predict(tmp_path / "turned.jpg").labels.shape == (64, 48)
    with Image.open(tmp_path / "turned.jpg") as opened:
        assert predictor.predict(opened).labels.shape == (64, 48)


def test_bad_images(predictor, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="broken.png"):
        predictor.predict(tmp_path / "broken.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        predictor.predict(tmp_path / "missing.png")
    with pytest.raises(PredictionError, match="uint8"):
        predictor.predict(np.zeros((40, 40, 3), np.float32))
    with pytest.raises(PredictionError, match="H x W x 3"):
        predictor.predict(np.zeros((40, 40, 2), np.uint8))


def test_small_images_are_upscaled_and_too_elongated_ones_refused(predictor):
    # A 10 x 12 image is enlarged by the keep-ratio resize to the test scale: it works.
    assert predictor.predict(random_image(10, 12)).labels.shape == (10, 12)
    # 3 x 300 stays 1 x 128 after the resize: smaller than the stride, a clear error.
    with pytest.raises(PredictionError, match=r"3x300.*1x128.*stride 32"):
        predictor.predict(random_image(3, 300))


def test_checkpoint_is_loaded(checkpoint):
    torch.manual_seed(123)  # a different random initialisation before the load
    loaded = Predictor(PRESET, checkpoint)
    assert loaded.load_report.format == "denseclip"
    saved = torch.load(checkpoint, weights_only=True)["model"]
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)


def test_checkpoint_of_another_model_names_the_keys(tmp_path):
    torch.manual_seed(0)
    vit = denseclip.build_model(denseclip.load_config("tiny_denseclip_vit"))
    path = save_checkpoint(tmp_path / "vit.pth", vit)
    with pytest.raises(CheckpointError) as info:
        Predictor(PRESET, path)
    message = str(info.value)
    assert "does not match the model" in message
    assert "backbone.layer1" in message  # a ResNet key the ViT file lacks
    assert "file keys unknown to the model" in message and "backbone.fpn1" in message


def test_random_weights_warn():
    with pytest.warns(UserWarning, match="meaningless"):
        Predictor(PRESET)


def test_whole_image_mode(checkpoint):
    cfg = denseclip.load_config(PRESET, ["evaluation.mode=whole"])
    predictor = Predictor(cfg, checkpoint, precision="fp32")  # as the fp32 `expected`
    image = random_image(60, 90)
    result = predictor.predict(image)
    tensor = predictor.prepare(image).tensor
    expected = inference(predictor.model, tensor[None], cfg.evaluation, 150, (60, 90))[0]
    np.testing.assert_array_equal(result.probs, expected.numpy())


# ------------------------------------------------------------------------------ detection
class StubDetector(nn.Module):
    """Our detectors' interface: images and their original sizes in, list of dicts out.
    Each image gets one box covering it, in original pixels."""

    def __init__(self, masks: bool = False):
        super().__init__()
        self.masks = masks
        self.seen = []

    def forward(self, images, original_sizes=None):
        out = []
        if original_sizes is None:
            original_sizes = [image.shape[-2:] for image in images]
        for image, (h, w) in zip(images, original_sizes, strict=True):
            self.seen.append((tuple(image.shape), (h, w), image.clone()))
            item = {"boxes": torch.tensor([[0.0, 0.0, w, h], [1.0, 1.0, 4.0, 4.0]]),
                    "labels": torch.tensor([3, 7]), "scores": torch.tensor([0.9, 0.1])}
            if self.masks:
                mask = torch.zeros(2, 1, h, w)
                mask[:, :, : h // 2] = 1.0
                item["masks"] = mask
            out.append(item)
        return out


def detection_config():
    cfg = denseclip.load_config(PRESET)
    cfg.model.task = "retinanet"
    cfg.model.classes = "coco"
    cfg.model.detection.min_size, cfg.model.detection.max_size = 64, 128
    return cfg


def test_detection_path():
    stub = StubDetector(masks=True)
    predictor = Predictor.from_model(stub, detection_config())
    result = predictor.predict(random_image(100, 300))
    assert isinstance(result, DetectionPrediction)
    assert len(result.class_names) == 80 and result.class_names[0] == "person"
    np.testing.assert_allclose(result.boxes[0], [0, 0, 300, 100], atol=1e-4)
    assert result.labels.tolist() == [3, 7] and result.scores.dtype == np.float32
    assert result.masks.shape == (2, 100, 300) and result.masks.dtype == bool
    assert result.masks[:, :45].all() and not result.masks[:, 55:].any()
    shape, original, pixels = stub.seen[0]
    # mmdet's test Resize on the uint8 image (cv2, mmcv's size) before the model, which
    # gets 0..1 pixels and the original size (it normalises and pads itself)
    assert shape == (3, 43, 128) and original == (100, 300)
    image = random_image(100, 300)
    expected = cv2.resize(image, (128, 43), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal((pixels * 255).round().byte().permute(1, 2, 0).numpy(),
                                  expected)


def test_detection_without_detections_and_no_open_classes():
    class Empty(StubDetector):
        def forward(self, images, original_sizes=None):
            return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                     "scores": torch.zeros(0), "masks": torch.zeros(0, 1, *size)}
                    for size in original_sizes]

    predictor = Predictor.from_model(Empty(), detection_config())
    result = predictor.predict(random_image(30, 40))
    assert result.boxes.shape == (0, 4) and result.masks.shape == (0, 30, 40)
    with pytest.raises(PredictionError, match="segmentation preset"):
        predictor.set_classes(["cat"])


def test_real_detector_if_available():
    pytest.importorskip("denseclip.models.detection")
    names = [n for n in denseclip.available_presets() if n.startswith("tiny")
             and "denseclip" in n
             and denseclip.load_config(n).model.task in ("retinanet", "mask_rcnn")]
    if not names:
        pytest.skip("no tiny detection preset")
    for name in names:
        with pytest.warns(UserWarning):
            predictor = Predictor(name)
        result = predictor.predict(random_image(80, 120))
        assert isinstance(result, DetectionPrediction)
        n = len(result.scores)
        assert result.boxes.shape == (n, 4) and result.labels.shape == (n,)
        if n:
            assert result.boxes[:, 0::2].max() <= 120 and result.boxes[:, 1::2].max() <= 80
        if predictor.task == "mask_rcnn":
            assert result.masks.shape == (n, 80, 120) and result.masks.dtype == bool


def test_the_task_prepares_and_predicts_for_the_predictor(predictor):
    task = get_task(predictor.cfg)
    assert task.supports_open_vocabulary and not get_task(detection_config()) \
        .supports_open_vocabulary
    images = [random_image(100, 300, seed=2), random_image(70, 90, seed=3)]
    items = [task.prepare(image) for image in images]
    for item, image in zip(items, images, strict=True):
        assert torch.equal(item.tensor, predictor.prepare(image).tensor)
    with torch.no_grad(), run_mode(predictor.precision, predictor.cfg.kernels, predictor.device):
        direct = task.predict(predictor.model, items, batch_size=predictor.batch_size)
    for got, want in zip(direct, predictor.predict_batch(images), strict=True):
        np.testing.assert_array_equal(got.probs, want.probs)
        np.testing.assert_array_equal(got.labels, want.labels)
    with pytest.raises(PredictionError, match="too elongated"):
        task.prepare(random_image(2, 400))
