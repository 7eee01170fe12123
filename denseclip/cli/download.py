"""``denseclip download``: fetch named weights into the cache, or list what is registered
(see :mod:`denseclip.weights.hub`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import ConfigError
from ..weights import hub

COLUMNS = ("name", "preset", "cached", "size", "checksum", "licence", "url")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes} B"


def describe(cache: str | None = None) -> list[dict[str, Any]]:
    """One row per registered entry: name, preset, url, source, licence, sha256 (the
    published digest, or None), checksum (how the download is checked), cached (``yes``,
    ``partial`` or ``no``: files are only looked at, not hashed), bytes (the cached file's
    size, or of its partial download, else None) and size (the same in words, ``unknown``
    when nothing is cached: the registry publishes no sizes)."""
    rows = []
    for entry in hub.REGISTRY.values():
        path = hub.cached_path(entry, cache)
        part = path.with_name(path.name + ".part")
        present = path if path.is_file() else part if part.is_file() else None
        cached = "no" if present is None else "yes" if present == path else "partial"
        nbytes = present.stat().st_size if present is not None else None
        size = "unknown" if nbytes is None else _size(nbytes) + (
            " so far" if cached == "partial" else "")
        checksum = (f"sha256 {entry.sha256[:12]}... (verified)" if entry.sha256
                    else "not published")
        rows.append({"name": entry.name, "preset": entry.preset or "-", "url": entry.url,
                     "source": entry.source, "licence": entry.licence,
                     "sha256": entry.sha256, "checksum": checksum, "cached": cached,
                     "bytes": nbytes, "size": size, "path": str(path)})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows of :func:`describe` as aligned text columns under a header."""
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS).rstrip() for r in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``denseclip download``: prints one cached path per NAME (or, with --list, the table or
    its --json list)."""
    if args.list:
        rows = describe(args.cache_dir)
        if args.json:
            print(json.dumps(rows, ensure_ascii=False))
        else:
            print(f"cache: {hub.cache_dir(args.cache_dir)}")
            print(format_table(rows))
        return 0
    if not args.names:
        raise ConfigError("give at least one NAME to download, or --list; known names: "
                          + ", ".join(hub.known_names()))
    for name in args.names:
        print(hub.download(name, cache=args.cache_dir, progress=not args.no_progress))
    return 0
