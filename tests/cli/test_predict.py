"""``denseclip predict``: inputs of every kind, outputs, failures reported, bad setups."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

import denseclip
from denseclip import cli
from denseclip.classes import load_class_names
from denseclip.cli import arguments, predict
from denseclip.tasks.writers import safe_name
from denseclip.weights import save_checkpoint
from tests.helpers.images import random_image

PRESET = "tiny_denseclip_res"


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="denseclip predict")
    arguments.add_predict_arguments(parser)
    return predict.run(parser.parse_args(list(argv)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = denseclip.build_model(denseclip.load_config(PRESET))
    return str(save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", model))


@pytest.fixture
def images(tmp_path):
    """A folder with an RGB PNG, a greyscale JPEG, an RGBA PNG in a subfolder, a text
    file (skipped in folders) and a corrupt PNG."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(random_image(50, 70, 1)).save(root / "a.png")
    Image.fromarray(random_image(40, 40, 2)[:, :, 0]).save(root / "b.jpg")
    rgba = np.concatenate([random_image(45, 60, 3), np.full((45, 60, 1), 9, np.uint8)], 2)
    Image.fromarray(rgba, "RGBA").save(root / "sub" / "c.png")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes(b"\x89PNG but not really")
    return root


def test_folder_file_and_glob(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "out"
    extra = tmp_path / "extra"
    extra.mkdir()
    Image.fromarray(random_image(30, 90, 4)).save(extra / "d.png")
    Image.fromarray(random_image(30, 90, 5)).save(extra / "e.png")
    status = run_cli(PRESET, checkpoint, str(images), str(extra / "d.png"),
                     str(extra / "*.png"), "--out", str(out), "--batch-size", "2")
    captured = capsys.readouterr()
    assert status == 1  # broken.png failed; everything else was written
    assert "broken.png" in captured.err and "cannot read image" in captured.err
    assert "skipped 1 non-image file" in captured.err
    assert "5 image(s) written" in captured.out and "1 failed" in captured.out
    for stem, (h, w) in {"a": (50, 70), "b": (40, 40), "c": (45, 60), "d": (30, 90),
                         "e": (30, 90)}.items():
        labels = np.asarray(Image.open(out / f"{stem}_labels.png"))
        assert labels.shape == (h, w) and labels.max() < 150
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert overlay.height == h and overlay.width > w  # image + legend
    assert not (out / "broken_overlay.png").exists()
    assert not list(out.glob("*heatmap*"))
    assert json.loads((out / "classes.json").read_text())["classes"][0] == "wall"


def test_labels_match_the_predictor(checkpoint, tmp_path):
    Image.fromarray(random_image(50, 70, 1)).save(tmp_path / "a.png")
    assert run_cli(PRESET, checkpoint, str(tmp_path / "a.png"), "--out", str(tmp_path)) == 0
    # Exact even in `auto` precision (bf16 on CPUs with AVX-512 BF16 or AMX, fp32 elsewhere):
    # the CLI and the predictor resolve it alike and run the same operations on one machine.
    expected = denseclip.Predictor(PRESET, checkpoint).predict(tmp_path / "a.png").labels
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a_labels.png")), expected)


def test_open_classes_and_heatmaps(checkpoint, tmp_path, capsys):
    Image.fromarray(random_image(50, 70, 1)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    status = run_cli(PRESET, checkpoint, str(tmp_path / "a.png"), "--out", str(out),
                     "--classes", "cat,dog,green grass", "--heatmaps")
    assert status == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert {"a_overlay.png", "a_labels.png", "a_open_overlay.png", "a_open_labels.png",
            "a_heatmap_cat.png", "a_heatmap_dog.png", "a_heatmap_green_grass.png"} <= names
    assert np.asarray(Image.open(out / "a_open_labels.png")).max() <= 2
    heat = Image.open(out / "a_heatmap_cat.png")  # the image, then its name and colour bar
    assert heat.width > 70 and heat.height >= 50
    meta = json.loads((out / "classes.json").read_text())
    assert meta["open_classes"] == ["cat", "dog", "green grass"]


def test_class_file_and_trained_heatmaps(checkpoint, tmp_path):
    Image.fromarray(random_image(50, 70, 1)).save(tmp_path / "a.png")
    (tmp_path / "classes.txt").write_text("cat: kitty\ndog\n")
    out = tmp_path / "open"
    assert run_cli(PRESET, checkpoint, str(tmp_path / "a.png"), "--out", str(out),
                   "--classes-file", str(tmp_path / "classes.txt")) == 0
    meta = json.loads((out / "classes.json").read_text())
    assert meta["open_classes"] == ["cat", "dog"] and meta["open_texts"] == ["kitty", "dog"]
    out = tmp_path / "trained"
    assert run_cli(PRESET, checkpoint, str(tmp_path / "a.png"), "--out", str(out),
                   "--heatmaps") == 0
    labels = np.asarray(Image.open(out / "a_labels.png"))
    names = load_class_names("ade20k")
    heatmaps = sorted(p.name for p in out.glob("a_heatmap_*.png"))
    expected = sorted(f"a_heatmap_{safe_name(names[c])}.png" for c in np.unique(labels))
    assert heatmaps == expected


def test_overrides_among_the_inputs(checkpoint, tmp_path):
    Image.fromarray(random_image(50, 70, 1)).save(tmp_path / "a.png")
    assert run_cli(PRESET, checkpoint, str(tmp_path / "a.png"), "evaluation.mode=whole",
                   "--out", str(tmp_path / "out")) == 0
    assert (tmp_path / "out" / "a_labels.png").exists()


def test_missing_inputs_and_too_elongated_images_are_reported(checkpoint, tmp_path, capsys):
    Image.fromarray(random_image(3, 300)).save(tmp_path / "thin.png")
    Image.fromarray(random_image(40, 40)).save(tmp_path / "ok.png")
    status = run_cli(PRESET, checkpoint, str(tmp_path / "thin.png"), str(tmp_path / "ok.png"),
                     str(tmp_path / "nope.png"), str(tmp_path / "*.gif"),
                     "--out", str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert status == 1
    assert "nope.png: no such file or folder" in err
    assert "*.gif: pattern matches no files" in err
    assert "thin.png" in err and "stride 32" in err
    assert (tmp_path / "out" / "ok_overlay.png").exists()


def test_duplicate_stems_get_distinct_outputs(checkpoint, tmp_path):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        Image.fromarray(random_image(40, 40)).save(tmp_path / folder / "same.png")
    assert run_cli(PRESET, checkpoint, str(tmp_path / "x"), str(tmp_path / "y"),
                   "--out", str(tmp_path / "out")) == 0
    assert (tmp_path / "out" / "same_overlay.png").exists()
    assert (tmp_path / "out" / "same_2_overlay.png").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--classes", " , "], "class list is empty"),
    (["--classes", "a remarkably verbose description"], "at most 3"),
    (["--classes-file", "missing.txt"], "does not exist"),
])
def test_bad_class_lists_stop_before_predicting(checkpoint, tmp_path, capsys, args, message):
    Image.fromarray(random_image(40, 40)).save(tmp_path / "a.png")
    status = run_cli(PRESET, checkpoint, str(tmp_path / "a.png"), "--out",
                     str(tmp_path / "out"), *args)
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "a_overlay.png").exists()


