"""ONNX export of segmentation models with the class-name text features baked in.

The exported graph maps a normalised image batch ``images`` (B, 3, H, W) — RGB, keep-ratio
resized and normalised as ``(x - 255·mean) / (255·std)`` exactly like the test pipeline —
to ``logits`` (B, K, H, W) of the decode head over the trained classes. With open-vocabulary
classes it has a second output ``open_scores`` (B, K', H, W): the score maps (cosine
similarities) of those classes, upsampled bilinearly to the input. Batch size, height and
width are dynamic (``batch``, ``height``, ``width``, the same names in the input and the
outputs); the class axes have their fixed sizes K and K'. The sliding-window loop, the
final resize and the softmax stay outside, as they are per-image control flow (see
:class:`denseclip.inference.Predictor` for the reference).

The text encoder does not run in the graph: the text embeddings of the trained and the open
class lists are computed once at export time and stored as constants (post-model prompting;
pre-model prompting makes text depend on the image and is not exportable this way). The
class names, normalisation and test settings are stored in the ONNX metadata.

The graph is traced with the reference kernels (:mod:`denseclip.runtime`): plain
MatMul/Softmax attention and separate BatchNorm nodes, which every ONNX runtime supports
and fuses itself. ``precision="fp16"`` stores weights and computes in float16 (float16 input,
float32 outputs as in PyTorch, half the file size); ``fp32`` (default, and what ``auto`` means for a
file meant to run anywhere) keeps float32, from which runtimes such as TensorRT can
build reduced-precision engines themselves. bf16 is refused: ONNX Runtime implements few
operators in bf16.
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..inference import Predictor
from ..inference.int8 import Calibration, calibration_batches, calibration_paths, quantize_onnx
from ..models.segmentor import Segmentor
from ..optional import require
from ..runtime import reference_kernels

EXPORT_PRECISIONS = ("fp32", "fp16")

__all__ = ["ExportError", "SegmentorForExport", "check_exportable", "export_metadata",
           "export_onnx", "export_precision", "export_predictor", "export_predictor_int8",
           "write_metadata"]


class ExportError(ValueError):
    """The model cannot be exported as asked."""


class SegmentorForExport(nn.Module):
    """A :class:`~denseclip.models.Segmentor` whose text features are constants.

    ``forward(images)`` returns the head's logits (B, K, H, W) at the input size, plus
    the open classes' score maps (B, K', H, W) when ``open_text`` is given. The results
    equal the segmentor's eval forward (and the predictor's score maps)."""

    def __init__(self, model: Segmentor, open_text: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        guidance = model.guidance
        if guidance is not None and guidance.prompting != "post":
            raise ExportError(
                "pre-model prompting computes text features from each image, so they "
                "cannot be baked in; only post-model prompting models can be exported"
            )
        if guidance is None and open_text is not None:
            raise ExportError("a model without text guidance has no score maps to export")
        text = None
        if guidance is not None:
            with torch.no_grad():
                text = guidance.encode(guidance.tokens, guidance.contexts).detach()
        self.register_buffer("text", text)
        self.register_buffer("open_text", None if open_text is None else open_text.detach())

    def forward(self, images: torch.Tensor):
        model = self.model
        dense = model.forward_features(images, text=self.text)
        logits = model.forward_head(dense.features, images.shape[-2:])
        if self.open_text is None:
            return logits
        return logits, model.forward_scores(dense, images.shape[-2:], text=self.open_text)


def export_precision(precision: str) -> str:
    """The stored precision of an ONNX file for a ``--precision`` choice (``auto`` and
    ``fp32`` → fp32, ``fp16`` → fp16); bf16 raises :class:`ExportError`."""
    if precision in ("auto", "fp32"):
        return "fp32"
    if precision == "fp16":
        return "fp16"
    if precision == "bf16":
        raise ExportError("ONNX Runtime implements few operators in bf16: export fp32 (and "
                          "let the runtime reduce precision) or fp16")
    raise ExportError(f"unknown precision {precision!r}; use fp32, fp16 or int8")


def export_onnx(model: Segmentor, path: str | Path, open_text: torch.Tensor | None = None,
                example_size: tuple[int, int] = (64, 96), opset: int = 17,
                metadata: dict[str, Any] | None = None, precision: str = "fp32") -> Path:
    """Export ``model`` (a segmentor) to ``path``; see the module documentation.

    ``open_text`` are the open classes' text embeddings (1, K', D) (e.g. from
    :class:`~denseclip.inference.Predictor`); ``metadata`` values are stored JSON-encoded in
    the model's ``metadata_props``. The graph is traced (TorchScript exporter) at
    ``example_size`` with dynamic batch, height and width, then checked with ``onnx``.
    ``precision`` is ``fp32`` or ``fp16`` (see :func:`export_precision`); an fp16 export
    converts a copy of the model, ``model`` itself is unchanged.
    """
    try:
        onnx = require("onnx", "ONNX export")
    except ImportError as e:
        raise ExportError(str(e)) from None
    if not isinstance(model, Segmentor):
        raise ExportError(f"only segmentation models can be exported, got {type(model).__name__}")
    stored = export_precision(precision)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if stored == "fp16" else torch.float32
    if stored == "fp16":
        model = copy.deepcopy(model).half()
        open_text = None if open_text is None else open_text.half()
    with reference_kernels():
        wrapper = SegmentorForExport(model, open_text).eval()
    device = next(model.parameters()).device
    example = torch.zeros(1, 3, *example_size, device=device, dtype=dtype)
    outputs = ["logits"] if open_text is None else ["logits", "open_scores"]
    axes = {"images": {0: "batch", 2: "height", 3: "width"}}
    axes.update({name: {0: "batch", 2: "height", 3: "width"} for name in outputs})
    with torch.no_grad(), reference_kernels(), warnings.catch_warnings():
        # The tracer warns about every Python-level shape check; the graph is verified
        # against PyTorch at other sizes in the tests instead.
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), str(path), input_names=["images"],
                          output_names=outputs, dynamic_axes=axes, opset_version=opset,
                          dynamo=False)
    proto = onnx.load(str(path))
    _set_class_dims(proto, [model.num_classes] + ([] if open_text is None
                                                  else [open_text.shape[1]]))
    write_metadata(proto, {**(metadata or {}), "precision": stored})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def write_metadata(proto, metadata: dict[str, Any]) -> None:
    """Store each value JSON-encoded in the ONNX model's ``metadata_props``."""
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)


