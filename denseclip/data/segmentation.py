"""Semantic-segmentation datasets: image + PNG label-map pairs.

:class:`CityscapesDataset` and :class:`VOCDataset` read those releases' layouts
(:mod:`denseclip.data.layouts`: Cityscapes' 19 training ids, VOC's 21 palette indices, 255
ignored in both, no ``reduce_zero_label``). The other two read the ADE20K release layout::

    ROOT/images/<split>/<name>.jpg         RGB images
    ROOT/annotations/<split>/<name>.png    label maps (same name, single channel)

* :class:`ADE20KDataset` — the 150-class SceneParsing release. Labels are reduced as mmseg's
  ``reduce_zero_label`` does: 0 ("other") → 255 (ignore), 1..150 → 0..149.
* :class:`FolderDataset` — your own data: an images directory, a labels directory of PNGs
  with the same names, and a class file (the format of :mod:`denseclip.classes`: one class
  per line in label order). Whether 0
  means "unlabelled" (``reduce_zero_label``) and which raw value means "ignore"
  (``ignore_value``) are arguments. :func:`build_segmentation_dataset` uses the layout above
  with ``ROOT/classes.txt`` as the class-names file.

Items are dictionaries:

* ``image`` — float32 tensor 3×H×W, RGB, normalised as ``(x - 255·mean) / (255·std)``;
* ``target`` — int64 tensor H×W of class indices 0..K-1, 255 = ignore;
* ``name`` — the file name without suffix (relative to the images directory);
* ``ori_size`` — ``(H, W)`` of the decoded image (after EXIF orientation);
* ``ori_target`` — test mode only: the label map at the original size (int64, 255 = ignore),
  for computing metrics at the original resolution.

:meth:`SegmentationDataset.get` with ``original=True`` returns instead the decoded image
itself (``ori_image``, uint8 H×W×3) with ``ori_target``, ``name`` and ``ori_size``: the input
of multi-scale testing, which rescales the original image once per scale as mmseg does.

Pipeline (:mod:`denseclip.data.transforms`): the image reaches the transforms as the decoded
uint8 H×W×3 RGB array and the label map as uint8 H×W (targets fit, K <= 255), and stay 8-bit
through rescale, crop, flip and photometric distortion with mmcv's OpenCV arithmetic, so the
pixels equal the official pipeline's.

Decoding (:mod:`denseclip.data.io`): images as mmseg's ``LoadImageFromFile`` (OpenCV,
``cv2.imdecode(..., IMREAD_COLOR)``, then RGB): grayscale and palette images become RGB, alpha
is dropped, 16-bit images keep their high byte, and the EXIF orientation tag is applied.
Label maps as mmseg's ``LoadAnnotations`` (Pillow, stored values, palette indices for mode P)
and are *not* EXIF-rotated; a rotated image whose label map was not rotated with it then
fails with a size-mismatch :class:`DatasetError` (unless the rotation was 180°, which no
check can notice). Problems with the data raise :class:`DatasetError` naming the file.

Reproducible augmentation: an index may be given as ``(index, seed)``; the transforms then run
with torch's CPU generator seeded by ``seed`` (the caller's generator state is restored
afterwards), so the same pair always gives the same sample. The training loader of
:mod:`denseclip.data.samplers` passes a seed derived from (run seed, position in the sample
stream), which makes augmentation independent of worker count and identical after a resume.
A plain integer index uses whatever state torch's generator is in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..classes import BUNDLED, load_class_names
from ..config import DataConfig
from .holdout import split_holdout
from .io import DatasetError, load_image, load_label_map
from .layouts import (
    CITYSCAPES_IMG_SUFFIX,
    CITYSCAPES_SEG_SUFFIX,
    VOC_IMG_SUFFIX,
    VOC_SEG_SUFFIX,
    cityscapes_dirs,
    voc_files,
)
from .transforms import (
    IGNORE_INDEX,
    apply_seeded,
    build_test_transforms,
    build_train_transforms,
    to_chw_tensor,
)

__all__ = [
    "ADE20KDataset",
    "ADE20K_CLASSES_FILE",
    "CityscapesDataset",
    "DatasetError",
    "FolderDataset",
    "SegmentationDataset",
    "VOCDataset",
    "build_segmentation_dataset",
    "load_image",
    "load_label_map",
]

ADE20K_CLASSES_FILE = BUNDLED["ade20k"]


def _as_tensor(value: Any, image: bool = False) -> torch.Tensor:
    """A pipeline output as a tensor: arrays H×W×C → C×H×W (images), H×W as they are."""
    if isinstance(value, torch.Tensor):
        return value.as_subclass(torch.Tensor)
    if image and value.ndim == 3:
        return to_chw_tensor(value)
    return torch.from_numpy(np.ascontiguousarray(value))


def _format_values(values: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (f", ... ({len(values)} distinct)" if len(values) > limit else "")


class SegmentationDataset(Dataset):
    """Images in ``img_dir`` paired with label maps of the same relative name in ``ann_dir``.

    Args:
        img_dir, ann_dir: directories, searched recursively for ``img_suffix`` (matched
            case-insensitively) and read as ``<name><seg_suffix>`` respectively.
        class_names: one name per class; ``K = len(class_names)`` (at most 255, as 255 is
            the ignore index of targets).
        reduce_zero_label: raw 0 → ignore and raw ``1..K`` → ``0..K-1``; otherwise raw values
            are ``0..K-1`` already.
        ignore_value: the raw value meaning "ignore" (mapped to 255 in targets). Any other
            raw value outside the class range is a :class:`DatasetError`.
        transforms: a callable taking ``{"image": H×W×3 uint8 RGB array, "target": H×W
            uint8 array (255 = ignore)}`` and returning the same keys, as tensors (image
            3×H×W) or arrays (image H×W×3), e.g. :func:`build_train_transforms`; None
            leaves the image unnormalised (float32 3×H×W, 0..255).
        test_mode: also return ``ori_target``.
        max_image_pixels: images and label maps with more pixels are refused undecoded
            (:class:`~denseclip.data.io.ImageTooLargeError`); None: the default limit
            (:func:`~denseclip.data.io.max_image_pixels`).
        names: the items, as names relative to ``img_dir`` without suffix, instead of
            every image found there (a split file's list, checked by its reader).

    Raises ``FileNotFoundError`` for a missing directory and :class:`DatasetError` for an
    empty image directory or an image without its label map (both at construction).
    """

    def __init__(
        self,
        img_dir: str | Path,
        ann_dir: str | Path,
        class_names: Sequence[str],
        *,
        reduce_zero_label: bool = False,
        ignore_value: int = IGNORE_INDEX,
        img_suffix: str = ".jpg",
        seg_suffix: str = ".png",
        transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        test_mode: bool = False,
        max_image_pixels: int | None = None,
        names: Sequence[str] | None = None,
    ):
        self.img_dir = Path(img_dir)
        self.ann_dir = Path(ann_dir)
        self.class_names = list(class_names)
        if not 1 <= len(self.class_names) <= 255:
            raise ValueError(f"need 1..255 classes, got {len(self.class_names)}")
        self.reduce_zero_label = reduce_zero_label
        self.ignore_value = int(ignore_value)
        self.img_suffix = img_suffix
        self.seg_suffix = seg_suffix
        self.transforms = transforms
        self.test_mode = test_mode
        self.max_image_pixels = max_image_pixels
        for kind, directory in (("image", self.img_dir), ("label", self.ann_dir)):
            if not directory.is_dir():
                raise FileNotFoundError(f"{kind} directory {directory} does not exist")
        if names is None:
            self._names = self._scan()
        else:
            self._names = list(names)
            self._img_paths = [self.img_dir / (n + img_suffix) for n in self._names]

    def _scan(self) -> list[str]:
        suffix = self.img_suffix.lower()
        found = sorted(
            (p.relative_to(self.img_dir).as_posix()[: -len(suffix)], p)
            for p in self.img_dir.rglob("*")
            if p.name.lower().endswith(suffix) and p.is_file()
        )
        if not found:
            raise DatasetError(f"no images ending in {self.img_suffix!r} found in {self.img_dir}")
        missing = [(n, p) for n, p in found if not self.label_path_of(n).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            name, path = missing[0]
            raise DatasetError(
                f"image {path} has no label map {self.label_path_of(name)}{more}"
            )
        self._img_paths = [p for _, p in found]
        return [n for n, _ in found]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def names(self) -> list[str]:
        """File names without suffix, in item order."""
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def keep_only(self, names: Sequence[str]) -> None:
        """Keep only the items named in ``names`` (in item order), e.g. one part of a
        :func:`~denseclip.data.holdout.split_holdout`."""
        wanted = set(names)
        pairs = [(n, p) for n, p in zip(self._names, self._img_paths, strict=True)
                 if n in wanted]
        self._names, self._img_paths = [n for n, _ in pairs], [p for _, p in pairs]

    def image_path(self, index: int) -> Path:
        return self._img_paths[index]

    def label_path_of(self, name: str) -> Path:
        return self.ann_dir / (name + self.seg_suffix)

    def label_path(self, index: int) -> Path:
        return self.label_path_of(self._names[index])

    # ----------------------------------------------------------------- label spaces
    def encode_labels(self, raw: np.ndarray, path: str | Path = "<array>") -> np.ndarray:
        """Raw stored label values → training targets (int64, 0..K-1, 255 = ignore).

        Raises :class:`DatasetError` naming ``path`` if a value is neither a class nor the
        ignore value."""
        k = self.num_classes
        low, high = (1, k) if self.reduce_zero_label else (0, k - 1)
        if raw.dtype == np.uint8:
            present = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
        else:
            present = np.unique(raw)
        allowed = ((present >= low) & (present <= high)) | (present == self.ignore_value)
        if self.reduce_zero_label:
            allowed |= present == 0
        bad = present[~allowed]
        if bad.size:
            zero = "0 = unlabelled, " if self.reduce_zero_label else ""
            raise DatasetError(
                f"label map {path} holds value(s) {_format_values(bad)} outside the class range "
                f"({zero}{low}..{high} for {k} classes, {self.ignore_value} = ignore)"
            )
        lut = np.full(int(max(present.max(), 255)) + 1, IGNORE_INDEX, dtype=np.int64)
        classes = np.arange(low, high + 1)
        lut[classes] = classes - low
        if 0 <= self.ignore_value < lut.size:
            lut[self.ignore_value] = IGNORE_INDEX
        return lut[raw]

    def to_dataset_labels(self, pred: np.ndarray | torch.Tensor) -> np.ndarray:
        """Predicted class indices (0..K-1, 255 = ignore) → the dataset's own label values,
        for writing PNGs (ADE20K: 0..149 → 1..150, ignore → 0)."""
        if isinstance(pred, torch.Tensor):
            pred = pred.detach().cpu().numpy()
        pred = np.asarray(pred).astype(np.int64)
        valid = (pred >= 0) & (pred < self.num_classes)
        if self.reduce_zero_label:
            out = np.where(valid, pred + 1, 0)
        else:
            out = np.where(valid, pred, self.ignore_value)
        dtype = np.uint8 if out.max(initial=0) <= 255 and out.min(initial=0) >= 0 else np.int32
        return out.astype(dtype)

    def save_prediction(self, pred: np.ndarray | torch.Tensor, out_dir: str | Path,
                        name: str) -> Path:
        """Write a predicted label map (H×W class indices) as ``out_dir/<name>.png`` in the
        dataset's own label space; returns the path."""
        path = Path(out_dir) / (name + ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        labels = self.to_dataset_labels(pred)
        if labels.dtype != np.uint8:
            labels = labels.astype(np.int32)
        Image.fromarray(labels).save(path)
        return path

    # ----------------------------------------------------------------- loading
    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The decoded image (H, W, 3 uint8) and its encoded target (H, W int64), checked."""
        img_path, ann_path = self.image_path(index), self.label_path(index)
        image = load_image(img_path, self.max_image_pixels)
        raw = load_label_map(ann_path, self.max_image_pixels)
        if image.shape[:2] != raw.shape[:2]:
            (ih, iw), (lh, lw) = image.shape[:2], raw.shape[:2]
            raise DatasetError(
                f"label map {ann_path} is {lh}x{lw} (HxW) but image {img_path} is {ih}x{iw}"
                " (label maps are not EXIF-rotated; rotate the image pixels instead)"
            )
        return image, self.encode_labels(raw, ann_path)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, tuple):
            index, seed = key
        else:
            index, seed = key, None
        return self.get(index, seed)

    def get(self, index: int, seed: int | None = None, original: bool = False
            ) -> dict[str, Any]:
        """Item ``index`` (``self[index]``, or ``self[(index, seed)]`` with a ``seed``).

        ``original=True`` skips the pipeline and gives what multi-scale testing starts from:
        ``ori_image`` (the decoded image, uint8 tensor H×W×3, RGB), ``ori_target``, ``name``
        and ``ori_size``."""
        image_np, target_np = self.load(index)
        height, width = target_np.shape
        name = self._names[index]
        if original:
            return {"ori_image": torch.from_numpy(image_np), "ori_target": torch.from_numpy(
                target_np), "name": name, "ori_size": (height, width)}
        if self.transforms is None:
            image = torch.from_numpy(image_np).permute(2, 0, 1).float()
            target = torch.from_numpy(target_np)
        else:
            # Encoded targets are 0..K-1 (K <= 255) or 255, so they fit uint8 (as mmseg's).
            sample = {"image": image_np, "target": target_np.astype(np.uint8)}
            sample = apply_seeded(self.transforms, sample, seed)
            image, target = _as_tensor(sample["image"], True), _as_tensor(sample["target"])
        item = {
            "image": image.float().contiguous(),
            "target": target.long().contiguous(),
            "name": name,
            "ori_size": (height, width),
        }
        if self.test_mode:
            item["ori_target"] = torch.from_numpy(target_np)
        return item

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images, {self.num_classes} classes, "
            f"img_dir={str(self.img_dir)!r}, test_mode={self.test_mode})"
        )


class ADE20KDataset(SegmentationDataset):
    """ADE20K (SceneParsing) in its release layout ``root/{images,annotations}/<split>``.

    ``class_names`` defaults to the bundled 150 names; raw labels 1..K become 0..K-1 and 0
    becomes ignore (``reduce_zero_label``)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        *,
        class_names: Sequence[str] | None = None,
        reduce_zero_label: bool = True,
        img_suffix: str = ".jpg",
        seg_suffix: str = ".png",
        transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        test_mode: bool = False,
        max_image_pixels: int | None = None,
    ):
        root = _existing_root(root)
        if class_names is None:
            class_names = load_class_names("ade20k")
        self.root = root
        self.split = split
        super().__init__(
            root / "images" / split,
            root / "annotations" / split,
            class_names,
            reduce_zero_label=reduce_zero_label,
            ignore_value=IGNORE_INDEX,
            img_suffix=img_suffix,
            seg_suffix=seg_suffix,
            transforms=transforms,
            test_mode=test_mode,
            max_image_pixels=max_image_pixels,
        )


class FolderDataset(SegmentationDataset):
    """Your own data: ``img_dir`` + ``ann_dir`` (PNG label maps, same names) + a class-names
    file (one name per line; line i names class i, or raw value i+1 with
    ``reduce_zero_label``)."""

    def __init__(self, img_dir: str | Path, ann_dir: str | Path, classes_file: str | Path,
                 **options: Any):
        """``options``: the keyword arguments of :class:`SegmentationDataset`."""
        super().__init__(img_dir, ann_dir, load_class_names(classes_file), **options)
        self.classes_file = Path(classes_file)


def _existing_root(root: str | Path) -> Path:
    """``root`` as a path, refused unless it is a folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    return root


class CityscapesDataset(SegmentationDataset):
    """Cityscapes (``gtFine``) in its release layout (:func:`~.layouts.cityscapes_dirs`):
    ``root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with
    ``root/gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png``. Items are named
    ``<city>/<name>``. Labels are the 19 training ids (0..18) as stored, 255 = ignore;
    ``class_names`` defaults to the bundled list."""

    def __init__(self, root: str | Path, split: str = "train", *,
                 class_names: Sequence[str] | None = None,
                 transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 test_mode: bool = False, max_image_pixels: int | None = None):
        self.root, self.split = _existing_root(root), split
        img_dir, ann_dir = cityscapes_dirs(self.root, split)
        super().__init__(
            img_dir, ann_dir, class_names or load_class_names("cityscapes"),
            reduce_zero_label=False, ignore_value=IGNORE_INDEX,
            img_suffix=CITYSCAPES_IMG_SUFFIX, seg_suffix=CITYSCAPES_SEG_SUFFIX,
            transforms=transforms, test_mode=test_mode, max_image_pixels=max_image_pixels)


class VOCDataset(SegmentationDataset):
    """Pascal VOC 2012 segmentation in its release layout (:func:`~.layouts.voc_files`):
    the names of ``root/ImageSets/Segmentation/<split>.txt``, images
    ``root/JPEGImages/<name>.jpg`` and palette PNGs ``root/<ann_name>/<name>.png`` whose
    palette index is the class (0 = background .. 20), 255 = boundary, ignored.
    ``class_names`` defaults to the bundled 21 names."""

    def __init__(self, root: str | Path, split: str = "train", *,
                 class_names: Sequence[str] | None = None,
                 ann_name: str = "SegmentationClass",
                 transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 test_mode: bool = False, max_image_pixels: int | None = None):
        self.root, self.split = _existing_root(root), split
        img_dir, ann_dir, names, self.split_file = voc_files(self.root, split, ann_name)
        super().__init__(
            img_dir, ann_dir, class_names or load_class_names("voc"),
            reduce_zero_label=False, ignore_value=IGNORE_INDEX,
            img_suffix=VOC_IMG_SUFFIX, seg_suffix=VOC_SEG_SUFFIX, transforms=transforms,
            test_mode=test_mode, max_image_pixels=max_image_pixels, names=names)


# data.dataset → (what messages call it, dataset class) of the fixed release layouts.
_RELEASES = {"cityscapes": ("Cityscapes", CityscapesDataset),
             "voc": ("Pascal VOC", VOCDataset)}


def build_segmentation_dataset(
    cfg: DataConfig, split: str, num_classes: int, train: bool, *, seed: int = 0
) -> SegmentationDataset:
    """The dataset for ``split`` (e.g. ``cfg.train_split``) with the training (``train=True``)
    or test pipeline.

    ``"ade20k"`` and ``"folder"`` read ``cfg.root/images/<split>`` and
    ``cfg.root/annotations/<split>``, with ``cfg.img_suffix``/``cfg.seg_suffix`` and
    ``cfg.reduce_zero_label``; raw value 255 is ignore.

    * ``"ade20k"``: class names are the bundled ADE20K list when ``num_classes`` is 150,
      otherwise ``cfg.root/classes.txt`` (e.g. the synthetic quickstart data).
    * ``"folder"``: class names always come from ``cfg.root/classes.txt``.
    * ``"cityscapes"`` (:class:`CityscapesDataset`), ``"voc"`` (:class:`VOCDataset`): the
      release layouts, with the bundled class names (19, 21) and their fixed label
      encodings (stored class indices, 255 = ignore); ``cfg.reduce_zero_label`` and the
      suffixes do not apply to them. Splits are folder or split-file names (``train``,
      ``val``); a wrong layout is a :class:`DatasetError` naming the path.

    ``num_classes`` (the model's K) must equal the number of class names. With
    ``cfg.holdout_fraction`` > 0, ``cfg.train_split`` is cut by
    :func:`~denseclip.data.holdout.split_holdout` with ``seed``: its training set
    (``train``) is the kept part, its test set the held-out part.
    """
    dataset = _segmentation_split(cfg, split, num_classes, train)
    if cfg.holdout_fraction > 0 and split == cfg.train_split:
        kept, held = split_holdout(dataset.names, cfg.holdout_fraction, seed)
        dataset.keep_only(kept if train else held)
    return dataset


def _segmentation_split(cfg: DataConfig, split: str, num_classes: int,
                        train: bool) -> SegmentationDataset:
    """:func:`build_segmentation_dataset` before any holdout: the whole ``split``."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} (data.root) does not exist")
    transforms = build_train_transforms(cfg) if train else build_test_transforms(cfg)
    if cfg.dataset in _RELEASES:
        title, layout = _RELEASES[cfg.dataset]
        class_names = load_class_names(cfg.dataset)
        if len(class_names) != num_classes:
            raise DatasetError(
                f"the model has {num_classes} classes but {title} has {len(class_names)} "
                f"(model.classes={cfg.dataset} names them)")
        return layout(root, split, class_names=class_names, transforms=transforms,
                      test_mode=not train, max_image_pixels=cfg.max_image_pixels)
    classes_file = root / "classes.txt"
    if cfg.dataset == "ade20k":
        if num_classes == 150:
            class_names = load_class_names("ade20k")
        elif classes_file.is_file():
            class_names = load_class_names(classes_file)
        else:
            raise DatasetError(
                f"the model has {num_classes} classes but ADE20K has 150, and there is no "
                f"{classes_file} naming {num_classes} classes"
            )
    elif cfg.dataset == "folder":
        class_names = load_class_names(classes_file)
    else:
        raise ValueError(f"unknown data.dataset {cfg.dataset!r}; expected 'ade20k', "
                         "'folder', 'cityscapes' or 'voc'")
    if len(class_names) != num_classes:
        raise DatasetError(
            f"the model has {num_classes} classes but {classes_file} names {len(class_names)}"
        )
    common: dict[str, Any] = dict(
        reduce_zero_label=cfg.reduce_zero_label,
        img_suffix=cfg.img_suffix,
        seg_suffix=cfg.seg_suffix,
        transforms=transforms,
        test_mode=not train,
        max_image_pixels=cfg.max_image_pixels,
    )
    if cfg.dataset == "ade20k":
        return ADE20KDataset(root, split, class_names=class_names, **common)
    return FolderDataset(
        root / "images" / split, root / "annotations" / split, classes_file, **common
    )
