"""Segment images with a DenseCLIP model exported with ``--dynamic-classes``, with
onnxruntime, numpy, OpenCV and Pillow only (no PyTorch, no denseclip).

    denseclip export tiny_denseclip_res CKPT --dynamic-classes --out model.onnx
    denseclip embed-classes tiny_denseclip_res CKPT --classes 'cat,dog,grass' --out classes.npy
    python examples/onnx_segment.py model.onnx classes.npy photo.jpg --out out

writes ``out/photo_labels.png`` (the decode head over the trained classes) and
``out/photo_open_labels.png`` (the score maps of the classes in ``classes.npy``, names in
``classes.txt`` beside it), the label maps ``denseclip predict ... --classes ...`` writes.

The steps are the Predictor's, with the settings the ONNX metadata stores: the image is
decoded as OpenCV does (``IMREAD_COLOR``, BGR to RGB), resized keeping its ratio to
``test_scale`` (OpenCV bilinear on the uint8 pixels), normalised with ``mean_255`` and
``std_255``, run whole or in sliding windows (``evaluation``: mode, crop size, stride;
overlaps averaged), and the logits and score maps are resized bilinearly back to the image
before the argmax.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
from PIL import Image

MAX_PIXELS = 89_478_485  # refuse larger images before decoding them (Pillow's default)


def read_metadata(session: ort.InferenceSession) -> dict:
    """The JSON-encoded metadata the exporter stored."""
    raw = session.get_modelmeta().custom_metadata_map
    return {key: json.loads(value) for key, value in raw.items()}


def read_class_names(path: Path) -> list[str]:
    """Class names of a class file: one ``name`` or ``name: text`` per line; blank lines and
    ``#`` comments skipped."""
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.append(line.partition(":")[0].strip())
    return names


def decode(path: Path) -> np.ndarray:
    """An image file as H x W x 3 uint8 RGB, its size checked before decoding."""
    data = path.read_bytes()
    with Image.open(path) as header:  # reads the header only
        width, height = header.size
    if width * height > MAX_PIXELS:
        raise ValueError(f"{path}: {width} x {height} pixels is more than {MAX_PIXELS}")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{path}: OpenCV cannot decode this image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def keep_ratio_size(height: int, width: int, scale: list[int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale size for the edge bounds ``scale`` (either order)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * float(factor) + 0.5), int(width * float(factor) + 0.5)


def preprocess(rgb: np.ndarray, meta: dict) -> np.ndarray:
    """The normalised 1 x 3 x h x w float32 network input of an RGB image."""
    h, w = keep_ratio_size(rgb.shape[0], rgb.shape[1], meta["test_scale"])
    if (h, w) != rgb.shape[:2]:
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    mean = np.array(meta["mean_255"], np.float32).astype(np.float64).reshape(1, -1)
    std = np.array(meta["std_255"], np.float32).astype(np.float64).reshape(1, -1)
    out = rgb.astype(np.float32)
    cv2.subtract(out, mean, out)  # as mmcv.imnormalize: float32 pixels, float64 constants
    cv2.multiply(out, 1 / std, out)
    return np.ascontiguousarray(out.transpose(2, 0, 1))[None]


def windows(h: int, w: int, crop: list[int], stride: list[int]) -> list[tuple[int, ...]]:
    """mmseg's sliding windows ``(y1, y2, x1, x2)``, row-major, shifted to end inside."""
    rows = max(h - crop[0] + stride[0] - 1, 0) // stride[0] + 1
    cols = max(w - crop[1] + stride[1] - 1, 0) // stride[1] + 1
    boxes = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * stride[0] + crop[0], h), min(j * stride[1] + crop[1], w)
            boxes.append((max(y2 - crop[0], 0), y2, max(x2 - crop[1], 0), x2))
    return boxes


