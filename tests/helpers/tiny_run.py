"""A real tiny training run (``tiny_denseclip_res`` for two iterations on generated data),
for tests of what its checkpoints carry."""

from __future__ import annotations

from pathlib import Path

import torch

from denseclip.config import load_config
from denseclip.data import make_synthetic_dataset
from denseclip.dist import DistEnv
from denseclip.engine.trainer import train
from tests.helpers.clip import FakeOpenAICLIP

PRESET = "tiny_denseclip_res"


def make_data(root: Path) -> Path:
    """Four training and two validation scenes of the five synthetic classes."""
    return make_synthetic_dataset(root, num_train=4, num_val=2, size=(64, 80), seed=0)


def train_tiny(work_dir: Path, data: Path, *extra: str, load_from: str | None = None) -> Path:
    """Train ``PRESET`` in ``work_dir`` on ``data`` for two iterations (a checkpoint at
    each); returns the work dir."""
    torch.manual_seed(0)
    cfg = load_config(PRESET, [f"data.root={data}", f"model.classes={data}/classes.txt",
                               "data.batch_size=2", "data.num_workers=0",
                               "schedule.max_iters=2", "schedule.checkpoint_interval=1",
                               "schedule.eval_interval=0", "schedule.warmup_iters=1",
                               "evaluation.mode=whole", *extra])
    train(cfg, work_dir, env=DistEnv(), progress=False, load_from=load_from)
    return work_dir


def write_openai_clip(path: Path) -> Path:
    """A small OpenAI CLIP state dict whose towers fit ``PRESET``."""
    torch.manual_seed(3)
    torch.save(FakeOpenAICLIP(vit=False).state_dict(), path)
    return path
