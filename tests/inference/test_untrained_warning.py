"""Outputs that depend on parts never trained or loaded come with one warning naming them:
a text encoder no CLIP weights initialised (open-vocabulary scores), parts a checkpoint left
at initialisation (every output). The facts come from the load report and the provenance
that training checkpoints store."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import denseclip
from denseclip.cli import main
from denseclip.inference import Predictor
from denseclip.tools.demo import render_page
from denseclip.weights import read_checkpoint, save_checkpoint
from denseclip.weights.provenance import UntrainedPartsWarning, part_of
from tests.helpers.images import random_image
from tests.helpers.tiny_run import PRESET, make_data, train_tiny, write_openai_clip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny runs on the same data: from random initialisation (as the quickstart) and
    from (small) OpenAI CLIP weights; the CLIP file; the data; a photo."""
    root = tmp_path_factory.mktemp("runs")
    data = make_data(root / "data")
    clip = write_openai_clip(root / "clip.pt")
    photo = root / "photo.png"
    Image.fromarray(random_image(48, 64, 7)).save(photo)
    return {"random": train_tiny(root / "random", data) / "iter_2.pth",
            "clip": train_tiny(root / "clip", data, load_from=str(clip)) / "iter_2.pth",
            "clip_file": clip, "data": data, "photo": photo}


def untrained(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, UntrainedPartsWarning)]


def test_training_checkpoints_record_what_initialised_and_what_trained_each_part(runs):
    random_run = read_checkpoint(runs["random"])["provenance"]
    assert random_run["loaded"] == {}
    assert "text encoder" in random_run["fixed"]  # the presets' text_encoder lr_mult 0
    assert "head" not in random_run["fixed"]
    clip_run = read_checkpoint(runs["clip"])["provenance"]
    assert clip_run["loaded"] == {"text encoder": "clip.pt (openai)",
                                  "backbone": "clip.pt (openai)"}


def test_open_vocabulary_with_a_text_encoder_never_loaded_from_clip_warns(runs):
    with pytest.warns(UntrainedPartsWarning) as record:
        predictor = Predictor(runs["random"], classes="cat,dog")
    messages = untrained(record)
    assert len(messages) == 1
    assert "text encoder was never loaded from CLIP weights" in messages[0]
    assert "open-vocabulary scores" in messages[0]
    # the trained classes alone depend on nothing untrained: no warning
    assert predictor.untrained_message(open_vocabulary=False) is None


def test_predict_prints_one_warning_line_naming_the_text_encoder(runs, tmp_path, capsys):
    status = main(["predict", str(runs["random"]), str(runs["photo"]), "--out",
                   str(tmp_path / "o"), "--classes", "cat,dog"])
    err = capsys.readouterr().err
    assert status == 0
    lines = [x for x in err.splitlines() if "warning:" in x]
    assert len(lines) == 1 and lines[0].startswith("denseclip predict: warning: untrained "
                                                   "parts: the text encoder")
    assert main(["predict", str(runs["random"]), str(runs["photo"]), "--out",
                 str(tmp_path / "o2")]) == 0
    assert "untrained" not in capsys.readouterr().err  # trained classes only


def test_a_run_from_clip_weights_gives_no_warning(runs, tmp_path, capsys):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        predictor = Predictor(runs["clip"], classes="cat,dog")
    assert untrained(record) == []
    assert predictor.untrained_message() is None
    assert main(["predict", str(runs["clip"]), str(runs["photo"]), "--out",
                 str(tmp_path / "o"), "--classes", "cat,dog"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_fully_loaded_checkpoint_gives_no_warning(tmp_path):
    torch.manual_seed(0)
    model = denseclip.build_model(denseclip.load_config(PRESET))
    path = save_checkpoint(tmp_path / "full.pth", model)  # every key, no provenance
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        predictor = Predictor(PRESET, path, classes="cat,dog")
    assert untrained(record) == [] and predictor.untrained_message() is None
    assert "id='untrained'" not in render_page(predictor)


def test_a_checkpoint_that_leaves_the_head_at_initialisation_warns_naming_it(runs):
    # OpenAI CLIP weights fill the backbone and text encoder; the rest stays random
    with pytest.warns(UntrainedPartsWarning) as record:
        predictor = Predictor(PRESET, runs["clip_file"])
    (message,) = untrained(record)
    assert ("the contexts, context decoder, neck and head were left at random "
            "initialisation by clip.pt") in message
    assert "text encoder" not in message and "backbone" not in message
    page = render_page(predictor)
    assert "<p class='warning' id='untrained'>Warning: untrained parts: the contexts" in page


def test_test_prints_the_warning_once(runs, capsys):
    status = main(["test", PRESET, str(runs["clip_file"]), f"data.root={runs['data']}",
                   f"model.classes={runs['data']}/classes.txt", "--no-progress"])
    err = capsys.readouterr().err
    assert status == 0
    lines = [x for x in err.splitlines() if "untrained parts" in x]
    assert len(lines) == 1 and lines[0].startswith("denseclip test: warning:")
    assert "head" in lines[0]


def test_the_demo_warns_on_the_page_before_class_names_are_typed(runs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedPartsWarning)
        predictor = Predictor(runs["random"])
    page = render_page(predictor)
    assert "id='untrained'" in page and "never loaded from CLIP weights" in page


@pytest.mark.parametrize(("key", "part"), [
    ("guidance.text_encoder.transformer.resblocks.0.attn.in_proj_weight", "text encoder"),
    ("guidance.contexts", "contexts"), ("guidance.gamma", "context decoder"),
    ("backbone.layer1.0.conv1.weight", "backbone"), ("neck.fpn_convs.0.conv.weight", "neck"),
    ("roi_heads.box_head.fc6.weight", "head"), ("backbone.bn1.num_batches_tracked", None)])
def test_keys_fall_into_named_parts(key, part):
    assert part_of(key) == part