def test_checkpoint_of_another_config(tmp_path, capsys):
    torch.manual_seed(0)
    vit = denseclip.build_model(denseclip.load_config("tiny_denseclip_vit"))
    path = save_checkpoint(tmp_path / "vit.pth", vit)
    Image.fromarray(random_image(40, 40)).save(tmp_path / "a.png")
    status = run_cli(PRESET, str(path), str(tmp_path / "a.png"), "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert status == 2
    assert "does not match the model" in err and "model keys missing from the file" in err
    assert "backbone.layer1" in err


def test_missing_checkpoint(tmp_path, capsys):
    Image.fromarray(random_image(40, 40)).save(tmp_path / "a.png")
    status = run_cli(PRESET, str(tmp_path / "nope.pth"), str(tmp_path / "a.png"), "--out",
                     str(tmp_path / "o"))
    assert status == 2 and "nope.pth does not exist" in capsys.readouterr().err


def test_random_weights_are_announced(tmp_path, capsys):
    Image.fromarray(random_image(40, 40)).save(tmp_path / "a.png")
    assert run_cli(PRESET, "none", str(tmp_path / "a.png"), "--out", str(tmp_path / "o")) == 0
    assert "random weights" in capsys.readouterr().err


def test_detection_outputs(tmp_path, capsys):
    preset = "tiny_mask_rcnn_denseclip"
    Image.fromarray(random_image(60, 80)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    status = run_cli(preset, "none", str(tmp_path / "a.png"), "--out", str(out),
                     "--score-thr", "0.0")
    assert status == 0, capsys.readouterr().err
    assert Image.open(out / "a_overlay.png").size == (80, 60)
    record = json.loads((out / "a.json").read_text())
    assert record["image_size"] == [60, 80] and record["score_thr"] == 0.0
    for det in record["detections"]:
        assert set(det) == {"label", "class", "score", "box", "mask_area"}
        assert det["class"] == load_class_names("coco")[det["label"]]
    scores = [d["score"] for d in record["detections"]]
    assert scores == sorted(scores, reverse=True)


def test_registered_in_the_cli(checkpoint, tmp_path):
    Image.fromarray(random_image(40, 40)).save(tmp_path / "a.png")
    status = cli.main(["predict", PRESET, checkpoint, str(tmp_path / "a.png"), "--out",
                       str(tmp_path / "out"), "evaluation.mode=whole"])
    assert status == 0
    assert (tmp_path / "out" / "a_overlay.png").exists()
