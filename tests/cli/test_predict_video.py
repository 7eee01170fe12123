"""``denseclip predict`` on videos and live sources: overlay videos of the input's size and
frame rate, per-frame label maps, unreadable frames skipped, bad sources named."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import denseclip
from denseclip.cli import arguments, predict
from denseclip.weights import save_checkpoint
from tests.helpers.images import random_image

PRESET = "tiny_denseclip_res"
FRAMES, WIDTH, HEIGHT, FPS = 12, 64, 48, 7


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="denseclip predict")
    arguments.add_predict_arguments(parser)
    return predict.run(parser.parse_args(list(argv)))


def write_clip(path: Path, codec: str, frames: int = FRAMES) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), FPS, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(random_image(HEIGHT, WIDTH, seed=i)[:, :, ::-1].copy())
    writer.release()
    return path


def read_video(path: Path) -> tuple[list[np.ndarray], float, tuple[int, int]]:
    """Every frame (RGB), the frame rate and (W, H) of a video, read back with OpenCV."""
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    assert capture.isOpened(), path
    fps = capture.get(cv2.CAP_PROP_FPS)
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    frames = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames, fps, size


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = denseclip.build_model(denseclip.load_config(PRESET))
    return str(save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", model))


@pytest.mark.parametrize(("name", "codec"), [("clip.avi", "MJPG"), ("clip.mp4", "mp4v")])
def test_overlay_video_and_frame_label_maps(checkpoint, tmp_path, capsys, name, codec):
    clip = write_clip(tmp_path / name, codec)
    out = tmp_path / "out"
    status = run_cli(PRESET, checkpoint, str(clip), "--out", str(out), "--save-frames",
                     "--batch-size", "5")
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "frame/s" in captured.err  # the progress bar's rate
    assert f"{clip}: {FRAMES} frame(s) written" in captured.out
    frames, fps, size = read_video(out / "clip_overlay.mp4")
    assert len(frames) == FRAMES and fps == FPS and size == (WIDTH, HEIGHT)
    label_maps = sorted(p.name for p in (out / "clip_frames").iterdir())
    assert label_maps == [f"{i:06d}_labels.png" for i in range(FRAMES)]
    if codec == "MJPG":  # each label map is the frame predicted alone
        inputs, _, _ = read_video(clip)
        predictor = denseclip.Predictor(PRESET, checkpoint)
        for i, frame in enumerate(inputs):
            saved = cv2.imread(str(out / "clip_frames" / f"{i:06d}_labels.png"),
                               cv2.IMREAD_UNCHANGED)
            alone = predictor.predict(frame, return_probs=False).labels
            assert np.array_equal(saved, alone), i


def test_open_classes_get_their_own_overlay_video(checkpoint, tmp_path):
    clip = write_clip(tmp_path / "clip.avi", "MJPG", frames=3)
    out = tmp_path / "out"
    assert run_cli(PRESET, checkpoint, str(clip), "--out", str(out), "--classes", "cat,dog",
                   "--save-frames") == 0
    frames, _, _ = read_video(out / "clip_open_overlay.mp4")
    assert len(frames) == 3
    assert (out / "clip_frames" / "000002_open_labels.png").exists()


def corrupt_frame(path: Path, index: int) -> None:
    """Overwrite one MJPG frame's JPEG (SOI to EOI) with zeros: FFmpeg finds no JPEG data."""
    data = bytearray(path.read_bytes())
    starts = [i for i in range(len(data) - 2) if data[i:i + 3] == b"\xff\xd8\xff"]
    assert len(starts) == FRAMES
    end = data.index(b"\xff\xd9", starts[index]) + 2
    data[starts[index]:end] = bytes(end - starts[index])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("index", [5, FRAMES - 1])
