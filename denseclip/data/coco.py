"""COCO-format instance data for the detectors (``instances_*.json`` + an image folder).

Layout (``data.dataset: coco``)::

    ROOT/<split>/<file_name>                   images (e.g. ROOT/train2017/000000000009.jpg)
    ROOT/annotations/instances_<split>.json    COCO annotations

Labels are contiguous class indices ``0..K-1`` over the JSON's categories sorted by id
(:attr:`CocoDetection.cat_ids` is the label → category id table, ``cat_id_to_label`` the
inverse; store them with a checkpoint to map predictions back). There is no background
index: the detectors add their own.

Items are dictionaries:

* ``image`` — float32 3×H×W in 0..1, RGB (the detectors normalise with CLIP's mean/std);
* ``target`` — ``boxes`` (float32 N×4, x1 y1 x2 y2 in the pixels of ``image``), ``labels``
  (int64 N) and, with ``with_masks``, ``masks`` (uint8 N×H×W);
* ``image_id`` — the COCO image id; ``ori_size`` — (H, W) of the image on disk.

Training pipeline (DESIGN §7, on ``torchvision.transforms.v2`` so boxes and masks move with
the image): keep-ratio resize to ``data.scale`` = (1333, 800) as mmdet's ``Resize`` does it
(:class:`DetectionResize`: mmcv's size rounding, the uint8 image through OpenCV bilinear and
each mask through OpenCV nearest, exactly ``mmcv.imrescale``; boxes times the float32 scale
factor, clipped to the image) and horizontal flip with ``data.flip_prob``. The test pipeline
(:func:`build_coco_test_transforms`) is the same resize to the test scale, without flip;
``ori_size`` keeps the size on disk, which the detector is given to rescale its boxes to
before NMS (mmdet's ``rescale=True``). Normalisation and padding to a multiple of 32 happen
in the detector; :func:`collate_detection` returns lists.

What is kept (mmdet's ``CocoDataset`` rules, with torchvision's image filter):

* ``iscrowd`` annotations never become targets (they stay in the ground truth that COCO
  evaluation uses to ignore detections);
* an annotation whose box is narrower or lower than 1 px, has ``area <= 0`` or lies outside
  the image is skipped, counted, and reported in one :class:`DatasetWarning`; kept boxes
  are clipped to the image;
* with masks: polygon parts with fewer than three points are dropped; an annotation left
  without a polygon (or with no segmentation at all) is skipped, counted and reported the
  same way. RLE masks (compressed or not) are used as they are;
* for training, images are dropped unless some annotation (crowd ones included) has a box
  larger than 1 px both ways (torchvision's reference rule); evaluation keeps every image.

Ids: a repeated image or category id is an error (pycocotools keeps only one entry per id,
so evaluation would silently score other ground truth, and no renumbering can know which
entry results refer to). A repeated or missing annotation id is repaired: later repeats get
fresh ids above the largest one, with a :class:`DatasetWarning` that counts them (nothing
outside the file refers to annotation ids).

Errors (:class:`~denseclip.data.io.DatasetError`, naming the file and the
annotation id): a file that is not JSON or lacks COCO's ``images``/``annotations``/
``categories`` lists, a repeated image or category id, an annotation whose
``category_id`` is not among the categories or whose ``image_id`` is not among the images,
a malformed box, an RLE whose size is not the image's, and an image on disk whose size
differs from its JSON entry.

An index may be ``(index, seed)``: the random flip then draws from torch's generator seeded
with ``seed`` (the caller's state is restored), as for the segmentation datasets.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..config import DataConfig
from ..optional import require
from .holdout import split_holdout
from .image_ops import imresize
from .io import DatasetError, open_image
from .transforms import KeepRatioResize, apply_seeded

__all__ = [
    "CocoDetection",
    "DatasetWarning",
    "DetectionResize",
    "build_coco_dataset",
    "build_coco_test_transforms",
    "build_coco_train_transforms",
    "collate_detection",
    "move_detection_batch",
]

_REQUIRED_LISTS = ("images", "annotations", "categories")


class DatasetWarning(UserWarning):
    """Annotations were skipped while reading a dataset (the message counts them)."""


def read_coco_json(path: str | Path) -> dict[str, Any]:
    """Load a COCO annotation file and check its top-level structure."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is not a COCO annotation file: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path} is not a COCO annotation file: the top level is a "
                           f"{type(data).__name__}, not an object")
    missing = [k for k in _REQUIRED_LISTS if not isinstance(data.get(k), list)]
    if missing:
        raise DatasetError(f"{path} is not a COCO annotation file: no {', '.join(missing)} "
                           "list (expected images, annotations and categories)")
    _check_ids(data, path)
    return data


