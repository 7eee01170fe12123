"""The Cityscapes and Pascal VOC 2012 release layouts, on generated folders of the real
layout: image/label pairs and label values (255 kept as ignore), the presets, one training
step with evaluation on each, and wrong layouts reported by path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import denseclip
from denseclip.classes import BUNDLED, load_class_names
from denseclip.cli import main
from denseclip.config import DataConfig
from denseclip.data import (
    CityscapesDataset,
    DatasetError,
    VOCDataset,
    build_segmentation_dataset,
)
from denseclip.data.layouts import MAX_SPLIT_FILE_BYTES, read_split_file
from denseclip.dist import DistEnv
from denseclip.engine import trainer
from denseclip.tasks.segmentation import SegmentationTask
from tests.helpers.images import block_labels, random_image

SIZE = (64, 128)  # H, W: Cityscapes' 1:2 aspect
CITIES = {"train": {"aachen": 2, "bremen": 1}, "val": {"lindau": 2}}
VOC_SPLITS = {"train": ["2007_000032", "2007_000039", "2008_000002"],
              "val": ["2009_000012", "2007_000033"]}


def _labels(seed: int, num_classes: int, border: int = 0) -> np.ndarray:
    """Block labels over every class id, 255 in the cells ``seed`` picks and (VOC's
    boundary) a ``border``-pixel frame."""
    rng = np.random.default_rng(seed)
    label = block_labels(rng, SIZE, [*range(num_classes), 255])
    if border:
        label[:border], label[-border:] = 255, 255
        label[:, :border], label[:, -border:] = 255, 255
    return label


def write_cityscapes(root: Path) -> dict[str, np.ndarray]:
    """The gtFine layout with the other label files the release ships beside the
    train-id maps; returns {item name: train-id map}."""
    written = {}
    seed = 0
    for split, cities in CITIES.items():
        for city, count in cities.items():
            img_dir = root / "leftImg8bit" / split / city
            ann_dir = root / "gtFine" / split / city
            img_dir.mkdir(parents=True)
            ann_dir.mkdir(parents=True)
            for i in range(count):
                stem = f"{city}_{i:06d}_000019"
                label = _labels(seed, 19)
                Image.fromarray(random_image(*SIZE, seed)).save(
                    img_dir / f"{stem}_leftImg8bit.png")
                Image.fromarray(label).save(ann_dir / f"{stem}_gtFine_labelTrainIds.png")
                Image.fromarray(label + 7).save(ann_dir / f"{stem}_gtFine_labelIds.png")
                (ann_dir / f"{stem}_gtFine_polygons.json").write_text("{}")
                written[f"{city}/{stem}"] = label
                seed += 1
    return written


def voc_palette() -> list[int]:
    """The VOC colour map: the bits of the index spread over R, G and B, high bit first."""
    palette = []
    for index in range(256):
        rgb = [0, 0, 0]
        for shift in range(8):
            for channel in range(3):
                rgb[channel] |= ((index >> (3 * shift + channel)) & 1) << (7 - shift)
        palette += rgb
    return palette


def write_voc(root: Path) -> dict[str, np.ndarray]:
    """VOCdevkit/VOC2012's segmentation layout: JPEG images, palette PNG labels with a
    255 boundary, split lists; returns {name: palette indices}."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    written = {}
    for seed, name in enumerate(n for names in VOC_SPLITS.values() for n in names):
        Image.fromarray(random_image(*SIZE, seed)).save(root / "JPEGImages" / f"{name}.jpg",
                                                        quality=95)
        label = _labels(seed, 21, border=2)
        png = Image.fromarray(label, mode="L").convert("P")
        png.putpalette(voc_palette())
        png.save(root / "SegmentationClass" / f"{name}.png")
        written[name] = label
    for split, names in VOC_SPLITS.items():
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    (root / "ImageSets/Segmentation/trainval.txt").write_text(
        "\n".join(VOC_SPLITS["train"] + VOC_SPLITS["val"]) + "\n")
    return written


