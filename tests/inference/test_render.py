"""Palette, overlays with a legend, detection drawings and heatmaps."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from denseclip.tasks.render import (
    colorize,
    format_share,
    heatmap_overlay,
    palette,
    render_detections,
    render_heatmap,
    render_overlay,
)
from denseclip.tasks.results import DetectionPrediction, SegmentationPrediction
from denseclip.tasks.writers import write_detection, write_segmentation
from tests.helpers.images import random_image


def test_palette_is_deterministic_and_distinct():
    colours = palette(150)
    assert colours.shape == (150, 3) and colours.dtype == np.uint8
    np.testing.assert_array_equal(palette(150), colours)
    np.testing.assert_array_equal(palette(5), colours[:5])  # a class keeps its colour
    assert len({tuple(c) for c in colours}) == 150
    # neighbouring classes are far apart in colour
    gaps = np.abs(colours[1:].astype(int) - colours[:-1].astype(int)).sum(1)
    assert gaps.min() > 60
    assert palette(0).shape == (0, 3)


def has_colour(image: Image.Image, colour) -> bool:
    return bool((np.asarray(image) == np.asarray(colour, np.uint8)).all(-1).any())


def test_overlay_blends_and_lists_the_present_classes():
    image = np.full((40, 60, 3), 100, np.uint8)
    labels = np.zeros((40, 60), np.int64)
    labels[:, 30:] = 2
    labels[:5, :5] = 255  # ignore: left as is
    names = ["sky", "tree", "road"]
    out = render_overlay(image, labels, names, alpha=0.5)
    assert out.mode == "RGB" and out.height == 40 and out.width > 60
    pixels = np.asarray(out)[:, :60].astype(int)
    colours = palette(3).astype(int)
    np.testing.assert_allclose(pixels[20, 10], (100 + colours[0]) / 2, atol=1)
    np.testing.assert_allclose(pixels[20, 40], (100 + colours[2]) / 2, atol=1)
    np.testing.assert_array_equal(pixels[2, 2], [100, 100, 100])
    legend = out.crop((60, 0, out.width, out.height))
    assert has_colour(legend, colours[0]) and has_colour(legend, colours[2])
    assert not has_colour(legend, colours[1])  # "tree" is absent from the image

    plain = render_overlay(image, labels, names, alpha=0.0, legend=False)
    np.testing.assert_array_equal(np.asarray(plain), image)


def test_overlay_legend_wraps_into_columns_for_many_classes():
    names = [f"class {i}" for i in range(60)]
    labels = np.arange(60).repeat(2)[None].repeat(20, 0)  # 20 x 120, all 60 classes
    image = np.zeros((20, 120, 3), np.uint8)
    out = render_overlay(image, labels, names)
    assert out.height == 20  # the legend fits the image height, in several columns
    legend = out.crop((120, 0, out.width, out.height))
    colours = palette(60)
    assert all(has_colour(legend, colours[i]) for i in (0, 59))


def test_overlay_input_checks():
    with pytest.raises(ValueError, match="do not match"):
        render_overlay(np.zeros((10, 10, 3), np.uint8), np.zeros((5, 5), int), ["a"])
    with pytest.raises(ValueError, match="alpha"):
        render_overlay(np.zeros((10, 10, 3), np.uint8), np.zeros((10, 10), int), ["a"],
                       alpha=2)
    with pytest.raises(TypeError, match="uint8"):
        render_overlay(np.zeros((10, 10, 3), np.float32), np.zeros((10, 10), int), ["a"])


def test_detections_are_drawn_above_the_threshold():
    image = np.zeros((80, 100, 3), np.uint8)
    boxes = np.array([[10, 20, 60, 70], [70, 5, 95, 30]], np.float32)
    masks = np.zeros((2, 80, 100), bool)
    masks[0, 30:60, 20:50] = True
    out = render_detections(image, boxes, np.array([1, 2]), np.array([0.9, 0.2]),
                            ["a", "b", "c"], masks=masks, score_thr=0.5)
    colours = palette(3)
    assert out.size == (100, 80)
    assert has_colour(out, colours[1])  # box of the kept detection
    assert not has_colour(out, colours[2])  # the 0.2 detection is not drawn
    pixels = np.asarray(out)
    assert pixels[45, 35].any()  # mask tinted


def test_colorize_and_heatmap():
    values = np.linspace(0, 1, 50, dtype=np.float32).reshape(5, 10)
    rgb = colorize(values, 0.0, 1.0)
    assert rgb.shape == (5, 10, 3) and rgb.dtype == np.uint8
    brightness = rgb.astype(int).sum(-1).ravel()
    assert brightness[-1] > brightness[0]
    np.testing.assert_array_equal(colorize(np.zeros((2, 2))), colorize(np.zeros((2, 2))))
    out = heatmap_overlay(np.zeros((5, 10, 3), np.uint8), values)
    assert out.size == (10, 5)


def test_format_share():
    assert [format_share(p) for p in (0, 0.2, 1, 42.4, 99.5, 100)] == [
        "0%", "<1%", "1%", "42%", ">99%", "100%"]


def test_every_picture_takes_an_image_path(tmp_path):
    # Regression: render_overlay("photo.jpg", ...) raised "expected a uint8 image array".
    rgb = random_image(40, 60)
    path = tmp_path / "photo.png"
    Image.fromarray(rgb).save(path)
    labels = np.zeros((40, 60), np.int64)
    labels[:, 30:] = 1
    for image in (str(path), path):
        assert np.array_equal(np.asarray(render_overlay(image, labels, ["a", "b"])),
                              np.asarray(render_overlay(rgb, labels, ["a", "b"])))
        boxes = np.array([[5, 5, 30, 30]], np.float32)
        assert np.array_equal(
            np.asarray(render_detections(image, boxes, [0], [0.9], ["a"])),
            np.asarray(render_detections(rgb, boxes, [0], [0.9], ["a"])))
        values = np.linspace(0, 1, 2400, dtype=np.float32).reshape(40, 60)
        assert np.array_equal(np.asarray(heatmap_overlay(image, values)),
                              np.asarray(heatmap_overlay(rgb, values)))
        assert render_heatmap(image, values, "a").size == render_heatmap(rgb, values, "a").size
    # The writers of `denseclip predict` take a path too, and write the same pictures.
    seg = SegmentationPrediction(labels=labels, probs=None, class_names=["a", "b"])
    det = DetectionPrediction(boxes=boxes, labels=np.array([0]), scores=np.array([0.9]),
                              class_names=["a"])
    for image, folder in ((rgb, "array"), (path, "path")):
        (tmp_path / folder).mkdir()
        write_segmentation(seg, image, tmp_path / folder, "x")
        write_detection(det, image, tmp_path / folder, "y", 0.5)
    for name in ("x_overlay.png", "y_overlay.png", "y.json"):
        assert (tmp_path / "array" / name).read_bytes() == (tmp_path / "path" / name).read_bytes()
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        render_overlay(tmp_path / "missing.jpg", labels, ["a", "b"])
    with pytest.raises(TypeError, match="image path, a PIL image or a uint8"):
        render_overlay(rgb.astype(np.float32), labels, ["a", "b"])


def test_heatmap_names_its_class_and_shows_its_scale():
    H, W = 120, 160
    values = np.tile(np.linspace(-0.2, 0.4, W, dtype=np.float32), (H, 1))
    out = render_heatmap(np.zeros((H, W, 3), np.uint8), values, "green grass", -0.2, 0.4,
                         unit="cosine score")
    assert out.height == H and out.width > W
    np.testing.assert_array_equal(np.asarray(out)[:, :W],
                                  np.asarray(heatmap_overlay(np.zeros((H, W, 3), np.uint8),
                                                             values, -0.2, 0.4)))
    panel = np.asarray(out)[:, W:]
    # The colour bar: a black outline around a column that runs from the colour of the
    # scale's top to the colour of its bottom, brightest at the top.
    black = (panel == 0).all(-1)
    x0 = int(np.flatnonzero(black.sum(0) > H // 3)[0])
    column = panel[:, x0 + 2].astype(int)
    coloured = ~black[:, x0 + 2] & (column.sum(-1) < 3 * 255)
    runs = np.split(np.arange(H), np.flatnonzero(np.diff(coloured.astype(int))) + 1)
    rows = max((r for r in runs if coloured[r[0]]), key=len)  # the bar's inside
    top = colorize(np.array([[0.4]]), -0.2, 0.4)[0, 0].astype(int)
    bottom = colorize(np.array([[-0.2]]), -0.2, 0.4)[0, 0].astype(int)
    assert len(rows) > H // 2
    assert np.abs(column[rows[0]] - top).max() <= 10
    assert np.abs(column[rows[-1]] - bottom).max() <= 10
    brightness = column[rows].sum(-1)
    assert (np.diff(brightness) <= 0).all()
    # Text: the name (and unit) above the bar, the two scale values beside its ends.
    ink = panel.astype(int).sum(-1) < 200
    right = ink[:, np.flatnonzero(black.sum(0) > H // 3)[-1] + 2:]  # right of the bar
    assert ink[: rows[0] - 1].any()
    assert right[rows[0] - 1: rows[0] + 15].any()
    assert right[rows[-1] - 15: rows[-1] + 2].any()
    assert not right[rows[0] + 20: rows[-1] - 20].any()  # nothing between the two values
    # A longer name makes a wider panel; a short image grows to fit the panel.
    assert render_heatmap(np.zeros((H, W, 3), np.uint8), values, "x" * 40).width > out.width
    small = render_heatmap(np.zeros((20, 30, 3), np.uint8), values[:20, :30], "cat")
    assert small.height > 20
    assert np.asarray(small)[20:, :30].min() == 255  # the image's part below it stays white
