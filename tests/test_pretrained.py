"""Models as safetensors directories: save_pretrained / from_pretrained round trips, the
model card, .safetensors through load_checkpoint (never unpickled), and
``denseclip export --format safetensors`` from other formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import denseclip
from denseclip.cli import main
from denseclip.weights import CheckpointError, load_checkpoint, save_checkpoint
from tests.helpers.clip import FakeOpenAICLIP
from tests.helpers.weights import randomise_batchnorm


def tiny(name: str = "tiny_denseclip_res", *overrides: str):
    torch.manual_seed(0)
    model = denseclip.build_model(denseclip.load_config(name, list(overrides)))
    randomise_batchnorm(model)
    return model.eval()


def test_round_trip_with_model_card_and_own_classes(tmp_path, monkeypatch):
    classes = tmp_path / "mine.txt"
    classes.write_text("road\nsky\ntree\n")
    model = tiny("tiny_denseclip_res", f"model.classes={classes}")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"mIoU": 41.25, "mAcc": 52.5, "per_class": []}))
    out = model.save_pretrained(tmp_path / "saved", metrics=metrics)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "classes.txt", "config.yaml",
                                                     "model.safetensors"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "denseclip", "preset": "tiny_denseclip_res"}
        assert set(f.keys()) == set(model.state_dict())
    card = (out / "README.md").read_text()
    for phrase in ("# tiny_denseclip_res", "DenseCLIP", "Classes (3):** road, sky, tree",
                   "| mIoU | 41.25 |", "| mAcc | 52.50 |", "Licence", "from_pretrained"):
        assert phrase in card, phrase
    assert "per_class" not in card
    classes.unlink()  # the directory is self-contained
    monkeypatch.chdir(tmp_path)
    loaded = denseclip.from_pretrained(out)
    assert not loaded.training and loaded.class_names == ["road", "sky", "tree"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # exact: same weights, same operations, one machine
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_detector_round_trip(tmp_path, shared_coco):
    model = tiny("tiny_retinanet_denseclip", f"model.classes={shared_coco / 'classes.txt'}")
    denseclip.save_pretrained(model, tmp_path / "det")
    loaded = denseclip.from_pretrained(tmp_path / "det")
    images = [torch.rand(3, 96, 128)]
    with torch.no_grad():
        a, b = model(images)[0], loaded(images)[0]
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_safetensors_files_load_and_a_pickle_in_disguise_is_not_executed(tmp_path):
    model = tiny()
    denseclip.save_pretrained(model, tmp_path / "m")
    other = tiny("tiny_denseclip_res", "seed=1")
    torch.manual_seed(5)
    for p in other.parameters():
        p.data.normal_()
    report = load_checkpoint(other, tmp_path / "m" / "model.safetensors")
    assert report.format == "state_dict" and not report.new
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), k

    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": Payload()}, tmp_path / "evil.safetensors")
    with pytest.raises(CheckpointError, match="evil.safetensors is not a readable safetensors"):
        load_checkpoint(other, tmp_path / "evil.safetensors")
    assert not marker.exists()


def test_from_pretrained_errors_are_clear(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match="not a saved model: model.safetensors missing"):
        denseclip.from_pretrained(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="neither a saved model directory nor a release"):
        denseclip.from_pretrained("no-such-model")
    with pytest.raises(ValueError, match="needs the model's config"):
        denseclip.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")


def test_export_converts_an_openai_file_and_the_cli_reads_the_directory(tmp_path, capsys):
    torch.manual_seed(0)
    clip = tmp_path / "RN50.pt"
    torch.save(FakeOpenAICLIP(vit=False).state_dict(), clip)
    out = tmp_path / "exported"
    status = main(["export", "tiny_denseclip_res", str(clip), "--format", "safetensors",
                   "--out", str(out)])
    assert status == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "openai checkpoint" in printed and "wrote" in printed
    reference = tiny()
    load_checkpoint(reference, clip)
    loaded = denseclip.from_pretrained(out)
    for k, v in reference.state_dict().items():
        if k.startswith(("backbone.", "guidance.text_encoder.")):
            assert torch.equal(loaded.state_dict()[k], v), k
    # our own checkpoint converts too, and predict takes the directory as the checkpoint
    ours = save_checkpoint(tmp_path / "ours.pth", loaded)
    assert main(["export", "tiny_denseclip_res", str(ours), "--format", "safetensors",
                 "--out", str(tmp_path / "again")]) == 0
    Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(tmp_path / "a.png")
    assert main(["predict", str(out / "config.yaml"), str(out), str(tmp_path / "a.png"),
                 "--out", str(tmp_path / "pred"), "--precision", "fp32"]) == 0
    assert (tmp_path / "pred" / "a_labels.png").is_file()
