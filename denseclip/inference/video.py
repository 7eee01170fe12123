"""Videos, cameras and streams through a :class:`~denseclip.inference.Predictor`.

A source is read with OpenCV's ``VideoCapture`` (its FFmpeg backend for files and
network streams): :func:`open_video` opens a file, :func:`open_source` a string of the
command line's ``--source`` (a camera index, a stream URL or a file path).
:func:`predict_video` predicts every frame with :meth:`Predictor.stream` and writes an
overlay video of the source's size and frame rate (``<stem>_overlay.mp4``, codec
``mp4v``), and on request one data file per frame, named by its index.

Which files are videos: those whose suffix is in :data:`VIDEO_SUFFIXES` (decided by name,
so an image is never handed to FFmpeg and a video never to the image decoder).

Unreadable frames: OpenCV reports a frame it cannot decode as a failed read and goes on
with the next one. A failed read followed by a good one is an unreadable frame: it is
reported with its index and skipped (the overlay video has no frame for it). Failed reads
at the end are the end of the source, except those below the frame count the file
declares, which are reported as unreadable too. :data:`MAX_MISSES` failed reads in a row
end the source.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..data.io import check_image_size
from ..tasks.results import PredictionError
from ..tasks.writers import frame_overlays, safe_name, write_frame_data

__all__ = ["MAX_MISSES", "NETWORK_SCHEMES", "VIDEO_SUFFIXES", "Frame", "OverlayVideo",
           "VideoError", "VideoSource", "VideoSummary", "is_video", "open_source",
           "open_video", "predict_video", "quiet_opencv"]

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg",
                            ".mpeg"})
#: URL schemes ``--source`` passes to OpenCV; other ``scheme://`` strings are refused (FFmpeg
#: knows protocols such as ``pipe:`` or ``concat:`` that must not be reachable from a string).
NETWORK_SCHEMES = ("http", "https", "rtsp", "rtsps", "rtmp", "rtmps", "udp", "tcp", "srt")
#: Failed reads in a row that end a source.
MAX_MISSES = 25
#: Frame rate of the overlay video when the source does not say (cameras may not).
DEFAULT_FPS = 30.0
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class VideoError(PredictionError):
    """A video source that cannot be opened or written; the message names it."""


def is_video(path: str | Path) -> bool:
    """Whether ``path`` names a video file (by its suffix, :data:`VIDEO_SUFFIXES`)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def quiet_opencv() -> None:
    """Silence OpenCV's and FFmpeg's own messages on stderr (a failed open or an
    undecodable frame is reported once by the caller instead). An
    ``OPENCV_FFMPEG_LOGLEVEL`` set by the user is kept (e.g. 32 to see FFmpeg's reasons)."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


@dataclass
class Frame:
    """One read of a source: its index and RGB pixels, or ``image=None`` with the
    ``reason`` it cannot be used."""

    index: int
    image: np.ndarray | None
    reason: str = ""


class VideoSource:
    """An opened capture: ``name`` (for messages), ``stem`` (for output names), ``fps``
    (:data:`DEFAULT_FPS` when the source does not say), ``size`` (W, H) and ``frame_count``
    (``None`` when unknown: cameras, streams). Use :meth:`frames`; close it (or use it as a
    context manager) when done."""

    def __init__(self, capture: Any, name: str, stem: str,
                 max_pixels: int | None = None) -> None:
        self.capture, self.name, self.stem = capture, name, stem
        if not capture.isOpened():
            capture.release()
            raise VideoError(f"{name}: cannot open it as a video")
        fps = capture.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and np.isfinite(fps) and 0 < fps <= 1000 else DEFAULT_FPS
        self.size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                     int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
        self.frame_count = int(count) if count and np.isfinite(count) and count > 0 else None
        self.max_pixels = max_pixels
        try:  # before a frame is decoded
            check_image_size(*self.size, name, max_pixels)
        except ValueError:
            capture.release()
            raise

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the capture."""
        self.capture.release()

    def frames(self, max_frames: int | None = None) -> Iterator[Frame]:
        """The source's frames as RGB arrays, at most ``max_frames`` reads; unreadable frames
        (see the module doc) and frames whose size differs from the first one's come as
        ``Frame(index, None, reason)``."""
        misses: list[int] = []
        first: tuple[int, ...] | None = None
        index = 0
        while max_frames is None or index < max_frames:
            if misses and self.frame_count is not None and index >= self.frame_count:
                break  # past the declared end: the failed reads are the end
            ok, bgr = self.capture.read()
            if not ok or bgr is None:
                misses.append(index)
                index += 1
                if len(misses) >= MAX_MISSES:
                    break
                continue
            for miss in misses:
                yield Frame(miss, None, "cannot decode the frame")
            misses.clear()
            if first is None:
                check_image_size(bgr.shape[1], bgr.shape[0], self.name, self.max_pixels)
                first = bgr.shape
            if bgr.shape != first:
                yield Frame(index, None, f"the frame is {bgr.shape[1]}x{bgr.shape[0]} "
                                         f"pixels, the video {first[1]}x{first[0]}")
            else:
                rgb = cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB if bgr.ndim == 2
                                   else cv2.COLOR_BGR2RGB)
                yield Frame(index, rgb)
            index += 1
        declared = self.frame_count if len(misses) < MAX_MISSES else None
        for miss in misses:
            if declared is not None and miss < declared:
                yield Frame(miss, None, f"cannot decode the frame (the video declares "
                                        f"{declared} frames)")
        if (len(misses) >= MAX_MISSES and self.frame_count is not None
                and misses[-1] < self.frame_count - 1):  # stopped before the declared end
            yield Frame(misses[0], None, f"{MAX_MISSES} frames in a row cannot be read from "
                                         f"frame {misses[0]} on; stopped")


