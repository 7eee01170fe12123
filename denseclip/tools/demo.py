"""A local demo page: upload an image, type class names, see the segmentation (or, for a
detection preset, the detections).

``denseclip demo CONFIG CHECKPOINT`` serves one HTML page with the standard library's
``http.server`` (no extra dependency, works offline). The form posts the image and the class
names; the answer is the same page with the overlays inline (PNG data URLs):

* with class names: the open-vocabulary segmentation from the score maps (coarse,
  zero-shot) first, then the decode head's segmentation over the trained classes;
* without: the decode head's segmentation only;
* detection presets: the boxes (and masks) scoring at least the form's score threshold
  (0..1, default ``score_thr``), with a list of the detected classes; they take no class
  names.

Each legend is the page's list under its picture; the pictures carry none of their own.

The server is meant for your own machine (default ``127.0.0.1``); it handles one
prediction at a time. Against misbehaving clients: every socket read times out
(``request_timeout``, so a connection that stops sending is dropped), at most
``max_connections`` connections are served at once (more get ``503`` at once), the
``Content-Length`` is checked before the body is read (``400`` if it is not a number,
``413`` above ``MAX_UPLOAD_BYTES``), and an upload's size in pixels is checked from its
header before it is decoded (:func:`denseclip.data.io.max_image_pixels`).
"""

from __future__ import annotations

import base64
import html
import io
import re
import socket
import threading
import time
from email.parser import BytesParser
from email.policy import HTTP
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image

from ..data.io import READABLE_FORMATS, DatasetError, UnknownImageFormatError, decode_image
from ..inference import DetectionPrediction, PredictionError, Predictor
from ..tasks.render import format_share, palette, render_detections, render_overlay

__all__ = ["DemoServer", "make_server", "parse_score_threshold", "render_page"]

