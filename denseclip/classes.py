"""Class-name lists: the bundled ADE20K and COCO names, or a user file."""

from __future__ import annotations

from pathlib import Path

BUNDLED = {
    "ade20k": Path(__file__).parent / "data" / "ade20k_classes.txt",
    "coco": Path(__file__).parent / "data" / "coco_classes.txt",
}


def read_class_file(path: str | Path) -> list[str]:
    """One class name per line; blank lines and ``#`` comments are skipped. A line
    ``name: description`` keeps only the name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-names file {path} does not exist")
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        names.append(line.split(":", 1)[0].strip())
    if not names:
        raise ValueError(f"class-names file {path} lists no classes")
    return names


def load_class_names(spec: str | Path) -> list[str]:
    """A bundled list name (``ade20k``, ``coco``) or a path to a class-names file."""
    if str(spec) in BUNDLED:
        return read_class_file(BUNDLED[str(spec)])
    return read_class_file(spec)
