"""Evaluation over a dataset agrees with the Predictor, whatever ``model.align_corners``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import denseclip
from denseclip.checkpoint import save_checkpoint
from denseclip.data import make_synthetic_dataset
from denseclip.engine import trainer
from denseclip.engine.dist import DistEnv


@pytest.mark.parametrize("align_corners", [False, True])
def test_evaluation_labels_equal_the_predictor(tmp_path, align_corners):
    # Regression: model.align_corners reached the Predictor but not the evaluation, so
    # `denseclip test` and `denseclip predict` disagreed.
    root = make_synthetic_dataset(tmp_path / "data", 1, 2, seed=0)
    cfg = denseclip.load_config("tiny_denseclip_res", [
        f"data.root={root}", f"model.classes={root}/classes.txt",
        f"model.align_corners={str(align_corners).lower()}", "data.num_workers=0"])
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "model.pth", denseclip.build_model(cfg))
    out = tmp_path / "pred"
    trainer.test(cfg, checkpoint, out_dir=out, env=DistEnv(), progress=False)
    predictor = denseclip.Predictor(cfg, checkpoint)
    assert predictor.model.align_corners is align_corners
    images = sorted((root / "images" / "validation").glob("*.jpg"))
    assert len(images) == 2
    for image in images:
        evaluated = np.array(Image.open(out / f"{image.stem}.png")).astype(np.int64)
        predicted = predictor.predict(image).labels + 1  # ADE label space: 0 is "other"
        np.testing.assert_array_equal(evaluated, predicted)
