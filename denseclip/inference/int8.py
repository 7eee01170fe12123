"""int8 inference on CPUs (``precision: int8``): ONNX Runtime static quantisation.

A segmentor is traced to ONNX (reference kernels, the text features of its trained classes
baked in as constants: the eval forward, images to logits at the input size), then
quantised statically by ONNX Runtime (``onnxruntime.quantization.quantize_static``):
BatchNorm folded into the convolutions first (``quant_pre_process``), weights int8 per
output channel, activations uint8 with ranges calibrated (min/max) on real images, QDQ
format. Before that, each convolution gets a bias of its own (ONNX Runtime's optimiser
shares equal constants, and a shared bias keeps a convolution in float) and each average
pool becomes the depthwise convolution it equals (ONNX Runtime's int8 depthwise
convolution is ~10x faster than its int8 average pool). ONNX Runtime fuses the QDQ pairs
into integer kernels (``QLinearConv``, ``QLinearMatMul``...; VNNI/AMX instructions where
the CPU has them). The nodes that
produce the graph's outputs (the bilinear resize to the input size) and the nodes that feed
them (the classifier) stay float, so the logits are never rounded to 8 bits.

Calibration images (:class:`Calibration`) come from a folder, or by default from the
training split of the config's dataset (``data.train_split``): ``images`` of them, evenly
spaced through the split, each preprocessed as :class:`~denseclip.inference.Predictor`
does (keep-ratio resize to ``data.test_scale``, normalisation) and cut into the windows
the model sees at test time (``evaluation.mode``/``crop_size``/``stride``).

The quantised graph is cached in ``<cache>/int8/`` (``$DENSECLIP_CACHE``, default
``~/.cache/denseclip``) under the SHA-256 of the float graph (weights and class texts
included), the calibration tensors and the ONNX Runtime version, so the same model with
the same calibration images is quantised once; ``Calibration(cache=False)`` skips the
cache. int8 changes results by more than rounding (typically a few pixels in a hundred
change class), so it is never chosen by ``precision: auto``.

onnx and onnxruntime come with the ``export`` extra (``pip install 'denseclip[export]'``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..models.seg_inference import SegInference, slide_windows
from ..models.segmentor import Segmentor
from ..optional import require
from ..runtime import reference_kernels
from ..tasks import get_task
from ..tasks.results import PredictionError
from ..weights.hub import cache_dir
from .inputs import collect_inputs, to_rgb

__all__ = ["DEFAULT_CALIBRATION_IMAGES", "OPEN_CLASSES_MESSAGE", "Calibration", "Int8Error",
           "Int8Segmentor", "calibration_batches", "calibration_paths", "quantize_model",
           "quantize_onnx"]

DEFAULT_CALIBRATION_IMAGES = 32
MAX_CALIBRATION_IMAGES = 4096
_FORMAT = "denseclip-int8-v2"  # part of the cache key: bump when the recipe changes
OPEN_CLASSES_MESSAGE = ("int8 covers the trained classes only; open-vocabulary classes need "
                        "precision fp32, bf16 or fp16")


class Int8Error(PredictionError):
    """The model cannot run in int8 as asked (one line, for the command line)."""


@dataclass(frozen=True)
class Calibration:
    """Where int8 calibration images come from: ``folder`` (its images, searched
    recursively, sorted) or, when ``None``, the config's training split; ``images`` of
    them at most, evenly spaced. ``cache``: reuse and store the quantised graph."""

    folder: str | Path | None = None
    images: int = DEFAULT_CALIBRATION_IMAGES
    cache: bool = True


def _require(module: str):
    """``module`` of the ``export`` extra, or :class:`Int8Error` saying what to install."""
    try:
        return require(module, "int8 inference")
    except ImportError as e:
        raise Int8Error(str(e)) from None


def _evenly(items: Sequence[Any], count: int) -> list[Any]:
    if len(items) <= count:
        return list(items)
    picks = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[i] for i in sorted(set(picks.tolist()))]


def calibration_paths(cfg: Config, calibration: Calibration) -> list[Path]:
    """The calibration image files of ``calibration`` for ``cfg``; :class:`Int8Error` when
    there are none or the count is out of range."""
    count = calibration.images
    if not 1 <= count <= MAX_CALIBRATION_IMAGES:
        raise Int8Error(f"int8 calibration: the number of images must be 1 to "
                        f"{MAX_CALIBRATION_IMAGES}, got {count}")
    if calibration.folder is not None:
        folder = Path(calibration.folder)
        if not folder.is_dir():
            raise Int8Error(f"int8 calibration: {folder} is not a folder")
        paths, _, _ = collect_inputs([str(folder)])
        if not paths:
            raise Int8Error(f"int8 calibration: no images in {folder}")
        return _evenly(sorted(paths), count)
    split = cfg.data.train_split
    try:
        dataset = get_task(cfg).dataset(split, train=False)
        paths = [Path(dataset.image_path(i)) for i in range(len(dataset))]
    except (OSError, ValueError, AttributeError) as e:
        raise Int8Error(f"int8 calibration: cannot read the training split {split!r} of "
                        f"data.root {cfg.data.root}: {e}; pass a folder of images "
                        f"(--calibration DIR)") from None
    if not paths:
        raise Int8Error(f"int8 calibration: the training split {split!r} of data.root "
                        f"{cfg.data.root} has no images; pass --calibration DIR")
    return _evenly(paths, count)


def calibration_batches(cfg: Config, paths: Iterable[Path]) -> Iterator[np.ndarray]:
    """One ``1 x 3 x h x w`` float32 array per test-time window of each image, preprocessed
    as the :class:`~denseclip.inference.Predictor` does; :class:`Int8Error` names an
    unreadable image."""
    task = get_task(cfg)
    ev = cfg.evaluation
    for path in paths:
        try:
            image = task.prepare(to_rgb(path, cfg.data.max_image_pixels)).tensor
        except (OSError, ValueError) as e:
            raise Int8Error(f"int8 calibration: {path}: {e}") from None
        _, h, w = image.shape
        boxes = (slide_windows(h, w, ev.crop_size, ev.stride) if ev.mode == "slide"
                 else [(0, h, 0, w)])
        for y1, y2, x1, x2 in boxes:
            yield image[None, :, y1:y2, x1:x2].float().contiguous().numpy()


# ------------------------------------------------------------------ quantisation
class _Reader:
    """An ONNX Runtime ``CalibrationDataReader`` over arrays for the input ``images``."""

    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"images": batch}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantiser logs a warning per rank-1 weight it cannot split per
    channel (LayerNorm scales: they stay per tensor, as intended)."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def quantize_onnx(src: str | Path, dst: str | Path, batches: Sequence[np.ndarray],
                  metadata: dict[str, str] | None = None) -> Path:
    """Quantise the float ONNX graph ``src`` into ``dst`` (module docstring) with
    ``batches`` as calibration inputs; the metadata of ``src`` is kept, updated by
    ``metadata`` (values already JSON-encoded)."""
    onnx = _require("onnx")
    quantization = _require("onnxruntime.quantization")
    if not batches:
        raise Int8Error("int8 calibration: no calibration inputs")
    dst = Path(dst)
    with tempfile.TemporaryDirectory(prefix="denseclip-int8-") as tmp:
        pre = Path(tmp) / "folded.onnx"
        with _quiet():
            quantization.shape_inference.quant_pre_process(str(src), str(pre),
                                                           skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        if _unshare_biases(model) | _pools_as_convs(model):
            onnx.save(model, str(pre))
        graph = model.graph
        outputs = {o.name for o in graph.output}
        producers = {out: node for node in graph.node for out in node.output}
        last = [n for n in graph.node if outputs & set(n.output)]
        keep_float = sorted({n.name for n in last} | {producers[n.input[0]].name for n in last
                                                     if n.input and n.input[0] in producers})
        with _quiet():
            quantization.quantize_static(
                str(pre), str(dst), _Reader(batches),
                quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8,
                nodes_to_exclude=keep_float,
                calibrate_method=quantization.CalibrationMethod.MinMax)
    source, proto = onnx.load(str(src)), onnx.load(str(dst))
    props = {p.key: p.value for p in source.metadata_props}
    props.update(metadata or {})
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(dst))
    return dst


def _unshare_biases(model) -> bool:
    """Give each convolution's bias an initializer of its own. ONNX Runtime's optimiser
    shares equal constants (a folded bias of zeros and a LayerNorm's zero shift, say), and
    a bias that another node reads cannot be quantised to int32 with that convolution's
    scales: the convolution would run in float. Returns whether the graph changed."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    changed = False
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2 \
                and node.input[2] in inits and uses[node.input[2]] > 1:
            copy = type(inits[node.input[2]])()
            copy.CopyFrom(inits[node.input[2]])
            copy.name = f"{node.name or node.output[0]}.bias_own"
            graph.initializer.append(copy)
            uses[node.input[2]] -= 1
            node.input[2] = copy.name
            changed = True
    return changed


def _pools_as_convs(model) -> bool:
    """Each unpadded ``AveragePool`` as the depthwise convolution it equals (weights
    ``1 / kernel area``): ONNX Runtime's int8 average pool is several times slower than its
    int8 depthwise convolution. Returns whether the graph changed."""
    onnx = _require("onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    graph = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(graph.value_info) + list(graph.input)}
    changed = False
    for index, node in enumerate(list(graph.node)):  # replaced one for one: indices hold
        if node.op_type != "AveragePool":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kernel = list(attrs.get("kernel_shape", []))
        shape = shapes.get(node.input[0])
        if (len(kernel) != 2 or any(attrs.get("pads", [0])) or attrs.get("ceil_mode", 0)
                or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
                or any(d != 1 for d in attrs.get("dilations", []))
                or not shape or len(shape) != 4 or shape[1] <= 0):
            continue
        channels = shape[1]
        weight = numpy_helper.from_array(
            np.full((channels, 1, *kernel), 1.0 / (kernel[0] * kernel[1]), np.float32),
            f"{node.name or node.output[0]}.depthwise_weight")
        graph.initializer.append(weight)
        conv = helper.make_node("Conv", [node.input[0], weight.name], list(node.output),
                                name=node.name, group=channels, kernel_shape=kernel,
                                strides=list(attrs.get("strides", [1, 1])))
        graph.node.remove(node)
        graph.node.insert(index, conv)
        changed = True
    return changed


class _Logits(nn.Module):
    """A segmentor's eval forward (logits at the input size), its trained classes' text
    features as constants."""

    def __init__(self, model: Segmentor) -> None:
        super().__init__()
        self.model = model
        guidance = model.guidance
        text = None
        if guidance is not None:
            if guidance.prompting != "post":
                raise Int8Error("int8 needs post-model prompting: pre-model prompting "
                                "computes the text features from each image")
            with torch.no_grad():
                text = guidance.text_encoder(guidance.tokens, guidance.contexts).detach()
        self.register_buffer("text", text)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dense = self.model.forward_features(images, text=self.text)
        return self.model.forward_head(dense.features, images.shape[-2:])


def _float_graph(model: Segmentor, path: Path, example_size: Sequence[int]) -> Path:
    wrapper = _Logits(model).eval()
    example = torch.zeros(1, 3, *example_size)
    axes = {"images": {0: "batch", 2: "height", 3: "width"},
            "logits": {0: "batch", 2: "height", 3: "width"}}
    with torch.no_grad(), reference_kernels(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python-level shape checks
        torch.onnx.export(wrapper, (example,), str(path), input_names=["images"],
                          output_names=["logits"], dynamic_axes=axes, opset_version=17,
                          dynamo=False)
    return path


def _digest(graph: bytes, batches: Sequence[np.ndarray], version: str) -> str:
    h = hashlib.sha256(_FORMAT.encode())
    h.update(version.encode())
    h.update(hashlib.sha256(graph).digest())
    for batch in batches:
        h.update(str(batch.shape).encode())
        h.update(batch.tobytes())
    return h.hexdigest()


def _session(graph: bytes):
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # idle threads sleep instead of spinning: they would take the cores from PyTorch's
    # threads, which run the rest of the pipeline in the same process
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def quantize_model(model: nn.Module, cfg: Config, calibration: Calibration | None = None,
                   batches: Sequence[np.ndarray] | None = None) -> Int8Segmentor:
    """``model`` (a segmentor of ``cfg``, on the CPU) as an :class:`Int8Segmentor`,
    calibrated on ``calibration`` (default: :class:`Calibration()`) or on ``batches``
    given directly (``1 x 3 x h x w`` float32 arrays); cached as the module docstring
    says. ``model`` itself is unchanged."""
    if not isinstance(model, Segmentor) or cfg.model.zeroshot:
        raise Int8Error(f"int8 supports the trained segmentation models; {cfg.name} is a "
                        f"{cfg.model.task} model (use precision fp32, bf16 or fp16)")
    calibration = calibration or Calibration()
    ort = _require("onnxruntime")
    if batches is None:
        batches = list(calibration_batches(cfg, calibration_paths(cfg, calibration)))
    was_training = model.training
    model.eval()
    crop = cfg.evaluation.crop_size if cfg.evaluation.mode == "slide" else batches[0].shape[-2:]
    try:
        with tempfile.TemporaryDirectory(prefix="denseclip-int8-") as tmp:
            graph = _float_graph(model, Path(tmp) / "float.onnx", [int(s) for s in crop])
            key = _digest(graph.read_bytes(), batches, ort.__version__)
            cached = cache_dir() / "int8" / f"{key[:40]}.onnx"
            if calibration.cache and cached.is_file():
                data = cached.read_bytes()
            else:
                out = quantize_onnx(graph, Path(tmp) / "int8.onnx", batches)
                data = out.read_bytes()
                if calibration.cache:
                    _store(cached, data)
    finally:
        model.train(was_training)
    return Int8Segmentor(data, model, get_task(cfg).model_class_names(model))


def _store(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a cache that cannot be written is skipped)."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


class Int8Segmentor(SegInference, nn.Module):
    """A quantised segmentor run by ONNX Runtime on the CPU: ``model(images)`` maps a
    normalised batch ``B x 3 x H x W`` to float32 logits ``B x K x H x W`` as the float
    segmentor's eval forward does, and :meth:`inference` / :meth:`aug_inference` work as
    for it. ``graph`` holds the quantised ONNX file's bytes."""

    guidance = None  # no text encoder at run time: the trained classes only

    def __init__(self, graph: bytes, model: Segmentor, class_names: Sequence[str]) -> None:
        nn.Module.__init__(self)
        self.graph = graph
        self.session = _session(graph)
        self.num_classes = model.num_classes
        self.align_corners = model.align_corners
        self.inference_settings = model.inference_settings
        self.class_names = list(class_names)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be B x 3 x H x W, got {tuple(images.shape)}")
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run(["logits"], {"images": array})
        return torch.from_numpy(logits).to(images.device)
