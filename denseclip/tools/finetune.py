"""The recipe of ``denseclip finetune``: what a data folder holds, and the official training
settings fitted to it.

:func:`inspect_data` recognises a folder's layout and reads what the recipe needs without
loading any image: the task the data trains (label maps: segmentation; a COCO JSON with
boxes only: RetinaNet; with masks, any annotation with a non-empty ``segmentation``: Mask
R-CNN), the classes, the splits and their sizes. Layouts (:data:`LAYOUTS`):

* folder: ``classes.txt``, ``images/{training,validation}/`` and
  ``annotations/{training,validation}/`` (PNG label maps, values 0..K-1, 255 ignored;
  ``train``/``val`` also accepted);
* COCO: ``classes.txt``, ``train/`` and ``annotations/instances_train.json`` (and ``val``;
  or ``train2017``/``val2017``); boxes, polygons or RLE;
* Cityscapes (``leftImg8bit/``, ``gtFine/``) and Pascal VOC (``JPEGImages/``,
  ``SegmentationClass/``, ``ImageSets/Segmentation/``), with their bundled classes.

A folder without a validation split gets one held out of its training split
(:mod:`denseclip.data.holdout`, :data:`HOLDOUT_FRACTION`, seeded by ``seed``).

:func:`build_recipe` loads the preset with the data's settings and keeps the official
effective batch (:attr:`denseclip.tasks.Task.official_batch_size`) through
``optim.accumulate`` over ``world size × data.batch_size``: an optimiser step, which the
schedule counts, then sees as many images as in the official runs, so the learning rate and
the number of iterations stay the preset's. ``epochs`` instead sets the length from the data:
``ceil(epochs · train images / effective batch)`` iterations (epoch-based detection presets:
``schedule.max_epochs`` and their lr steps scaled). Warm-up, evaluation, checkpoint and log
intervals are fitted to short runs (:func:`fit_intervals`). The user's ``key=value``
overrides are applied last, so they always win, and the recipe describes the result.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..classes import load_class_names
from ..config import Config, ConfigError, load_config
from ..data.coco import read_coco_json
from ..data.holdout import split_holdout
from ..data.io import DatasetError, load_label_map
from ..data.layouts import (
    CITYSCAPES_IMG_SUFFIX,
    read_split_file,
)
from ..tasks import TASKS, SegmentationTask
from ..weights import hub, resolve
from .presets import backbone_label

__all__ = ["DEFAULT_PRESETS", "HOLDOUT_FRACTION", "LAYOUTS", "DataInfo", "Recipe",
           "build_recipe", "clip_weights_name", "fit_intervals", "inspect_data",
           "resolve_load_from"]

LAYOUTS = (
    "folder (classes.txt, images/training/ + annotations/training/ PNG label maps, "
    "optional validation/)",
    "COCO (classes.txt, train/ + annotations/instances_train.json, optional val/; or "
    "train2017/val2017)",
    "Cityscapes (leftImg8bit/ + gtFine/)",
    "Pascal VOC (JPEGImages/ + SegmentationClass/ + ImageSets/Segmentation/)",
)
# the task the data trains → the preset chosen when none is given
DEFAULT_PRESETS = {"segmentation": "denseclip_fpn_res50_512x512_80k",
                   "retinanet": "retinanet_denseclip_r50_fpn_1x_coco",
                   "mask_rcnn": "mask_rcnn_denseclip_r50_fpn_1x_coco"}
# release layouts have presets of their own (crop, test scale and classes)
RELEASE_PRESETS = {"cityscapes": "denseclip_fpn_res50_cityscapes_512x1024_80k",
                   "voc": "denseclip_fpn_res50_voc12_512x512_40k"}
# the task of the data → the model tasks that can train on it (masks carry boxes too)
FITTING_TASKS = {"segmentation": ("segmentation",), "retinanet": ("retinanet",),
                 "mask_rcnn": ("mask_rcnn", "retinanet")}
_DATA_WORDS = {"segmentation": "label maps (segmentation)",
               "retinanet": "COCO boxes without masks (detection: retinanet)",
               "mask_rcnn": "COCO instance masks (mask_rcnn)"}
HOLDOUT_FRACTION = 0.1  # of the training split, when the data has no validation split
MAX_COCO_JSON_BYTES = 2 << 30  # instances_train2017.json is 448 MiB
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_MAPS_READ = 32  # label maps read to tell 0..K-1 from 1..K (0 = unlabelled)
_FOLDER_SPLITS = (("training", "train"), ("validation", "val"))
_COCO_SPLITS = (("train", "train2017"), ("val", "val2017"))


@dataclass
class DataInfo:
    """What :func:`inspect_data` found: ``layout`` (the ``data.dataset`` value), ``task``
    (the model task the data trains), ``classes`` (``model.classes``) and their names, the
    splits (``val_split`` None: none on disk), the training items' keys (file names or
    COCO image ids; ``usable``: the ids COCO training keeps, None: all), the number of
    validation images and the data settings the layout needs (``settings``)."""

    root: Path
    layout: str
    task: str
    classes: str
    class_names: list[str]
    train_split: str
    val_split: str | None
    train_keys: list[Any]
    val_images: int
    usable: set[Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def _layout_error(path: Path, problem: str) -> DatasetError:
    return DatasetError(f"{path} {problem}; accepted layouts: {'; '.join(LAYOUTS)}")


def _first_dir(base: Path, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if (base / n).is_dir()), None)


def _image_names(folder: Path, suffix: str) -> list[str]:
    """Names (relative, without suffix) of the images in ``folder``, as the segmentation
    datasets list them."""
    return sorted(p.relative_to(folder).as_posix()[: -len(suffix)] for p in folder.rglob("*")
                  if p.name.lower().endswith(suffix) and p.is_file())


def _class_file(root: Path) -> tuple[str, list[str]]:
    path = root / "classes.txt"
    if not path.is_file():
        raise _layout_error(path, "is missing: a class file, one 'name' or 'name: "
                                  "description' per line in label order")
    return str(path), load_class_names(path)


def _inspect_folder(root: Path) -> DataInfo:
    images, labels = root / "images", root / "annotations"
    if not labels.is_dir():
        raise _layout_error(labels, "is missing (the folder layout pairs images/<split>/ "
                                    "with annotations/<split>/)")
    train = _first_dir(images, _FOLDER_SPLITS[0])
    if train is None:
        raise _layout_error(images / "training", "is missing (the training images)")
    if not (labels / train).is_dir():
        raise _layout_error(labels / train, "is missing (the training label maps)")
    val = _first_dir(images, _FOLDER_SPLITS[1])
    classes, names = _class_file(root)
    found = Counter(p.suffix.lower() for p in (images / train).rglob("*")
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise _layout_error(images / train, f"holds no images ({', '.join(IMAGE_SUFFIXES)})")
    suffix = found.most_common(1)[0][0]
    keys = _image_names(images / train, suffix)
    return DataInfo(root, "folder", "segmentation", classes, names, train, val, keys,
                    len(_image_names(images / val, suffix)) if val else 0,
                    settings={"img_suffix": suffix, "reduce_zero_label": _zero_unlabelled(
                        labels / train, keys, len(names))})


def _zero_unlabelled(folder: Path, names: list[str], num_classes: int) -> bool:
    """Whether the label maps count classes from 1 (0 = unlabelled, the ADE20K
    convention): some map among the first :data:`LABEL_MAPS_READ` holds the value K. Else
    the values 0..K-1 are the classes."""
    for name in names[:LABEL_MAPS_READ]:
        path = folder / f"{name}.png"
        if path.is_file() and (load_label_map(path) == num_classes).any():
            return True
    return False


def _read_json(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    if size > MAX_COCO_JSON_BYTES:
        raise DatasetError(f"{path} is {size} bytes, more than the {MAX_COCO_JSON_BYTES} an "
                           f"annotation file may have")
    return read_coco_json(path)


def _usable(anns: list[Any]) -> set[Any]:
    """Image ids with a box larger than 1 px both ways (the COCO training filter)."""
    out = set()
    for ann in anns:
        box = ann.get("bbox") if isinstance(ann, dict) else None
        if (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float))
                                                            for v in box)
                and box[2] > 1 and box[3] > 1):
            out.add(ann.get("image_id"))
    return out


def _inspect_coco(root: Path) -> DataInfo:
    ann_dir = root / "annotations"
    train = next((s for s in _COCO_SPLITS[0] if (ann_dir / f"instances_{s}.json").is_file()),
                 None)
    if train is None:
        raise _layout_error(ann_dir / "instances_train.json", "is missing (COCO layout)")
    if not (root / train).is_dir():
        raise _layout_error(root / train, f"is missing (the images of instances_{train}.json)")
    val = next((s for s in _COCO_SPLITS[1] if (ann_dir / f"instances_{s}.json").is_file()
                and (root / s).is_dir()), None)
    classes, names = _class_file(root)
    data = _read_json(ann_dir / f"instances_{train}.json")
    cats = sorted((c for c in data["categories"] if isinstance(c, dict) and "id" in c),
                  key=lambda c: (str(type(c["id"])), c["id"]))
    cat_names = [str(c.get("name", c["id"])) for c in cats]
    if [n.strip().lower() for n in cat_names] != [n.strip().lower() for n in names]:
        raise DatasetError(f"{classes} names {len(names)} classes ({', '.join(names[:5])}) "
                           f"but the categories of instances_{train}.json, sorted by id, are "
                           f"{len(cat_names)} ({', '.join(cat_names[:5])}): list the "
                           f"category names in id order")
    masks = any(isinstance(a, dict) and a.get("segmentation") for a in data["annotations"])
    val_images = len(_read_json(ann_dir / f"instances_{val}.json")["images"]) if val else 0
    ids = [img.get("id") for img in data["images"] if isinstance(img, dict)]
    return DataInfo(root, "coco", "mask_rcnn" if masks else "retinanet", classes, names,
                    train, val, ids, val_images, usable=_usable(data["annotations"]))


def _inspect_cityscapes(root: Path) -> DataInfo:
    images = root / "leftImg8bit"
    train = _first_dir(images, ("train",))
    if train is None:
        raise _layout_error(images / "train", "is missing (Cityscapes layout)")
    val = _first_dir(images, ("val",))
    suffix = CITYSCAPES_IMG_SUFFIX.lower()
    return DataInfo(root, "cityscapes", "segmentation", "cityscapes",
                    load_class_names("cityscapes"), train, val,
                    _image_names(images / train, suffix),
                    len(_image_names(images / val, suffix)) if val else 0)


def _inspect_voc(root: Path) -> DataInfo:
    lists = root / "ImageSets" / "Segmentation"
    if not (lists / "train.txt").is_file():
        raise _layout_error(lists / "train.txt", "is missing (Pascal VOC layout)")
    val = "val" if (lists / "val.txt").is_file() else None
    return DataInfo(root, "voc", "segmentation", "voc", load_class_names("voc"), "train", val,
                    read_split_file(lists / "train.txt"),
                    len(read_split_file(lists / "val.txt")) if val else 0)


def inspect_data(root: str | Path) -> DataInfo:
    """The layout, task, classes and splits of the data folder ``root``; a folder that
    fits no layout is a one-line :class:`DatasetError` naming the path that is missing and
    listing the accepted layouts."""
    root = Path(root)
    if not root.is_dir():
        raise _layout_error(root, "is not a folder")
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return _inspect_cityscapes(root)
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        return _inspect_voc(root)
    if (root / "images").is_dir():
        return _inspect_folder(root)
    if (root / "annotations").is_dir() and any((root / "annotations").glob("instances_*.json")):
        return _inspect_coco(root)
    if (root / "annotations").is_dir():
        raise _layout_error(root / "images", "is missing (the folder layout), and so is "
                                             f"{root / 'annotations' / 'instances_train.json'}"
                                             " (the COCO layout)")
    raise _layout_error(root, "holds no dataset: no images/ + annotations/ folders and no "
                              "annotations/instances_train.json")


def fit_intervals(cfg: Config, iterations: int) -> dict[str, int]:
    """Warm-up at most 10 % of ``iterations``; evaluation and checkpoints about 10 times,
    logging about 20 times per run; never more than the preset's (so a full-length run
    keeps them); evaluation off stays off."""
    s = cfg.schedule
    tenth = max(1, math.ceil(iterations / 10))
    fitted = {"warmup_iters": min(s.warmup_iters, iterations // 10),
              "checkpoint_interval": min(s.checkpoint_interval, tenth),
              "log_interval": min(s.log_interval, max(1, math.ceil(iterations / 20)))}
    if s.eval_interval:
        fitted["eval_interval"] = min(s.eval_interval, tenth)
    return fitted


@dataclass
class Recipe:
    """The config :func:`build_recipe` made, the sizes it was made for and the recipe's
    lines (:meth:`lines`): ``accumulate`` over ``batch × world_size``, ``effective``
    images per optimiser step, ``official`` the preset's task's, ``iterations`` in the
    run (≈ for epoch-based schedules), the training and validation sizes, and what the
    command set (``chosen``) before the user's ``overrides``."""

    cfg: Config
    info: DataInfo
    preset: str
    world_size: int
    official: int
    train_images: int
    val_images: int
    iterations: int
    epochs: int | None
    chosen: list[str]
    overrides: list[str]

    @property
    def effective(self) -> int:
        return self.cfg.data.batch_size * self.world_size * self.cfg.optim.accumulate

    def lines(self, weights: str) -> list[str]:
        """The recipe in words, ``weights`` saying what initialises the model."""
        cfg, info, s = self.cfg, self.info, self.cfg.schedule
        shown = ", ".join(info.class_names[:5]) + (", …" if len(info.class_names) > 5 else "")
        b, w, a = cfg.data.batch_size, self.world_size, cfg.optim.accumulate
        if self.effective == self.official:
            batch_note = f"the official {self.official}"
        elif self.official % (b * w) == 0:  # the user's overrides chose another batch
            batch_note = (f"not the official {self.official}, by your overrides; the learning "
                          f"rate stays the preset's")
        else:
            batch_note = (f"not the official {self.official}: {self.official} is not a "
                          f"multiple of {b} × {w}; the learning rate stays the official one")
        passes = self.iterations * self.effective / max(1, self.train_images)
        length = (f"{s.max_epochs} epochs ≈ {self.iterations} iterations"
                  if s.max_epochs > 0 else
                  f"{self.iterations} iterations ≈ {passes:.1f} epochs")
        length += (f" (--epochs {self.epochs}: ceil({self.epochs} × {self.train_images} / "
                   f"{self.effective}))" if self.epochs and s.max_epochs == 0 else "")
        size = (f"crop {cfg.data.crop_size[0]}×{cfg.data.crop_size[1]} (H×W)"
                if issubclass(TASKS[cfg.model.task], SegmentationTask)
                else f"images resized to fit {cfg.data.scale[0]}×{cfg.data.scale[1]}")
        evaluation = (f"every {s.eval_interval} iterations and at the end; best.pth keeps "
                      f"the best {TASKS[cfg.model.task].main_metric}"
                      if s.eval_interval else "off (schedule.eval_interval=0)")
        return [
            f"denseclip finetune: {info.root} ({info.layout} layout) with preset "
            f"{self.preset} (model.task {cfg.model.task})",
            f"  classes: {len(info.class_names)} ({shown}) from {cfg.model.classes}",
            f"  training: {self.train_images} images ({info.train_split})",
            *self._label_line(),
            f"  validation: {self.val_images} images, {self._validation_source()}",
            f"  batch: {b} per device × {w} device(s) × {a} accumulation step(s) = "
            f"{self.effective} images per step ({batch_note})",
            f"  learning rate: {cfg.optim.lr:g} ({s.policy} schedule, warm-up "
            f"{s.warmup_iters} iterations)",
            f"  schedule: {length}",
            f"  input: {size}",
            f"  evaluation: {evaluation}; checkpoints every {s.checkpoint_interval} "
            f"iterations (intervals fitted to the run: warm-up <= 10 %, evaluation and "
            f"checkpoints about 10 times)",
            f"  weights: {weights}",
            self._batchnorm_line(),
            *([f"  your overrides (applied last): {' '.join(self.overrides)}"]
              if self.overrides else []),
        ]

    def _batchnorm_line(self) -> str:
        b = self.cfg.data.batch_size
        if self.cfg.optim.accumulate == 1:
            return (f"  BatchNorm: statistics over the {b} image(s) of one forward pass per "
                    f"device (SyncBatchNorm over all devices under torchrun on GPUs)")
        return (f"  BatchNorm: statistics over the {b} image(s) of one forward pass per device, "
                f"not over the {self.effective} of a step (accumulation cannot pool them); "
                f"closest: a larger data.batch_size, or torchrun on several GPUs (SyncBatchNorm "
                f"over all of them)")

    def _label_line(self) -> list[str]:
        if self.info.layout != "folder":
            return []
        k = len(self.info.class_names)
        if self.cfg.data.reduce_zero_label:
            return [f"  labels: PNG values 1..{k} are the classes, 0 unlabelled, 255 ignored "
                    f"(data.reduce_zero_label=true)"]
        return [f"  labels: PNG values 0..{k - 1} are the classes, 255 ignored "
                f"(data.reduce_zero_label=false)"]

    def _validation_source(self) -> str:
        data, info = self.cfg.data, self.info
        if data.val_split != data.train_split:
            return f"the {data.val_split} split"
        if data.holdout_fraction > 0:
            return (f"a {data.holdout_fraction:.0%} holdout of the training split drawn with "
                    f"seed {self.cfg.seed} (data.holdout_fraction={data.holdout_fraction:g}: "
                    f"the same images every run, never trained on)")
        return f"the training split itself ({info.train_split}; data.holdout_fraction=0)"


