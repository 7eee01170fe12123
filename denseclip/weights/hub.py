"""Weights by name: a registry of published checkpoints and a download cache.

``download("RN50")`` fetches a registered file (or any http(s) URL) into the cache and returns
its path; :func:`denseclip.weights.resolve` turns whatever a user gives where weights are
expected (a file, a registered name, a URL, or ``pretrained`` for a preset's release) into a
local path.

Cache layout: ``$DENSECLIP_CACHE`` (default ``~/.cache/denseclip``) holds each registered
file under its own name (``RN50.pt``, ``<preset>.pth``) and plain URLs flat under ``url/`` as
``<hash of the URL>-<file name>``. Every cache file name is made of ``[A-Za-z0-9._-]`` only and
is checked to lie directly in its folder, so no URL (path, query, fragment, percent-encoded
``..`` or ``/``) can place a file anywhere else. A
download is written to ``<file>.part`` (kept when interrupted, resumed with an HTTP ``Range``
request next time), verified, then renamed into place, so a file with its final name is always
complete; ``<file>.lock`` keeps two processes from writing the same file. Where a SHA-256 is
known, a ``<file>.sha256`` stamp records the digest with the file's size and modification
time: later calls re-hash only when the file changed, so a cache hit costs a ``stat`` and no
network. ``DENSECLIP_OFFLINE=1`` forbids the network altogether.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

try:
    import fcntl
except ImportError:  # not POSIX: concurrent downloads of one file are not serialised
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

ENV_CACHE = "DENSECLIP_CACHE"
ENV_OFFLINE = "DENSECLIP_OFFLINE"
DEFAULT_CACHE = Path("~/.cache/denseclip")
CHUNK = 1 << 16
RETRY_DELAY_S = 1.0  # pause before resuming an interrupted transfer (times the attempt number)
USER_AGENT = "denseclip-hub/0.1 (+urllib)"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_FILENAME = 120  # characters of a cache file name (well under any file system's limit)
URL_TAG = 16  # hex digits of the URL's SHA-256 that prefix a plain URL's cache file


class DownloadError(RuntimeError):
    """A file could not be fetched or verified; the message names the URL and a way out."""


class OfflineError(DownloadError):
    """``DENSECLIP_OFFLINE`` is set and the requested file is not in the cache."""


@dataclass(frozen=True)
class WeightsEntry:
    """One named, downloadable weights file.

    ``sha256`` is the published digest (``None``: not published, the file is checked for
    completeness only); ``preset`` is the bundled config these weights belong to, if any.
    """

    name: str
    url: str
    sha256: str | None
    preset: str | None
    source: str
    licence: str
    description: str

    @property
    def filename(self) -> str:
        """The file's name in the cache: the URL's own file name when it has one (with a
        suffix), else ``<name>.pth``; always reduced to :func:`safe_filename`."""
        base = safe_filename(_url_basename(self.url))
        if "." in base:
            return base
        stem = base if self.name == self.url else safe_filename(self.name)
        return safe_filename(f"{stem or 'weights'}.pth")


def safe_filename(text: str) -> str:
    """``text`` as a plain file name: every run of characters outside ``[A-Za-z0-9._-]``
    becomes ``_``, leading and trailing dots, dashes and underscores go (no hidden file, no
    ``.``/``..``), and a name longer than :data:`MAX_FILENAME` is shortened keeping its suffix.
    May return an empty string (nothing usable in ``text``)."""
    name = _UNSAFE.sub("_", text).strip("._-")
    if len(name) > MAX_FILENAME:
        stem, suffix = os.path.splitext(name)
        suffix = suffix[:16]
        name = stem[:MAX_FILENAME - len(suffix)].rstrip("._-") + suffix
    return name


def _url_basename(url: str) -> str:
    """The last component of a URL's path (never its query or fragment), percent-decoded."""
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])


def _openai(name: str, url: str, description: str, preset: str | None = None) -> WeightsEntry:
    """An OpenAI CLIP entry: its URL carries the file's SHA-256 as the last directory;
    ``preset`` is the zero-shot preset that these weights alone make usable."""
    digest = url.rsplit("/", 2)[-2]
    if not _SHA256.fullmatch(digest):
        raise ValueError(f"{url}: expected a SHA-256 as the path component before the file")
    return WeightsEntry(name, url, digest, preset, "OpenAI CLIP", "MIT (OpenAI CLIP)",
                        description)


