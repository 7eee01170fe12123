"""The validation holdout (data.holdout_fraction): the same disjoint parts on every run, for
the folder and COCO datasets alike."""

from __future__ import annotations

import pytest

from denseclip.config import load_config
from denseclip.data.coco import build_coco_dataset
from denseclip.data.holdout import holdout_count, split_holdout
from denseclip.data.io import DatasetError
from denseclip.data.segmentation import build_segmentation_dataset
from denseclip.data.synthetic import make_synthetic_dataset
from tests.helpers.coco import write_coco


def test_holdout_count_keeps_one_on_each_side():
    assert holdout_count(100, 0.1) == 10
    assert holdout_count(3, 0.1) == 1  # at least one held out
    assert holdout_count(2, 0.9) == 1  # at least one left to train on
    with pytest.raises(DatasetError, match="at least 2 training images, got 1"):
        holdout_count(1, 0.1)


def test_split_is_disjoint_complete_and_independent_of_order():
    keys = [f"img{i:02d}" for i in range(20)]
    kept, held = split_holdout(keys, 0.25, seed=3)
    assert len(held) == 5 and sorted(kept + held) == keys and not set(kept) & set(held)
    again = split_holdout(list(reversed(keys)), 0.25, seed=3)
    assert set(again[1]) == set(held)
    assert len({tuple(split_holdout(keys, 0.25, seed=s)[1]) for s in range(5)}) > 1


def test_folder_dataset_holdout(tmp_path):
    root = make_synthetic_dataset(tmp_path, 10, 0, size=(32, 32))
    overrides = ["data.dataset=folder", f"data.root={root}", "data.holdout_fraction=0.3",
                 "data.val_split=training"]
    cfg = load_config("tiny_denseclip_res", overrides).data

    def parts(seed):
        train = build_segmentation_dataset(cfg, "training", 5, train=True, seed=seed)
        val = build_segmentation_dataset(cfg, "training", 5, train=False, seed=seed)
        return train.names, val.names

    train, val = parts(0)
    assert len(val) == 3 and len(train) == 7 and not set(train) & set(val)
    assert parts(0) == (train, val)  # every run the same
    assert parts(1) != (train, val)
    assert val == split_holdout(sorted(train + val), 0.3, 0)[1]


def test_coco_dataset_holdout(tmp_path):
    write_coco(tmp_path, "train")
    cfg = load_config("tiny_retinanet_denseclip", [
        f"data.root={tmp_path}", "data.train_split=train", "data.val_split=train",
        "data.holdout_fraction=0.5"]).data
    train = build_coco_dataset(cfg, "train", True, seed=0)
    val = build_coco_dataset(cfg, "train", False, seed=0)
    assert len(val) == 2 and not set(train.ids) & set(val.ids)
    assert set(train.ids) <= {10, 20, 40} - set(val.ids)  # 30 has no annotation
    assert sorted(val.coco.getImgIds()) == sorted(val.ids)  # the ground truth is the part's
    assert {a["image_id"] for a in val.coco.dataset["annotations"]} <= set(val.ids)
    assert build_coco_dataset(cfg, "train", False, seed=0).ids == val.ids
