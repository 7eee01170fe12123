"""The image size limit: headers are checked before decoding, so a tiny file declaring a
huge size (a decompression bomb) is refused by every reader without spending memory."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from denseclip.cli import arguments, predict
from denseclip.config import DataConfig, load_config
from denseclip.data.coco import CocoDetection, build_coco_dataset
from denseclip.data.io import (
    MAX_IMAGE_PIXELS,
    MAX_PIXELS_ENV,
    DatasetError,
    ImageTooLargeError,
    UnknownImageFormatError,
    decode_image,
    load_image,
    load_label_map,
    max_image_pixels,
)
from denseclip.data.segmentation import ADE20KDataset, build_segmentation_dataset
from denseclip.inference import Predictor
from tests.helpers.bombs import png_bomb_bytes, write_png_bomb
from tests.helpers.coco import write_coco
from tests.helpers.images import random_image, write_pair

ROOT = Path(__file__).resolve().parents[2]
BOMB_MESSAGE = (r"photo\.png: 20000x20000 image \(400\.0 M pixels\) exceeds the limit of "
                r"89\.5 M pixels \(--max-image-pixels / data\.max_image_pixels")


def test_a_tiny_file_declaring_400m_pixels_is_refused(tmp_path):
    bomb = write_png_bomb(tmp_path / "photo.png")
    assert bomb.stat().st_size < 200_000  # ~50 KB that decode to 1.2 GB of RGB
    assert MAX_IMAGE_PIXELS == 89_478_485 == max_image_pixels()
    with pytest.raises(ImageTooLargeError, match=BOMB_MESSAGE) as info:
        load_image(bomb)
    assert "\n" not in str(info.value) and isinstance(info.value, DatasetError)
    with pytest.raises(ImageTooLargeError, match=r"labels\.png: 20000x20000 image"):
        load_label_map(write_png_bomb(tmp_path / "labels.png"))
    with pytest.raises(ImageTooLargeError, match=r"^the upload: 20000x20000"):
        decode_image(png_bomb_bytes(), name="the upload")


def test_normal_images_are_unaffected_and_the_limit_is_settable(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    Image.fromarray(random_image(50, 60)).save(path)
    np.testing.assert_array_equal(load_image(path), cv2.imread(str(path))[:, :, ::-1])
    assert load_image(path, max_pixels=3000).shape == (50, 60, 3)  # exactly at the limit
    with pytest.raises(ImageTooLargeError, match=r"a\.png: 60x50 image \(3000 pixels\) "
                                                 r"exceeds the limit of 2999 pixels"):
        load_image(path, max_pixels=2999)
    monkeypatch.setenv(MAX_PIXELS_ENV, "2_999")
    with pytest.raises(ImageTooLargeError, match="limit of 2999 pixels"):
        load_image(path)
    assert load_image(path, max_pixels=3000).shape == (50, 60, 3)  # the argument wins
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match=f"{MAX_PIXELS_ENV}='lots'"):
        load_image(path)
    with pytest.raises(ValueError, match="data.max_image_pixels"):
        load_image(path, max_pixels=0)


def test_raising_the_limit_allows_a_large_image(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    big.write_bytes(png_bomb_bytes(3000, 2000))  # 6 M pixels, a few KB
    with pytest.raises(ImageTooLargeError, match=r"3000x2000 image \(6\.0 M pixels\)"):
        load_image(big, max_pixels=5_000_000)
    # Pillow's own limit does not get in the way of a raised one (sizes come from headers)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    out = load_image(big, max_pixels=6_000_000)
    assert out.shape == (2000, 3000, 3) and not out.any()


def test_bytes_without_a_checkable_header_are_not_decoded(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(UnknownImageFormatError, match=r"notes\.png: not an image file \(JPEG"):
        load_image(tmp_path / "notes.png")
    hdr = tmp_path / "light.hdr"  # Radiance HDR: OpenCV reads it, Pillow cannot size it
    assert cv2.imwrite(str(hdr), np.ones((8, 8, 3), np.float32))
    assert cv2.imread(str(hdr)) is not None
    with pytest.raises(UnknownImageFormatError, match=r"light\.hdr"):
        load_image(hdr)


def test_datasets_refuse_oversized_images(tmp_path):
    ade = tmp_path / "ade"
    write_pair(ade, "validation", "ok", random_image(20, 30), np.ones((20, 30), np.uint8),
               img_suffix=".png")
    write_png_bomb(ade / "images" / "validation" / "photo.png")
    Image.fromarray(np.ones((4, 4), np.uint8)).save(ade / "annotations/validation/photo.png")
    ds = ADE20KDataset(ade, "validation", img_suffix=".png")
    assert ds.load(0)[0].shape == (20, 30, 3)  # "ok" sorts first
    with pytest.raises(ImageTooLargeError, match=BOMB_MESSAGE):
        ds[1]
    cfg = DataConfig(root=str(ade), img_suffix=".png", max_image_pixels=599)  # the config key
    small = build_segmentation_dataset(cfg, "validation", 150, train=False)
    with pytest.raises(ImageTooLargeError, match=r"ok\.png: 30x20 image \(600 pixels\)"):
        small[0]

    coco = tmp_path / "coco"
    data = write_coco(coco, "val")
    first = data["images"][0]
    ds = CocoDetection(coco / "val", coco / "annotations/instances_val.json")
    assert ds.load_image(0).shape == (first["height"], first["width"], 3)
    limited = build_coco_dataset(DataConfig(root=str(coco), max_image_pixels=99), "val", False)
    with pytest.raises(ImageTooLargeError, match=first["file_name"]):
        limited[0]
    write_png_bomb(coco / "val" / first["file_name"])
    with pytest.raises(ImageTooLargeError, match=r"20000x20000 image \(400\.0 M pixels\)"):
        ds[0]


@pytest.mark.filterwarnings("ignore:no checkpoint given")
def test_predictor_uses_the_config_limit():
    predictor = Predictor(load_config("tiny_denseclip_res", ["data.max_image_pixels=100"]))
    with pytest.raises(ImageTooLargeError, match=r"12x9 image \(108 pixels\)"):
        predictor.prepare(Image.fromarray(random_image(9, 12)))  # PIL images too
    assert predictor.prepare(random_image(9, 12)).image.shape == (9, 12, 3)  # arrays: decoded


def _predict(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="denseclip predict")
    arguments.add_predict_arguments(parser)
    return predict.run(parser.parse_args(list(argv)))


def test_predict_reports_refused_images_and_writes_the_others(tmp_path, capsys):
    bomb = write_png_bomb(tmp_path / "photo.png")
    good = tmp_path / "good.png"
    Image.fromarray(random_image(40, 50)).save(good)
    out = tmp_path / "out"
    status = _predict("tiny_denseclip_res", "none", str(bomb), str(good), "--out", str(out))
    err = capsys.readouterr().err
    assert status == 1 and (out / "good_labels.png").is_file()
    assert not list(out.glob("photo*"))
    assert f"failed: {bomb}: {bomb}: 20000x20000 image (400.0 M pixels) exceeds" in err
    status = _predict("tiny_denseclip_res", "none", str(good), "--out", str(tmp_path / "o2"),
                      "--max-image-pixels", "1999")
    assert status == 1 and "50x40 image (2000 pixels) exceeds the limit of 1999" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit):
        _predict("tiny_denseclip_res", "none", str(good), "--out", str(out),
                 "--max-image-pixels", "0")


# Run in a fresh interpreter: every reader meets the bomb, and the resident memory must not
# grow by anything like the decoded image (1.2 GB). Resident memory is sampled (every 2 ms
# and at the end, by the benchmark's RSSSampler) rather than read from getrusage's lifetime
# peak: a kernel that reclaims cold pages proactively (DAMON) lowers the current RSS below
# that peak, which then hides new allocations.
_MEMORY_SCRIPT = r"""
import io, json, resource, sys, threading, urllib.error, urllib.request, warnings
from pathlib import Path
import numpy as np
from PIL import Image
from denseclip.cli import main
from denseclip.data.io import ImageTooLargeError, decode_image, load_image
from denseclip.data.segmentation import ADE20KDataset
from denseclip.tools.demo import make_server
from denseclip.inference import Predictor
from denseclip.tools.bench import RSSSampler
from tests.helpers.bombs import png_bomb_bytes, write_png_bomb

