import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from denseclip.evaluation.metrics import SegmentationMetric

REPO_ROOT = Path(__file__).resolve().parents[2]
I = 255  # ignore


def hand_example():
    # 4 classes: 0 and 1 occur in the ground truth, 2 is only predicted, 3 appears nowhere.
    target = torch.tensor(
        [
            [0, 0, 0, 1],
            [0, 0, 1, 1],
            [1, 1, 1, I],
            [I, I, 1, 1],
        ]
    )
    pred = torch.tensor(
        [
            [0, 0, 1, 1],
            [0, 2, 1, 1],
            [1, 1, 0, 2],  # the last pixel is ignored: its "2" must not count
            [2, 2, 1, 2],  # the first two pixels are ignored
        ]
    )
    return pred, target


def test_hand_worked_example():
    pred, target = hand_example()
    m = SegmentationMetric(4, ignore_index=255, class_names=["a", "b", "c", "d"])
    m.update(pred, target)
    # (gt, pred) pairs over the 13 labelled pixels:
    #   gt 0: (0,0) x3, (0,1) x1, (0,2) x1           -> label area 5, TP 3
    #   gt 1: (1,1) x6, (1,0) x1, (1,2) x1           -> label area 8, TP 6
    #   predicted areas: class 0: 3+1 = 4, class 1: 1+6 = 7, class 2: 1+1 = 2, class 3: 0
    expected = torch.tensor(
        [
            [3, 1, 1, 0],
            [1, 6, 1, 0],
            [0, 0, 0, 0],
            [0, 0, 0, 0],
        ]
    )
    assert torch.equal(m.confusion, expected)
    assert m.confusion.dtype == torch.int64

    res = m.compute()
    iou = [3 / (5 + 4 - 3), 6 / (8 + 7 - 6), 0 / (0 + 2 - 0)]  # class 3: 0/0 -> NaN
    acc = [3 / 5, 6 / 8]  # classes 2 and 3 have no ground truth -> NaN
    assert res["mIoU"] == pytest.approx(100 * sum(iou) / 3)  # 38.888...
    assert res["mIoU"] == pytest.approx(38.8888889)
    assert res["mAcc"] == pytest.approx(100 * sum(acc) / 2)  # 67.5
    assert res["mAcc"] == pytest.approx(67.5)
    assert res["aAcc"] == pytest.approx(100 * 9 / 13)  # 69.23...

    per = res["per_class"]
    assert [c["name"] for c in per] == ["a", "b", "c", "d"]
    assert per[0]["IoU"] == pytest.approx(50.0) and per[0]["Acc"] == pytest.approx(60.0)
    assert per[1]["IoU"] == pytest.approx(200 / 3) and per[1]["Acc"] == pytest.approx(75.0)
    # Predicted but absent from the ground truth: IoU 0 (counted), Acc NaN (skipped).
    assert per[2]["IoU"] == 0.0 and math.isnan(per[2]["Acc"])
    # Absent everywhere: both NaN, left out of both means.
    assert math.isnan(per[3]["IoU"]) and math.isnan(per[3]["Acc"])


def _mmseg_style_reference(preds, targets, k, ignore):
    """Histogram-based areas and metrics written independently of the confusion matrix."""
    inter = torch.zeros(k, dtype=torch.float64)
    area_pred = torch.zeros(k, dtype=torch.float64)
    area_label = torch.zeros(k, dtype=torch.float64)
    for p, t in zip(preds, targets, strict=True):
        keep = t != ignore
        p, t = p[keep], t[keep]
        inter += torch.histc(p[p == t].double(), bins=k, min=0, max=k - 1)
        area_pred += torch.histc(p.double(), bins=k, min=0, max=k - 1)
        area_label += torch.histc(t.double(), bins=k, min=0, max=k - 1)
    union = area_pred + area_label - inter
    iou, acc = inter / union, inter / area_label
    return (
        100 * float(torch.nanmean(iou)),
        100 * float(torch.nanmean(acc)),
        100 * float(inter.sum() / area_label.sum()),
    )


