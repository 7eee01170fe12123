"""COCO evaluation: results JSON, AP of perfect predictions, sharding and a real model."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
from pycocotools import mask as mask_utils
from torch import nn

import denseclip
from denseclip.config import DataConfig
from denseclip.data.coco import CocoDetection, DatasetWarning, build_coco_dataset
from denseclip.dist import DistEnv
from denseclip.evaluation import coco as coco_eval
from denseclip.evaluation.coco import (
    METRIC_NAMES,
    coco_evaluate,
    detections_to_coco,
    evaluate_detection,
    masks_to_rles,
)
from denseclip.models.build import build_detector
from denseclip.utils import keep_ratio_size


def test_dataset(root, masks: bool = True) -> CocoDetection:
    return CocoDetection(root / "train", root / "annotations" / "instances_train.json",
                         with_masks=masks)


test_dataset.__test__ = False  # a helper, not a test


def perfect(ds: CocoDetection, index: int) -> dict[str, torch.Tensor]:
    """Ground truth as a detector would output it (original coordinates)."""
    t = ds[index]["target"]
    n = len(t["labels"])
    return {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.linspace(1.0, 0.5, n),
            "masks": t["masks"][:, None].float()}


class Replay(nn.Module):
    """Returns the perfect detections of the images it is shown, in dataset order."""

    def __init__(self, ds: CocoDetection, indices) -> None:
        super().__init__()
        self.outputs = [perfect(ds, i) for i in indices]
        self.calls = 0
        self.seen: list[tuple[tuple[int, ...], tuple[int, int]]] = []

    def forward(self, images, original_sizes=None):
        assert original_sizes is not None and len(original_sizes) == len(images)
        self.seen += [(tuple(im.shape), tuple(s)) for im, s in zip(images, original_sizes,
                                                                   strict=True)]
        out = self.outputs[self.calls:self.calls + len(images)]
        self.calls += len(images)
        return out


def test_perfect_predictions_score_100(shared_coco):
    ds = test_dataset(shared_coco)
    dets = [perfect(ds, i) for i in range(len(ds))]
    bbox, segm = detections_to_coco(dets, ds.ids, ds.cat_ids)
    assert {r["category_id"] for r in bbox} == {3, 7, 11}
    assert len(bbox) == len(segm) == 6  # crowd region and the empty image add nothing
    for iou_type, results in (("bbox", bbox), ("segm", segm)):
        metrics = coco_evaluate(ds.coco, results, iou_type)
        assert metrics["AP"] == pytest.approx(100.0)
        assert metrics["AP50"] == pytest.approx(100.0) and metrics["AP75"] == pytest.approx(100.0)
        assert math.isnan(metrics["APl"])  # no large objects in the ground truth
        assert "Average Precision" in metrics["summary"]
    # one wrong class: AP drops
    dets[0]["labels"] = (dets[0]["labels"] + 1) % 3
    bbox, _ = detections_to_coco(dets, ds.ids, ds.cat_ids)
    assert coco_evaluate(ds.coco, bbox, "bbox")["AP"] < 100.0


@pytest.mark.filterwarnings("ignore:.*copy keyword:DeprecationWarning")  # pycocotools, NumPy 2
def test_results_are_coco_json_in_original_coordinates(shared_coco):
    ds = test_dataset(shared_coco)
    det = perfect(ds, 0)
    bbox, segm = detections_to_coco([det], [ds.ids[0]], ds.cat_ids)
    x1, y1, x2, y2 = det["boxes"][0].tolist()
    assert bbox[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-3)
    assert bbox[0]["image_id"] == 10 and isinstance(bbox[0]["score"], float)
    assert isinstance(segm[0]["segmentation"]["counts"], str)
    assert segm[0]["segmentation"]["size"] == [96, 128]
    json.dumps(bbox + segm)  # JSON-ready
    assert masks_to_rles(torch.zeros(0, 1, 4, 4)) == []
    half = torch.tensor([[[0.49, 0.5], [0.7, 0.1]]])
    assert mask_utils.decode(masks_to_rles(half)[0]).tolist() == [[0, 1], [1, 0]]
    with pytest.raises(ValueError, match="outside the 3 classes"):
        detections_to_coco([{**det, "labels": torch.tensor([5, 0])}], [10], ds.cat_ids)


def test_no_detections_score_zero(shared_coco):
    ds = test_dataset(shared_coco)
    metrics = coco_evaluate(ds.coco, [], "bbox")
    assert all(metrics[k] == 0.0 for k in METRIC_NAMES)


def test_evaluate_detection_writes_files_that_round_trip(shared_coco, tmp_path):
    ds = test_dataset(shared_coco)
    model = Replay(ds, range(len(ds)))
    metrics = evaluate_detection(model, ds, out_dir=tmp_path, progress=False)
    assert metrics["bbox_AP"] == pytest.approx(100.0)
    assert metrics["segm_AP"] == pytest.approx(100.0)
    assert metrics["num_images"] == 4 and metrics["num_detections"] == 6
    assert model.calls == 4  # every image exactly once
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["bbox_AP50"] == pytest.approx(100.0)
    for name in ("bbox", "segm"):
        text = (tmp_path / f"{name}.json").read_text()
        with contextlib.redirect_stdout(io.StringIO()):
            loaded = ds.coco.loadRes(json.loads(text))  # loadRes edits its input
        results = json.loads(text)
        assert len(loaded.getAnnIds()) == 6
        assert coco_evaluate(ds.coco, results, name)["AP"] == pytest.approx(100.0)


def test_the_test_pipeline_resizes_and_the_model_gets_the_original_sizes(shared_coco):
    cfg = DataConfig(dataset="coco", root=str(shared_coco), test_scale=[160, 128])
    ds = build_coco_dataset(cfg, "train", train=False)  # mmdet's test pipeline
    model = Replay(test_dataset(shared_coco), range(len(ds)))
    metrics = evaluate_detection(model, ds, batch_size=2, progress=False)
    assert metrics["bbox_AP"] == pytest.approx(100.0)  # predictions in original pixels
    originals = [(96, 128), (112, 96), (80, 100), (100, 120)]
    assert [size for _, size in model.seen] == originals
    assert [shape for shape, _ in model.seen] == [
        (3, *keep_ratio_size(h, w, (160, 128))) for h, w in originals]


def test_ranks_evaluate_disjoint_shards_and_rank0_gathers(shared_coco, monkeypatch):
    ds = test_dataset(shared_coco)
    parts = {}

    def fake_gather(obj, env):
        parts[env.rank] = obj
        return [parts[r] for r in sorted(parts)]

    monkeypatch.setattr(coco_eval, "_gather", fake_gather)
    rank1 = Replay(ds, [2, 3])
    assert evaluate_detection(rank1, ds, DistEnv(rank=1, world_size=2), progress=False) is None
    rank0 = Replay(ds, [0, 1])
    metrics = evaluate_detection(rank0, ds, DistEnv(rank=0, world_size=2), progress=False)
    assert rank0.calls == 2 and rank1.calls == 2
    assert {r["image_id"] for r in parts[0][0]} == {10, 20}
    assert {r["image_id"] for r in parts[1][0]} == {40}  # image 30 has no objects
    assert metrics["bbox_AP"] == pytest.approx(100.0)


def test_a_real_detector_evaluates(shared_coco, tmp_path):
    cfg = denseclip.load_config("tiny_mask_rcnn_denseclip",
                                [f"model.classes={shared_coco / 'classes.txt'}"])
    torch.manual_seed(0)
    model = build_detector(cfg.model, rpn_post_nms_top_n=(100, 100)).train()
    ds = test_dataset(shared_coco, masks=False)
    metrics = evaluate_detection(model, ds, out_dir=tmp_path, batch_size=2, progress=False)
    assert model.training  # mode restored
    for prefix in ("bbox", "segm"):
        for name in METRIC_NAMES[:3]:
            assert 0.0 <= metrics[f"{prefix}_{name}"] <= 100.0
    assert (tmp_path / "segm.json").is_file()


@pytest.mark.filterwarnings("ignore:.*copy keyword:DeprecationWarning")  # pycocotools, NumPy 2
def test_repeated_annotation_ids_are_repaired_and_the_ap_is_right(shared_coco, tmp_path):
    """pycocotools indexes annotations by id: with image 40's second object under image
    20's first id, its own evaluation of perfect detections scores below 100. Read through
    CocoDetection, the id is renumbered (with a warning) and the same detections score 100."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from tests.helpers.coco import write_coco

    data = write_coco(tmp_path)
    second_of_40 = [a for a in data["annotations"] if a["image_id"] == 40][1]
    second_of_40["id"] = next(a["id"] for a in data["annotations"] if a["image_id"] == 20)
    path = tmp_path / "annotations" / "instances_train.json"
    path.write_text(json.dumps(data))

    with pytest.warns(DatasetWarning, match=r"renumbered 1 annotation\(s\)"):
        ds = test_dataset(tmp_path, masks=False)
    bbox, _ = detections_to_coco([perfect_boxes(ds, i) for i in range(len(ds))], ds.ids,
                                 ds.cat_ids)
    assert len(bbox) == 6
    assert coco_evaluate(ds.coco, bbox, "bbox")["AP"] == pytest.approx(100.0)

    with contextlib.redirect_stdout(io.StringIO()):
        raw = COCO(str(path))  # pycocotools on the file as it is
        evaluator = COCOeval(raw, raw.loadRes([dict(r) for r in bbox]), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] * 100 < 90.0
    with pytest.raises(ValueError, match=r"repeats annotation ids \(7 annotations, 6 distinct"):
        coco_evaluate(raw, bbox, "bbox")  # our evaluation refuses such a ground truth


def perfect_boxes(ds: CocoDetection, index: int) -> dict[str, torch.Tensor]:
    t = ds[index]["target"]
    n = len(t["labels"])
    return {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.linspace(1.0, 0.5, n)}
