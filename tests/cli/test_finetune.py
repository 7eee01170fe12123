"""``denseclip finetune`` end to end on generated data in each layout: a segmentation folder
without a validation split (a class file with descriptions), COCO boxes and COCO polygons;
each run trains, evaluates, keeps best.pth, writes work_dir/model/, and `denseclip predict`
takes that model. Also the recipe's checks: a preset of another task, a broken layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from denseclip.classes import read_classes
from denseclip.cli import main
from denseclip.data.synthetic import make_synthetic_dataset
from tests.helpers.coco import CLASS_NAMES, rewrite, write_coco

CLASS_FILE = "sky: a clear blue sky\ngrass\nroad: an asphalt road\nbuilding\nwater\n"
# short runs: one image per step, two steps (the recipe's 32 / 16 per step would take long)
FAST = ["optim.accumulate=1", "schedule.max_iters=2", "schedule.eval_interval=2"]


def segmentation_folder(root: Path, num_train: int = 10) -> Path:
    """Synthetic scenes in the folder layout with no validation split, labels 1..5."""
    make_synthetic_dataset(root, num_train, 0, size=(48, 64))
    for top in ("images", "annotations"):
        shutil.rmtree(root / top / "validation")
    (root / "classes.txt").write_text(CLASS_FILE)
    return root


def coco_folder(root: Path, masks: bool) -> Path:
    """The test COCO set (train and val); without ``masks`` no annotation has a
    segmentation."""
    for split in ("train", "val"):
        data = write_coco(root, split)
        if not masks:
            for ann in data["annotations"]:
                ann.pop("segmentation")
            rewrite(root, data, split)
    (root / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    return root


def finetune(data: Path, preset: str, work: Path, *extra: str) -> int:
    return main(["finetune", str(data), preset, "--load-from", "none", "--work-dir",
                 str(work), "--no-progress", *extra])


def val_records(work: Path) -> list[dict]:
    lines = (work / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["mode"] == "val"]


def predicts(model: Path, image: Path, out: Path) -> None:
    assert main(["predict", str(model), str(image), "--out", str(out)]) == 0
    assert (out / f"{image.stem}_overlay.png").is_file()


def test_segmentation_folder_trains_with_a_holdout_and_predicts(tmp_path, capsys):
    data = segmentation_folder(tmp_path / "data")
    work = tmp_path / "work"
    assert finetune(data, "tiny_denseclip_res", work, *FAST) == 0
    out = capsys.readouterr().out
    assert "classes: 5 (sky, grass, road, building, water)" in out
    assert "training: 9 images" in out and "validation: 1 images, a 10% holdout" in out
    assert "PNG values 1..5 are the classes" in out  # found in the label maps
    assert "1 accumulation step(s) = 2 images per step (not the official 32" in out
    assert "weights: none: random initialisation" in out
    assert "your overrides (applied last): optim.accumulate=1" in out
    assert [r["iter"] for r in val_records(work)] == [2]
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    assert cfg["data"]["holdout_fraction"] == 0.1 and cfg["data"]["val_split"] == "training"
    assert cfg["optim"]["accumulate"] == 1 and cfg["schedule"]["max_iters"] == 2
    assert (work / "best.pth").is_file()
    # the descriptions are what the text encoder read, and the saved model keeps them; the
    # longest ("a clear blue sky": 4 tokens) needs one more text position than the official 13
    assert read_classes(work / "model" / "classes.txt") == read_classes(data / "classes.txt")
    assert cfg["model"]["text"]["context_length"] == 14
    predicts(work / "model", next((data / "images" / "training").iterdir()), tmp_path / "out")


@pytest.mark.parametrize("masks, preset", [(False, "tiny_retinanet_denseclip"),
                                           (True, "tiny_mask_rcnn_denseclip")])
def test_coco_trains_and_predicts(tmp_path, capsys, masks, preset):
    data = coco_folder(tmp_path / "data", masks)
    work = tmp_path / "work"
    assert finetune(data, preset, work, "optim.accumulate=1", "schedule.max_epochs=1") == 0
    out = capsys.readouterr().out
    assert f"(model.task {'mask_rcnn' if masks else 'retinanet'})" in out
    assert "validation: 4 images, the val split" in out
    assert val_records(work)[-1]["iter"] == 2  # 3 usable images, batch 2: 2 steps
    assert "bbox_AP" in val_records(work)[-1]
    assert (work / "best.pth").is_file() and (work / "model" / "model.safetensors").is_file()
    predicts(work / "model", next((data / "val").iterdir()), tmp_path / "out")


def test_a_preset_of_another_task_is_refused_in_one_line(tmp_path, capsys):
    data = coco_folder(tmp_path / "data", masks=False)
    status = finetune(data, "tiny_mask_rcnn_denseclip", tmp_path / "work")
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err
    assert "preset tiny_mask_rcnn_denseclip trains mask_rcnn" in err
    assert "retinanet_denseclip_r50_fpn_1x_coco" in err
    assert not (tmp_path / "work").exists()


def test_a_broken_layout_is_named_by_path(tmp_path, capsys):
    data = segmentation_folder(tmp_path / "data", num_train=2)
    shutil.rmtree(data / "annotations")
    status = finetune(data, "tiny_denseclip_res", tmp_path / "work")
    err = capsys.readouterr().err.strip()
    assert status == 1 and "\n" not in err
    assert f"{data / 'annotations'} is missing" in err and "accepted layouts: folder" in err


def test_the_recipe_without_a_preset_names_the_default_and_the_weights(tmp_path, capsys):
    """No preset: the data's task picks one; ``--load-from pretrained`` of a backbone
    without CLIP release says what to give instead (no download is attempted)."""
    data = coco_folder(tmp_path / "data", masks=True)
    status = main(["finetune", str(data), "--work-dir", str(tmp_path / "w"),
                   "model.backbone.layers=[1,1,1,1]"])
    err = capsys.readouterr().err
    assert status == 1
    assert "no CLIP release fits mask_rcnn_denseclip_r50_fpn_1x_coco's backbone" in err
    assert json.loads((data / "annotations" / "instances_train.json").read_text())
