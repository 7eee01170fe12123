"""Semantic-segmentation evaluation over a (sharded) dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..config import Config
from ..data.samplers import build_test_loader
from ..engine.dist import DistEnv
from ..utils import unwrap_model
from .inference import aug_inference, inference
from .metrics import SegmentationMetric


@torch.no_grad()
def evaluate(model: nn.Module, dataset, cfg: Config, env: DistEnv | None = None,
             aug_test: bool = False, out_dir: str | Path | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset`` (test pipeline): each process runs its exact shard,
    the confusion matrices are summed across processes, and every process returns the
    metrics (mIoU, mAcc, aAcc in percent, per-class table). Predictions are resized to
    each image's original size. With ``out_dir``, one label PNG per image (dataset label
    space) and ``metrics.json`` are written there."""
    env = env or DistEnv()
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    num_classes = net.num_classes
    align = cfg.model.align_corners  # as the model's own upsampling and the Predictor
    metric = SegmentationMetric(num_classes, cfg.model.ignore_index)
    loader = build_test_loader(dataset, env.rank, env.world_size, cfg.data.num_workers)
    bar = tqdm(loader, desc="eval", disable=not (progress and env.is_main), leave=False,
               dynamic_ncols=True)
    for batch in bar:
        image = batch["image"].to(env.device)
        ori_size = tuple(batch["ori_size"][0])
        if aug_test:
            probs = aug_inference(net, image[0], cfg.data.test_scale, cfg.evaluation,
                                  num_classes, out_size=ori_size, align_corners=align)
        else:
            probs = inference(net, image, cfg.evaluation, num_classes, ori_size,
                              align_corners=align)
        pred = probs.argmax(dim=1)[0].cpu()
        metric.update(pred, batch["ori_target"][0])
        if out_dir is not None:
            dataset.save_prediction(pred, out_dir, batch["name"][0])
    metric.all_reduce()
    class_names = getattr(dataset, "class_names", None)
    result = metric.compute(class_names)
    result["table"] = metric.format_table(class_names)
    result["num_images"] = len(dataset)
    if out_dir is not None and env.is_main:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "metrics.json").write_text(json.dumps(
            {k: v for k, v in result.items() if k != "table"}, indent=2, default=float))
    net.train(was_training)
    return result
