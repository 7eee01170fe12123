"""A work dir, or one of its checkpoints alone, is enough for ``predict``, ``test``, ``demo``
and ``export``: the checkpoint stores its config and trained classes, so nothing else is
needed, not even the training data's folder. A preset that disagrees with the checkpoint's
classes is said in words."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import denseclip
from denseclip.cli import arguments, main
from denseclip.cli.common import model_config_only, predictor_from_args
from denseclip.data.synthetic import SYNTHETIC_CLASSES
from denseclip.tools.demo import render_page
from denseclip.weights import read_checkpoint, save_checkpoint
from denseclip.weights.resolver import describe
from tests.helpers.images import random_image
from tests.helpers.tiny_run import PRESET, make_data, train_tiny

CLASSES = list(SYNTHETIC_CLASSES)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A trained work dir whose data folder was moved away afterwards (its config's
    ``data.root`` and ``model.classes`` point nowhere), a copy of its last checkpoint in a
    folder of its own, the moved data and a photo."""
    root = tmp_path_factory.mktemp("run")
    work = train_tiny(root / "work", make_data(root / "data"))
    moved = root / "data_moved"
    (root / "data").rename(moved)
    alone = root / "elsewhere" / "model.pth"
    alone.parent.mkdir()
    shutil.copy(work / "iter_2.pth", alone)
    photo = root / "photo.png"
    Image.fromarray(random_image(48, 64, 5)).save(photo)
    return {"work": work, "alone": alone, "data": moved, "photo": photo}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSECLIP_CACHE", str(tmp_path / "cache"))


def test_the_checkpoint_stores_its_config_and_classes(run):
    payload = read_checkpoint(run["work"] / "iter_2.pth")
    assert payload["classes"] == CLASSES
    assert payload["config"]["name"] == PRESET


@pytest.mark.parametrize("which", ["work", "checkpoint", "alone"])
def test_predict_from_a_work_dir_or_a_checkpoint_alone(run, tmp_path, capsys, which):
    model = {"work": run["work"], "checkpoint": run["work"] / "iter_2.pth",
             "alone": run["alone"]}[which]
    out = tmp_path / "out"
    status = main(["predict", str(model), str(run["photo"]), "--out", str(out)])
    assert status == 0, capsys.readouterr().err
    assert (out / "photo_overlay.png").is_file()
    assert json.loads((out / "classes.json").read_text())["classes"] == CLASSES


def test_a_work_dir_means_its_newest_checkpoint(run):
    described = describe(run["work"])
    assert described.checkpoint == run["work"] / "iter_2.pth"  # not iter_1.pth
    assert described.kind == "work dir" and described.classes == CLASSES
    # the data folder is gone: the class names come from the checkpoint itself
    assert not Path(f"{run['data'].parent}/data/classes.txt").exists()
    assert Path(described.config.model.classes).read_text().split() == CLASSES


def test_a_preset_that_disagrees_with_the_classes_is_said_in_words(run, tmp_path, capsys):
    status = main(["predict", PRESET, str(run["work"] / "iter_2.pth"), str(run["photo"]),
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2
    assert (f"the checkpoint was trained for 5 classes ({', '.join(CLASSES[:3])}, …) but "
            f"preset {PRESET} has 150; use the work dir or its config.yaml") in err
    assert f"denseclip predict {run['work']} …" in err
    assert "does not fit" not in err and "shape" not in err


def test_test_names_its_own_command_in_the_mismatch(run, capsys):
    status = main(["test", PRESET, str(run["alone"]), f"data.root={run['data']}",
                   "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1
    assert f"denseclip test {run['alone']} …" in err and "trained for 5 classes" in err


@pytest.mark.parametrize("which", ["work", "alone"])
def test_test_from_a_work_dir_or_a_checkpoint_alone(run, capsys, which):
    # the data moved: data.root is an override of the stored config
    status = main(["test", str(run[which]), f"data.root={run['data']}", "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0
    assert "mIoU" in json.loads(out.strip().splitlines()[-1])


def test_demo_page_from_a_checkpoint_alone(run):
    parser = argparse.ArgumentParser()
    arguments.add_demo_arguments(parser)
    args = parser.parse_args([str(run["alone"])])
    cfg = model_config_only(args, "demo")
    predictor = predictor_from_args(args, cfg, "demo")
    page = render_page(predictor)
    assert f"Model <b>{PRESET}</b>, 5 trained classes." in page


def test_export_onnx_from_a_work_dir_and_safetensors_from_a_checkpoint(run, tmp_path, capsys):
    onnx_file = tmp_path / "model.onnx"
    assert main(["export", str(run["work"]), "--out", str(onnx_file)]) == 0, \
        capsys.readouterr().err
    assert onnx_file.stat().st_size > 0
    saved = tmp_path / "saved"
    assert main(["export", str(run["alone"]), "--format", "safetensors", "--out",
                 str(saved)]) == 0
    assert (saved / "classes.txt").read_text().split() == CLASSES
    # a saved model directory describes itself as well
    out = tmp_path / "out"
    assert main(["predict", str(saved), str(run["photo"]), "--out", str(out)]) == 0
    assert json.loads((out / "classes.json").read_text())["classes"] == CLASSES


def test_a_checkpoint_after_options_still_counts(run, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["predict", PRESET, "--out", str(out), "none", str(run["photo"])])
    assert status == 0, capsys.readouterr().err
    assert (out / "photo_overlay.png").is_file()


def test_what_is_not_a_self_describing_model_says_why(run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(empty), str(run["photo"]), "--out", str(tmp_path / "o")]) == 2
    assert "neither a work dir" in capsys.readouterr().err
    model = denseclip.build_model(denseclip.load_config(PRESET))
    bare = save_checkpoint(tmp_path / "bare.pth", model)  # weights without a config
    assert main(["predict", str(bare), str(run["photo"]), "--out", str(tmp_path / "o")]) == 2
    assert "does not describe itself" in capsys.readouterr().err
    assert main(["test", PRESET, "--no-progress"]) == 2
    assert f"{PRESET} needs weights after it" in capsys.readouterr().err


def test_the_installed_command_predicts_from_a_work_dir(run, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "denseclip", "predict", str(run["work"]),
                           str(run["photo"]), "--out", str(out)], capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "DENSECLIP_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert (out / "photo_overlay.png").is_file()
