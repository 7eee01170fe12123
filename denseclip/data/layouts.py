"""Where the files of the Cityscapes and Pascal VOC 2012 releases are, checked by path.

Each function takes a dataset root and a split name and returns the folders (and, for VOC,
the listed names) that :class:`~denseclip.data.segmentation.SegmentationDataset` reads.
A layout that is not what the release ships is a :class:`~denseclip.data.io.DatasetError`
whose one line names the path that is missing or wrong and what belongs there.

Cityscapes (``gtFine``, the 19 training ids)::

    ROOT/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
    ROOT/gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png    0..18, 255 = ignore

The ``*_labelTrainIds.png`` maps are not in the download: cityscapesscripts'
``createTrainIdLabelImgs`` writes them from the ``*_labelIds.png`` maps.

Pascal VOC 2012 segmentation (``VOCdevkit/VOC2012``)::

    ROOT/ImageSets/Segmentation/<split>.txt    one image name per line
    ROOT/JPEGImages/<name>.jpg
    ROOT/SegmentationClass/<name>.png          palette PNG: index 0..20, 255 = boundary/ignore

Names read from a split file are untrusted: each must be a plain file name (no folder part,
not ``.``/``..``), so every path made from one stays inside its folder, and a split file
larger than :data:`MAX_SPLIT_FILE_BYTES` is refused before it is read.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from .io import DatasetError

__all__ = [
    "CITYSCAPES_IMG_SUFFIX",
    "CITYSCAPES_SEG_SUFFIX",
    "MAX_SPLIT_FILE_BYTES",
    "VOC_IMG_SUFFIX",
    "VOC_SEG_SUFFIX",
    "check_plain_name",
    "cityscapes_dirs",
    "read_split_file",
    "voc_files",
]

CITYSCAPES_IMG_SUFFIX = "_leftImg8bit.png"
CITYSCAPES_SEG_SUFFIX = "_gtFine_labelTrainIds.png"
VOC_IMG_SUFFIX = ".jpg"
VOC_SEG_SUFFIX = ".png"
MAX_SPLIT_FILE_BYTES = 16 * 2**20  # VOC's largest list (trainaug, 10582 names) is ~130 kB

_CITYSCAPES = "a Cityscapes root (data.root) holds leftImg8bit/ and gtFine/"
_VOC = ("a Pascal VOC root (data.root, e.g. VOCdevkit/VOC2012) holds JPEGImages/, "
        "SegmentationClass/ and ImageSets/Segmentation/")
_SPLIT_KEYS = "data.train_split / data.val_split name the split"


def check_plain_name(name: str, where: str) -> str:
    """``name`` if it is a plain file name (no folder part on any system, not ``.``/``..``,
    no NUL), else :class:`DatasetError` saying ``where`` it came from."""
    plain = (name not in ("", ".", "..") and "\x00" not in name
             and PurePosixPath(name).name == name and PureWindowsPath(name).name == name)
    if not plain:
        raise DatasetError(f"{where}: {name!r} is not a plain file name (no folder part "
                           "allowed)")
    return name


def _choices(folder: Path, suffix: str = "") -> str:
    """The entries of ``folder`` ending in ``suffix`` (suffix removed), for a message."""
    found = sorted(p.name[: len(p.name) - len(suffix)] for p in folder.iterdir()
                   if p.name.endswith(suffix) and (p.is_file() if suffix else p.is_dir()))
    return ", ".join(found) if found else "none"


def cityscapes_dirs(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(ROOT/leftImg8bit/<split>, ROOT/gtFine/<split>)``, checked: both top folders and
    split folders exist, and the label folder holds ``*_gtFine_labelTrainIds.png`` maps
    (when it holds only ``*_labelIds.png``, the message says how to make them)."""
    root = Path(root)
    for top in ("leftImg8bit", "gtFine"):
        if not (root / top).is_dir():
            raise DatasetError(f"{root / top} does not exist: {_CITYSCAPES}")
    check_plain_name(split, "Cityscapes split")
    img_dir, ann_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for folder in (img_dir, ann_dir):
        if not folder.is_dir():
            raise DatasetError(f"split folder {folder} does not exist (splits there: "
                               f"{_choices(folder.parent)}; {_SPLIT_KEYS})")
    if next(ann_dir.rglob("*" + CITYSCAPES_SEG_SUFFIX), None) is None and next(
            ann_dir.rglob("*_gtFine_labelIds.png"), None) is not None:
        raise DatasetError(
            f"{ann_dir} holds *_gtFine_labelIds.png but no *{CITYSCAPES_SEG_SUFFIX}: write "
            "the 19 training ids first (cityscapesscripts' createTrainIdLabelImgs)")
    return img_dir, ann_dir


def read_split_file(path: str | Path) -> list[str]:
    """The names listed in a split file, one per line (blank lines skipped), each checked
    by :func:`check_plain_name`. Raises :class:`DatasetError` naming the file (and line)
    for a file that is missing, too large, not UTF-8 text or lists no name."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_SPLIT_FILE_BYTES:
            raise DatasetError(f"split file {path} is {size} bytes, more than the "
                               f"{MAX_SPLIT_FILE_BYTES} a list of names can need")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DatasetError(f"split file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read split file {path}: {e}") from None
    names = [check_plain_name(line.strip(), f"{path}, line {number}")
             for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not names:
        raise DatasetError(f"split file {path} lists no images")
    return names


def voc_files(root: str | Path, split: str,
              ann_name: str = "SegmentationClass") -> tuple[Path, Path, list[str], Path]:
    """``(ROOT/JPEGImages, ROOT/<ann_name>, names, split file)`` of a VOC split: the names
    of ``ROOT/ImageSets/Segmentation/<split>.txt``, each checked to have its image and
    label map (the message names the split file, the name and the missing path)."""
    root = Path(root)
    img_dir, ann_dir = root / "JPEGImages", root / ann_name
    split_dir = root / "ImageSets" / "Segmentation"
    for folder in (img_dir, ann_dir, split_dir):
        if not folder.is_dir():
            raise DatasetError(f"{folder} does not exist: {_VOC}")
    check_plain_name(split, "VOC split")
    split_file = split_dir / f"{split}.txt"
    if not split_file.is_file():
        raise DatasetError(f"split file {split_file} does not exist (splits there: "
                           f"{_choices(split_dir, '.txt')}; {_SPLIT_KEYS})")
    names = read_split_file(split_file)
    for kind, folder, suffix in (("image", img_dir, VOC_IMG_SUFFIX),
                                 ("label map", ann_dir, VOC_SEG_SUFFIX)):
        missing = [n for n in names if not (folder / (n + suffix)).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DatasetError(f"{split_file} lists {missing[0]!r} but its {kind} "
                               f"{folder / (missing[0] + suffix)} does not exist{more}")
    return img_dir, ann_dir, names, split_file
