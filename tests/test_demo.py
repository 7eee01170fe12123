"""The demo page: HTTP behaviour, and end to end in a headless Chromium.

The browser test needs the ``playwright`` Python package (a test extra) and Debian's
Chromium at /usr/bin/chromium (``make test`` installs it as root; otherwise
``apt-get install -y chromium chromium-driver``); without Chromium it fails saying so.
Playwright's own browser download is not used.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import re
import shutil
import socket
import threading
import urllib.error
import urllib.request
import uuid
import warnings
from pathlib import Path

import playwright.sync_api as playwright
import pytest
import torch
from PIL import Image

import denseclip
from denseclip.cli import arguments, demo
from denseclip.inference import Predictor
from denseclip.tools.demo import make_server
from tests.helpers.bombs import png_bomb_bytes
from tests.helpers.images import random_image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def serving(preset: str, **options):
    """The demo server for a tiny random model of ``preset`` on a free port, in a thread;
    ``options``: :func:`make_server`'s limits."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        predictor = Predictor(preset)
    srv = make_server(predictor, "127.0.0.1", 0, quiet=True, **options)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server():
    with serving("tiny_denseclip_res") as srv:
        yield srv


def png_bytes(h: int = 60, w: int = 90) -> bytes:
    image = random_image(h, w)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def post(url: str, image: bytes, classes: str, **fields: str) -> tuple[int, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f"--{boundary}\r\n".encode(),
        b'Content-Disposition: form-data; name="image"; filename="upload.png"\r\n',
        b"Content-Type: image/png\r\n\r\n", image, b"\r\n",
        f"--{boundary}\r\n".encode(),
        b'Content-Disposition: form-data; name="classes"\r\n\r\n', classes.encode(), b"\r\n",
    ]
    for name, value in fields.items():
        parts += [f"--{boundary}\r\n".encode(),
                  f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode(),
                  value.encode(), b"\r\n"]
    body = b"".join([*parts, f"--{boundary}--\r\n".encode()])
    request = urllib.request.Request(
        url + "predict", data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_page_and_prediction_over_http(server):
    with urllib.request.urlopen(server.url, timeout=30) as response:
        page = response.read().decode()
    assert response.status == 200
    assert "id='image'" in page and "id='classes'" in page and "random" in page
    status, page = post(server.url, png_bytes(), "cat, dog")
    assert status == 200
    assert re.search(r"<img id='overlay'[^>]*src='data:image/png;base64,", page)
    assert "id='overlay-trained'" in page and "id='legend'" in page
    assert "value='cat, dog'" in page  # the typed names stay in the form
    status, page = post(server.url, png_bytes(), "")
    assert status == 200 and "id='overlay'" in page and "overlay-trained" not in page


def picture(page: str, element_id: str) -> Image.Image:
    data = re.search(rf"<img id='{element_id}'[^>]*src='data:image/png;base64,([^']+)'", page)
    return Image.open(io.BytesIO(base64.b64decode(data.group(1))))


def test_each_legend_is_shown_once(server):
    # Regression: the overlays carried a legend panel of their own beside the page's list.
    status, page = post(server.url, png_bytes(60, 90), "cat, dog")
    assert status == 200
    assert page.count("id='legend'") == 1 and page.count("id='legend-trained'") == 1
    assert picture(page, "overlay").size == (90, 60)  # the image alone, no panel
    assert picture(page, "overlay-trained").size == (90, 60)
    assert "id='score_thr'" not in page  # segmentation has no score threshold


def test_bad_uploads_get_a_message(server):
    status, page = post(server.url, b"definitely not an image", "cat")
    assert status == 400 and ("upload.png: not an image this server can read (JPEG, PNG, "
                              "WebP, BMP, TIFF") in page and "BytesIO" not in page
    status, page = post(server.url, png_bytes(), "cat, a remarkably verbose description")
    assert status == 400 and "at most 3" in page and "id='error'" in page
    status, page = post(server.url, png_bytes(3, 300), "")
    assert status == 400 and "stride 32" in page
    status, page = post(server.url, b"", "cat")
    assert status == 400 and "choose an image" in page


def test_in_a_headless_browser(server, tmp_path):
    assert Path(CHROMIUM).exists() and shutil.which(CHROMIUM), (
        f"no Chromium at {CHROMIUM}: `make test` installs it as root on Debian "
        f"(apt-get install -y chromium chromium-driver)")
    upload = tmp_path / "photo.png"
    upload.write_bytes(png_bytes(72, 100))
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server.url, timeout=30_000)
            page.set_input_files("#image", str(upload))
            page.fill("#classes", "cat, dog, grass")
            page.click("#submit")
            page.wait_for_selector("#overlay", timeout=60_000)
            page.wait_for_function(
                "() => { const img = document.querySelector('#overlay');"
                " return img && img.complete && img.naturalWidth > 0; }", timeout=30_000)
            width = page.eval_on_selector("#overlay", "img => img.naturalWidth")
            height = page.eval_on_selector("#overlay", "img => img.naturalHeight")
            assert (width, height) == (100, 72)  # the image; its legend is the list below
            legend = page.inner_text("#legend")
            assert any(name in legend for name in ("cat", "dog", "grass"))
            assert page.eval_on_selector("#overlay-trained", "img => img.naturalWidth") == 100
            assert page.locator(".legend").count() == 2  # one list per picture
            assert page.input_value("#classes") == "cat, dog, grass"
        finally:
            browser.close()