def test_matches_histogram_reference_and_batched_updates():
    gen = torch.Generator().manual_seed(0)
    k = 6
    preds = torch.randint(0, k, (5, 11, 17), generator=gen)
    targets = torch.randint(0, k - 1, (5, 11, 17), generator=gen)  # class 5 never in GT
    targets[torch.rand((5, 11, 17), generator=gen) < 0.25] = 255

    batched = SegmentationMetric(k)
    batched.update(preds, targets)
    single = SegmentationMetric(k)
    for p, t in zip(preds, targets, strict=True):
        single.update(p, t)
    assert torch.equal(batched.confusion, single.confusion)
    assert int(batched.confusion.sum()) == int((targets != 255).sum())

    m_iou, m_acc, a_acc = _mmseg_style_reference(preds, targets, k, 255)
    res = batched.compute()
    assert res["mIoU"] == pytest.approx(m_iou, abs=1e-9)
    assert res["mAcc"] == pytest.approx(m_acc, abs=1e-9)
    assert res["aAcc"] == pytest.approx(a_acc, abs=1e-9)
    assert res["per_class"][5]["IoU"] == 0.0  # predicted, never labelled


def test_numpy_inputs_reset_and_custom_ignore():
    m = SegmentationMetric(3, ignore_index=-1)
    m.update(np.array([[0, 1], [2, 2]]), np.array([[0, -1], [2, 1]]))
    assert m.confusion.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    m.reset()
    assert int(m.confusion.sum()) == 0
    assert math.isnan(m.compute()["mIoU"])


def test_invalid_inputs():
    m = SegmentationMetric(3)
    with pytest.raises(ValueError, match="shape"):
        m.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        m.update(torch.tensor([0, 1]), torch.tensor([3, 255]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        m.update(torch.tensor([0, 5]), torch.tensor([0, 1]))
    with pytest.raises(TypeError):
        m.update(torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        SegmentationMetric(3, class_names=["a", "b"])
    # Predictions are only checked (and counted) where the label is valid.
    m.update(torch.tensor([7, 1]), torch.tensor([255, 1]))
    assert m.confusion.tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_format_table():
    pred, target = hand_example()
    m = SegmentationMetric(4)
    m.update(pred, target)
    table = m.format_table(["wall", "building", "sky", "floor"])
    lines = table.splitlines()
    assert any("wall" in ln and "50.00" in ln and "60.00" in ln for ln in lines)
    assert any("building" in ln and "66.67" in ln and "75.00" in ln for ln in lines)
    assert any("sky" in ln and "0.00" in ln and "nan" in ln for ln in lines)
    assert any("floor" in ln and ln.count("nan") == 2 for ln in lines)
    assert lines[-1] == "aAcc: 69.23  mIoU: 38.89  mAcc: 67.50"
    # Default names are the class indices.
    assert "| 3 " in m.format_table()


def test_all_reduce_without_process_group_is_noop():
    pred, target = hand_example()
    m = SegmentationMetric(4)
    m.update(pred, target)
    before = m.confusion.clone()
    m.all_reduce()
    assert torch.equal(m.confusion, before)


def test_all_reduce_two_processes(tmp_path):
    worker = Path(__file__).with_name("dist_metric_worker.py")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on a free local port
        "--nproc_per_node",
        "2",
        str(worker),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    full = torch.tensor(results[0]["full"])
    assert int(full.sum()) > 0
    local_sum = torch.tensor(results[0]["local"]) + torch.tensor(results[1]["local"])
    assert torch.equal(local_sum, full)
    for res in results:
        assert res["world"] == 2
        assert res["dtype"] == "torch.int64"
        assert not torch.equal(torch.tensor(res["local"]), full)
        assert torch.equal(torch.tensor(res["reduced"]), full)
