"""One way to write a file: :func:`atomic_write` goes through a temporary file in the same
directory, flushed to disk and renamed over the target, so a reader sees the old file or the
new one, never half of one; a full disk is reported as :class:`DiskFullError` in one line.
Checkpoints, ``save_pretrained`` directories and the training guard's clean-up
(:data:`TEMP_PATTERN`) all rely on it."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path

# errno values that mean "the disk (or this process's file-size limit) is full"
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# The temporary files of :func:`atomic_write`: ``.<name>.<8 random characters>.tmp``.
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


class DiskFullError(RuntimeError):
    """Writing a file failed for lack of space (``ENOSPC``/``EDQUOT``) or because the file
    reached the process's size limit (``EFBIG``); the file it would have replaced is intact."""


class _RecordingWriter:
    """A binary file that remembers the ``OSError`` of a failed ``write``: ``torch.save``
    replaces it with an unhelpful ``enforce fail ... unexpected pos``."""

    def __init__(self, file) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def atomic_write(path: str | Path, write, size_hint: int = 0, by_name: bool = False) -> Path:
    """Write ``path`` through a temporary ``.<name>.XXXXXXXX.tmp`` in its directory, flushed
    to disk, then renamed over ``path``: a reader sees the old file or the new one, never
    half of one. ``write`` receives a binary file open on the temporary (or, ``by_name``,
    its path). On any failure the temporary is removed; a full disk raises
    :class:`DiskFullError` naming ``path`` and ``size_hint`` (bytes needed, if known)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    writer = None
    try:
        if by_name:
            os.close(fd)
            write(Path(tmp))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        else:
            with os.fdopen(fd, "wb") as f:
                writer = _RecordingWriter(f)
                write(writer)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        code = _errno_of(e if isinstance(e, OSError) else getattr(writer, "error", None) or e)
        if code in _FULL:
            raise DiskFullError(_full_message(path, size_hint, code)) from None
        raise
    return path


def _errno_of(error: BaseException) -> int | None:
    """An OSError's errno, or the one a Rust writer (safetensors) names as "(os error N)"."""
    if isinstance(error, OSError):
        return error.errno
    m = re.search(r"\(os error (\d+)\)", str(error))
    return int(m[1]) if m else None


def _full_message(path: Path, size_hint: int, code: int) -> str:
    needed = f" ({max(1, round(size_hint / 2**20))} MB needed)" if size_hint else ""
    limit = "; the file-size limit (ulimit -f) was reached" if code == errno.EFBIG else ""
    return (f"no space left on device writing {path}{needed}{limit}; the existing files are "
            f"untouched")
