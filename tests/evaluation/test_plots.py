"""What ``denseclip test`` leaves to look at for segmentation: the confusion matrix of real
predictions (``confusion_matrix.npy``), its heatmap and the per-class IoU chart."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import denseclip
from denseclip.classes import load_class_names
from denseclip.data import build_segmentation_dataset, make_synthetic_dataset
from denseclip.dist import DistEnv
from denseclip.engine import trainer
from denseclip.evaluation.metrics import SegmentationMetric
from denseclip.evaluation.plots import (
    most_confused_classes,
    plot_confusion_matrix,
    plot_per_class_iou,
)
from denseclip.evaluation.segmentation import evaluate
from denseclip.models.seg_inference import SegInference
from denseclip.tasks import SegmentationTask
from denseclip.weights import save_checkpoint
from tests.helpers.images import write_pair
from tests.helpers.pictures import assert_picture

COLOURS = ["red", "green", "blue"]
# Worked by hand from the images of `colour_scenes` (rows: ground truth, columns: prediction):
# image a is red (every pixel predicted "red"): 16x8 "red" + 16x8 "green" pixels, 16x8 ignored;
# image b is green (predicted "green"): 10x24 "blue" + 6x24 "green" pixels.
EXPECTED = np.array([[128, 0, 0],
                     [128, 144, 0],
                     [0, 240, 0]], dtype=np.int64)
# IoU = TP / (GT + predicted - TP): 128 / 256, 144 / (272 + 384 - 144), 0 / 240
EXPECTED_IOU = [50.0, 28.125, 0.0]


class ColourModel(SegInference, nn.Module):
    """Segments by colour: the logit of class c is the normalised image channel c."""

    num_classes = 3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images


@pytest.fixture
def colour_scenes(tmp_path):
    """Two lossless validation images of one colour each, in the ADE20K layout (raw label
    0 is ignored, raw k is class k - 1), and a config that evaluates them."""
    root = tmp_path / "data"
    red = np.zeros((16, 24, 3), np.uint8)
    red[..., 0] = 255
    green = np.zeros((16, 24, 3), np.uint8)
    green[..., 1] = 255
    labels_a = np.zeros((16, 24), np.uint8)
    labels_a[:, :8], labels_a[:, 8:16] = 1, 2
    labels_b = np.full((16, 24), 2, np.uint8)
    labels_b[:10] = 3
    write_pair(root, "validation", "a", red, labels_a, img_suffix=".png")
    write_pair(root, "validation", "b", green, labels_b, img_suffix=".png")
    (root / "classes.txt").write_text("\n".join(COLOURS) + "\n")
    cfg = denseclip.load_config("tiny_denseclip_res", [
        f"data.root={root}", f"model.classes={root}/classes.txt", "data.img_suffix=.png",
        "data.num_workers=0", "evaluation.mode=whole"])
    return cfg, build_segmentation_dataset(cfg.data, cfg.data.val_split, 3, train=False)


def test_confusion_matrix_npy_equals_a_hand_worked_example(colour_scenes, tmp_path):
    cfg, dataset = colour_scenes
    out = tmp_path / "out"
    model = SegmentationTask(cfg).configure_model(ColourModel())  # the config's test settings
    metrics = evaluate(model, dataset, cfg, out_dir=out, progress=False)
    saved = np.load(out / "confusion_matrix.npy")
    assert saved.dtype == np.int64 and saved.shape == (3, 3)
    np.testing.assert_array_equal(saved, EXPECTED)
    np.testing.assert_array_equal(metrics["confusion"], EXPECTED)
    assert [row["IoU"] for row in metrics["per_class"]] == pytest.approx(EXPECTED_IOU)
    assert "confusion" not in json.loads((out / "metrics.json").read_text())

    figures = SegmentationTask(cfg).write_figures(metrics, out)
    assert figures == [out / "plots/confusion_matrix.png", out / "plots/per_class_iou.png"]
    for path in figures:
        assert_picture(path)
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png"]  # labels only


def test_denseclip_test_writes_the_matrix_of_its_predictions_and_figures(tmp_path):
    root = make_synthetic_dataset(tmp_path / "data", 1, 2, size=(48, 64), seed=0)
    cfg = denseclip.load_config("tiny_denseclip_res", [
        f"data.root={root}", f"model.classes={root}/classes.txt", "data.num_workers=0"])
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "model.pth", denseclip.build_model(cfg))
    out = tmp_path / "out"
    metrics = trainer.test(cfg, checkpoint, out_dir=out, env=DistEnv(), progress=False)
    saved = np.load(out / "confusion_matrix.npy")
    np.testing.assert_array_equal(saved, metrics["confusion"])
    # The same matrix again, from the label PNGs written and the annotations on disk.
    recount = SegmentationMetric(5)
    for ann in sorted((root / "annotations" / "validation").glob("*.png")):
        pred = np.array(Image.open(out / ann.name)).astype(np.int64) - 1  # ADE label space
        raw = np.array(Image.open(ann)).astype(np.int64)
        recount.update(torch.from_numpy(pred), torch.from_numpy(np.where(raw == 0, 255,
                                                                         raw - 1)))
    np.testing.assert_array_equal(saved, recount.confusion.numpy())
    assert saved.sum() > 0
    for name in ("confusion_matrix.png", "per_class_iou.png"):
        assert_picture(out / "plots" / name)
    assert len(list(out.glob("*.png"))) == 2  # one label PNG per image, nothing else


def test_without_matplotlib_the_data_files_are_written_and_install_is_named(
        colour_scenes, tmp_path, monkeypatch, caplog):
    for name in [m for m in sys.modules if m.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # import fails as when not installed
    cfg, dataset = colour_scenes
    out = tmp_path / "out"
    model = SegmentationTask(cfg).configure_model(ColourModel())  # the config's test settings
    metrics = evaluate(model, dataset, cfg, out_dir=out, progress=False)
    with caplog.at_level(logging.WARNING, logger="denseclip"):
        assert SegmentationTask(cfg).write_figures(metrics, out) == []
    assert "pip install 'denseclip[plot]'" in caplog.text
    np.testing.assert_array_equal(np.load(out / "confusion_matrix.npy"), EXPECTED)
    assert (out / "metrics.json").is_file() and not (out / "plots").exists()
    with pytest.raises(ImportError, match=r"pip install 'denseclip\[plot\]'"):
        plot_per_class_iou(EXPECTED_IOU, COLOURS, tmp_path / "iou.png")


def test_nothing_to_draw_is_a_warning_not_a_failed_test(colour_scenes, tmp_path, caplog):
    cfg, _ = colour_scenes
    nothing = {"confusion": np.zeros((3, 3), np.int64),
               "per_class": [{"name": c, "IoU": float("nan")} for c in COLOURS]}
    with caplog.at_level(logging.WARNING, logger="denseclip"):
        assert SegmentationTask(cfg).write_figures(nothing, tmp_path) == []
    assert "no class has an IoU" in caplog.text
    assert not (tmp_path / "plots").exists()


def ade20k_like_confusion() -> np.ndarray:
    """150 classes, mostly right, with two planted confusions and one class never seen."""
    rng = np.random.default_rng(0)
    cm = np.diag(rng.integers(5_000, 50_000, 150)).astype(np.int64)
    cm += rng.integers(0, 3, (150, 150))  # scattered single-pixel mistakes
    cm[7, 42] = cm[7, 7]  # half of class 7 is taken for class 42
    cm[99, 3] = cm[99, 99] // 3
    cm[120], cm[:, 120] = 0, 0  # class 120 neither in the ground truth nor predicted
    return cm


def test_most_confused_classes_take_both_sides_of_the_largest_confusions():
    cm = ade20k_like_confusion()
    chosen = most_confused_classes(cm, 30)
    assert len(chosen) == 30 and chosen == sorted(chosen)
    assert {7, 42, 99, 3} <= set(chosen)
    assert 120 not in chosen  # nothing to show for a class without ground truth
    # Fewer confused classes than asked for: then the lowest recall, skipping class 2,
    # which has no pixels.
    few = np.diag([5, 4, 0, 9, 8])
    few[0, 1], few[4, 0] = 1, 2
    assert most_confused_classes(few, 4) == [0, 1, 3, 4]  # 4 → 0 first (2 / 10 of class 4)


def test_150_classes_figures_are_readable_subsets(tmp_path):
    cm = ade20k_like_confusion()
    names = load_class_names("ade20k")
    heatmap = plot_confusion_matrix(cm, names, tmp_path / "cm.png", max_classes=30)
    assert_picture(heatmap, min_size=(800, 800), max_bytes=200_000)
    metric = SegmentationMetric(150)
    metric.confusion = torch.from_numpy(cm)
    iou = [row["IoU"] for row in metric.compute(names)["per_class"]]
    assert np.isnan(iou[120])
    bars = plot_per_class_iou(iou, names, tmp_path / "iou.png", worst=30)
    assert_picture(bars, min_size=(800, 500), max_bytes=200_000)


def test_figures_reject_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match="square"):
        plot_confusion_matrix(np.zeros((2, 3)), ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        plot_confusion_matrix(EXPECTED, ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="2 class names for 3 IoU"):
        plot_per_class_iou(EXPECTED_IOU, ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no class has an IoU"):
        plot_per_class_iou([float("nan")] * 2, ["a", "b"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
