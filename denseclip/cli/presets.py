"""``denseclip presets``: the bundled presets as a table (or JSON) to choose from.

Reads the precomputed table (:data:`denseclip.config.PRESET_TABLE`, written by
:mod:`denseclip.tools.presets`) and the weights registry (:mod:`denseclip.weights.hub`), so
it imports no PyTorch and builds no model.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import PRESET_TABLE, available_presets
from ..weights import hub

COLUMNS = ("name", "task", "backbone", "data", "params", "weights", "description")


def preset_rows(task: str | None = None) -> list[dict[str, Any]]:
    """One row per bundled preset (of ``task``, if given): the stored table's columns plus
    ``name`` and ``weights`` (the registered release's name, or None)."""
    table = json.loads(PRESET_TABLE.read_text(encoding="utf-8"))["presets"]
    rows = []
    for name in available_presets():
        row = {"name": name, **table.get(name, {})}
        if task is not None and row.get("task") != task:
            continue
        release = hub.release_for_preset(name)
        row["weights"] = release.name if release is not None else None
        rows.append(row)
    return rows


def _millions(count: int | None) -> str:
    return "?" if count is None else f"{count / 1e6:.1f}M"


def _weights(row: dict[str, Any]) -> str:
    """``yes`` for a release named like the preset, else the weights' name, or ``-``."""
    return "-" if row["weights"] is None else "yes" if row["weights"] == row["name"] else (
        row["weights"])


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows of :func:`preset_rows` as aligned text columns under a header."""
    cells = [{"name": r["name"], "task": r.get("task", "?"), "backbone": r.get("backbone", "?"),
              "data": f"{r.get('dataset', '?')}, {r.get('classes', '?')} classes",
              "params": _millions(r.get("parameters")), "weights": _weights(r),
              "description": r.get("description", "")} for r in rows]
    widths = {c: max([len(c)] + [len(r[c]) for r in cells]) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS).rstrip() for r in cells]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``denseclip presets [--task T] [--json]``."""
    rows = preset_rows(args.task)
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
    else:
        print(format_table(rows))
        print(f"\n{len(rows)} presets; params: parameters of the whole model; weights: released "
              "weights exist (use 'pretrained' as the checkpoint, or `denseclip download "
              "NAME`)")
    return 0
