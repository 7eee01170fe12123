"""Fixtures shared by the whole suite: one intra-op thread, and tiny datasets written in the
real ADE20K and COCO on-disk formats (helpers in :mod:`tests.helpers`)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers.coco import CLASS_NAMES, write_coco
from tests.helpers.images import PALETTE, block_labels, write_pair


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The suite's tensors are small: one intra-op thread avoids synchronisation overhead
    (and large slowdowns when other processes share the two cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ ADE20K layout
@pytest.fixture(name="write_pair")
def write_pair_fixture():
    """:func:`tests.helpers.images.write_pair`, for tests that take it as a fixture."""
    return write_pair


@pytest.fixture
def colour_dataset(tmp_path: Path) -> Path:
    """Four PNG images whose colours encode their labels (raw 1..7 → PALETTE[1..7]), plus
    raw 0 (unlabelled, black) cells; lossless so colour and label agree exactly."""
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(48, 64), (64, 48), (40, 40), (72, 96)]):
        label = block_labels(rng, shape, list(range(8)))
        write_pair(tmp_path, "training", f"img{i}", PALETTE[label], label, img_suffix=".png")
    (tmp_path / "classes.txt").write_text("\n".join(f"c{k}" for k in range(1, 8)) + "\n")
    return tmp_path


# ------------------------------------------------------------------ COCO layout
@pytest.fixture
def coco_root(tmp_path) -> Path:
    write_coco(tmp_path, "train")
    return tmp_path


@pytest.fixture
def coco_json(coco_root) -> dict[str, Any]:
    return copy.deepcopy(
        json.loads((coco_root / "annotations" / "instances_train.json").read_text()))


@pytest.fixture
def classes_file(tmp_path) -> Path:
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(CLASS_NAMES) + "\n")
    return path


@pytest.fixture(scope="session")
def shared_coco(tmp_path_factory) -> Path:
    """A read-only copy of the dataset (with ``classes.txt``) shared by the model tests."""
    root = tmp_path_factory.mktemp("coco")
    write_coco(root, "train")
    (root / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    return root