tmp = Path(sys.argv[1])
(tmp / "images/training").mkdir(parents=True)
bomb = write_png_bomb(tmp / "images/training/photo.png")
(tmp / "annotations/training").mkdir(parents=True)
Image.fromarray(np.ones((4, 4), np.uint8)).save(tmp / "annotations/training/photo.png")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    predictor = Predictor("tiny_denseclip_res")
server = make_server(predictor, "127.0.0.1", 0, quiet=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
with RSSSampler() as sampler:
    start = sampler.sample()
    refused = []
    for read in (lambda: load_image(bomb), lambda: ADE20KDataset(tmp, img_suffix=".png")[0],
                 lambda: predictor.prepare(bomb)):
        try:
            read()
        except ImageTooLargeError as e:
            refused.append(str(e))
    status = main(["predict", "tiny_denseclip_res", "none", str(bomb), "--out", str(tmp / "o")])
    body = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"photo.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + bomb.read_bytes() + b"\r\n--b--\r\n")
    request = urllib.request.Request(server.url + "predict", data=body,
                                     headers={"Content-Type": "multipart/form-data; boundary=b"})
    try:
        urllib.request.urlopen(request, timeout=60)
        page, code = "", 200
    except urllib.error.HTTPError as e:
        page, code = e.read().decode(), e.code
server.shutdown()
print(json.dumps({"refused": refused, "status": status, "code": code, "page": page,
                  "refusing_mib": (sampler.peak - start) / 2**20}))
"""

# The control, in a fresh interpreter of its own: decoding a real 10000x10000 image, measured
# the same way, shows that the measurement sees a decode.
_CONTROL_SCRIPT = r"""
import json
from denseclip.data.io import decode_image
from denseclip.tools.bench import RSSSampler
from tests.helpers.bombs import png_bomb_bytes
control = png_bomb_bytes(10000, 10000)
with RSSSampler() as sampler:
    start = sampler.sample()
    image = decode_image(control, max_pixels=100_000_000)  # held until the last sample
print(json.dumps({"decoding_mib": (sampler.peak - start) / 2**20, "shape": list(image.shape)}))
"""


def test_refusing_a_bomb_costs_no_memory_anywhere(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    env.pop(MAX_PIXELS_ENV, None)
    done = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    control = subprocess.run([sys.executable, "-c", _CONTROL_SCRIPT], env=env,
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert control.returncode == 0, control.stderr[-3000:]
    decoding = json.loads(control.stdout.strip().splitlines()[-1])["decoding_mib"]
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["refused"]) == 3 and all("20000x20000 image" in m
                                               for m in result["refused"])
    assert result["status"] == 1 and "20000x20000 image (400.0 M pixels)" in done.stderr
    assert result["code"] == 400 and "photo.png: 20000x20000 image (400.0 M pixels)" in (
        result["page"])
    assert result["refusing_mib"] < 100, result  # decoding the bomb would take ~1150 MiB
    assert decoding > 200, decoding  # 10000x10000 decoded: RGB + BGR, ~570 MiB


def test_the_option_sets_the_config_key_on_test_and_demo(capsys):
    from denseclip.cli import build_parser
    from denseclip.cli import demo as demo_cli
    from denseclip.cli.common import load_cli_config

    args = build_parser().parse_args(["test", "tiny_denseclip_res", "w.pth",
                                      "--max-image-pixels", "1_000"])
    assert load_cli_config(args).data.max_image_pixels == 1000
    args = build_parser().parse_args(["test", "tiny_denseclip_res", "w.pth"])
    assert load_cli_config(args).data.max_image_pixels is None  # the default limit
    args = build_parser().parse_args(["demo", "tiny_denseclip_res", "none", "--timeout", "0"])
    assert demo_cli.run(args) == 2 and "--timeout" in capsys.readouterr().err