def _repeated(values: list[Any]) -> list[Any]:
    """The values that occur more than once, in order of first occurrence."""
    return [v for v, n in Counter(values).items() if n > 1]


def _check_ids(data: dict[str, Any], path: Path) -> None:
    """Refuse repeated image or category ids; renumber repeated (or missing) annotation
    ids, with a :class:`DatasetWarning`. pycocotools indexes images, categories and
    annotations by id, so a repeat silently replaces one entry with another and COCO
    evaluation scores the wrong ground truth. An image or category id is what results and
    labels refer to, so no repair can be right; an annotation id is referred to by nothing
    outside the file, so giving each annotation its own id loses nothing."""
    for key, what in (("images", "image"), ("categories", "category")):
        ids = [e.get("id") for e in data[key] if isinstance(e, dict)]
        bad = next((i for i, v in enumerate(ids) if not isinstance(v, (int, str))), None)
        if bad is not None:
            raise DatasetError(f"{path}: {what} #{bad} has id {ids[bad]!r}; ids must be "
                               f"integers")
        repeated = _repeated(ids)
        if repeated:
            raise DatasetError(f"{path}: {what} ids must be unique; repeated: "
                               f"{_ids_text(repeated)}")
    anns = [a for a in data["annotations"] if isinstance(a, dict)]
    used = [a["id"] for a in anns if isinstance(a.get("id"), int)
            and not isinstance(a["id"], bool)]
    seen: set[Any] = set()
    renumbered: list[Any] = []
    next_id = max(used, default=0) + 1
    for ann in anns:
        aid = ann.get("id")
        if aid is None or isinstance(aid, (bool, dict, list)) or aid in seen:
            renumbered.append(aid)
            ann["id"] = next_id
            next_id += 1
        seen.add(ann["id"])
    if renumbered:
        warnings.warn(f"{path}: renumbered {len(renumbered)} annotation(s) whose id repeated an "
                      f"earlier annotation's (or was missing) to {next_id - len(renumbered)}.."
                      f"{next_id - 1}, so that COCO evaluation sees every one; ids were "
                      f"{_ids_text(renumbered)}", DatasetWarning, stacklevel=3)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _ids_text(ids: list[Any], limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", … ({len(ids)} in all)" if len(ids) > limit else "")


class DetectionResize(KeepRatioResize):
    """mmdet's keep-ratio ``Resize`` of the image, its boxes and its masks: the size is
    mmcv's (:func:`denseclip.utils.keep_ratio_size`); the uint8 image is resized by
    :func:`~denseclip.data.image_ops.imresize` (OpenCV bilinear, as ``mmcv.imrescale``) and
    each mask by OpenCV nearest; boxes are multiplied by the float32 scale factor
    (new / old width, new / old height) and clipped to the new image."""

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask, tv_tensors.BoundingBoxes)

    def apply(self, inpt: Any, params: dict[str, Any]) -> Any:
        h, w = (int(v) for v in params["size"])
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            old_h, old_w = inpt.canvas_size
            factor = torch.tensor([w / old_w, h / old_h] * 2, dtype=torch.float32)
            boxes = inpt.as_subclass(torch.Tensor).float() * factor
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            return tv_tensors.BoundingBoxes(boxes, format=inpt.format, canvas_size=(h, w))
        if isinstance(inpt, tv_tensors.Mask):
            masks = inpt.as_subclass(torch.Tensor)
            if masks.shape[0] == 0:
                return tv_tensors.Mask(masks.new_zeros((0, h, w)))
            resized = [imresize(m.numpy(), (h, w), "nearest") for m in masks]
            return tv_tensors.Mask(torch.from_numpy(np.stack(resized)))
        image = inpt.as_subclass(torch.Tensor)
        if image.dtype != torch.uint8:
            raise TypeError(f"DetectionResize takes the uint8 image (mmcv resizes 8-bit "
                            f"data), got {image.dtype}")
        array = imresize(image.permute(1, 2, 0).numpy(), (h, w), "bilinear")
        return tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1))