def run_model(session: ort.InferenceSession, image: np.ndarray, embeddings: np.ndarray,
              meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """Logits (K_trained, h, w) and score maps (K, h, w) of a preprocessed image, whole or
    averaged over sliding windows as the metadata's ``evaluation`` says."""
    dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32

    def forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, scores = session.run(["logits", "open_scores"], {
            "images": x.astype(dtype), "class_embeddings": embeddings})
        return logits[0].astype(np.float32), scores[0].astype(np.float32)

    evaluation = meta["evaluation"]
    if evaluation["mode"] == "whole":
        return forward(image)
    _, _, h, w = image.shape
    logits = scores = None
    count = np.zeros((h, w), np.float32)
    for y1, y2, x1, x2 in windows(h, w, evaluation["crop_size"], evaluation["stride"]):
        crop_logits, crop_scores = forward(image[:, :, y1:y2, x1:x2])
        if logits is None:
            logits = np.zeros((crop_logits.shape[0], h, w), np.float32)
            scores = np.zeros((crop_scores.shape[0], h, w), np.float32)
        logits[:, y1:y2, x1:x2] += crop_logits
        scores[:, y1:y2, x1:x2] += crop_scores
        count[y1:y2, x1:x2] += 1
    return logits / count, scores / count


def _axis(size_in: int, size_out: int, align_corners: bool):
    """Source indices and weights of a bilinear resize along one axis (PyTorch's rule)."""
    dst = np.arange(size_out, dtype=np.float32)
    if align_corners:
        scale = np.float32((size_in - 1) / (size_out - 1)) if size_out > 1 else np.float32(0)
        src = dst * scale
    else:
        scale = np.float32(size_in / size_out)
        src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    low = src.astype(np.int64)
    high = np.minimum(low + 1, size_in - 1)
    frac = (src - low).astype(np.float32)
    return low, high, frac


def resize(maps: np.ndarray, size: tuple[int, int], align_corners: bool) -> np.ndarray:
    """Bilinear resize of C x h x w maps to ``size`` (H, W), as ``F.interpolate``."""
    if maps.shape[1:] == tuple(size):
        return maps
    y0, y1, fy = _axis(maps.shape[1], size[0], align_corners)
    x0, x1, fx = _axis(maps.shape[2], size[1], align_corners)
    rows = maps[:, y0] * (1 - fy)[None, :, None] + maps[:, y1] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx


def write_labels(labels: np.ndarray, path: Path) -> None:
    """A label PNG as ``denseclip predict`` writes it: 8-bit, or 16-bit above 255."""
    if labels.size and labels.max() > 255:
        Image.fromarray(labels.astype(np.uint16)).save(path)
    else:
        Image.fromarray(labels.astype(np.uint8), "L").save(path)


def segment(session: ort.InferenceSession, rgb: np.ndarray, embeddings: np.ndarray,
            meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """(trained-class labels, open-class labels), each H x W, of an RGB image."""
    logits, scores = run_model(session, preprocess(rgb, meta), embeddings, meta)
    size, align = rgb.shape[:2], bool(meta["align_corners"])
    return resize(logits, size, align).argmax(0), resize(scores, size, align).argmax(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="the .onnx file (--dynamic-classes)")
    parser.add_argument("embeddings", type=Path,
                        help="class embeddings, K x D (.npy of `denseclip embed-classes`)")
    parser.add_argument("images", type=Path, nargs="+", help="image files")
    parser.add_argument("--out", type=Path, default=Path("onnx_out"),
                        help="folder for the label PNGs (default onnx_out)")
    args = parser.parse_args(argv)

    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    meta = read_metadata(session)
    if not meta.get("dynamic_classes"):
        print(f"error: {args.model} takes no class embeddings (export it with "
              f"--dynamic-classes)", file=sys.stderr)
        return 2
    embeddings = np.load(args.embeddings, allow_pickle=False).astype(np.float32)
    if embeddings.ndim != 2 or embeddings.shape[1] != meta["class_embedding_dim"]:
        print(f"error: {args.embeddings}: expected K x {meta['class_embedding_dim']} "
              f"embeddings, got {embeddings.shape}", file=sys.stderr)
        return 2
    names_file = args.embeddings.with_suffix(".txt")
    names = read_class_names(names_file) if names_file.is_file() else None
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        labels, open_labels = segment(session, decode(path), embeddings, meta)
        write_labels(labels, args.out / f"{path.stem}_labels.png")
        write_labels(open_labels, args.out / f"{path.stem}_open_labels.png")
        present = [names[i] if names else str(i) for i in np.unique(open_labels)]
        print(f"{path}: {', '.join(present)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