def test_unreadable_frame_is_reported_and_skipped(checkpoint, tmp_path, capsys, index):
    clip = write_clip(tmp_path / "clip.avi", "MJPG")
    corrupt_frame(clip, index)
    out = tmp_path / "out"
    status = run_cli(PRESET, checkpoint, str(clip), "--out", str(out), "--save-frames")
    captured = capsys.readouterr()
    assert status == 1
    lines = [line for line in captured.err.splitlines() if "failed:" in line]
    assert len(lines) == 1 and f"frame {index}: cannot decode the frame" in lines[0]
    assert f"{FRAMES - 1} frame(s) written" in captured.out and "1 skipped" in captured.out
    frames, _, _ = read_video(out / "clip_overlay.mp4")
    assert len(frames) == FRAMES - 1
    names = {p.name for p in (out / "clip_frames").iterdir()}
    assert len(names) == FRAMES - 1 and f"{index:06d}_labels.png" not in names


def test_detection_video_with_max_frames(tmp_path, capsys):
    clip = write_clip(tmp_path / "clip.mp4", "mp4v")
    out = tmp_path / "out"
    status = run_cli("tiny_retinanet_denseclip", "none", str(clip), "--out", str(out),
                     "--save-frames", "--max-frames", "3", "--score-thr", "0")
    assert status == 0, capsys.readouterr().err
    frames, fps, size = read_video(out / "clip_overlay.mp4")
    assert len(frames) == 3 and fps == FPS and size == (WIDTH, HEIGHT)
    records = sorted((out / "clip_frames").iterdir())
    assert [p.name for p in records] == ["000000.json", "000001.json", "000002.json"]
    record = json.loads(records[0].read_text())
    assert record["image_size"] == [HEIGHT, WIDTH] and record["detections"]


def test_bad_sources_are_named(checkpoint, tmp_path, capsys):
    (tmp_path / "fake.mp4").write_text("not a video")
    status = run_cli(PRESET, checkpoint, str(tmp_path / "fake.mp4"), "--out", str(tmp_path))
    assert status == 1
    assert f"failed: {tmp_path / 'fake.mp4'}: cannot open it as a video" in \
        capsys.readouterr().err
    for source, message in [
        (str(tmp_path / "missing.mp4"), "missing.mp4: no such file"),
        ("pipe:0", "pipe:0: no such file"),  # a path stays a path: no FFmpeg protocol
        ("file:///etc/hostname", "unsupported URL scheme 'file'"),
        ("rtsp://127.0.0.1:1/live", "cannot open the stream"),  # nothing listens on port 1
    ]:
        status = run_cli(PRESET, checkpoint, "--source", source, "--out", str(tmp_path / "o"))
        err = capsys.readouterr().err
        assert status == 2, source
        lines = err.splitlines()  # one line, naming the source
        assert len(lines) == 1 and lines[0].startswith(f"denseclip predict: error: --source "
                                                       f"{source}: "), err
        assert message in lines[0], (source, err)
    assert not (tmp_path / "o").exists()


def test_missing_camera_is_one_clear_line(checkpoint, tmp_path, capfd):
    """OpenCV's own warnings about the camera (written by its C++ code straight to the
    stderr descriptor, which capfd sees) do not reach the user: one line says it."""
    index = next(i for i in range(64) if not os.path.exists(f"/dev/video{i}"))
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_WARNING)  # OpenCV's default
    try:
        status = run_cli(PRESET, checkpoint, "--source", str(index), "--out",
                         str(tmp_path / "o"))
    finally:
        cv2.utils.logging.setLogLevel(level)
    assert status == 2
    assert capfd.readouterr().err.splitlines() == [
        f"denseclip predict: error: --source {index}: cannot open camera {index} (no such "
        f"camera, or it is busy or not permitted)"]


def test_videos_of_the_same_name_and_images_together(checkpoint, tmp_path, capsys):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        write_clip(tmp_path / folder / "clip.avi", "MJPG", frames=2)
    cv2.imwrite(str(tmp_path / "photo.png"), random_image(HEIGHT, WIDTH))
    out = tmp_path / "out"
    assert run_cli(PRESET, checkpoint, str(tmp_path / "x" / "clip.avi"),
                   str(tmp_path / "y" / "clip.avi"), str(tmp_path / "photo.png"),
                   "--out", str(out)) == 0
    assert "1 image(s) written" in capsys.readouterr().out
    assert (out / "photo_overlay.png").exists()
    for name in ("clip_overlay.mp4", "clip_2_overlay.mp4"):
        assert len(read_video(out / name)[0]) == 2