def build_coco_train_transforms(cfg: DataConfig) -> v2.Compose:
    """Resize to ``cfg.scale`` keeping the ratio, then flip with ``cfg.flip_prob``."""
    return v2.Compose([DetectionResize(cfg.scale), v2.RandomHorizontalFlip(cfg.flip_prob)])


def build_coco_test_transforms(scale: Sequence[int]) -> v2.Compose:
    """mmdet's test pipeline before normalisation: the keep-ratio :class:`DetectionResize`
    to ``scale`` (the detector's (max_size, min_size)), no flip."""
    return v2.Compose([DetectionResize(scale)])


class CocoDetection(Dataset):
    """Images of ``img_dir`` with their instances from the COCO JSON ``ann_file``.

    Args:
        img_dir: folder holding the ``file_name`` of every image entry.
        ann_file: ``instances_<split>.json``.
        train: training split: drop images without a usable annotation (see the module
            docstring) unless ``filter_empty`` says otherwise.
        with_masks: decode instance masks (Mask R-CNN); also skips annotations without a
            usable polygon or RLE.
        transforms: a v2 callable taking and returning ``{"image": tv_tensors.Image (uint8),
            "boxes": tv_tensors.BoundingBoxes, "masks": tv_tensors.Mask}`` (``masks`` only
            with masks), e.g. :func:`build_coco_train_transforms`; None keeps the original.
        filter_empty: override the training image filter.
        keep_ground_truth: keep the raw JSON for :attr:`coco` (default: not ``train``).
        max_image_pixels: images with more pixels are refused undecoded; None: the default
            limit (:func:`~denseclip.data.io.max_image_pixels`).
        holdout: ``(fraction, seed)``: keep only one part of the images (and their
            annotations, also in :attr:`coco`) cut by
            :func:`~denseclip.data.holdout.split_holdout` on the image ids: the training
            part when ``train``, else the held-out part.
    """

    def __init__(self, img_dir: str | Path, ann_file: str | Path, *, train: bool = False,
                 with_masks: bool = False,
                 transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 filter_empty: bool | None = None, keep_ground_truth: bool | None = None,
                 max_image_pixels: int | None = None,
                 holdout: tuple[float, int] | None = None):
        self.img_dir = Path(img_dir)
        self.max_image_pixels = max_image_pixels
        self.ann_file = Path(ann_file)
        self.train = train
        self.with_masks = with_masks
        self.transforms = transforms
        if not self.img_dir.is_dir():
            raise FileNotFoundError(f"image directory {self.img_dir} does not exist")
        data = read_coco_json(self.ann_file)
        if holdout is not None:
            data = _holdout_part(data, *holdout, train)
        self._parse(data)
        filter_empty = train if filter_empty is None else filter_empty
        if filter_empty:
            self.ids = [i for i in self.ids if self._has_usable_box.get(i, False)]
            if not self.ids:
                raise DatasetError(f"{self.ann_file}: no image has a usable annotation")
        keep = (not train) if keep_ground_truth is None else keep_ground_truth
        self._ground_truth = self._evaluation_json(data) if keep else None
        self._coco = None

    # ------------------------------------------------------------------ parsing
    def _parse(self, data: dict[str, Any]) -> None:
        where = str(self.ann_file)
        cats = {}
        for c in data["categories"]:
            if not isinstance(c, dict) or "id" not in c:
                raise DatasetError(f"{where}: every category needs an 'id', got {c!r}")
            cats[c["id"]] = str(c.get("name", c["id"]))
        if not cats:
            raise DatasetError(f"{where}: the categories list is empty")
        self.cat_ids: list[int] = sorted(cats)
        self.class_names: list[str] = [cats[i] for i in self.cat_ids]
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(self.cat_ids)}

        self.images: dict[int, dict[str, Any]] = {}
        self.ids: list[int] = []
        for img in data["images"]:
            if not isinstance(img, dict) or not {"id", "file_name", "height", "width"} <= set(img):
                raise DatasetError(f"{where}: every image needs id, file_name, height and width; "
                                   f"got {img!r}")
            self.images[img["id"]] = img
            self.ids.append(img["id"])

        self._records: dict[int, list[dict[str, Any]]] = {i: [] for i in self.ids}
        self._has_usable_box: dict[int, bool] = {}
        skipped: dict[str, list[Any]] = {"degenerate box": [], "no usable mask": []}
        for n, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict):
                raise DatasetError(f"{where}: annotation #{n} is not an object")
            aid = ann.get("id", f"#{n}")
            for key in ("image_id", "category_id", "bbox"):
                if key not in ann:
                    raise DatasetError(f"{where}: annotation {aid} has no {key!r}")
            image = self.images.get(ann["image_id"])
            if image is None:
                raise DatasetError(f"{where}: annotation {aid} refers to image_id "
                                   f"{ann['image_id']!r}, which is not in 'images'")
            if ann["category_id"] not in self.cat_id_to_label:
                raise DatasetError(f"{where}: annotation {aid} has category_id "
                                   f"{ann['category_id']!r}, which is not in 'categories'")
            bbox = ann["bbox"]
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_number, bbox))):
                raise DatasetError(f"{where}: annotation {aid} has a malformed bbox {bbox!r} "
                                   "(expected [x, y, width, height])")
            x, y, w, h = (float(v) for v in bbox)
            if w > 1 and h > 1:
                self._has_usable_box[ann["image_id"]] = True
            if ann.get("iscrowd", 0):
                continue
            width, height = float(image["width"]), float(image["height"])
            overlap_w = min(x + w, width) - max(x, 0.0)
            overlap_h = min(y + h, height) - max(y, 0.0)
            area = ann.get("area", w * h)
            if w < 1 or h < 1 or not _number(area) or area <= 0 or overlap_w <= 0 or overlap_h <= 0:
                skipped["degenerate box"].append(aid)
                continue
            record = {
                "id": aid,
                "box": [max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)],
                "label": self.cat_id_to_label[ann["category_id"]],
            }
            if self.with_masks:
                seg = self._check_segmentation(ann.get("segmentation"), aid, image, where)
                if seg is None:
                    skipped["no usable mask"].append(aid)
                    continue
                record["segmentation"] = seg
            self._records[ann["image_id"]].append(record)

        self.skipped = {kind: len(ids) for kind, ids in skipped.items()}
        for kind, ids in skipped.items():
            if ids:
                detail = ("width or height below 1 px, area <= 0, or outside the image"
                          if kind == "degenerate box"
                          else "polygons need at least 3 points (6 coordinates)")
                warnings.warn(f"{where}: skipped {len(ids)} annotation(s) with a {kind} "
                              f"({detail}); ids {_ids_text(ids)}", DatasetWarning, stacklevel=3)

    @staticmethod
    def _check_segmentation(seg: Any, aid: Any, image: dict[str, Any], where: str):
        """A usable polygon list or RLE dict, or None (annotation skipped)."""
        if isinstance(seg, list):
            polys = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                     and all(map(_number, p))]
            return polys or None
        if isinstance(seg, dict) and "counts" in seg and "size" in seg:
            size = list(seg["size"])
            if size != [image["height"], image["width"]]:
                raise DatasetError(f"{where}: annotation {aid} has an RLE of size {size}, but its "
                                   f"image is {[image['height'], image['width']]} (height, width)")
            return seg
        return None

    def _evaluation_json(self, data: dict[str, Any]) -> dict[str, Any]:
        """The ground truth for COCO evaluation: the raw annotations with ``iscrowd`` and
        ``area`` filled in where a file leaves them out."""
        anns = []
        for ann in data["annotations"]:
            ann = dict(ann)
            ann.setdefault("iscrowd", 0)
            ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
            anns.append(ann)
        return {"images": data["images"], "annotations": anns, "categories": data["categories"],
                **({"info": data["info"]} if "info" in data else {})}

    # ------------------------------------------------------------------ public API
    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    @property
    def coco(self):
        """The ground truth as a ``pycocotools.coco.COCO`` (built once, quietly)."""
        if self._coco is None:
            if self._ground_truth is None:
                raise ValueError("this dataset was built without its ground truth "
                                 "(keep_ground_truth=False)")
            coco = require("pycocotools.coco", "COCO evaluation").COCO()
            coco.dataset = self._ground_truth
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco

    @property
    def aspect_ratio_flags(self) -> list[int]:
        """Per item, 1 for landscape images (width > height), else 0: mmdet batches images
        of one flag together (its ``GroupSampler``) to reduce padding."""
        return [int(self.images[i]["width"] > self.images[i]["height"]) for i in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        return self.img_dir / self.images[self.ids[index]]["file_name"]

    def annotations(self, index: int) -> list[dict[str, Any]]:
        """The kept (non-crowd, valid) annotations of item ``index``: ``id``, ``box``
        (x1 y1 x2 y2), ``label`` and, with masks, ``segmentation``."""
        return list(self._records[self.ids[index]])

    def load_image(self, index: int) -> np.ndarray:
        """The RGB uint8 image (H, W, 3) as stored (no EXIF rotation: COCO annotations
        refer to the stored pixels), checked against its JSON size."""
        info = self.images[self.ids[index]]
        path = self.image_path(index)
        try:
            with open_image(path, self.max_image_pixels) as img:  # size checked, undecoded
                array = np.array(img.convert("RGB"), dtype=np.uint8)
        except (FileNotFoundError, DatasetError):
            raise
        except (OSError, SyntaxError, ValueError) as e:
            raise DatasetError(f"cannot read image {path}: {e}") from e
        if array.shape[:2] != (info["height"], info["width"]):
            raise DatasetError(f"image {path} is {array.shape[0]}x{array.shape[1]} (HxW) but "
                               f"{self.ann_file} says {info['height']}x{info['width']}")
        return array

    def load_masks(self, index: int) -> np.ndarray:
        """Instance masks (N, H, W) uint8 of the kept annotations, at the original size."""
        info = self.images[self.ids[index]]
        h, w = int(info["height"]), int(info["width"])
        records = self._records[self.ids[index]]
        if not records:
            return np.zeros((0, h, w), dtype=np.uint8)
        mask_utils = require("pycocotools.mask", "COCO masks")
        rles = []
        for r in records:
            seg = r["segmentation"]
            if isinstance(seg, list):
                rles.append(mask_utils.merge(mask_utils.frPyObjects(seg, h, w)))
            elif isinstance(seg["counts"], list):
                rles.append(mask_utils.frPyObjects(seg, h, w))
            else:
                counts = seg["counts"]
                rles.append({"size": [h, w],
                             "counts": counts.encode() if isinstance(counts, str) else counts})
        with warnings.catch_warnings():  # pycocotools' NumPy-2 copy notice, harmless
            warnings.filterwarnings("ignore", message=".*copy keyword", category=DeprecationWarning)
            masks = mask_utils.decode(rles)  # (H, W, N), Fortran order
        return np.ascontiguousarray(masks.transpose(2, 0, 1))

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image_id = self.ids[index]
        array = self.load_image(index)
        h, w = array.shape[:2]
        records = self._records[image_id]
        boxes = torch.tensor([r["box"] for r in records], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([r["label"] for r in records], dtype=torch.int64)
        sample: dict[str, Any] = {
            "image": tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1).contiguous()),
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
        }
        if self.with_masks:
            sample["masks"] = tv_tensors.Mask(torch.from_numpy(self.load_masks(index)))
        if self.transforms is not None:
            sample = apply_seeded(self.transforms, sample, seed)
        target = {"boxes": sample["boxes"].as_subclass(torch.Tensor).float().contiguous(),
                  "labels": labels}
        if self.with_masks:
            target["masks"] = sample["masks"].as_subclass(torch.Tensor).to(torch.uint8)
        image = sample["image"].as_subclass(torch.Tensor).float().div_(255.0)
        return {"image": image.contiguous(), "target": target, "image_id": image_id,
                "ori_size": (h, w)}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} images, {self.num_classes} classes, "
                f"ann_file={str(self.ann_file)!r}, train={self.train}, "
                f"with_masks={self.with_masks})")


