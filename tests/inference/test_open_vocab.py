"""Open-vocabulary score-map segmentation: the numbers, the text cache, the class lists."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import denseclip
from denseclip.classes import parse_class_list
from denseclip.inference import PredictionError, Predictor, read_open_classes
from denseclip.models import tokenize
from tests.helpers.images import random_image

PRESET = "tiny_denseclip_res"
NAMES = ["cat", "dog", "grass"]


def make_predictor(preset: str = PRESET, classes=None, overrides=()) -> Predictor:
    torch.manual_seed(0)
    model = denseclip.build_model(denseclip.load_config(preset, overrides))
    # fp32: these tests compare with fp32 references (reduced precision: test_fast_path.py)
    return Predictor.from_model(model, denseclip.load_config(preset, overrides), classes=classes,
                                precision="fp32")


def count_text_calls(predictor: Predictor) -> list:
    calls = []
    predictor.guidance.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("preset", ["tiny_denseclip_res", "tiny_denseclip_vit"])
def test_both_segmentations_are_returned(preset):
    trained_only = make_predictor(preset)
    predictor = make_predictor(preset, ",".join(NAMES))
    image = random_image(90, 130)
    result = predictor.predict(image)
    assert result.open_class_names == NAMES
    assert result.open_labels.shape == (90, 130) and result.open_labels.dtype == np.int64
    assert set(np.unique(result.open_labels)) <= {0, 1, 2}
    assert result.open_scores.shape == (3, 90, 130) and result.open_scores.dtype == np.float32
    assert np.abs(result.open_scores).max() <= 1.0 + 1e-5  # cosine similarities
    np.testing.assert_array_equal(result.open_labels, result.open_scores.argmax(0))
    # The decode head still answers with the trained classes, unchanged by the new names:
    # exactly, since the head's operations do not depend on the open classes (same machine,
    # same kernels, same bits).
    reference = trained_only.predict(image)
    np.testing.assert_array_equal(result.probs, reference.probs)
    np.testing.assert_array_equal(result.labels, reference.labels)
    assert predictor.model.class_names == trained_only.model.class_names


def reference_scores(predictor: Predictor, image: np.ndarray, names) -> torch.Tensor:
    """Score maps the plain way: a copy of the model whose guidance is switched to the new
    names, run with autograd on (so no cache is involved), upsampled to the image."""
    model = copy.deepcopy(predictor.model)
    model.guidance.set_classes(names)
    x = predictor.prepare(image).tensor[None]
    with torch.enable_grad():
        _, embeddings = model.backbone(x)
        score = model.guidance(*embeddings).score.detach()
    return F.interpolate(score, size=x.shape[-2:], mode="bilinear", align_corners=False)[0]


def test_scores_equal_the_guidance_with_the_new_names():
    predictor = make_predictor(classes=NAMES)
    image = random_image(64, 64)  # one 64 x 64 window, no resize: a direct comparison
    result = predictor.predict(image)
    expected = reference_scores(predictor, image, NAMES)
    # Two computations (fast kernels with BatchNorm folded and cached text vs autograd on):
    # equal up to rounding only. The scores are <= 0.14 here and differ by <= 7e-8 with the
    # AVX-512, AVX2 and SSE4.1 kernels alike; 1e-6 leaves 14x margin and is still far below
    # what a wrong text feature, normalisation or resize would change.
    torch.testing.assert_close(torch.from_numpy(result.open_scores), expected, rtol=0,
                               atol=1e-6)


def test_text_features_are_computed_once_per_class_list():
    predictor = make_predictor(classes=NAMES)
    calls = count_text_calls(predictor)
    images = [random_image(100, 300, 1), random_image(64, 200, 2)]  # 3 windows each
    first = predictor.predict_batch(images)
    predictor.predict(images[0])
    assert len(calls) == 2  # trained classes once, open classes once: no thrashing
    assert predictor.guidance.class_names == predictor.class_names  # never switched
    predictor.set_classes(["tree", "sky"])
    predictor.predict(images[0])
    assert len(calls) == 3  # only the new list is embedded
    predictor.set_classes(NAMES)
    again = predictor.predict_batch(images)
    assert len(calls) == 4
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.open_scores, b.open_scores)
        np.testing.assert_array_equal(a.probs, b.probs)


def test_identical_with_and_without_the_cache():
    predictor = make_predictor(classes=NAMES)
    image = random_image(100, 300)
    cached = [predictor.predict(image) for _ in range(2)][-1]  # second call: cache hits
    predictor.clear_cache()
    fresh = predictor.predict(image)
    np.testing.assert_array_equal(cached.open_scores, fresh.open_scores)
    np.testing.assert_array_equal(cached.probs, fresh.probs)
    # And equal to the uncached, autograd-on reference window by window (one 64 x 64 view).
    square = random_image(64, 64, seed=5)
    predictor.predict(square)
    torch.testing.assert_close(torch.from_numpy(predictor.predict(square).open_scores),
                               reference_scores(predictor, square, NAMES), rtol=0, atol=1e-6)


def test_cache_follows_weight_changes():
    predictor = make_predictor(classes=NAMES)
    calls = count_text_calls(predictor)
    image = random_image(64, 64)
    before = predictor.predict(image).open_scores
    with torch.no_grad():
        predictor.guidance.contexts.add_(0.5)  # in place, as an optimiser step
    after = predictor.predict(image).open_scores
    assert len(calls) == 4  # both lists re-embedded once after the change
    assert not np.array_equal(before, after)


def test_class_file_embeds_the_description(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# my classes\ncat: kitty\n\ndog\ngrass:  lawn \n")
    classes = read_open_classes(path)
    assert classes == {"cat": "kitty", "dog": "dog", "grass": "lawn"}
    predictor = make_predictor(classes=classes)
    assert predictor.open_class_names == ["cat", "dog", "grass"]
    assert predictor.open_texts == ["kitty", "dog", "lawn"]
    by_text = make_predictor(classes=["kitty", "dog", "lawn"])
    image = random_image(64, 64)
    np.testing.assert_array_equal(predictor.predict(image).open_scores,
                                  by_text.predict(image).open_scores)
    assert torch.equal(predictor.guidance.tokenize(predictor.open_texts),
                       tokenize(["kitty", "dog", "lawn"], 5))


def test_pre_model_prompting_runs_the_text_encoder_per_image():
    predictor = make_predictor(classes=NAMES, overrides=["model.guidance.prompting=pre"])
    result = predictor.predict(random_image(70, 90))
    assert result.open_scores.shape == (3, 70, 90)


@pytest.mark.parametrize(("classes", "match"), [
    ("", "empty"),
    (" , ", "empty"),
    ("cat,,dog", "empty name at position"),
    ([], "empty"),
    ("cat,dog,cat", "duplicate class name"),
    ("a remarkably verbose description", r"'a remarkably verbose description'.*at most 3"),
])
def test_bad_class_lists(classes, match):
    predictor = make_predictor()
    with pytest.raises(PredictionError, match=match):
        predictor.set_classes(classes)
    assert predictor.open_class_names is None  # nothing half-set


def test_long_description_names_its_class(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("cat: a small domesticated carnivorous mammal\n")
    with pytest.raises(PredictionError, match=r"at most 3.*'cat'"):
        make_predictor(classes=read_open_classes(path))


def test_class_file_errors(tmp_path):
    with pytest.raises(PredictionError, match="does not exist"):
        read_open_classes(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(PredictionError, match="lists no classes"):
        read_open_classes(tmp_path / "empty.txt")
    (tmp_path / "colon.txt").write_text(": text\n")
    with pytest.raises(PredictionError, match="line 1"):
        read_open_classes(tmp_path / "colon.txt")
    assert parse_class_list(" cat ,dog") == {"cat": "cat", "dog": "dog"}


def test_models_without_guidance_refuse_open_classes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        predictor = Predictor("tiny_clip_res")
    with pytest.raises(PredictionError, match="no text guidance"):
        predictor.set_classes(NAMES)
    assert predictor.predict(random_image(40, 40)).labels.shape == (40, 40)