def _set_class_dims(proto, sizes: list[int]) -> None:
    """Give each output's class axis its fixed size (``sizes``: K for ``logits``, K' for
    ``open_scores``). The tracer names it after the resize that made it, the same name for
    both outputs, which claims ``open_scores`` has as many channels as ``logits``. The
    batch, height and width keep the input's names: they are the input's."""
    for value, size in zip(proto.graph.output, sizes, strict=True):
        dim = value.type.tensor_type.shape.dim[1]
        dim.ClearField("dim_param")
        dim.dim_value = int(size)


def export_predictor(predictor: Predictor, path: str | Path, opset: int = 17,
                     precision: str = "fp32") -> Path:
    """Export a predictor's model and class lists (trained and open) to ONNX, stored in
    ``precision`` (see :func:`export_precision`)."""
    check_exportable(predictor)
    open_text = None
    if predictor.open_class_names:
        guidance = predictor.guidance
        if guidance.prompting != "post":
            raise ExportError("open-vocabulary export needs post-model prompting")
        open_text = predictor.open_text_embeddings()
    crop = [int(c) for c in predictor.cfg.evaluation.crop_size]
    return export_onnx(predictor.model, path, open_text, example_size=(crop[0], crop[1]),
                       opset=opset, metadata=export_metadata(predictor), precision=precision)


def check_exportable(predictor: Predictor) -> None:
    """Raise :class:`ExportError` unless the predictor holds a trained segmentor (the
    presets ONNX export supports)."""
    if not predictor.task_object.onnx_export:
        raise ExportError(f"ONNX export supports segmentation presets; {predictor.cfg.name} "
                          f"is a {predictor.task} model")
    if predictor.cfg.model.zeroshot:
        raise ExportError(f"{predictor.cfg.name} is a zero-shot preset: ONNX export supports "
                          f"the trained segmentors (DenseCLIP and its baselines)")


def export_metadata(predictor: Predictor) -> dict[str, Any]:
    """What an exported segmentor stores in its ONNX metadata: the config's name, the class
    lists, the normalisation (0..255 scale) and the test settings a runtime needs to
    preprocess an image and slide windows over it as :class:`Predictor` does."""
    cfg = predictor.cfg
    return {
        "config": cfg.name,
        "class_names": predictor.class_names,
        "open_class_names": predictor.open_class_names or [],
        "open_texts": predictor.open_texts or [],
        "mean_255": [255.0 * m for m in cfg.data.mean],
        "std_255": [255.0 * s for s in cfg.data.std],
        "test_scale": list(cfg.data.test_scale),
        "evaluation": {"mode": cfg.evaluation.mode, "crop_size": list(cfg.evaluation.crop_size),
                       "stride": list(cfg.evaluation.stride)},
        "align_corners": cfg.model.align_corners,
    }


def export_predictor_int8(predictor: Predictor, path: str | Path,
                          calibration: Calibration | None = None, opset: int = 17) -> Path:
    """Export a predictor's model (fp32, see :func:`export_predictor`) as an int8 QDQ graph
    quantised by ONNX Runtime (:func:`denseclip.inference.int8.quantize_onnx`), calibrated
    on ``calibration`` (default: the config's training split). Same inputs, outputs and
    metadata as the float file, with ``precision`` "int8"; the outputs stay float32."""
    calibration = calibration or Calibration()
    batches = list(calibration_batches(predictor.cfg,
                                       calibration_paths(predictor.cfg, calibration)))
    with tempfile.TemporaryDirectory(prefix="denseclip-export-") as tmp:
        float_graph = export_predictor(predictor, Path(tmp) / "fp32.onnx", opset, "fp32")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return quantize_onnx(float_graph, path, batches, {"precision": json.dumps("int8")})
