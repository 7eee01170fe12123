"""Evaluation over a dataset agrees with the Predictor, whatever ``model.align_corners``;
multi-scale evaluation starts from the original images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import denseclip
from denseclip.data import build_segmentation_dataset, make_synthetic_dataset
from denseclip.dist import DistEnv
from denseclip.engine import trainer
from denseclip.evaluation.segmentation import evaluate
from denseclip.models.seg_inference import SegInference, aug_scales
from denseclip.tasks import SegmentationTask
from denseclip.weights import save_checkpoint
from tests.helpers.official import official_view


@pytest.mark.parametrize("align_corners", [False, True])
def test_evaluation_labels_equal_the_predictor(tmp_path, align_corners):
    # Regression: model.align_corners reached the Predictor but not the evaluation, so
    # `denseclip test` and `denseclip predict` disagreed.
    root = make_synthetic_dataset(tmp_path / "data", 1, 2, seed=0)
    cfg = denseclip.load_config("tiny_denseclip_res", [
        f"data.root={root}", f"model.classes={root}/classes.txt",
        f"model.align_corners={str(align_corners).lower()}", "data.num_workers=0"])
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "model.pth", denseclip.build_model(cfg))
    out = tmp_path / "pred"
    trainer.test(cfg, checkpoint, out_dir=out, env=DistEnv(), progress=False)
    predictor = denseclip.Predictor(cfg, checkpoint, precision="fp32")  # as `test` evaluates
    assert predictor.model.align_corners is align_corners
    upsamples = [m for m in predictor.model.head.modules() if isinstance(m, torch.nn.Upsample)]
    assert upsamples and all(m.align_corners is align_corners for m in upsamples)  # mmseg's
    images = sorted((root / "images" / "validation").glob("*.jpg"))
    assert len(images) == 2
    for image in images:
        evaluated = np.array(Image.open(out / f"{image.stem}.png")).astype(np.int64)
        predicted = predictor.predict(image).labels + 1  # ADE label space: 0 is "other"
        np.testing.assert_array_equal(evaluated, predicted)


class ViewRecorder(SegInference, nn.Module):
    """A 1x1 convolution that records the batches it is given."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return self.conv(x)


def test_multi_scale_evaluation_rescales_the_original_images(tmp_path):
    # mmseg's MultiScaleFlipAug resizes the decoded uint8 image once per ratio; the views
    # were resampled from the test-scaled, normalised image before.
    root = make_synthetic_dataset(tmp_path / "data", 1, 2, size=(75, 110), seed=1)
    ratios = [0.5, 1.25]
    cfg = denseclip.load_config("tiny_denseclip_res", [
        f"data.root={root}", f"model.classes={root}/classes.txt", "data.num_workers=0",
        "evaluation.mode=whole", f"evaluation.aug_ratios={ratios}", "evaluation.aug_flip=true"])
    dataset = build_segmentation_dataset(cfg.data, cfg.data.val_split, 5, train=False)
    torch.manual_seed(0)
    model = SegmentationTask(cfg).configure_model(ViewRecorder(5))  # cfg's test settings
    metrics = evaluate(model, dataset, cfg, aug_test=True, progress=False)
    assert metrics["num_images"] == 2
    expected = []
    for index in range(len(dataset)):
        image = cv2.imread(str(dataset.image_path(index)), cv2.IMREAD_COLOR)[:, :, ::-1]
        for bounds in aug_scales(cfg.data.test_scale, ratios):
            view = official_view(image, bounds)[None]
            expected.append(torch.cat([view, view.flip(-1)]))
    assert len(model.inputs) == len(expected) == 4
    for seen, view in zip(model.inputs, expected, strict=True):
        assert torch.equal(seen, view)