def _holdout_part(data: dict[str, Any], fraction: float, seed: int,
                  train: bool) -> dict[str, Any]:
    """``data`` with only the kept (``train``) or held-out images of
    :func:`~denseclip.data.holdout.split_holdout` and their annotations."""
    ids = [img.get("id") for img in data["images"] if isinstance(img, dict)]
    kept, held = split_holdout(ids, fraction, seed)
    chosen = set(kept if train else held)
    return {**data,
            "images": [i for i in data["images"] if isinstance(i, dict) and i.get("id") in chosen],
            "annotations": [a for a in data["annotations"]
                            if not isinstance(a, dict) or a.get("image_id") in chosen]}


def _same_names(a: Sequence[str], b: Sequence[str]) -> bool:
    return [s.strip().lower() for s in a] == [s.strip().lower() for s in b]


def build_coco_dataset(cfg: DataConfig, split: str, train: bool, *, with_masks: bool = False,
                       class_names: Sequence[str] | None = None,
                       test_scale: Sequence[int] | None = None,
                       seed: int = 0) -> CocoDetection:
    """``cfg.root/<split>`` with ``cfg.root/annotations/instances_<split>.json``; the
    training pipeline (resize to ``cfg.scale``, flip) when ``train``, else the test
    pipeline (resize to ``test_scale``, default ``cfg.test_scale``; the detection task
    passes the model's (max_size, min_size)). With ``class_names`` (the model's classes),
    the JSON's categories (sorted by id) must carry the same names in the same order. With
    ``cfg.holdout_fraction`` > 0, ``cfg.train_split`` is cut with ``seed`` (see
    :class:`CocoDetection`'s ``holdout``)."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} (data.root) does not exist")
    if train:
        transforms = build_coco_train_transforms(cfg)
    else:
        transforms = build_coco_test_transforms(cfg.test_scale if test_scale is None
                                                else test_scale)
    dataset = CocoDetection(root / split, root / "annotations" / f"instances_{split}.json",
                            train=train, with_masks=with_masks, transforms=transforms,
                            max_image_pixels=cfg.max_image_pixels,
                            holdout=((cfg.holdout_fraction, seed) if cfg.holdout_fraction > 0
                                     and split == cfg.train_split else None))
    if class_names is not None and not _same_names(dataset.class_names, class_names):
        raise DatasetError(
            f"{dataset.ann_file}: its {dataset.num_classes} categories "
            f"({_ids_text(dataset.class_names)}) are not the model's {len(class_names)} "
            f"classes ({_ids_text(list(class_names))}); set model.classes to match"
        )
    return dataset


def collate_detection(batch: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Lists per key (``image``, ``target``, ``image_id``, ``ori_size``), as torchvision's
    detectors take them; the detector pads the images into one batch."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    return {key: [item[key] for item in batch] for key in batch[0]}


def move_detection_batch(batch: dict[str, list[Any]], device: torch.device | str,
                         non_blocking: bool = False) -> tuple[list[torch.Tensor],
                                                              list[dict[str, torch.Tensor]]]:
    """``(images, targets)`` of a collated batch on ``device``."""
    images = [img.to(device, non_blocking=non_blocking) for img in batch["image"]]
    targets = [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()}
               for t in batch["target"]]
    return images, targets