def open_video(path: str | Path, max_pixels: int | None = None) -> VideoSource:
    """Open a video file (FFmpeg backend only; the path is made absolute so that FFmpeg
    never reads a protocol such as ``pipe:`` or ``concat:`` from it)."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    capture = cv2.VideoCapture(str(path.resolve()), cv2.CAP_FFMPEG)
    return VideoSource(capture, str(path), path.stem, max_pixels)


def open_source(spec: str, max_pixels: int | None = None) -> VideoSource:
    """Open a ``--source`` string: digits only are a camera index (``0``: the first camera;
    a file named ``0`` is ``./0``), ``scheme://...`` with a scheme of
    :data:`NETWORK_SCHEMES` a stream URL handed to OpenCV as it is, anything else a file
    path. Nothing is run by a shell; failures are a :class:`VideoError` naming ``spec``."""
    spec = str(spec)
    if spec.isascii() and spec.isdigit():
        capture = cv2.VideoCapture(int(spec))
        try:
            return VideoSource(capture, f"camera {spec}", f"camera{int(spec)}", max_pixels)
        except VideoError:
            raise VideoError(f"{spec}: cannot open camera {spec} (no such camera, or it "
                             f"is busy or not permitted)") from None
    match = _URL.match(spec)
    if match:
        scheme = match.group(1).lower()
        if scheme not in NETWORK_SCHEMES:
            raise VideoError(f"{spec}: unsupported URL scheme {scheme!r} (use "
                             f"{', '.join(NETWORK_SCHEMES)}, or a file path)")
        capture = cv2.VideoCapture(spec, cv2.CAP_FFMPEG)
        try:
            return VideoSource(capture, spec, "stream", max_pixels)
        except VideoError:
            raise VideoError(f"{spec}: cannot open the stream (OpenCV's FFmpeg backend "
                             f"could not connect or read it)") from None
    return open_video(spec, max_pixels)


class OverlayVideo:
    """An ``.mp4`` (codec ``mp4v``) written frame by frame from RGB arrays; opened on the
    first frame, at its size."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path, self.fps = Path(path), fps
        self.writer: Any = None
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        """Append one ``H × W × 3`` uint8 RGB frame."""
        if self.writer is None:
            h, w = rgb.shape[:2]
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"),
                                          self.fps, (w, h))
            if not self.writer.isOpened():
                raise VideoError(f"{self.path}: cannot write an mp4v video of {w}x{h} pixels")
        self.writer.write(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self) -> None:
        """Finish the file."""
        if self.writer is not None:
            self.writer.release()


@dataclass
class VideoSummary:
    """What :func:`predict_video` did: frames predicted, ``(index, reason)`` of the frames
    skipped, and the files written (videos first)."""

    frames: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)


def predict_video(predictor, source: VideoSource, out: str | Path, stem: str | None = None,
                  *, batch_size: int | None = None, save_frames: bool = False,
                  max_frames: int | None = None, score_thr: float = 0.3,
                  on_frame: Callable[[int], None] | None = None,
                  on_skip: Callable[[int, str], None] | None = None) -> VideoSummary:
    """Predict every frame of ``source`` (batches of ``batch_size`` frames through
    :meth:`Predictor.stream`, results equal to predicting each frame alone) and write in
    ``out``: ``<stem>_overlay.mp4`` (trained classes or detections, same size and frame
    rate as the source; with open classes also ``<stem>_open_overlay.mp4``) and, with
    ``save_frames``, ``<stem>_frames/<index>_labels.png`` (segmentation; also
    ``_open_labels.png``) or ``<index>.json`` (detection) per frame, the index 6 digits
    wide. ``on_frame(index)`` is called after each frame is written, ``on_skip(index,
    reason)`` for each frame skipped. ``stem`` defaults to ``source.stem``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = safe_name(stem or source.stem)
    frames_dir = out / f"{stem}_frames"
    if save_frames:
        frames_dir.mkdir(exist_ok=True)
    summary = VideoSummary()
    videos: dict[str, OverlayVideo] = {}
    pending: deque[Frame] = deque()

    def readable() -> Iterator[np.ndarray]:
        for frame in source.frames(max_frames):
            if frame.image is None:
                summary.skipped.append((frame.index, frame.reason))
                if on_skip is not None:
                    on_skip(frame.index, frame.reason)
                continue
            pending.append(frame)
            yield frame.image

    try:
        for result in predictor.stream(readable(), batch_size, return_probs=False):
            frame = pending.popleft()
            for kind, picture in frame_overlays(result, frame.image, score_thr).items():
                if kind not in videos:
                    videos[kind] = OverlayVideo(out / f"{stem}_{kind}.mp4", source.fps)
                    summary.written.append(videos[kind].path)
                videos[kind].write(picture)
            if save_frames:
                summary.written += write_frame_data(result, frames_dir, f"{frame.index:06d}",
                                                    frame.image.shape[:2], score_thr)
            summary.frames += 1
            if on_frame is not None:
                on_frame(frame.index)
    finally:
        for video in videos.values():
            video.close()
    return summary
