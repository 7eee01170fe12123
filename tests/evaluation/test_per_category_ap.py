"""AP per COCO category: agrees with pycocotools category by category and on average, and
``denseclip test`` writes and prints it."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
from pycocotools.cocoeval import COCOeval

import denseclip
from denseclip.dist import DistEnv
from denseclip.evaluation.coco import (
    coco_evaluate,
    detections_to_coco,
    format_per_category_table,
    write_per_category_ap,
)
from denseclip.tasks import DetectionTask
from tests.evaluation.test_coco import Replay, perfect, test_dataset
from tests.helpers.coco import rewrite


def imperfect(ds) -> list[dict[str, torch.Tensor]]:
    """The ground truth as detections, spoilt differently per category: shifted squares,
    a circle given the wrong class, a confident false triangle."""
    dets = []
    for i in range(len(ds)):
        det = perfect(ds, i)
        shift = torch.where(det["labels"] == 0, 4.0, 0.0)[:, None]
        det["boxes"] = det["boxes"] + shift
        if i == 3:
            det["labels"] = torch.where(det["labels"] == 1, 0, det["labels"])
        if i == 0:
            det = {k: torch.cat([v, extra]) for k, v, extra in (
                ("boxes", det["boxes"], torch.tensor([[60.0, 2.0, 90.0, 30.0]])),
                ("labels", det["labels"], torch.tensor([2])),
                ("scores", det["scores"], torch.tensor([0.99])),
                ("masks", det["masks"], torch.zeros(1, *det["masks"].shape[1:])))}
        dets.append(det)
    return dets


def cocoeval_ap(coco_gt, results, iou_type, cat_ids=None) -> float:
    """pycocotools' own AP (stats[0]), optionally over some categories only."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes([dict(r) for r in results]), iou_type)
        if cat_ids is not None:
            evaluator.params.catIds = cat_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0]) * 100


@pytest.mark.filterwarnings("ignore:.*copy keyword:DeprecationWarning")  # pycocotools, NumPy 2
def test_per_category_ap_matches_pycocotools(coco_root, coco_json):
    # A fourth category without any annotation: pycocotools reports -1 for it.
    coco_json["categories"].append({"id": 20, "name": "hexagon", "supercategory": "shape"})
    rewrite(coco_root, coco_json)
    ds = test_dataset(coco_root)
    bbox, segm = detections_to_coco(imperfect(ds), ds.ids, ds.cat_ids)
    for iou_type, results in (("bbox", bbox), ("segm", segm)):
        metrics = coco_evaluate(ds.coco, results, iou_type)
        rows = metrics["per_category"]
        assert [(r["category_id"], r["name"]) for r in rows] == [
            (3, "square"), (7, "circle"), (11, "triangle"), (20, "hexagon")]
        assert math.isnan(rows[3]["AP"])
        aps = [r["AP"] for r in rows[:3]]
        assert len(set(aps)) > 1 and all(0 < ap < 100 for ap in aps)  # really per category
        for row in rows[:3]:  # pycocotools restricted to the one category
            assert row["AP"] == pytest.approx(
                cocoeval_ap(ds.coco, results, iou_type, [row["category_id"]]), abs=1e-9)
        # The mean over categories is pycocotools' overall AP.
        assert sum(aps) / 3 == pytest.approx(metrics["AP"], abs=1e-9)
        assert metrics["AP"] == pytest.approx(cocoeval_ap(ds.coco, results, iou_type))


def test_no_detections_give_zero_per_category(shared_coco):
    ds = test_dataset(shared_coco)
    rows = coco_evaluate(ds.coco, [], "bbox", image_ids=[10, 30])["per_category"]
    # images 10 (a square, a circle, a crowd square) and 30 (empty): no triangle there
    assert [r["AP"] for r in rows[:2]] == [0.0, 0.0] and math.isnan(rows[2]["AP"])


def test_table_and_files(tmp_path):
    per_type = {
        "bbox": [{"category_id": 3, "name": "square", "AP": 50.0},
                 {"category_id": 7, "name": "circle", "AP": math.nan},
                 {"category_id": 11, "name": "triangle", "AP": 25.5}],
        "segm": [{"category_id": 3, "name": "square", "AP": 40.0},
                 {"category_id": 7, "name": "circle", "AP": math.nan},
                 {"category_id": 11, "name": "triangle", "AP": 20.0}],
    }
    table = format_per_category_table(per_type)
    assert table.splitlines() == [
        "| category | id | bbox AP | segm AP |",
        "|:---|---:|---:|---:|",
        "| square | 3 | 50.00 | 40.00 |",
        "| circle | 7 | - | - |",
        "| triangle | 11 | 25.50 | 20.00 |",
        "| **mean** |  | 37.75 | 30.00 |",
    ]
    json_path, md_path = write_per_category_ap(tmp_path, per_type)
    saved = json.loads(json_path.read_text())  # strict JSON: null, not NaN
    assert saved["bbox"][1] == {"category_id": 7, "name": "circle", "AP": None}
    assert saved["segm"][2]["AP"] == 20.0
    assert md_path.read_text() == table + "\n"


def test_denseclip_test_prints_and_writes_the_per_category_table(shared_coco, tmp_path):
    cfg = denseclip.load_config("tiny_mask_rcnn_denseclip", [
        f"model.classes={shared_coco / 'classes.txt'}", f"data.root={shared_coco}",
        "data.val_split=train", "data.num_workers=0"])
    task = DetectionTask(cfg)
    ds = test_dataset(shared_coco)
    metrics = task.evaluate(Replay(ds, range(len(ds))), ds, DistEnv(), out_dir=tmp_path,
                            progress=False)
    assert [r["AP"] for r in metrics["bbox_per_category"]] == pytest.approx([100.0] * 3)
    assert "AP per category (%):\n| category | id | bbox AP | segm AP |" in metrics["table"]
    assert "| circle | 7 | 100.00 | 100.00 |" in metrics["table"]
    saved = json.loads((tmp_path / "per_category_ap.json").read_text())
    assert set(saved) == {"bbox", "segm"} and len(saved["segm"]) == 3
    assert (tmp_path / "per_category_ap.md").read_text().startswith("| category |")
    assert task.write_figures(metrics, tmp_path) == []
