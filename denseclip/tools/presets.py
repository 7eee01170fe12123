"""The table behind ``denseclip presets``: each bundled preset's task, backbone, dataset,
class count and parameter count, with its one-line description.

Counting parameters builds the model (on PyTorch's meta device: shapes only, no memory, no
weights), which is too slow, and too heavy an import, for listing; so the table is
precomputed into :data:`denseclip.config.PRESET_TABLE` (``denseclip/configs/presets.json``),
and a test compares it with a fresh :func:`measure_preset` of every preset. After adding or
changing a preset, rewrite it (descriptions are kept; a new preset needs one)::

    python -m denseclip.tools.presets
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..classes import load_class_names
from ..config import PRESET_TABLE, Config, available_presets, load_config
from ..tasks import build_model
from .flops import count_parameters

# CLIP ResNets by blocks per stage (at base width 64)
_CLIP_RESNETS = {(3, 4, 6, 3): "RN50", (3, 4, 23, 3): "RN101"}


def backbone_label(cfg: Config) -> str:
    """A short name of ``cfg``'s visual backbone: ``CLIP RN50``, ``CLIP ViT-B/16``,
    ``torchvision swin_t``, or the sizes of a reduced one (``CLIP ResNet 1-1-1-1 w8``: blocks
    per stage and width; ``CLIP ViT 4x32/16``: layers x width / patch)."""
    b = cfg.model.backbone
    if b.type == "resnet":
        name = _CLIP_RESNETS.get(tuple(b.layers)) if b.width == 64 else None
        return f"CLIP {name}" if name else (
            f"CLIP ResNet {'-'.join(map(str, b.layers))} w{b.width}")
    if b.type == "vit":
        if b.layers[0] == 12 and b.width == 768:
            return f"CLIP ViT-B/{b.patch_size}"
        return f"CLIP ViT {b.layers[0]}x{b.width}/{b.patch_size}"
    return f"{b.type} {b.name}".strip()


def preset_parameters(cfg: Config) -> int:
    """Parameters of ``cfg``'s model, built on the meta device (no weights loaded)."""
    with torch.device("meta"):
        model = build_model(cfg)
    return count_parameters(model)["total"]


def measure_preset(name: str) -> dict[str, Any]:
    """The computed columns of one preset's row: task, backbone, dataset, classes (their
    number) and parameters."""
    cfg = load_config(name, ["model.pretrained=null"])
    return {"task": cfg.model.task, "backbone": backbone_label(cfg),
            "dataset": cfg.data.dataset, "classes": len(load_class_names(cfg.model.classes)),
            "parameters": preset_parameters(cfg)}


def read_table(path: Path = PRESET_TABLE) -> dict[str, dict[str, Any]]:
    """The stored table: preset name → row (empty if the file does not exist yet)."""
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))["presets"]


def build_table(descriptions: dict[str, str]) -> dict[str, dict[str, Any]]:
    """A fresh table of every bundled preset, with ``descriptions`` (``""`` where missing)."""
    return {name: {**measure_preset(name), "description": descriptions.get(name, "")}
            for name in available_presets()}


def write_table(path: Path = PRESET_TABLE) -> list[str]:
    """Recount every preset into ``path``, keeping its descriptions; returns the presets
    that still lack a description."""
    old = read_table(path)
    table = build_table({name: row.get("description", "") for name, row in old.items()})
    document = {"about": "written by `python -m denseclip.tools.presets`; descriptions are "
                         "edited by hand, the other columns are recounted",
                "presets": table}
    path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return [name for name, row in table.items() if not row["description"]]


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the table; exit status 1 when a preset has no description yet."""
    missing = write_table()
    print(f"wrote {PRESET_TABLE}")
    if missing:
        print(f"add a description for: {', '.join(missing)}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