def _release(preset: str, url: str, description: str) -> WeightsEntry:
    """An official DenseCLIP release (no checksum is published for these)."""
    return WeightsEntry(preset, url, None, preset, "DenseCLIP release (Tsinghua Cloud)",
                        "MIT (DenseCLIP)", description)


_CLIP = "https://openaipublic.azureedge.net/clip/models"
# Tsinghua Cloud share links as the DenseCLIP README gives them: with "?dl=1", which makes the
# share page redirect to the file itself instead of showing an HTML page.
_TSINGHUA = "https://cloud.tsinghua.edu.cn/f"

_BUILTIN: tuple[WeightsEntry, ...] = (
    _openai("RN50", f"{_CLIP}/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/"
            "RN50.pt", "CLIP ResNet-50 (TorchScript archive)", "clip_zeroshot_rn50"),
    _openai("RN101", f"{_CLIP}/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/"
            "RN101.pt", "CLIP ResNet-101 (TorchScript archive)"),
    _openai("ViT-B-16", f"{_CLIP}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df41"
            "6f/ViT-B-16.pt", "CLIP ViT-B/16 (TorchScript archive)", "clip_zeroshot_vit-b"),
    _release("denseclip_fpn_res50_512x512_80k", f"{_TSINGHUA}/8636d4a95c60418ba63c/?dl=1",
             "ADE20K semantic FPN, RN50-DenseCLIP (43.5 mIoU single-scale)"),
    _release("denseclip_fpn_res101_512x512_80k", f"{_TSINGHUA}/87387f3625ac42a68da5/?dl=1",
             "ADE20K semantic FPN, RN101-DenseCLIP (45.1 mIoU single-scale)"),
    _release("denseclip_fpn_vit-b_640x640_80k", f"{_TSINGHUA}/d056a1a943214d479cd1/?dl=1",
             "ADE20K semantic FPN, ViT-B-DenseCLIP (50.6 mIoU single-scale)"),
    _release("retinanet_denseclip_r50_fpn_1x_coco", f"{_TSINGHUA}/bfb64768d2124e99b79c/?dl=1",
             "COCO RetinaNet, RN50-DenseCLIP (37.8 box AP)"),
    _release("retinanet_denseclip_r101_fpn_1x_coco", f"{_TSINGHUA}/cfb8cdf85dfb453eb786/?dl=1",
             "COCO RetinaNet, RN101-DenseCLIP (41.1 box AP)"),
    _release("mask_rcnn_denseclip_r50_fpn_1x_coco", f"{_TSINGHUA}/4adf197e693e4480bf26/?dl=1",
             "COCO Mask R-CNN, RN50-DenseCLIP (40.2 box AP, 37.6 mask AP)"),
    _release("mask_rcnn_denseclip_r101_fpn_1x_coco", f"{_TSINGHUA}/ca072b19676942c3be82/?dl=1",
             "COCO Mask R-CNN, RN101-DenseCLIP (42.6 box AP, 39.6 mask AP)"),
)

REGISTRY: dict[str, WeightsEntry] = {e.name: e for e in _BUILTIN}


def register(entry: WeightsEntry, *, replace: bool = False) -> None:
    """Add ``entry`` to :data:`REGISTRY` (``replace=True`` to overwrite a name)."""
    if entry.name in REGISTRY and not replace:
        raise ValueError(f"weights name {entry.name!r} is already registered")
    if entry.sha256 is not None and not _SHA256.fullmatch(entry.sha256):
        raise ValueError(f"{entry.name}: sha256 must be 64 lowercase hex digits")
    REGISTRY[entry.name] = entry


def known_names() -> list[str]:
    """The registered names, in registration order."""
    return list(REGISTRY)


def get_entry(name: str) -> WeightsEntry | None:
    """The entry called ``name`` (also matched ignoring case and with ``/`` for ``-``, so
    ``vit-b/16`` finds ``ViT-B-16``), or ``None``."""
    if name in REGISTRY:
        return REGISTRY[name]
    key = name.replace("/", "-").lower()
    return next((e for n, e in REGISTRY.items() if n.lower() == key), None)