def _data_settings(info: DataInfo) -> list[str]:
    """The overrides that point a preset at ``info``'s data."""
    holdout = info.val_split is None
    settings = {"data.dataset": info.layout, "data.root": str(info.root),
                "data.train_split": info.train_split,
                "data.val_split": info.train_split if holdout else info.val_split,
                "data.holdout_fraction": HOLDOUT_FRACTION if holdout else 0.0,
                "model.classes": info.classes,
                **{f"data.{k}": v for k, v in info.settings.items()}}
    return [f"{k}={_yaml(v)}" for k, v in settings.items()]


def _yaml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):  # quoted, so that a path reads as text whatever it holds
        return "'" + value.replace("'", "''") + "'"
    return str(value)


def _sizes(cfg: Config, info: DataInfo) -> tuple[int, int]:
    """Training and validation images under ``cfg``'s holdout."""
    keys, val = info.train_keys, info.val_images
    if cfg.data.holdout_fraction > 0:
        keys, held = split_holdout(keys, cfg.data.holdout_fraction, cfg.seed)
        if cfg.data.val_split == cfg.data.train_split:
            val = len(held)
    elif cfg.data.val_split == cfg.data.train_split:
        val = len(keys)
    if info.usable is not None:
        keys = [k for k in keys if k in info.usable]
    return len(keys), val


