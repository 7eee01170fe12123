from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from denseclip.classes import load_class_names, read_classes
from denseclip.config import DataConfig
from denseclip.data import (
    SHAPE_CLASSES,
    SYNTHETIC_CLASSES,
    FolderDataset,
    build_segmentation_dataset,
    make_shapes_dataset,
    make_synthetic_dataset,
    synthetic_sample,
)


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_layout_and_determinism(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", num_train=6, num_val=3, size=(48, 64), seed=7)
    b = make_synthetic_dataset(tmp_path / "b", num_train=6, num_val=3, size=(48, 64), seed=7)
    c = make_synthetic_dataset(tmp_path / "c", num_train=6, num_val=3, size=(48, 64), seed=8)
    files = _files(a)
    assert len([f for f in files if f.startswith("images/training/")]) == 6
    assert len([f for f in files if f.startswith("annotations/validation/")]) == 3
    assert "classes.txt" in files and files == _files(b)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    labels = [f for f in files if f.endswith(".png")]
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in labels)
    assert load_class_names(a / "classes.txt") == list(SYNTHETIC_CLASSES)
    assert all(len(name.split()) == 1 for name in SYNTHETIC_CLASSES) and len(SYNTHETIC_CLASSES) == 5

    img = Image.open(a / "images/training/synthetic_training_00000.jpg")
    lbl = Image.open(a / "annotations/training/synthetic_training_00000.png")
    assert img.mode == "RGB" and img.size == (64, 48)
    assert lbl.mode == "L" and lbl.size == (64, 48)


def test_scenes_mix_classes_with_distinct_colours():
    per_class = {k: [] for k in range(6)}
    seen_counts = []
    for i in range(60):
        image, label = synthetic_sample(np.random.default_rng([0, i]), (64, 96))
        assert image.dtype == np.uint8 and image.shape == (64, 96, 3)
        assert label.max() <= 5
        present = set(np.unique(label).tolist()) - {0}
        seen_counts.append(len(present))
        for k in range(6):
            if (label == k).any():
                per_class[k].append(image[label == k].astype(float).mean(0))
    assert min(seen_counts) >= 2 and np.mean(seen_counts) >= 3
    assert all(len(v) > 5 for v in per_class.values())  # every class (and "other") occurs
    means = np.array([np.mean(per_class[k], axis=0) for k in range(1, 6)])
    dists = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert dists[~np.eye(5, dtype=bool)].min() > 40  # class colours are far apart


@pytest.mark.parametrize("dataset", ["ade20k", "folder"])
def test_loads_as_a_five_class_dataset(tmp_path, dataset):
    root = make_synthetic_dataset(tmp_path, num_train=4, num_val=2, size=(32, 48), seed=0)
    cfg = DataConfig(dataset=dataset, root=str(root), scale=[96, 32], crop_size=[32, 32],
                     test_scale=[96, 32])
    train = build_segmentation_dataset(cfg, cfg.train_split, num_classes=5, train=True)
    val = build_segmentation_dataset(cfg, cfg.val_split, num_classes=5, train=False)
    assert len(train) == 4 and len(val) == 2 and train.class_names == list(SYNTHETIC_CLASSES)
    item = val[0]
    assert set(item["ori_target"].unique().tolist()) <= {0, 1, 2, 3, 4, 255}
    assert (item["ori_target"] != 255).float().mean() > 0.8
    assert train[(0, 1)]["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32


def test_rejects_tiny_sizes(tmp_path):
    with pytest.raises(ValueError, match="16x16"):
        make_synthetic_dataset(tmp_path, 1, 1, size=(8, 8))


def test_shapes_dataset_is_deterministic_and_labels_what_is_drawn(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", num_train=6, num_val=2, size=(48, 64), seed=3)
    b = make_shapes_dataset(tmp_path / "b", num_train=6, num_val=2, size=(48, 64), seed=3)
    c = make_shapes_dataset(tmp_path / "c", num_train=6, num_val=2, size=(48, 64), seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*.*"))
    assert len(files) == 6 * 2 + 2 * 2 + 1
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.suffix == ".png")
    assert read_classes(a / "classes.txt") == SHAPE_CLASSES  # names with descriptions
    labels = np.stack([np.asarray(Image.open(p)) for p in
                       sorted((a / "annotations" / "training").glob("*.png"))])
    assert labels.shape == (6, 48, 64) and set(np.unique(labels)) <= {0, 1, 2, 3}
    assert (labels > 0).any(axis=(1, 2)).all()  # every image has a shape
    images = np.stack([np.asarray(Image.open(p)) for p in
                       sorted((a / "images" / "training").glob("*.jpg"))]).astype(float)
    # a shape is one flat colour, the background noise: the local spread tells them apart
    spread = np.abs(np.diff(images, axis=2)).mean(axis=-1)
    inside = (labels[:, :, 1:] > 0) & (labels[:, :, :-1] == labels[:, :, 1:])
    assert spread[inside].mean() < 0.2 * spread[~inside & (labels[:, :, 1:] == 0)].mean()
    dataset = FolderDataset(a / "images" / "training", a / "annotations" / "training",
                            a / "classes.txt", reduce_zero_label=False)
    assert len(dataset) == 6