MAX_UPLOAD_BYTES = 32 * 1024 * 1024
REQUEST_TIMEOUT = 20.0  # seconds a socket read may wait for the client
MAX_CONNECTIONS = 8  # connections served at once; more are answered 503
SCORE_THR = 0.3  # the detection demo's default score threshold
_REFUSAL_LINGER = 1.0  # seconds a refused connection may take to read its 503
_FORMATS_TEXT = ", ".join("WebP" if f == "WEBP" else f for f in READABLE_FORMATS)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #222; }
form { display: flex; flex-wrap: wrap; gap: 1rem; align-items: end; padding: 1rem;
       background: #f3f4f6; border-radius: 8px; }
label { display: flex; flex-direction: column; gap: .3rem; font-weight: 600; }
input[type=text] { min-width: 22rem; padding: .4rem; }
input[type=number] { width: 6rem; padding: .4rem; }
button { padding: .5rem 1.2rem; font-size: 1rem; }
.error { color: #a40000; background: #fde8e8; padding: .8rem; border-radius: 6px;
         white-space: pre-wrap; }
.warning { color: #7a4d00; }
img { max-width: 100%; border: 1px solid #ccc; }
.legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: .4rem 1.2rem; }
.swatch { display: inline-block; width: 1em; height: 1em; border: 1px solid #333;
          vertical-align: middle; margin-right: .3em; }
.note { color: #555; font-size: .9rem; }
"""


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _legend_html(labels: np.ndarray, names: list[str], element_id: str) -> str:
    counts = np.bincount(labels.ravel(), minlength=len(names))[: len(names)]
    colours = palette(len(names))
    items = []
    for c in sorted(np.flatnonzero(counts), key=lambda c: (-counts[c], c)):
        r, g, b = (int(v) for v in colours[c])
        pct = format_share(100.0 * counts[c] / labels.size)
        items.append(
            f"<li><span class='swatch' style='background:#{r:02x}{g:02x}{b:02x}'></span>"
            f"{html.escape(names[c])} ({html.escape(pct)})</li>"
        )
    return f"<ul class='legend' id='{element_id}'>" + "".join(items) + "</ul>"


def _detections_html(result: DetectionPrediction, image: np.ndarray, score_thr: float) -> list[str]:
    overlay = render_detections(image, result.boxes, result.labels, result.scores,
                                result.class_names, result.masks, score_thr)
    keep = np.flatnonzero(result.scores >= score_thr)
    names = result.class_names
    colours = palette(len(names))
    items = []
    for c in sorted(set(result.labels[keep].tolist())):
        r, g, b = (int(v) for v in colours[c % len(names)])
        count = int((result.labels[keep] == c).sum())
        items.append(
            f"<li><span class='swatch' style='background:#{r:02x}{g:02x}{b:02x}'></span>"
            f"{html.escape(names[c])} ({count})</li>"
        )
    return [
        "<h2>Detections</h2>",
        f"<p class='note'>{len(keep)} detection(s) scoring at least {score_thr:g}.</p>",
        f"<img id='overlay' alt='detections' src='{_png_data_url(overlay)}'>",
        "<ul class='legend' id='legend'>" + "".join(items) + "</ul>",
    ]


def parse_score_threshold(text: str, default: float = SCORE_THR) -> float:
    """The form's score threshold: ``default`` when empty, else a number from 0 to 1
    (anything else raises :class:`PredictionError` with a one-line message)."""
    text = text.strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise PredictionError(f"the score threshold must be a number from 0 to 1, got "
                              f"{text[:40]!r}")
    return value


def render_page(predictor: Predictor, classes: str = "", result: Any = None,
                image: np.ndarray | None = None, error: str | None = None,
                note: str | None = None, score_thr: float = SCORE_THR) -> str:
    """The demo page: the form (with a score-threshold field for tasks that filter by
    score), then an error or the overlays of ``result``."""
    cfg = predictor.cfg
    task = predictor.task_object
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>DenseCLIP demo — {html.escape(cfg.name)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>DenseCLIP demo</h1>",
        f"<p>Model <b>{html.escape(cfg.name)}</b>, {predictor.num_classes} trained classes.</p>",
    ]
    if predictor.load_report is None:
        parts.append("<p class='warning'>No checkpoint: the weights are random, so the "
                     "predictions are meaningless.</p>")
    untrained = predictor.untrained_message(task.supports_open_vocabulary)
    if untrained:  # parts the outputs (typed class names included) depend on, never trained
        parts.append(f"<p class='warning' id='untrained'>Warning: {html.escape(untrained)}"
                     f"</p>")
    parts += [
        "<form id='form' method='post' action='/predict' enctype='multipart/form-data'>",
        "<label>Image <input type='file' id='image' name='image' accept='image/*' required>"
        "</label>",
        ("<label>Class names (comma-separated, optional) <input type='text' id='classes' "
         f"name='classes' placeholder='cat, dog, grass' value='{html.escape(classes)}'>"
         "</label>") if task.supports_open_vocabulary else "",
        ("<label>Score threshold (0–1) <input type='number' id='score_thr' name='score_thr' "
         f"min='0' max='1' step='0.05' value='{score_thr:g}'></label>")
        if task.score_threshold else "",
        f"<button type='submit' id='submit'>{task.verb}"
        "</button></form>",
    ]
    if error:
        parts.append(f"<p class='error' id='error'>{html.escape(error)}</p>")
    if result is not None and image is not None:
        parts.append("<section id='results'>")
        if note:
            parts.append(f"<p class='note'>{html.escape(note)}</p>")
        if isinstance(result, DetectionPrediction):
            parts += _detections_html(result, image, score_thr)
            parts.append("</section></body></html>")
            return "".join(parts)
        # The first overlay on the page is "overlay"/"legend": the open classes' when given.
        sections = []
        if result.open_labels is not None:
            sections.append((
                "Your classes — score map",
                "Argmax of the pixel-text score maps (stride 32, upsampled): coarse and "
                "zero-shot; quality depends on CLIP's pre-training.",
                "segmentation of your classes", result.open_labels, result.open_class_names))
        sections.append((
            "Trained classes — decode head",
            "The model's own prediction over the classes it was trained on (its accuracy is "
            "the trained model's).",
            "segmentation over the trained classes", result.labels, result.class_names))
        for i, (title, text, alt, labels, names) in enumerate(sections):
            suffix = "" if i == 0 else "-trained"
            overlay = render_overlay(image, labels, names, legend=False)  # legend: the list
            parts += [
                f"<h2>{title}</h2>",
                f"<p class='note'>{text}</p>",
                f"<img id='overlay{suffix}' alt='{alt}' src='{_png_data_url(overlay)}'>",
                _legend_html(labels, names, f"legend{suffix}"),
            ]
        parts.append("</section>")
    parts.append("</body></html>")
    return "".join(parts)


def _parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Form fields of a multipart/form-data body: ``{name: (filename, bytes)}``."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ValueError("the form data is not multipart")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


class DemoServer(ThreadingHTTPServer):
    """The demo's HTTP server; ``server_address`` holds the bound host and port.

    ``request_timeout``: seconds any socket read waits for the client before the
    connection is dropped; ``max_connections``: connections served at once (each further
    one is answered ``503`` and closed); ``max_pixels``: the upload size limit (default:
    the predictor's ``data.max_image_pixels``, see :func:`~denseclip.data.io.max_image_pixels`);
    ``score_thr``: the detection form's default score threshold (0..1).
    """

    daemon_threads = True
    request_queue_size = 64  # listen backlog: excess connections are accepted and refused

    def __init__(self, address: tuple[str, int], predictor: Predictor, max_side: int = 1024,
                 quiet: bool = False, *, request_timeout: float = REQUEST_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS, max_pixels: int | None = None,
                 score_thr: float = SCORE_THR) -> None:
        if request_timeout <= 0 or max_connections < 1:
            raise ValueError(f"the demo needs a positive timeout and connection count, got "
                             f"{request_timeout} s and {max_connections}")
        self.predictor = predictor
        if not 0.0 <= score_thr <= 1.0:
            raise ValueError(f"the score threshold must be from 0 to 1, got {score_thr}")
        self.max_side = max_side
        self.score_thr = float(score_thr)
        self.quiet = quiet
        self.request_timeout = float(request_timeout)
        self.max_connections = int(max_connections)
        self.max_pixels = predictor.cfg.data.max_image_pixels if max_pixels is None else max_pixels
        self.lock = threading.Lock()  # one prediction at a time: the model is shared
        self._active = 0
        self._changed = threading.Condition()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    @property
    def active_connections(self) -> int:
        """Connections being served now (refused ones not counted)."""
        with self._changed:
            return self._active

    def wait_for_connections(self, count: int, timeout: float) -> bool:
        """Wait until exactly ``count`` connections are being served; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._active == count, timeout)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve the connection if a slot is free, else answer 503 (in its own thread)."""
        with self._changed:
            admitted = self._active < self.max_connections
            if admitted:
                self._active += 1
                self._changed.notify_all()
        if not admitted:
            self._refuse(request)
            return
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._changed:
                self._active -= 1
                self._changed.notify_all()

    def _refuse(self, request: socket.socket) -> None:
        body = b"the demo is busy (too many connections); try again in a moment\n"
        head = ("HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8"
                f"\r\nContent-Length: {len(body)}\r\nRetry-After: 1\r\n"
                "Connection: close\r\n\r\n").encode("ascii")
        deadline = time.monotonic() + min(_REFUSAL_LINGER, self.request_timeout)
        try:
            request.settimeout(min(_REFUSAL_LINGER, self.request_timeout))
            request.sendall(head + body)
            request.shutdown(socket.SHUT_WR)
            # Read what the client sent until it closes (briefly): closing a socket with
            # unread data resets the connection, which can discard the 503 in transit.
            while time.monotonic() < deadline and request.recv(65536):
                pass
        except OSError:
            pass
        finally:
            self.close_request(request)


class _Handler(BaseHTTPRequestHandler):
    server: DemoServer
    server_version = "DenseCLIPDemo/0.1"

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # every read on the socket
        super().setup()

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, TimeoutError) as e:  # the client went away or stalled
            self.close_connection = True
            self.log_message("connection dropped: %s", e)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        if not self.server.quiet:
            super().log_message(format, *args)

    def _send(self, status: int, body: str, content_type: str = "text/html; charset=utf-8"):
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html", "/predict"):
            self._send(HTTPStatus.OK, render_page(self.server.predictor,
                                                  score_thr=self.server.score_thr))
        elif path == "/health":
            self._send(HTTPStatus.OK, "ok\n", "text/plain; charset=utf-8")
        else:
            self._send(HTTPStatus.NOT_FOUND, "not found\n", "text/plain; charset=utf-8")

    def do_POST(self) -> None:  # noqa: N802
        predictor = self.server.predictor
        if self.path.split("?", 1)[0] != "/predict":
            self._send(HTTPStatus.NOT_FOUND, "not found\n", "text/plain; charset=utf-8")
            return
        text = (self.headers.get("Content-Length") or "").strip()
        status, error = HTTPStatus.BAD_REQUEST, None
        if not text:
            status, error = HTTPStatus.LENGTH_REQUIRED, "the request has no Content-Length"
        elif not re.fullmatch(r"[0-9]{1,20}", text):
            error = f"the Content-Length {text[:40]!r} is not a number of bytes"
        elif int(text) == 0:
            error = "the upload is empty"
        elif int(text) > MAX_UPLOAD_BYTES:
            status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
            error = f"the upload is larger than {MAX_UPLOAD_BYTES // 2**20} MiB"
        if error is not None:  # answered before reading the body, which is not read at all
            self.close_connection = True
            self._send(status, render_page(predictor, error=error))
            return
        body = self._read_body(int(text))
        if body is None:
            return
        classes, score_thr = "", self.server.score_thr
        try:
            fields = _parse_multipart(self.headers.get("Content-Type", ""), body)
            classes = fields.get("classes", (None, b""))[1].decode("utf-8").strip()
            if predictor.task_object.score_threshold:
                text = fields.get("score_thr", (None, b""))[1].decode("utf-8", "replace")
                score_thr = parse_score_threshold(text, self.server.score_thr)
            filename, upload = fields.get("image", (None, b""))
            if not upload:
                raise PredictionError("choose an image file to upload")
            page = self._predict(upload, classes, filename, score_thr)
        except (PredictionError, ValueError, OSError) as e:
            self._send(HTTPStatus.BAD_REQUEST, render_page(predictor, classes, error=str(e),
                                                           score_thr=score_thr))
            return
        self._send(HTTPStatus.OK, page)

    def _read_body(self, length: int) -> bytes | None:
        """The request body, or None (answered 408/400, or the client left) when it does
        not arrive in full: each read waits at most the server's ``request_timeout``."""
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            self.log_message("upload timed out after %s s without data",
                             self.server.request_timeout)
            self._send(HTTPStatus.REQUEST_TIMEOUT, "the upload timed out\n",
                       "text/plain; charset=utf-8")
            return None
        if len(body) < length:
            self.close_connection = True
            self._send(HTTPStatus.BAD_REQUEST, "the upload ended early\n",
                       "text/plain; charset=utf-8")
            return None
        return body

    def _predict(self, upload: bytes, classes: str, filename: str | None = None,
                 score_thr: float = SCORE_THR) -> str:
        server = self.server
        name = _display_name(filename)
        try:  # as a file is decoded (OpenCV, like mmcv), its size checked from the header
            rgb = decode_image(upload, server.max_pixels, name)
        except UnknownImageFormatError:
            raise PredictionError(
                f"{name}: not an image this server can read ({_FORMATS_TEXT})") from None
        except DatasetError as e:  # too large, or a broken file (Pillow says what is wrong)
            raise PredictionError(str(e)) from None
        note = None
        H, W = rgb.shape[:2]
        if max(H, W) > server.max_side:
            factor = server.max_side / max(H, W)
            size = (max(1, round(W * factor)), max(1, round(H * factor)))
            rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
            note = f"The {W}x{H} image was reduced to {size[0]}x{size[1]} for the demo."
        with server.lock:
            predictor = server.predictor
            if predictor.task_object.supports_open_vocabulary:
                predictor.set_classes(classes or None)
            result = predictor.predict(rgb, return_probs=False)
        return render_page(predictor, classes, result, rgb, note=note, score_thr=score_thr)


def _display_name(filename: str | None) -> str:
    """The upload's file name as messages show it: its last part, printable, short."""
    name = re.split(r"[\\/]", filename or "")[-1]
    name = "".join(c for c in name if c.isprintable())[:80]
    return name or "the upload"


def make_server(predictor: Predictor, host: str = "127.0.0.1", port: int = 7860,
                max_side: int = 1024, quiet: bool = False, *,
                request_timeout: float = REQUEST_TIMEOUT, max_connections: int = MAX_CONNECTIONS,
                max_pixels: int | None = None, score_thr: float = SCORE_THR) -> DemoServer:
    """Bind the demo server (``port=0`` picks a free port); call ``serve_forever()`` on it
    (e.g. in a thread) and ``shutdown()`` + ``server_close()`` to stop it. See
    :class:`DemoServer` for the limits."""
    return DemoServer((host, port), predictor, max_side=max_side, quiet=quiet,
                      request_timeout=request_timeout, max_connections=max_connections,
                      max_pixels=max_pixels, score_thr=score_thr)