@pytest.fixture
def cityscapes(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "cityscapes"
    return root, write_cityscapes(root)


@pytest.fixture
def voc(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    return root, write_voc(root)


# ------------------------------------------------------------------ loading


def test_bundled_class_lists():
    assert load_class_names("cityscapes")[6:8] == ["traffic light", "traffic sign"]
    assert len(load_class_names("cityscapes")) == 19
    voc_names = load_class_names("voc")
    assert len(voc_names) == 21 and voc_names[0] == "background" and voc_names[-1] == "tvmonitor"
    assert BUNDLED["voc"].parent == BUNDLED["ade20k"].parent  # shipped as package data


def test_cityscapes_pairs_images_with_their_train_id_maps(cityscapes):
    root, written = cityscapes
    ds = CityscapesDataset(root, "train", test_mode=True)
    assert ds.names == sorted(n for n in written if n.split("/")[0] in CITIES["train"])
    assert ds.num_classes == 19 and ds.class_names[-1] == "bicycle"
    for index, name in enumerate(ds.names):
        item = ds[index]
        assert item["name"] == name and item["ori_size"] == SIZE
        # stored train ids are the targets: no zero-label reduction, 255 kept as ignore
        assert torch.equal(item["target"], torch.from_numpy(written[name].astype(np.int64)))
        assert (item["target"] == 255).any() and item["target"].max() == 255
        stem = name.split("/")[1]
        pixels = np.array(Image.open(ds.image_path(index)))
        assert ds.image_path(index).name == f"{stem}_leftImg8bit.png"
        assert torch.equal(item["image"], torch.from_numpy(pixels).permute(2, 0, 1).float())
    assert len(CityscapesDataset(root, "val")) == 2


def test_voc_reads_palette_indices_in_split_file_order(voc):
    root, written = voc
    ds = VOCDataset(root, "val", test_mode=True)
    assert ds.names == VOC_SPLITS["val"]  # the list's order, not sorted
    assert ds.split_file == root / "ImageSets/Segmentation/val.txt"
    assert ds.num_classes == 21
    for index, name in enumerate(ds.names):
        assert Image.open(ds.label_path(index)).mode == "P"
        target = ds[index]["target"]
        assert torch.equal(target, torch.from_numpy(written[name].astype(np.int64)))
        assert (target[:2] == 255).all() and (target[:, -2:] == 255).all()  # boundary
        assert set(target.unique().tolist()) - {255} <= set(range(21))
    assert len(VOCDataset(root, "trainval")) == 5


def test_predictions_are_written_in_the_layouts_label_space(cityscapes, tmp_path):
    root, _ = cityscapes
    ds = CityscapesDataset(root, "val")
    pred = torch.tensor([[0, 18], [255, 7]])
    path = ds.save_prediction(pred, tmp_path / "out", ds.names[0])
    assert path == tmp_path / "out" / "lindau" / "lindau_000000_000019.png"
    assert np.asarray(Image.open(path)).tolist() == [[0, 18], [255, 7]]


@pytest.mark.parametrize(("preset", "layout", "crop"), [
    ("denseclip_fpn_res50_cityscapes_512x1024_80k", "cityscapes", (512, 1024)),
    ("denseclip_fpn_res50_voc12_512x512_40k", "voc", (512, 512)),
])
def test_presets_build_their_datasets(preset, layout, crop, cityscapes, voc):
    root = {"cityscapes": cityscapes, "voc": voc}[layout][0]
    cfg = denseclip.load_config(preset, [f"data.root={root}"])
    assert cfg.data.dataset == layout and cfg.model.classes == layout
    assert not cfg.data.reduce_zero_label and cfg.evaluation.mode == "whole"
    task = SegmentationTask(cfg)
    train_set = task.dataset(cfg.data.train_split, train=True)
    item = train_set[(0, 123)]
    assert item["image"].shape == (3, *crop) and item["target"].shape == crop
    assert set(item["target"].unique().tolist()) - {255} <= set(range(task.num_classes))
    val_set = task.dataset(cfg.data.val_split, train=False)
    item = val_set[0]
    # the test scale fits the 64x128 image into (long, short) = test_scale, aspect kept
    long, short = cfg.data.test_scale
    factor = min(long / SIZE[1], short / SIZE[0])
    assert item["image"].shape[1:] == (round(SIZE[0] * factor), round(SIZE[1] * factor))
    assert item["ori_target"].shape == SIZE
    assert val_set.class_names == load_class_names(layout)


def test_the_model_must_have_the_layouts_classes(cityscapes):
    cfg = DataConfig(dataset="cityscapes", root=str(cityscapes[0]))
    with pytest.raises(DatasetError, match=r"the model has 150 classes but Cityscapes has 19 "
                                           r"\(model.classes=cityscapes names them\)"):
        build_segmentation_dataset(cfg, "train", 150, train=True)


# ------------------------------------------------------------------ training


def _tiny(layout: str, root: Path) -> denseclip.Config:
    return denseclip.load_config("tiny_denseclip_res", [
        f"data.dataset={layout}", f"data.root={root}", f"model.classes={layout}",
        "data.train_split=train", "data.val_split=val", "data.crop_size=[32,64]",
        "data.batch_size=2", "data.num_workers=0", "evaluation.mode=whole",
        "schedule.max_iters=2", "schedule.warmup_iters=0", "schedule.eval_interval=2",
        "schedule.checkpoint_interval=2", "schedule.log_interval=1"])


@pytest.mark.parametrize("layout", ["cityscapes", "voc"])
def test_one_training_step_and_evaluation(layout, cityscapes, voc, tmp_path):
    root = {"cityscapes": cityscapes, "voc": voc}[layout][0]
    cfg = _tiny(layout, root)
    torch.manual_seed(0)
    metrics = trainer.train(cfg, tmp_path / "work", env=DistEnv(), progress=False)
    names = load_class_names(layout)
    assert [row["name"] for row in metrics["per_class"]] == names
    assert metrics["num_images"] == 2
    assert 0.0 <= metrics["mIoU"] <= 100.0
    assert (tmp_path / "work" / "iter_2.pth").is_file()


# ------------------------------------------------------------------ wrong layouts


def _remove(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()


def _cityscapes_cases(root: Path) -> list[tuple[str, str, str]]:
    """(what is done to the tree, split, expected message); each test has a fresh tree."""
    stem = "lindau_000001_000019"
    return [
        ("rm gtFine", "train",
         f"{root / 'gtFine'} does not exist: a Cityscapes root (data.root) holds "
         "leftImg8bit/ and gtFine/"),
        ("", "training",
         f"split folder {root / 'leftImg8bit/training'} does not exist (splits there: "
         "train, val; data.train_split / data.val_split name the split)"),
        (f"rm gtFine/val/lindau/{stem}_gtFine_labelTrainIds.png", "val",
         f"image {root / 'leftImg8bit/val/lindau' / (stem + '_leftImg8bit.png')} has no "
         f"label map {root / 'gtFine/val/lindau' / (stem + '_gtFine_labelTrainIds.png')}"),
        ("rm gtFine/val/lindau/*_labelTrainIds.png", "val",
         f"{root / 'gtFine/val'} holds *_gtFine_labelIds.png but no "
         "*_gtFine_labelTrainIds.png: write the 19 training ids first (cityscapesscripts' "
         "createTrainIdLabelImgs)"),
        ("rm leftImg8bit/val/lindau/*", "val",
         f"no images ending in '_leftImg8bit.png' found in {root / 'leftImg8bit/val'}"),
        ("", "../cityscapes",
         "Cityscapes split: '../cityscapes' is not a plain file name (no folder part allowed)"),
    ]


def _apply(root: Path, action: str) -> None:
    """``rm GLOB`` (files or folders under ``root``) or ``write NAME TEXT`` (a VOC split
    file); an empty action changes nothing."""
    if not action:
        return
    verb, rest = action.split(" ", 1)
    if verb == "write":
        name, text = rest.split(" ", 1)
        (root / "ImageSets/Segmentation" / name).write_text(text)
        return
    assert verb == "rm"
    for path in sorted(root.glob(rest)):
        _remove(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize("case", range(6))
def test_wrong_cityscapes_layouts_are_reported_by_path(case, cityscapes):
    root, _ = cityscapes
    action, split, message = _cityscapes_cases(root)[case]
    _apply(root, action)
    with pytest.raises(DatasetError) as info:
        CityscapesDataset(root, split)
    assert str(info.value) == message


def test_label_ids_saved_as_train_ids_are_reported_at_load(cityscapes):
    root, written = cityscapes
    ds = CityscapesDataset(root, "val")
    label = written[ds.names[0]].copy()
    label[0, 0] = 33  # a label id ("bicycle") where train ids stop at 18
    Image.fromarray(label).save(ds.label_path(0))
    with pytest.raises(DatasetError, match=rf"label map {ds.label_path(0)} holds value\(s\) 33 "
                                           r"outside the class range \(0\.\.18 for 19 classes, "
                                           r"255 = ignore\)"):
        ds[0]


def _voc_cases(root: Path) -> list[tuple[str, str, str]]:
    seg = root / "ImageSets/Segmentation"
    voc = ("a Pascal VOC root (data.root, e.g. VOCdevkit/VOC2012) holds JPEGImages/, "
           "SegmentationClass/ and ImageSets/Segmentation/")
    return [
        ("rm JPEGImages", "train", f"{root / 'JPEGImages'} does not exist: {voc}"),
        ("rm ImageSets", "train", f"{seg} does not exist: {voc}"),
        ("", "training", f"split file {seg / 'training.txt'} does not exist (splits there: "
                         "train, trainval, val; data.train_split / data.val_split name the "
                         "split)"),
        ("rm JPEGImages/2007_000039.jpg", "train",
         f"{seg / 'train.txt'} lists '2007_000039' but its image "
         f"{root / 'JPEGImages/2007_000039.jpg'} does not exist"),
        ("rm SegmentationClass/2007_00003*.png", "trainval",
         f"{seg / 'trainval.txt'} lists '2007_000032' but its label map "
         f"{root / 'SegmentationClass/2007_000032.png'} does not exist (and 2 more)"),
        ("write val.txt \n\n", "val", f"split file {seg / 'val.txt'} lists no images"),
        ("write val.txt 2007_000032\n../../secret\n", "val",
         f"{seg / 'val.txt'}, line 2: '../../secret' is not a plain file name (no folder "
         "part allowed)"),
        ("write val.txt C:2007_000032\n", "val",
         f"{seg / 'val.txt'}, line 1: 'C:2007_000032' is not a plain file name (no folder "
         "part allowed)"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_wrong_voc_layouts_are_reported_by_path(case, voc):
    root, _ = voc
    action, split, message = _voc_cases(root)[case]
    _apply(root, action)
    with pytest.raises(DatasetError) as info:
        VOCDataset(root, split)
    assert str(info.value) == message


def test_voc_labels_saved_as_colour_are_refused(voc):
    root, _ = voc
    ds = VOCDataset(root, "val")
    Image.open(ds.label_path(1)).convert("RGB").save(ds.label_path(1))
    with pytest.raises(DatasetError, match=rf"label map {ds.label_path(1)} has mode RGB; "
                                           "expected a single-channel image"):
        ds[1]


def test_a_split_file_too_large_is_refused_unread(tmp_path):
    path = tmp_path / "train.txt"
    with open(path, "wb") as f:
        f.truncate(MAX_SPLIT_FILE_BYTES + 1)  # sparse: no memory or disk spent
    with pytest.raises(DatasetError, match=rf"split file {path} is {MAX_SPLIT_FILE_BYTES + 1} "
                                           "bytes, more than the"):
        read_split_file(path)


def test_the_cli_reports_a_wrong_layout_in_one_line(voc, tmp_path, capsys):
    root, _ = voc
    (root / "SegmentationClass" / "2009_000012.png").unlink()
    status = main(["train", "tiny_denseclip_res", "--work-dir", str(tmp_path / "work"),
                   "--no-progress", "data.dataset=voc", f"data.root={root}",
                   "model.classes=voc", "data.train_split=train", "data.val_split=val",
                   "data.num_workers=0"])
    assert status == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"denseclip train: error: {root / 'ImageSets/Segmentation/val.txt'} lists "
        f"'2009_000012' but its label map {root / 'SegmentationClass/2009_000012.png'} "
        "does not exist")