def build_recipe(info: DataInfo, preset: str | None, overrides: list[str], world_size: int,
                 epochs: int | None = None) -> Recipe:
    """The config for training on ``info``'s data with ``preset`` (default: the data's
    task's, :data:`DEFAULT_PRESETS`) on ``world_size`` processes: the data settings, the
    official effective batch through ``optim.accumulate``, the schedule (``epochs``) and
    fitted intervals, then ``overrides``. A preset for another task is a
    :class:`ConfigError` naming both."""
    name = preset or RELEASE_PRESETS.get(info.layout) or DEFAULT_PRESETS[info.task]
    data = _data_settings(info)
    base = load_config(name, [*data, *overrides])
    if base.model.task not in FITTING_TASKS[info.task]:
        raise ConfigError(f"preset {name} trains {base.model.task} but {info.root} holds "
                          f"{_DATA_WORDS[info.task]}; use a {info.task} preset such as "
                          f"{DEFAULT_PRESETS[info.task]}")
    official = TASKS[base.model.task].official_batch_size
    per_step = base.data.batch_size * world_size
    chosen = [*data, f"optim.accumulate={max(1, round(official / per_step))}"]
    with_batch = load_config(name, [*chosen, *overrides])
    train_images, _ = _sizes(with_batch, info)
    effective = per_step * with_batch.optim.accumulate
    per_epoch = max(1, math.ceil(train_images / effective))
    s = with_batch.schedule
    if epochs and s.max_epochs > 0:  # epoch-based (detection): lr steps scaled along
        steps = [min(epochs, max(1, round(x * epochs / s.max_epochs))) for x in s.steps]
        chosen += [f"schedule.max_epochs={epochs}", f"schedule.steps={steps}"]
        iterations = epochs * per_epoch
    elif epochs:
        iterations = max(1, math.ceil(epochs * train_images / effective))
        chosen.append(f"schedule.max_iters={iterations}")
    else:
        iterations = s.max_epochs * per_epoch if s.max_epochs > 0 else s.max_iters
    # the intervals of the user's length when an override sets it
    length = load_config(name, [*chosen, *overrides]).schedule
    if length.max_epochs > 0:
        iterations = length.max_epochs * per_epoch
    else:
        iterations = length.max_iters
    chosen += [f"schedule.{k}={v}" for k, v in fit_intervals(with_batch, iterations).items()]
    cfg = load_config(name, [*chosen, *overrides])
    _, val_images = _sizes(cfg, info)
    return Recipe(cfg, info, name, world_size, official, train_images, val_images, iterations,
                  epochs, chosen, list(overrides))


def clip_weights_name(cfg: Config) -> str | None:
    """The registered CLIP weights (``RN50``, ``RN101``, ``ViT-B-16``) whose towers
    ``cfg``'s backbone has, or None."""
    label = backbone_label(cfg)
    if not label.startswith("CLIP "):
        return None
    entry = hub.get_entry(label.removeprefix("CLIP ").replace("/", "-"))
    return entry.name if entry is not None else None


def resolve_load_from(spec: str | None, cfg: Config) -> tuple[Path | None, str]:
    """``(weights file or None, the recipe's words for it)`` of ``--load-from``:
    ``pretrained`` is the CLIP release of the preset's backbone (downloaded into the cache
    once), ``none`` random weights, anything else as :func:`denseclip.weights.resolve`."""
    if spec == "pretrained":
        name = clip_weights_name(cfg)
        if name is None:
            raise ValueError(f"--load-from pretrained: no CLIP release fits {cfg.name}'s "
                             f"backbone ({backbone_label(cfg)}); give --load-from FILE, or "
                             f"--load-from none for random weights")
        path = resolve(name, cfg.name)
        return path, f"CLIP {name} ({path})"
    path = resolve(spec, cfg.name)
    return path, str(path) if path is not None else "none: random initialisation"
