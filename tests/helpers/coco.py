"""A small COCO-format dataset written to disk: coloured shapes with polygon masks, one
compressed-RLE mask, a crowd region (uncompressed RLE) and an image without annotations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

CLASS_NAMES = ["square", "circle", "triangle"]
CAT_IDS = [3, 7, 11]  # not contiguous on purpose
COLOURS = {3: (230, 40, 40), 7: (40, 220, 60), 11: (50, 70, 240)}


def _polygon(kind: str, x: float, y: float, w: float, h: float) -> list[float]:
    if kind == "square":
        pts = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    elif kind == "triangle":
        pts = [(x + w / 2, y), (x + w, y + h), (x, y + h)]
    else:  # circle as a 16-gon
        t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        pts = list(zip(x + w / 2 + w / 2 * np.cos(t), y + h / 2 + h / 2 * np.sin(t), strict=True))
    return [round(float(c), 2) for p in pts for c in p]


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = int(v), 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


# image id → (height, width, [(category id, x, y, w, h, encoding)]); encoding "poly" or "rle"
LAYOUT = {
    10: (96, 128, [(3, 10, 12, 40, 36, "poly"), (7, 64, 40, 44, 44, "poly")]),
    20: (112, 96, [(11, 8, 50, 48, 40, "poly"), (3, 52, 8, 34, 34, "rle")]),
    30: (80, 100, []),  # no annotations at all
    40: (100, 120, [(7, 14, 20, 50, 50, "poly"), (11, 70, 44, 42, 46, "poly")]),
}


def write_coco(root: Path, split: str = "train") -> dict[str, Any]:
    """Write ``root/<split>/*.png`` and ``root/annotations/instances_<split>.json``; return the
    JSON dict. Image 10 also holds a crowd region (uncompressed RLE)."""
    img_dir = root / split
    img_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = 100
    for image_id, (h, w, objects) in LAYOUT.items():
        canvas = Image.new("RGB", (w, h), (128, 128, 128))
        draw = ImageDraw.Draw(canvas)
        for cat, x, y, bw, bh, enc in objects:
            kind = CLASS_NAMES[CAT_IDS.index(cat)]
            poly = _polygon(kind, x, y, bw, bh)
            draw.polygon(list(zip(poly[0::2], poly[1::2], strict=True)), fill=COLOURS[cat])
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
            area = float(mask_utils.area(rle))
            bbox = [round(float(v), 2) for v in mask_utils.toBbox(rle)]
            if enc == "rle":
                seg = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
            else:
                seg = [poly]
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": cat,
                                "bbox": bbox, "area": area, "iscrowd": 0,
                                "segmentation": seg})
            ann_id += 1
        if image_id == 10:  # a crowd region in the bottom-left corner
            crowd = np.zeros((h, w), dtype=np.uint8)
            crowd[70:92, 4:40] = 1
            draw.rectangle([4, 70, 39, 91], fill=(200, 200, 30))
            annotations.append({"id": 900, "image_id": image_id, "category_id": 3,
                                "bbox": [4.0, 70.0, 36.0, 22.0], "area": float(crowd.sum()),
                                "iscrowd": 1, "segmentation": _uncompressed_rle(crowd)})
        name = f"{image_id:012d}.png"
        canvas.save(img_dir / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    data = {
        "info": {"description": "synthetic"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": n, "supercategory": "shape"}
                       for c, n in zip(CAT_IDS, CLASS_NAMES, strict=True)],
    }
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return data


def rewrite(root: Path, data: dict[str, Any], split: str = "train") -> Path:
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(data))
    return path