def release_for_preset(preset: str) -> WeightsEntry | None:
    """The registered weights trained with the bundled config ``preset``, if any."""
    return next((e for e in REGISTRY.values() if e.preset == preset), None)


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``override``, else ``$DENSECLIP_CACHE``, else
    ``~/.cache/denseclip`` (not created here)."""
    chosen = override if override is not None else os.environ.get(ENV_CACHE) or DEFAULT_CACHE
    return Path(chosen).expanduser()


def is_offline() -> bool:
    """Whether ``DENSECLIP_OFFLINE`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(ENV_OFFLINE, "").strip().lower() in {"1", "true", "yes", "on"}


def _as_entry(name_or_url: str | WeightsEntry) -> WeightsEntry:
    if isinstance(name_or_url, WeightsEntry):
        return name_or_url
    entry = get_entry(name_or_url)
    if entry is not None:
        return entry
    if urllib.parse.urlsplit(name_or_url).scheme in ("http", "https"):
        return WeightsEntry(name_or_url, name_or_url, None, None, "URL", "unknown", "")
    raise FileNotFoundError(f"unknown weights name {name_or_url!r}; known names: "
                            f"{', '.join(known_names())} (or give an http(s) URL)")


def cached_path(name_or_url: str | WeightsEntry,
                cache: str | os.PathLike[str] | None = None) -> Path:
    """Where ``name_or_url`` lives in the cache (whether or not it is there)."""
    entry = _as_entry(name_or_url)
    root = cache_dir(cache)
    if isinstance(name_or_url, str) and entry.name == name_or_url == entry.url:
        # a plain URL: one flat folder, prefixed with a hash so that equal file names differ
        tag = hashlib.sha256(entry.url.encode()).hexdigest()[:URL_TAG]
        return _inside(root / "url", safe_filename(f"{tag}-{entry.filename}"))
    return _inside(root, entry.filename)


def _inside(folder: Path, name: str) -> Path:
    """``folder / name``, refused unless ``name`` is a plain file name and the path (links
    followed) lies directly in ``folder``: the last line of defence for the cache."""
    path = folder / name
    if (not name or name != safe_filename(name)
            or path.resolve().parent != folder.resolve()):
        raise DownloadError(f"refusing cache file name {name!r}: it would be written outside "
                            f"{folder}")
    return path


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_stamp(path: Path, digest: str) -> None:
    st = path.stat()
    _stamp(path).write_text(json.dumps(
        {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))


def _cached_ok(path: Path, expected: str | None) -> bool:
    """Whether the cached ``path`` holds the expected content: a stamp that still matches the
    file's size and mtime is trusted, anything else is re-hashed (and re-stamped)."""
    if expected is None:
        return True  # only complete files ever get their final name
    try:
        stamp = json.loads(_stamp(path).read_text())
        st = path.stat()
        if stamp == {"sha256": expected, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
            return True
    except (OSError, ValueError):
        pass
    if file_sha256(path) != expected:
        return False
    _write_stamp(path, expected)
    return True


def _manual_hint(entry: WeightsEntry, final: Path) -> str:
    return (f"download {entry.url} yourself (browser, curl or wget) and pass the file's path "
            f"instead of {entry.name!r}, or save it as {final}")


def download(name_or_url: str | WeightsEntry, *, cache: str | os.PathLike[str] | None = None,
             progress: bool = True, retries: int = 3, timeout: float = 60.0,
             offline: bool | None = None) -> Path:
    """Fetch a registered name, a :class:`WeightsEntry` or an http(s) URL into the cache and
    return the local path.

    A file already in the cache is returned without any network access (its SHA-256, where
    known, is re-checked only when the file changed since it was last verified; a mismatch
    means a fresh download). Otherwise the file is streamed into ``<file>.part``, resuming an
    earlier partial download with a ``Range`` request (and starting over when the server
    ignores it), retried up to ``retries`` times when the connection drops, checked against the
    known SHA-256 and renamed into place. ``offline`` (default: ``$DENSECLIP_OFFLINE``) forbids
    the network: a missing file raises :class:`OfflineError`.

    Raises :class:`DownloadError` (one line naming the URL and the manual alternative) when the
    host cannot be reached, answers with an HTTP error, or the checksum does not match (the
    bad file is deleted).
    """
    entry = _as_entry(name_or_url)
    final = cached_path(name_or_url, cache)
    offline = is_offline() if offline is None else offline
    if final.is_file():
        if _cached_ok(final, entry.sha256):
            return final
        if offline:
            raise OfflineError(f"cached {final} does not match the SHA-256 of {entry.name!r} "
                               f"({entry.sha256}) and {ENV_OFFLINE} is set; "
                               + _manual_hint(entry, final))
        log.warning("%s does not match its SHA-256; downloading it again", final)
        final.unlink()
    if offline:
        raise OfflineError(f"{entry.name!r} is not in the cache (expected at {final}) and "
                           f"{ENV_OFFLINE} is set, so nothing is downloaded; "
                           + _manual_hint(entry, final))
    with ExitStack() as stack:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_locked(final))
        except OSError as e:
            raise DownloadError(
                f"cannot write to the cache folder {final.parent} ({e.strerror or e}); set "
                f"{ENV_CACHE} (or --cache-dir) to a writable folder, or "
                + _manual_hint(entry, final)) from None
        if final.is_file():  # another process finished it while this one waited
            return final
        part = final.with_name(final.name + ".part")
        _fetch(entry, part, final, progress=progress, retries=retries, timeout=timeout)
        if entry.sha256 is not None:
            got = file_sha256(part)
            if got != entry.sha256:
                part.unlink()
                raise DownloadError(f"SHA-256 mismatch for {entry.url}: expected "
                                    f"{entry.sha256}, got {got}; the downloaded file was deleted")
        os.replace(part, final)
        if entry.sha256 is not None:
            _write_stamp(final, entry.sha256)
    return final


@contextmanager
def _locked(final: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<file>.lock`` so that two processes never append to the
    same ``.part`` file (the second waits, then finds the finished file)."""
    if fcntl is None:
        yield
        return
    with open(final.with_name(final.name + ".lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another download of %s", final)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Interrupted(Exception):
    """The transfer stopped early; the ``.part`` file keeps what arrived."""


# a dropped connection or a short body: worth resuming (other OSErrors concern the disk)
_RETRYABLE = (_Interrupted, ConnectionError, TimeoutError, ssl.SSLError,
              http.client.HTTPException)


def _fetch(entry: WeightsEntry, part: Path, final: Path, *, progress: bool, retries: int,
           timeout: float) -> None:
    """Complete ``part`` from ``entry.url``, resuming and retrying interrupted transfers."""
    attempt = 0
    while True:
        try:
            _transfer(entry.url, part, progress=progress, timeout=timeout)
            return
        except urllib.error.HTTPError as e:
            if e.code == 416 and part.exists():  # the partial file does not fit the remote one
                part.unlink()
                continue
            raise DownloadError(f"could not download {entry.url}: HTTP {e.code} {e.reason}; "
                                + _manual_hint(entry, final)) from None
        except urllib.error.URLError as e:
            raise DownloadError(f"could not reach {entry.url}: {e.reason}; "
                                + _manual_hint(entry, final)) from None
        except _RETRYABLE as e:
            attempt += 1
            have = part.stat().st_size if part.exists() else 0
            if attempt > retries:
                raise DownloadError(
                    f"download of {entry.url} interrupted ({e or type(e).__name__}) after "
                    f"{have} bytes; run again to resume from {part}, or "
                    + _manual_hint(entry, final)) from None
            log.warning("download of %s interrupted at %d bytes (%s); resuming", entry.url,
                        have, e or type(e).__name__)
            time.sleep(RETRY_DELAY_S * attempt)
        except OSError as e:  # not the connection: e.g. the cache is not writable or full
            raise DownloadError(f"could not save {entry.url} to {part}: {e}") from None


def _transfer(url: str, part: Path, *, progress: bool, timeout: float) -> None:
    """One HTTP request appending to ``part``; raises :class:`_Interrupted` when the body ends
    before its announced length."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != offset:
                raise _Interrupted(f"server resumed at byte {start}, not {offset}")
        else:  # a full answer (also when the server ignored the Range header): start over
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        received = offset
        mode = "ab" if offset else "wb"
        with open(part, mode) as out, tqdm(total=total, initial=offset, unit="B",
                                           unit_scale=True, unit_divisor=1024,
                                           desc=part.name[:-len(".part")], leave=False,
                                           disable=not progress) as bar:
            while block := response.read(CHUNK):
                out.write(block)
                received += len(block)
                bar.update(len(block))
    if total is not None and received < total:
        raise _Interrupted(f"connection closed at byte {received} of {total}")


def _content_range(value: str) -> tuple[int, int | None]:
    """``bytes START-END/TOTAL`` → ``(START, TOTAL or None)``."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value)
    if match is None:
        raise _Interrupted(f"unusable Content-Range {value!r} in a 206 answer")
    total = match.group(2)
    return int(match.group(1)), (int(total) if total != "*" else None)
