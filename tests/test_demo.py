"""The demo page: HTTP behaviour, and end to end in a headless Chromium.

The browser test needs the ``playwright`` Python package (a test extra) and Debian's
Chromium at /usr/bin/chromium (``make test`` installs it as root; otherwise
``apt-get install -y chromium chromium-driver``); without Chromium it fails saying so.
Playwright's own browser download is not used.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shutil
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
from denseclip.cli import demo
from denseclip.demo import make_server
from denseclip.inference import Predictor
from tests.helpers.images import random_image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def serving(preset: str):
    """The demo server for a tiny random model of ``preset`` on a free port, in a thread."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        predictor = Predictor(preset)
    srv = make_server(predictor, "127.0.0.1", 0, quiet=True)
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


def post(url: str, image: bytes, classes: str) -> tuple[int, str]:
    boundary = uuid.uuid4().hex
    body = b"".join([
        f"--{boundary}\r\n".encode(),
        b'Content-Disposition: form-data; name="image"; filename="upload.png"\r\n',
        b"Content-Type: image/png\r\n\r\n", image, b"\r\n",
        f"--{boundary}\r\n".encode(),
        b'Content-Disposition: form-data; name="classes"\r\n\r\n', classes.encode(), b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ])
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


def test_bad_uploads_get_a_message(server):
    status, page = post(server.url, b"definitely not an image", "cat")
    assert status == 400 and "cannot read the upload as an image" in page
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
            assert width > 100 and height == 72  # the image plus its legend panel
            legend = page.inner_text("#legend")
            assert any(name in legend for name in ("cat", "dog", "grass"))
            assert page.eval_on_selector("#overlay-trained", "img => img.naturalWidth") > 100
            assert page.input_value("#classes") == "cat, dog, grass"
        finally:
            browser.close()


def test_cli_run_refuses_a_bad_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    vit = denseclip.build_model(denseclip.load_config("tiny_denseclip_vit"))
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
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
