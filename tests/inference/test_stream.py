"""Batches and streams of frames: each result equals predicting the image alone, bit for bit;
text embeddings computed once per class list for a whole stream."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import denseclip
from denseclip.inference import PredictionError, Predictor
from tests.helpers.images import random_image

PRESET = "tiny_denseclip_res"


def predictor_for(mode: str, precision: str = "fp32") -> Predictor:
    torch.manual_seed(0)
    cfg = denseclip.load_config(PRESET, [f"evaluation.mode={mode}"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return Predictor(cfg, precision=precision, batch_size=3)


def frames(n: int = 5) -> list[np.ndarray]:
    return [random_image(48, 64, seed) for seed in range(n)]


def assert_same_segmentation(got, want) -> None:
    assert torch.equal(torch.from_numpy(got.labels), torch.from_numpy(want.labels))
    if want.probs is not None:
        assert np.array_equal(got.probs, want.probs)
    if want.open_scores is not None:
        assert np.array_equal(got.open_scores, want.open_scores)
        assert np.array_equal(got.open_labels, want.open_labels)


@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_batch_and_stream_equal_single_images(mode):
    """fp32 on CPU, where several images in one forward call change the last bits: the
    exact default gives each image its own forward calls."""
    predictor = predictor_for(mode)
    predictor.set_classes("cat,grass")
    images = frames()
    singles = [predictor.predict(image) for image in images]
    batch = predictor.predict_batch(images)
    streamed = list(predictor.stream(iter(images), batch_size=2))
    assert len(batch) == len(streamed) == len(images)
    for single, b, s in zip(singles, batch, streamed, strict=True):
        assert_same_segmentation(b, single)
        assert_same_segmentation(s, single)


def test_shared_forward_calls_are_close():
    predictor = predictor_for("whole")
    images = frames(4)
    shared = predictor.predict_batch(images, exact=False)
    for image, result in zip(images, shared, strict=True):
        np.testing.assert_allclose(result.probs, predictor.predict(image).probs, atol=1e-5)


def test_array_and_tensor_batches():
    predictor = predictor_for("whole")
    images = frames(3)
    want = [predictor.predict(image).labels for image in images]
    hwc = np.stack(images)  # B x H x W x 3
    chw = torch.from_numpy(hwc).permute(0, 3, 1, 2)  # B x 3 x H x W
    for batch in (hwc, torch.from_numpy(hwc), chw, chw.numpy()):
        got = [r.labels for r in predictor.predict_batch(batch)]
        assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    with pytest.raises(PredictionError, match="B x H x W x 3"):
        predictor.predict_batch(hwc[0])  # one image, not a batch
    with pytest.raises(PredictionError, match="B x H x W x 3"):
        predictor.predict_batch(np.zeros((2, 4, 40, 40), np.uint8))
    with pytest.raises(PredictionError, match="uint8"):
        predictor.predict_batch(hwc.astype(np.float32))


def test_stream_is_lazy():
    predictor = predictor_for("whole")
    read = []

    def source():
        for i, image in enumerate(frames(5)):
            read.append(i)
            yield image

    results = predictor.stream(source(), batch_size=2)
    assert read == []  # nothing read before the first result is asked for
    next(results)
    assert read == [0, 1]  # one batch read ahead, no more
    assert len(list(results)) == 4 and read == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="batch_size"):
        next(predictor.stream(frames(1), batch_size=0))


def test_text_encoder_runs_once_per_class_list_for_a_stream():
    predictor = predictor_for("slide", precision=None)  # the CLI's precision, `auto`
    predictor.set_classes("cat,dog")
    calls = []
    handle = predictor.guidance.text_encoder.register_forward_hook(
        lambda module, args, output: calls.append(tuple(output.shape)))
    try:
        results = list(predictor.stream(frames(7), batch_size=3))
        assert len(results) == 7
        # the trained classes (150) and the open ones (2), each embedded once
        assert sorted(calls) == [(1, 2, calls[0][-1]), (1, 150, calls[0][-1])]
        list(predictor.stream(frames(2)))
        assert len(calls) == 2  # a later stream reuses them
        predictor.set_classes("cat,dog,tree")
        list(predictor.stream(frames(2)))
        assert len(calls) == 3  # only the new open list is embedded
    finally:
        handle.remove()


def test_detection_batch_and_stream_equal_single_images():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        predictor = Predictor("tiny_retinanet_denseclip", precision="fp32", batch_size=2)
    images = [random_image(48, 64, 1), random_image(48, 64, 2)]
    singles = [predictor.predict(image) for image in images]
    for results in (predictor.predict_batch(images), list(predictor.stream(images))):
        for got, want in zip(results, singles, strict=True):
            assert len(want.scores) > 0
            assert np.array_equal(got.boxes, want.boxes)
            assert np.array_equal(got.scores, want.scores)
            assert np.array_equal(got.labels, want.labels)
