"""What the training tests share: one small synthetic ADE20K-layout dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from denseclip.data import make_synthetic_dataset


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """8 training and 2 validation scenes of 64x80 pixels (read only: tests train on it)."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_train=8, num_val=2,
                                  size=(64, 80), seed=0)
