"""Class lists: the bundled ADE20K, COCO, Cityscapes and Pascal VOC names, class files and
typed class lists.

One format serves every place that reads a class file (``model.classes=FILE``, the folder
dataset's ``classes.txt``, ``--classes-file`` of ``predict``/``export``):

* one class per line, in label order: the i-th class line is label i;
* a line is ``name`` or ``name: text`` — ``name`` is what results, legends and file names
  show, ``text`` (default: the name) is what the text encoder embeds;
* blank lines and lines starting with ``#`` are skipped;
* a line with no name before ``:``, a repeated name, or a file with no class is an error
  naming the file (and line).

A comma-separated list (``"cat, dog,grass"``) is read by :func:`parse_class_list`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

BUNDLED = {
    "ade20k": Path(__file__).parent / "data" / "ade20k_classes.txt",
    "coco": Path(__file__).parent / "data" / "coco_classes.txt",
    "cityscapes": Path(__file__).parent / "data" / "cityscapes_classes.txt",  # 19 train ids
    "voc": Path(__file__).parent / "data" / "voc_classes.txt",  # background + 20
}


class ClassListError(ValueError):
    """A class file or class list is unusable; the message names the file or position."""


def _check_unique(names: Iterable[str], where: str) -> None:
    dupes = [name for name, n in Counter(names).items() if n > 1]
    if dupes:
        raise ClassListError(f"{where}duplicate class name(s) {dupes}; each class needs its "
                             f"own name")


def read_classes(path: str | Path) -> dict[str, str]:
    """Read a class file (format in the module documentation): ``{name: text to embed}``
    in label order. Raises ``FileNotFoundError`` or :class:`ClassListError` naming the
    file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ClassListError(f"cannot read class file {path}: {e}") from None
    classes: dict[str, str] = {}
    order: list[str] = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, text = line.partition(":")
        name, text = name.strip(), text.strip()
        if not name:
            raise ClassListError(f"{path}, line {number}: no class name before ':'")
        order.append(name)
        classes[name] = text or name
    if not classes:
        raise ClassListError(f"class file {path} lists no classes")
    _check_unique(order, f"{path}: ")
    return classes


def load_classes(spec: str | Path) -> dict[str, str]:
    """``{name: text to embed}`` of a bundled list (a key of :data:`BUNDLED`: ``ade20k``,
    ``coco``, ``cityscapes``, ``voc``) or of a class file, in label order."""
    return read_classes(BUNDLED.get(str(spec), spec))


def load_class_names(spec: str | Path) -> list[str]:
    """The class names of a bundled list (a key of :data:`BUNDLED`) or of a class file."""
    return list(load_classes(spec))


def format_classes(classes: Mapping[str, str]) -> str:
    """A class file of ``{name: text}`` (read back by :func:`read_classes`): ``name`` lines,
    ``name: text`` where the text differs. A name that such a line cannot hold (with ``:``,
    a line break, or starting with ``#``) raises :class:`ClassListError`."""
    lines = []
    for name, text in classes.items():
        name, text = str(name).strip(), str(text).strip()
        if not name or ":" in name or "\n" in name or name.startswith("#") or "\n" in text:
            raise ClassListError(f"class name {name!r} (text {text!r}) cannot be written to "
                                 f"a class file")
        lines.append(name if text == name else f"{name}: {text}")
    return "".join(f"{line}\n" for line in lines)


def parse_class_list(text: str) -> dict[str, str]:
    """``"cat, dog,grass"`` → ``{name: text to embed}`` (the names themselves)."""
    names = [part.strip() for part in text.split(",")]
    if not any(names):
        raise ClassListError("the class list is empty; give names like --classes 'cat,dog'")
    empty = [i + 1 for i, name in enumerate(names) if not name]
    if empty:
        raise ClassListError(f"the class list {text!r} has an empty name at position(s) {empty}")
    _check_unique(names, "")
    return {name: name for name in names}


def as_class_dict(classes: Any) -> dict[str, str]:
    """A class list given as a comma-separated string, a sequence of names or a mapping
    ``{name: text to embed}`` → ``{name: text}``, checked (non-empty, unique names)."""
    if isinstance(classes, str):
        return parse_class_list(classes)
    if isinstance(classes, Mapping):
        out = {str(k).strip(): str(v).strip() for k, v in classes.items()}
        if not out:
            raise ClassListError("the class list is empty")
        if any(not k or not v for k, v in out.items()):
            raise ClassListError(f"class names and texts must be non-empty, got {classes!r}")
        return out
    names = [str(n).strip() for n in classes]
    if not names:
        raise ClassListError("the class list is empty")
    if any(not n for n in names):
        raise ClassListError(f"class names must be non-empty, got {list(classes)!r}")
    _check_unique(names, "")
    return {n: n for n in names}
