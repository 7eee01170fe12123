"""Detection through the shared training engine and the real CLI: train, resume-ready
checkpoints with the category mapping, `denseclip test` writing COCO results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from denseclip.config import load_config
from denseclip.data.samplers import GroupedInfiniteSampler, InfiniteSampler
from denseclip.dist import DistEnv
from denseclip.engine.trainer import _train_loader
from denseclip.tasks import get_task
from denseclip.weights import read_checkpoint
from tests.helpers.coco import CAT_IDS, CLASS_NAMES, write_coco

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    write_coco(root, "train")
    write_coco(root, "val")
    (root / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    return root


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "denseclip", *args], env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("preset", ["tiny_retinanet_denseclip", "tiny_mask_rcnn_denseclip",
                                    "tiny_retinanet_denseclip_vit"])
def test_train_then_test_through_the_cli(tmp_path, coco_dir, preset):
    common = [f"data.root={coco_dir}", "data.train_split=train", "data.val_split=val",
              f"model.classes={coco_dir}/classes.txt", "data.flip_prob=0.0"]
    work = tmp_path / "work"
    run = cli("train", preset, "--work-dir", str(work), "--no-progress", *common,
              "schedule.max_epochs=2", "schedule.steps=[1]", "schedule.checkpoint_interval=100",
              "schedule.eval_interval=0", "schedule.log_interval=1", "optim.lr=1e-3",
              "schedule.warmup_iters=0")
    assert run.returncode == 0, run.stderr[-3000:]
    # 3 training images with boxes (the empty one is dropped), batch 2 → 2 per epoch.
    assert "2 iterations per epoch" in run.stdout
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in lines] == [1, 2, 3, 4]
    # The logged lr is the next step's: ×0.1 from epoch 1 (iteration 2) on.
    assert lines[1]["lr"] == pytest.approx(lines[0]["lr"] * 0.1)
    assert lines[3]["lr"] == pytest.approx(lines[1]["lr"])
    assert "loss_seg_aux" in lines[0]
    ckpt = read_checkpoint(work / "iter_4.pth")
    assert ckpt["cat_ids"] == CAT_IDS and ckpt["classes"] == CLASS_NAMES

    out = tmp_path / "results"
    res = cli("test", preset, str(work / "iter_4.pth"), "--out-dir", str(out), "--no-progress",
              *common)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    types = ["bbox", "segm"] if "mask_rcnn" in preset else ["bbox"]
    gt = COCO(str(coco_dir / "annotations/instances_val.json"))
    for t in types:
        assert f"{t}_AP" in metrics and f"{t}_APl" in metrics
        results = json.loads((out / f"{t}.json").read_text())
        if results:  # a few iterations may not yet give confident detections
            dt = gt.loadRes(str(out / f"{t}.json"))
            assert set(dt.getImgIds()) <= set(gt.getImgIds())
            assert {r["category_id"] for r in results} <= set(CAT_IDS)
    assert "Average Precision" in res.stdout


def test_aug_test_is_refused_for_detection(tmp_path, coco_dir):
    res = cli("test", "tiny_retinanet_denseclip", str(tmp_path / "none.pth"), "--aug-test",
              f"data.root={coco_dir}", "data.val_split=val",
              f"model.classes={coco_dir}/classes.txt")
    assert res.returncode == 1 and "none.pth" in res.stderr  # the missing file is named


def test_detection_training_groups_batches_by_aspect_ratio(coco_dir):
    common = [f"data.root={coco_dir}", "data.train_split=train", "data.val_split=val",
              f"model.classes={coco_dir}/classes.txt"]
    cfg = load_config("tiny_retinanet_denseclip", common)
    assert cfg.data.group_by_aspect_ratio  # on by default, as mmdet
    task = get_task(cfg)
    train_set = task.dataset("train", train=True)
    flags = task.group_flags(train_set)
    assert flags == train_set.aspect_ratio_flags == [1, 0, 1]
    loader = _train_loader(cfg, train_set, DistEnv(), 0, task.collate, flags)
    sampler = loader.sampler.sampler
    assert isinstance(sampler, GroupedInfiniteSampler) and sampler.seed == cfg.seed
    for batch in islice(iter(loader), 6):
        ratios = {int(img.shape[-1] > img.shape[-2]) for img in batch["image"]}
        assert len(ratios) == 1  # landscape and portrait never share a batch
    off = load_config("tiny_retinanet_denseclip", [*common, "data.group_by_aspect_ratio=false"])
    off_task = get_task(off)
    assert off_task.group_flags(train_set) is None
    plain = _train_loader(off, train_set, DistEnv(), 0, task.collate, None).sampler.sampler
    assert isinstance(plain, InfiniteSampler)
    # the test pipeline resizes to the model's scale; the model gets the sizes on disk
    val = task.dataset("val", train=False)
    item = val[0]
    assert item["ori_size"] == (96, 128) and item["image"].shape[-2:] == (120, 160)
    seg = get_task(load_config("tiny_denseclip_res"))
    assert seg.group_flags(train_set) is None
