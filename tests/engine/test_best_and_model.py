"""The best checkpoint and the ready-to-use model of a training: ``best.pth`` follows the
task's main metric, survives retention and a resume (a worse evaluation never replaces it),
and ``work_dir/model/`` holds its weights with a card of the best and final metrics, which
``denseclip predict`` and ``denseclip.from_pretrained`` use as they are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import denseclip
from denseclip.dist import DistEnv
from denseclip.engine import trainer
from denseclip.inference import Predictor
from denseclip.tasks.detection import DetectionTask
from denseclip.tasks.segmentation import SegmentationTask
from denseclip.weights import read_checkpoint, save_checkpoint
from tests.engine.test_training import ENV, config

MODEL_FILES = ["README.md", "classes.txt", "config.yaml", "model.safetensors"]


def val_records(work: Path) -> dict[int, float]:
    lines = map(json.loads, (work / "metrics.jsonl").read_text().splitlines())
    return {x["iter"]: x["mIoU"] for x in lines if x["mode"] == "val"}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_task_picks_the_best_checkpoint_by_a_metric_its_evaluation_returns():
    assert SegmentationTask.main_metric == "mIoU"
    assert SegmentationTask.main_metric in SegmentationTask.summary_keys
    assert DetectionTask.main_metric in DetectionTask.summary_keys


def test_best_pth_holds_the_best_evaluation_and_model_dir_predicts(tmp_path, data_root):
    work = tmp_path / "w"
    cfg = config(data_root, "schedule.max_iters=4", "schedule.eval_interval=2",
                 "schedule.checkpoint_interval=2")
    metrics = trainer.train(cfg, work, env=DistEnv(), progress=False)
    evals = val_records(work)
    assert sorted(evals) == [2, 4]
    best_iter = max(evals, key=lambda i: (evals[i], -i))  # the first of equal values
    best = read_checkpoint(work / "best.pth")
    assert best["best"]["metric"] == "mIoU" and best["iteration"] == best_iter
    assert best["best"]["value"] == pytest.approx(evals[best_iter])
    assert set(best["best"]["summary"]) == {"mIoU", "mAcc", "aAcc"}
    assert "optimizer" not in best  # for use, not for resuming
    assert same_weights(best["model"], read_checkpoint(work / f"iter_{best_iter}.pth")["model"])

    model_dir = work / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == MODEL_FILES
    assert same_weights(load_file(str(model_dir / "model.safetensors")), best["model"])
    card = (model_dir / "README.md").read_text()
    assert f"| mIoU at iteration {best_iter} (best: these weights) | {evals[best_iter]:.2f} |" \
        in card
    assert f"| mIoU at iteration 4 (final) | {metrics['mIoU']:.2f} |" in card

    # the saved directory is a model as it is: Python API and the predict command
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 56, 3), np.uint8)).save(image)
    model = denseclip.from_pretrained(model_dir)
    predictor = Predictor.from_model(model, model_dir / "config.yaml")
    prediction = predictor.predict(str(image), return_probs=False)
    assert prediction.labels.shape == (48, 56)
    assert prediction.class_names == (model_dir / "classes.txt").read_text().split("\n")[:-1]
    done = subprocess.run([sys.executable, "-m", "denseclip", "predict",
                           str(model_dir / "config.yaml"), str(model_dir), str(image), "--out",
                           str(tmp_path / "out")], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out/photo_labels.png").is_file()


def test_a_resumed_run_keeps_a_better_best_and_saves_its_weights(tmp_path, data_root):
    work = tmp_path / "w"
    trainer.train(config(data_root, "schedule.max_iters=2", "schedule.eval_interval=2"), work,
                  env=DistEnv(), progress=False)
    first = read_checkpoint(work / "best.pth")
    assert first["iteration"] == 2
    # an evaluation at iteration 2 that no later one can beat
    first["best"] = dict(first["best"], value=1000.0,
                         summary=dict(first["best"]["summary"], mIoU=1000.0))
    model = denseclip.build_model(config(data_root))
    model.load_state_dict(first.pop("model"))
    save_checkpoint(work / "best.pth", model, **first)

    cfg = config(data_root, "schedule.max_iters=4", "schedule.eval_interval=2",
                 "schedule.keep_checkpoints=1")  # retention may change on resume
    metrics = trainer.train(cfg, work, resume=True, env=DistEnv(), progress=False)
    assert sorted(p.name for p in work.glob("*.pth")) == ["best.pth", "iter_4.pth"]
    kept = read_checkpoint(work / "best.pth")
    assert kept["iteration"] == 2 and kept["best"]["value"] == 1000.0
    assert same_weights(kept["model"], model.state_dict())
    saved = load_file(str(work / "model/model.safetensors"))
    assert same_weights(saved, model.state_dict())
    assert not same_weights(saved, read_checkpoint(work / "iter_4.pth")["model"])
    card = (work / "model/README.md").read_text()
    assert "| mIoU at iteration 2 (best: these weights) | 1000.00 |" in card
    assert f"| mIoU at iteration 4 (final) | {metrics['mIoU']:.2f} |" in card


def test_without_evaluation_the_final_weights_are_saved_and_save_model_false_saves_none(
        tmp_path, data_root):
    work = tmp_path / "final"
    trainer.train(config(data_root, "schedule.max_iters=2", "schedule.eval_interval=0"), work,
                  env=DistEnv(), progress=False)
    assert not (work / "best.pth").exists()
    saved = load_file(str(work / "model/model.safetensors"))
    assert same_weights(saved, read_checkpoint(work / "iter_2.pth")["model"])
    assert "## Metrics" not in (work / "model/README.md").read_text()

    off = tmp_path / "off"
    trainer.train(config(data_root, "schedule.max_iters=2", "schedule.eval_interval=0",
                         "schedule.save_model=false"), off, env=DistEnv(), progress=False)
    assert (off / "iter_2.pth").is_file() and not (off / "model").exists()
