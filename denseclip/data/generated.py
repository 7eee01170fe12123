"""Random data in real on-disk layouts and shapes for benchmarks: ADE20K-sized JPEGs with
label PNGs, COCO-sized JPEGs with a JSON of boxes (rectangle polygons), and random
detection targets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ADE20K_IMAGE = (512, 683)  # (H, W) of a typical ADE20K validation image
COCO_IMAGE = (480, 640)


def random_detection_target(h: int, w: int, num_classes: int, with_masks: bool,
                      gen: torch.Generator, boxes_per_image: int = 3) -> dict[str, torch.Tensor]:
    """A few valid random boxes (at least 4 px wide and high), labels and, for Mask R-CNN,
    filled box masks."""
    u = torch.rand(boxes_per_image, 4, generator=gen)
    x1, y1 = u[:, 0] * 0.5 * w, u[:, 1] * 0.5 * h
    x2 = torch.minimum(x1 + (0.2 + 0.3 * u[:, 2]) * w + 4, torch.tensor(float(w)))
    y2 = torch.minimum(y1 + (0.2 + 0.3 * u[:, 3]) * h + 4, torch.tensor(float(h)))
    boxes = torch.stack([x1, y1, x2, y2], dim=1)
    target = {"boxes": boxes,
              "labels": torch.randint(0, num_classes, (boxes_per_image,), generator=gen)}
    if with_masks:
        masks = torch.zeros(boxes_per_image, h, w, dtype=torch.uint8)
        for m, (a, b, c, d) in zip(masks, boxes.tolist(), strict=True):
            m[int(b):math.ceil(d), int(a):math.ceil(c)] = 1
        target["masks"] = masks
    return target


def write_ade20k_set(root: Path, num_images: int, rng: np.random.Generator) -> None:
    """``num_images`` random ADE20K-sized JPEGs (landscape and portrait in turn) with label
    PNGs in ``root``'s ADE20K layout (training split)."""
    (root / "images/training").mkdir(parents=True)
    (root / "annotations/training").mkdir(parents=True)
    for i in range(num_images):
        h, w = ADE20K_IMAGE if i % 2 else ADE20K_IMAGE[::-1]
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = np.repeat(np.arange(w, dtype=np.uint8)[None] % 151, h, axis=0)
        Image.fromarray(img).save(root / f"images/training/{i:05d}.jpg", quality=90)
        Image.fromarray(label).save(root / f"annotations/training/{i:05d}.png")


def write_coco_set(root: Path, num_images: int, rng: np.random.Generator) -> tuple[Path, Path]:
    """COCO-sized JPEGs with three boxes (rectangle polygons) each, in COCO's layout."""
    img_dir, ann_file = root / "train", root / "annotations" / "instances_train.json"
    img_dir.mkdir(parents=True)
    ann_file.parent.mkdir(parents=True)
    images, annotations = [], []
    for i in range(num_images):
        h, w = COCO_IMAGE if i % 2 else COCO_IMAGE[::-1]
        name = f"{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            img_dir / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for k in range(3):
            x, y = float(rng.uniform(0, w / 2)), float(rng.uniform(0, h / 2))
            bw, bh = float(rng.uniform(16, w / 2)), float(rng.uniform(16, h / 2))
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": k + 1,
                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0,
                "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
    categories = [{"id": k + 1, "name": f"class{k}"} for k in range(3)]
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": categories}))
    return img_dir, ann_file
