"""COCO evaluation of the detectors: results JSON and box / mask AP via pycocotools.

Detector outputs (boxes x1 y1 x2 y2 in original-image pixels, class indices 0..K-1,
scores, and for Mask R-CNN N×1×H×W mask probabilities at the original size) become COCO
results: ``bbox`` as [x, y, width, height], ``category_id`` mapped back through the
dataset's label → category-id table, and ``segmentation`` as compressed RLE of the mask
thresholded at 0.5 (``>= 0.5``, mmdet's ``mask_thr_binary``). :func:`coco_evaluate` runs the
official ``COCOeval`` and reports AP, AP50, AP75, APs, APm and APl in percent, and
:func:`per_category_ap` the AP of every category (``per_category_ap.json`` and ``.md``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..data.coco import collate_detection
from ..data.samplers import ShardedSampler
from ..dist import DistEnv, broadcast_object
from ..optional import require
from ..utils import unwrap_model

__all__ = [
    "METRIC_NAMES",
    "coco_evaluate",
    "detections_to_coco",
    "evaluate_detection",
    "format_per_category_table",
    "masks_to_rles",
    "per_category_ap",
    "write_per_category_ap",
]

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def masks_to_rles(masks: torch.Tensor | np.ndarray, threshold: float = 0.5) -> list[dict]:
    """Binary masks (N×H×W or N×1×H×W; probabilities are thresholded with ``>=
    threshold``) → compressed RLEs with ``counts`` as str (JSON-ready)."""
    mask_utils = require("pycocotools.mask", "COCO masks")
    if isinstance(masks, torch.Tensor):
        masks = masks.detach()
        if masks.is_floating_point():
            masks = masks >= threshold
        masks = masks.to("cpu", torch.uint8).numpy()
    masks = np.asarray(masks)
    if masks.ndim == 4:
        masks = masks[:, 0]
    if masks.dtype != np.uint8:
        masks = (masks >= threshold).astype(np.uint8) if masks.dtype.kind == "f" \
            else masks.astype(np.uint8)
    if masks.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def detections_to_coco(detections: Sequence[dict[str, torch.Tensor]], image_ids: Sequence[int],
                       label_to_cat_id: Sequence[int], mask_threshold: float = 0.5
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """COCO results of per-image detector outputs: ``(bbox results, segm results)`` (the
    second is empty when the outputs carry no ``masks``)."""
    if len(detections) != len(image_ids):
        raise ValueError(f"{len(detections)} outputs for {len(image_ids)} image ids")
    bbox_results: list[dict[str, Any]] = []
    segm_results: list[dict[str, Any]] = []
    for det, image_id in zip(detections, image_ids, strict=True):
        boxes = det["boxes"].detach().float().cpu()
        scores = det["scores"].detach().float().cpu().tolist()
        labels = det["labels"].detach().cpu().tolist()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        cats = []
        for label in labels:
            if not 0 <= label < len(label_to_cat_id):
                raise ValueError(f"label {label} is outside the {len(label_to_cat_id)} classes")
            cats.append(int(label_to_cat_id[label]))
        for box, score, cat in zip(xywh, scores, cats, strict=True):
            bbox_results.append({"image_id": int(image_id), "category_id": cat,
                                 "bbox": [round(v, 3) for v in box], "score": float(score)})
        if "masks" in det:
            rles = masks_to_rles(det["masks"], mask_threshold)
            for rle, score, cat in zip(rles, scores, cats, strict=True):
                segm_results.append({"image_id": int(image_id), "category_id": cat,
                                     "segmentation": rle, "score": float(score)})
    return bbox_results, segm_results


def _check_unique_ids(coco_gt) -> None:
    """pycocotools indexes the ground truth by id: a repeated image or annotation id makes
    one entry stand in for another and the AP silently wrong. Ground truth read by
    :class:`~denseclip.data.coco.CocoDetection` is already checked (annotation ids
    renumbered); this refuses a ``COCO`` object built elsewhere from such a file."""
    dataset = getattr(coco_gt, "dataset", None) or {}
    for key, index in (("images", coco_gt.imgs), ("annotations", coco_gt.anns)):
        entries = dataset.get(key, [])
        if len(index) != len(entries):
            counts = Counter(e.get("id") for e in entries)
            repeated = [i for i, n in counts.items() if n > 1][:5]
            raise ValueError(f"the ground truth repeats {key[:-1]} ids ({len(entries)} "
                             f"{key}, {len(index)} distinct ids; e.g. {repeated}): COCO "
                             f"evaluation would score the wrong ground truth; load the file "
                             f"with denseclip.data.coco.CocoDetection, which renumbers "
                             f"repeated annotation ids")


def coco_evaluate(coco_gt, results: list[dict[str, Any]], iou_type: str,
                  image_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """Run ``COCOeval`` (``iou_type`` "bbox" or "segm") over ``image_ids`` (default: every
    ground-truth image). Returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` in percent
    (NaN where COCO reports -1, e.g. no object of that size), ``summary``, COCOeval's
    printed table, and ``per_category`` (:func:`per_category_ap`). Without any result every
    AP is 0 (NaN for a category without ground truth in the images)."""
    COCOeval = require("pycocotools.cocoeval", "COCO evaluation").COCOeval  # noqa: N806
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    _check_unique_ids(coco_gt)
    if not results:
        ids = coco_gt.getImgIds() if image_ids is None else [int(i) for i in image_ids]
        per_category = [
            {"category_id": int(c), "name": coco_gt.cats[c]["name"],
             "AP": 0.0 if coco_gt.getAnnIds(imgIds=ids, catIds=[c], iscrowd=False) else math.nan}
            for c in sorted(coco_gt.getCatIds())]
        return {**{name: 0.0 for name in METRIC_NAMES}, "summary": "no detections",
                "per_category": per_category}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds fields in place
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics: dict[str, Any] = {}
    for name, value in zip(METRIC_NAMES, evaluator.stats[:6], strict=True):
        metrics[name] = float(value) * 100 if value >= 0 else math.nan
    metrics["summary"] = "\n".join(line for line in out.getvalue().splitlines()
                                   if line.lstrip().startswith("Average"))
    metrics["per_category"] = per_category_ap(evaluator)
    return metrics


def per_category_ap(evaluator) -> list[dict[str, Any]]:
    """The AP of each category of an accumulated ``COCOeval``, in percent, in its category
    order: ``[{"category_id", "name", "AP"}]``.

    Each AP is the mean of ``evaluator.eval["precision"]`` over the ten IoU thresholds
    (0.50:0.95) and the 101 recall points, for area "all" and 100 detections per image,
    leaving out the -1 entries as ``COCOeval.summarize`` does; a category without ground
    truth in the evaluated images has only -1 entries, and NaN here. Every category counts
    the same number of entries, so the NaN-ignoring mean over categories equals the overall
    AP (``stats[0]``)."""
    params = evaluator.params
    precision = evaluator.eval["precision"]  # T x R x K x A x M
    area = params.areaRngLbl.index("all")
    max_dets = [i for i, m in enumerate(params.maxDets) if m == 100]  # as stats[0]
    rows = []
    for k, cat_id in enumerate(params.catIds):
        values = precision[:, :, k, area, max_dets]
        valid = values[values > -1]
        rows.append({"category_id": int(cat_id), "name": evaluator.cocoGt.cats[cat_id]["name"],
                     "AP": float(valid.mean()) * 100 if valid.size else math.nan})
    return rows


def format_per_category_table(per_type: dict[str, list[dict[str, Any]]]) -> str:
    """A Markdown table of :func:`per_category_ap` results, one AP column per IoU type
    (``{"bbox": rows, "segm": rows}``), ``-`` for a category without ground truth, and a
    last row with the mean over categories (the overall AP)."""
    types = list(per_type)
    if not types:
        return ""
    first = per_type[types[0]]
    header = ["category", "id", *(f"{t} AP" for t in types)]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([":---", "---:", *("---:" for _ in types)]) + "|"]
    for i, row in enumerate(first):
        values = [_ap_cell(per_type[t][i]["AP"]) for t in types]
        lines.append(f"| {row['name']} | {row['category_id']} | " + " | ".join(values) + " |")
    means = []
    for t in types:
        valid = [r["AP"] for r in per_type[t] if not math.isnan(r["AP"])]
        means.append(_ap_cell(sum(valid) / len(valid) if valid else math.nan))
    lines.append("| **mean** |  | " + " | ".join(means) + " |")
    return "\n".join(lines)


def _ap_cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def write_per_category_ap(out_dir: str | Path, per_type: dict[str, list[dict[str, Any]]]
                          ) -> list[Path]:
    """Write ``per_category_ap.json`` (``{"bbox": [{"category_id", "name", "AP"}], ...}``,
    AP in percent, ``null`` for a category without ground truth) and ``per_category_ap.md``
    (:func:`format_per_category_table`) into ``out_dir``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = {t: [{**r, "AP": None if math.isnan(r["AP"]) else r["AP"]} for r in rows]
             for t, rows in per_type.items()}
    json_path = out / "per_category_ap.json"
    json_path.write_text(json.dumps(clean, indent=2))
    md_path = out / "per_category_ap.md"
    md_path.write_text(format_per_category_table(per_type) + "\n")
    return [json_path, md_path]


def _gather(obj: Any, env: DistEnv) -> list[Any]:
    if env.world_size > 1 and dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * env.world_size
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


@torch.no_grad()
def evaluate_detection(model: nn.Module, dataset, env: DistEnv | None = None,
                       out_dir: str | Path | None = None, *, batch_size: int = 1,
                       num_workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """Box (and, for models that return masks, mask) AP of ``model`` on ``dataset`` (a
    :class:`~denseclip.data.coco.CocoDetection`, normally with the test pipeline of
    :func:`~denseclip.data.coco.build_coco_dataset`). The model is called as
    ``model(images, original_sizes=ori_sizes)`` and returns predictions in the pixels of
    the images on disk.

    Each process runs its :class:`~denseclip.data.ShardedSampler` shard, so every image is
    seen exactly once; results are gathered on rank 0 (``all_gather_object`` when a process
    group is initialised), which writes ``bbox.json`` / ``segm.json`` and ``metrics.json``
    into ``out_dir`` (if given) and runs COCOeval; every process returns the metrics:
    ``bbox_AP``, ``bbox_AP50``, … (``segm_*`` too for Mask R-CNN) in percent,
    ``bbox_per_category`` (``segm_per_category``; :func:`per_category_ap`), ``num_images``
    and ``num_detections``. With ``out_dir``, :func:`write_per_category_ap` writes the
    per-category tables there too."""
    env = env or DistEnv()
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_detection,
        sampler=ShardedSampler(len(dataset), env.rank, env.world_size),
        pin_memory=env.device.type == "cuda",
    )
    bbox_results: list[dict[str, Any]] = []
    segm_results: list[dict[str, Any]] = []
    with_masks = False
    bar = tqdm(loader, desc="eval", disable=not (progress and env.is_main), leave=False,
               dynamic_ncols=True)
    try:
        for batch in bar:
            images = [img.to(env.device, non_blocking=True) for img in batch["image"]]
            # the test pipeline resized the images; the detector rescales its boxes to the
            # sizes on disk before NMS and pastes masks there (mmdet's rescale=True)
            outputs = net(images, original_sizes=batch["ori_size"])
            with_masks = with_masks or any("masks" in o for o in outputs)
            boxes, segms = detections_to_coco(outputs, batch["image_id"], dataset.cat_ids)
            bbox_results += boxes
            segm_results += segms
    finally:
        net.train(was_training)

    parts = _gather((bbox_results, segm_results, with_masks), env)
    metrics: dict[str, Any] | None = None
    if env.is_main:
        bbox_all = [r for p in parts for r in p[0]]
        segm_all = [r for p in parts for r in p[1]]
        with_masks = any(p[2] for p in parts)
        metrics = {"num_images": len(dataset), "num_detections": len(bbox_all)}
        types = [("bbox", bbox_all)] + ([("segm", segm_all)] if with_masks else [])
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            for name, results in types:
                (Path(out_dir) / f"{name}.json").write_text(json.dumps(results))
        for name, results in types:
            scores = coco_evaluate(dataset.coco, results, name, dataset.ids)
            metrics[f"{name}_summary"] = scores.pop("summary")
            metrics.update({f"{name}_{k}": v for k, v in scores.items()})
        if out_dir is not None:
            (Path(out_dir) / "metrics.json").write_text(json.dumps(
                {k: v for k, v in metrics.items() if not k.endswith("_summary")}, indent=2))
            write_per_category_ap(out_dir, {name: metrics[f"{name}_per_category"]
                                            for name, _ in types})
    return broadcast_object(metrics)
