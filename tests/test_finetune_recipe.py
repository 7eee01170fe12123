"""The recipe of ``denseclip finetune`` (denseclip.tools.finetune): layouts and tasks read
from a folder, the official effective batch through accumulation, --epochs, fitted
intervals, the user's overrides last, and broken layouts named by path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from denseclip.config import ConfigError, load_config
from denseclip.data.io import DatasetError
from denseclip.tools import finetune as ft
from tests.cli.test_finetune import coco_folder, segmentation_folder
from tests.helpers.coco import rewrite


@pytest.fixture
def seg(tmp_path) -> Path:
    return segmentation_folder(tmp_path / "seg")


def test_the_task_follows_from_the_data(tmp_path, seg):
    info = ft.inspect_data(seg)
    assert (info.layout, info.task, info.val_split) == ("folder", "segmentation", None)
    assert info.settings == {"img_suffix": ".jpg", "reduce_zero_label": True}
    assert ft.inspect_data(coco_folder(tmp_path / "boxes", masks=False)).task == "retinanet"
    masks = ft.inspect_data(coco_folder(tmp_path / "masks", masks=True))
    assert (masks.layout, masks.task, masks.val_split, masks.val_images) == (
        "coco", "mask_rcnn", "val", 4)
    recipe = ft.build_recipe(masks, None, [], 1)
    assert recipe.preset == "mask_rcnn_denseclip_r50_fpn_1x_coco"
    assert ft.build_recipe(ft.inspect_data(seg), None, [], 1).preset == \
        "denseclip_fpn_res50_512x512_80k"


def test_coco_2017_names_and_boxes_only_data_with_a_retinanet_preset(tmp_path):
    root = coco_folder(tmp_path / "c", masks=False)
    for split in ("train", "val"):
        (root / split).rename(root / f"{split}2017")
        (root / "annotations" / f"instances_{split}.json").rename(
            root / "annotations" / f"instances_{split}2017.json")
    info = ft.inspect_data(root)
    assert (info.train_split, info.val_split) == ("train2017", "val2017")
    cfg = ft.build_recipe(info, "tiny_retinanet_denseclip", [], 1).cfg
    assert (cfg.data.train_split, cfg.data.val_split, cfg.data.holdout_fraction) == (
        "train2017", "val2017", 0.0)


@pytest.mark.parametrize("batch, world, accumulate, effective", [
    (2, 1, 16, 32), (2, 4, 4, 32), (4, 8, 1, 32), (3, 1, 11, 33), (8, 8, 1, 64)])
def test_accumulation_keeps_the_official_batch(seg, batch, world, accumulate, effective):
    recipe = ft.build_recipe(ft.inspect_data(seg), "tiny_denseclip_res",
                             [f"data.batch_size={batch}"], world)
    assert recipe.cfg.optim.accumulate == accumulate and recipe.effective == effective
    batch_line = next(line for line in recipe.lines("x") if "batch:" in line)
    assert f"= {effective} images per step" in batch_line
    assert ("the official 32)" in batch_line) == (effective == 32)
    # the learning rate and schedule stay the preset's
    preset = load_config("tiny_denseclip_res")
    assert recipe.cfg.optim.lr == preset.optim.lr
    assert recipe.cfg.schedule.max_iters == preset.schedule.max_iters


def test_detection_accumulates_to_16(tmp_path):
    info = ft.inspect_data(coco_folder(tmp_path / "c", masks=True))
    recipe = ft.build_recipe(info, "tiny_mask_rcnn_denseclip", [], 1)
    assert recipe.official == 16 and recipe.cfg.optim.accumulate == 8


def test_epochs_set_the_length_from_the_data(seg):
    info = ft.inspect_data(seg)  # 9 training images after the holdout
    recipe = ft.build_recipe(info, "tiny_denseclip_res", [], 1, epochs=7)
    assert recipe.train_images == 9 and recipe.cfg.schedule.max_iters == 2  # ceil(63 / 32)
    s = recipe.cfg.schedule
    assert (s.warmup_iters, s.eval_interval, s.checkpoint_interval) == (0, 1, 1)
    small = ft.build_recipe(info, "tiny_denseclip_res", ["data.batch_size=1",
                                                         "optim.accumulate=1"], 1, epochs=30)
    assert small.cfg.schedule.max_iters == 270
    s = small.cfg.schedule
    assert (s.warmup_iters, s.eval_interval, s.checkpoint_interval, s.log_interval) == (
        5, 10, 10, 5)  # never more than the preset's
    assert "270 iterations ≈ 30.0 epochs (--epochs 30: ceil(30 × 9 / 1))" in \
        "\n".join(small.lines("x"))


def test_epoch_based_presets_scale_epochs_and_lr_steps(tmp_path):
    info = ft.inspect_data(coco_folder(tmp_path / "c", masks=False))
    cfg = ft.build_recipe(info, "tiny_retinanet_denseclip", [], 1, epochs=6).cfg
    assert cfg.schedule.max_epochs == 6 and cfg.schedule.steps == [3]  # [1] of 2 epochs


def test_overrides_are_applied_last_and_win(seg):
    recipe = ft.build_recipe(ft.inspect_data(seg), "tiny_denseclip_res", [
        "optim.accumulate=3", "schedule.eval_interval=7", "data.holdout_fraction=0.3",
        "data.reduce_zero_label=false"], 1, epochs=50)
    cfg = recipe.cfg
    assert cfg.optim.accumulate == 3 and cfg.schedule.eval_interval == 7
    assert (recipe.train_images, recipe.val_images) == (7, 3)
    assert cfg.schedule.max_iters == 59  # ceil(50 × 7 / 6)
    text = "\n".join(recipe.lines("x"))
    assert "a 30% holdout" in text and "PNG values 0..4 are the classes" in text
    assert "2 per device × 1 device(s) × 3 accumulation step(s) = 6" in text
    assert "(not the official 32, by your overrides" in text  # 32 = 2 × 16 was possible
    assert "not over the 6 of a step (accumulation cannot pool them)" in text
    single = ft.build_recipe(ft.inspect_data(seg), "tiny_denseclip_res", ["optim.accumulate=1"], 1)
    assert "cannot pool" not in "\n".join(single.lines("x"))  # one pass is the whole step


@pytest.mark.parametrize("break_it, missing", [
    (lambda r: shutil.rmtree(r / "annotations"), "annotations is missing"),
    (lambda r: (r / "classes.txt").unlink(), "classes.txt is missing"),
    (lambda r: shutil.rmtree(r / "images" / "training"), "training is missing"),
    (lambda r: [p.unlink() for p in (r / "images" / "training").iterdir()],
     "training holds no images"),
    (lambda r: shutil.rmtree(r / "images"), "images is missing"),
])
def test_a_broken_folder_is_named_by_path(seg, break_it, missing):
    break_it(seg)
    with pytest.raises(DatasetError, match="accepted layouts: folder") as e:
        ft.inspect_data(seg)
    assert missing in str(e.value) and str(seg) in str(e.value)


def test_broken_coco_data_is_named(tmp_path, monkeypatch):
    root = coco_folder(tmp_path / "c", masks=True)
    (root / "classes.txt").write_text("square\ncircle\n")
    with pytest.raises(DatasetError, match="classes.txt names 2 classes .* categories"):
        ft.inspect_data(root)
    (root / "classes.txt").write_text("square\ncircle\ntriangle\n")
    monkeypatch.setattr(ft, "MAX_COCO_JSON_BYTES", 100)
    with pytest.raises(DatasetError, match=r"instances_train.json is \d+ bytes, more than"):
        ft.inspect_data(root)
    monkeypatch.undo()
    shutil.rmtree(root / "train")
    with pytest.raises(DatasetError, match=r"train is missing \(the images of"):
        ft.inspect_data(root)
    rewrite(root, {"images": []}, "train")
    assert json.loads((root / "annotations" / "instances_train.json").read_text())
    with pytest.raises(DatasetError):
        ft.inspect_data(root)
    for path in (tmp_path / "nothing", tmp_path / "c" / "annotations"):
        with pytest.raises(DatasetError, match="accepted layouts"):
            ft.inspect_data(path)


def test_a_preset_of_another_task_names_both(seg):
    with pytest.raises(ConfigError, match="preset tiny_retinanet_denseclip trains retinanet "
                                          "but .* holds label maps"):
        ft.build_recipe(ft.inspect_data(seg), "tiny_retinanet_denseclip", [], 1)


def test_pretrained_means_the_backbones_clip_weights():
    assert ft.clip_weights_name(load_config("denseclip_fpn_res50_512x512_80k")) == "RN50"
    assert ft.clip_weights_name(load_config("mask_rcnn_denseclip_r101_fpn_1x_coco")) == "RN101"
    assert ft.clip_weights_name(load_config("denseclip_fpn_vit-b_640x640_80k")) == "ViT-B-16"
    assert ft.clip_weights_name(load_config("tiny_denseclip_res")) is None
    assert ft.resolve_load_from("none", load_config("tiny_denseclip_res"))[0] is None
