"""``denseclip download``: fetch named weights into the cache, or list what is registered
(see :mod:`denseclip.weights.hub`)."""

from __future__ import annotations

import argparse

from ..config import ConfigError
from ..weights import hub

HELP = "download named weights (CLIP backbones, DenseCLIP releases) into the cache"

COLUMNS = ("name", "preset", "source", "checksum", "licence", "cached")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``denseclip download``."""
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="registered names (see --list) or http(s) URLs to download")
    parser.add_argument("--list", action="store_true",
                        help="list the registered weights and whether they are cached")
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help=f"cache directory (default: ${hub.ENV_CACHE}, else "
                             f"{hub.DEFAULT_CACHE})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def describe(cache: str | None = None) -> list[dict[str, str]]:
    """One row per registered entry: name, preset, source, checksum, licence and cached
    (``yes``, ``partial`` or ``no``: files are only looked at, not hashed)."""
    rows = []
    for entry in hub.REGISTRY.values():
        path = hub.cached_path(entry, cache)
        part = path.with_name(path.name + ".part")
        cached = "yes" if path.is_file() else "partial" if part.is_file() else "no"
        rows.append({"name": entry.name, "preset": entry.preset or "-", "source": entry.source,
                     "checksum": "sha256 (verified)" if entry.sha256 else "not published",
                     "licence": entry.licence, "cached": cached})
    return rows


def format_table(rows: list[dict[str, str]]) -> str:
    """Rows of :func:`describe` as aligned text columns under a header."""
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS).rstrip() for r in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``denseclip download``: prints one cached path per NAME (or the --list table)."""
    if args.list:
        print(f"cache: {hub.cache_dir(args.cache_dir)}")
        print(format_table(describe(args.cache_dir)))
        return 0
    if not args.names:
        raise ConfigError("give at least one NAME to download, or --list; known names: "
                          + ", ".join(hub.known_names()))
    for name in args.names:
        print(hub.download(name, cache=args.cache_dir, progress=not args.no_progress))
    return 0
