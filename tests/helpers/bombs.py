"""Decompression bombs: tiny image files whose headers declare a huge size."""

from __future__ import annotations

import functools
import struct
import zlib
from pathlib import Path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


@functools.lru_cache(maxsize=4)
def png_bomb_bytes(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid, complete 1-bit grayscale PNG of ``width`` × ``height`` black pixels: about
    50 KB for 20000 × 20000, which a decoder turns into 400 M pixels (1.2 GB as RGB)."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    rows_per_block = max(1, (1 << 22) // len(row))
    compressor = zlib.compressobj(9)
    parts = []
    for start in range(0, height, rows_per_block):
        parts.append(compressor.compress(row * min(rows_per_block, height - start)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts))
            + _chunk(b"IEND", b""))


def write_png_bomb(path: str | Path, width: int = 20_000, height: int = 20_000) -> Path:
    """Write :func:`png_bomb_bytes` to ``path``."""
    path = Path(path)
    path.write_bytes(png_bomb_bytes(width, height))
    return path