def test_cli_run_refuses_a_bad_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    vit = denseclip.build_model(denseclip.load_config("tiny_denseclip_vit"))
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    parser = argparse.ArgumentParser()
    arguments.add_demo_arguments(parser)
    status = demo.run(parser.parse_args(["tiny_denseclip_res", str(path), "--port", "0"]))
    assert status == 2 and "does not match the model" in capsys.readouterr().err


def test_detection_preset_serves_detections():
    # Regression: every upload to a detection demo raised AttributeError (open_labels).
    with serving("tiny_retinanet_denseclip") as srv:
        with urllib.request.urlopen(srv.url, timeout=30) as response:
            page = response.read().decode()
        assert "id='classes'" not in page and ">Detect</button>" in page
        status, page = post(srv.url, png_bytes(100, 140), "")
        assert status == 200, page
        assert re.search(r"<img id='overlay' alt='detections' src='data:image/png;base64,", page)
        shown = int(re.search(r"(\d+) detection\(s\) scoring at least 0.3", page).group(1))
        result = srv.predictor.predict(random_image(100, 140))
        assert shown == int((result.scores >= 0.3).sum())
        assert page.count("<li>") == len(set(result.labels[result.scores >= 0.3].tolist()))
        assert "id='score_thr'" in page and "value='0.3'" in page
        # The form's threshold decides what is drawn and listed, and is kept in the form.
        thr = float(sorted(result.scores)[len(result.scores) // 2])
        status, page = post(srv.url, png_bytes(100, 140), "", score_thr=f"{thr!r}")
        assert status == 200, page
        shown = int(re.search(r"(\d+) detection\(s\) scoring at least", page).group(1))
        assert shown == int((result.scores >= thr).sum()) and 0 < shown < len(result.scores)
        assert f"value='{thr:g}'" in page
        for bad in ("1.5", "-0.1", "nan", "lots"):
            status, page = post(srv.url, png_bytes(100, 140), "", score_thr=bad)
            assert status == 400 and "the score threshold must be a number from 0 to 1" in page


def test_an_oversized_upload_is_refused_undecoded(server):
    status, page = post(server.url, png_bomb_bytes(), "cat")
    assert status == 400 and "id='error'" in page
    assert ("upload.png: 20000x20000 image (400.0 M pixels) exceeds the limit of 89.5 M "
            "pixels (--max-image-pixels") in page
    status, page = post(server.url, png_bytes(), "cat")  # the server carries on
    assert status == 200


# ------------------------------------------------------------ misbehaving clients
def connect(srv, data: bytes = b"", timeout: float = 30.0) -> socket.socket:
    """A raw connection to ``srv`` that has sent ``data``; reads wait at most ``timeout``."""
    sock = socket.create_connection(srv.server_address[:2], timeout=timeout)
    if data:
        sock.sendall(data)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as a
    close); raises TimeoutError if the server keeps it open past the socket's timeout."""
    chunks = []
    with sock:
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def headers(length: str | None) -> bytes:
    lines = ["POST /predict HTTP/1.1", "Host: 127.0.0.1",
             "Content-Type: multipart/form-data; boundary=x"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_content_length_is_checked_before_reading(server, capsys):
    for length, status in (("abc", b"400"), ("-5", b"400"), ("1e3", b"400"), (None, b"411"),
                           (str(10**12), b"413"), ("0", b"400")):
        # no body is sent: each answer comes without waiting for one
        answer = read_all(connect(server, headers(length)))
        assert answer.startswith(b"HTTP/1.0 " + status), (length, answer[:80])
    assert b"is not a number of bytes" in read_all(connect(server, headers("abc")))
    assert "Traceback" not in capsys.readouterr().err


def test_stalled_connections_are_dropped_after_the_timeout():
    with serving("tiny_denseclip_res", request_timeout=0.5, max_connections=4) as srv:
        silent = connect(srv)
        partial = connect(srv, b"POST /predict HTTP/1.1\r\nContent-Len")
        no_body = connect(srv, headers("1000"))
        # each read below would time out (30 s) if the server kept the connection open
        assert read_all(silent) == b"" and read_all(partial) == b""
        assert read_all(no_body).startswith(b"HTTP/1.0 408")
        assert srv.wait_for_connections(0, timeout=30)
        status, page = post(srv.url, png_bytes(), "cat")
        assert status == 200 and "id='overlay'" in page


def test_excess_connections_get_503_at_once_and_service_resumes():
    with serving("tiny_denseclip_res", request_timeout=60, max_connections=2) as srv:
        slow = [connect(srv, b"POST /predict HTTP/1.1\r\n") for _ in range(2)]
        assert srv.wait_for_connections(2, timeout=30)
        flood = [connect(srv, headers("1000"), timeout=20) for _ in range(20)]
        # answered while the slow ones still hold their slots (20 s < their 60 s)
        answers = [read_all(sock) for sock in flood]
        assert all(a.startswith(b"HTTP/1.0 503") for a in answers), answers[0][:80]
        assert srv.active_connections == 2
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(srv.url + "health", timeout=20)
        assert refused.value.code == 503 and b"busy" in refused.value.read()
        for sock in slow:  # the slow clients leave: their slots are free again
            sock.close()
        assert srv.wait_for_connections(0, timeout=30)
        status, page = post(srv.url, png_bytes(), "cat")
        assert status == 200 and "id='overlay'" in page
