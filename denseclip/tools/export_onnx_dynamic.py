"""ONNX export with the vocabulary as an input, and of the text encoder alone.

:func:`export_dynamic_classes` writes an image model with two inputs, the normalised image
batch ``images`` (B, 3, H, W) (as in :mod:`denseclip.tools.export`) and
``class_embeddings`` (K, D) float32, the text encoder's embeddings of K class texts behind
the learned contexts (:func:`denseclip.inference.embed_classes`, ``denseclip
embed-classes``). Its outputs are the head's ``logits`` (B, K_trained, H, W) and the
score maps ``open_scores`` (B, K, H, W) of the given classes, upsampled bilinearly to the
input: the same quantities as ``Predictor(..., classes=...)`` computes per window. K is a
dynamic axis (``classes``), so one file serves any class list. The context decoder, which
refines the embeddings against each image, is inside the graph; the text encoder is not
(the trained classes' embeddings, which the neck needs, are constants).

:func:`export_text_encoder` writes the text encoder alone, the learned contexts baked in:
input ``tokens`` (K, L) int64, output ``class_embeddings`` (K, D), for deployments that
name new classes at run time. ``tokens`` are CLIP BPE ids: the start token 49406, the
text's BPE tokens, the end token 49407, zero padding to L (the metadata's
``token_length``: ``text.context_length - text.n_ctx``). ``open_clip.tokenize(texts,
context_length=L)`` produces exactly these for texts that fit (it truncates longer ones,
which the model refuses). A model with ``model.text.templates`` (the metadata's
``templates``, T of them) takes the T prompts of each class in a row (``template.format(
text)`` for each template) and returns one ensembled embedding per class.

Only post-model prompting has image-independent text embeddings: pre-model prompting
models, models without text guidance and non-segmentation presets raise
:class:`~denseclip.tools.export.ExportError`.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..inference import Predictor
from ..models.guidance import TextGuidance
from ..models.segmentor import Segmentor
from ..optional import require
from ..runtime import reference_kernels
from .export import (
    ExportError,
    SegmentorForExport,
    check_exportable,
    export_metadata,
    export_precision,
    write_metadata,
)

__all__ = ["SegmentorWithClassInput", "TextEncoderForExport", "export_dynamic_classes",
           "export_text_encoder", "post_model_guidance"]

CLASS_AXIS = "classes"


def post_model_guidance(predictor: Predictor) -> TextGuidance:
    """The predictor's text guidance if its text embeddings are image-independent (a
    trained segmentor with post-model prompting); otherwise :class:`ExportError`."""
    check_exportable(predictor)
    guidance = predictor.guidance
    if guidance is None:
        raise ExportError(f"{predictor.cfg.name} has no text guidance, so it has no class "
                          f"embeddings to take as an input")
    if guidance.prompting != "post":
        raise ExportError(f"{predictor.cfg.name} uses pre-model prompting: its text features "
                          f"depend on each image, so the classes cannot be an input; only "
                          f"post-model prompting models can be exported this way")
    return guidance


class SegmentorWithClassInput(SegmentorForExport):
    """A segmentor whose open-vocabulary text embeddings are an input.

    ``forward(images, class_embeddings)`` with ``class_embeddings`` (K, D) returns the
    head's logits (B, K_trained, H, W) and the score maps (B, K, H, W) of those
    embeddings at the input size, as the segmentor's ``window_logits`` with open texts
    whose embeddings they are. The trained classes' embeddings are constants."""

    def __init__(self, model: Segmentor) -> None:
        if model.guidance is None or model.guidance.prompting != "post":
            raise ExportError("the classes can be an input only with post-model prompting")
        super().__init__(model)

    def forward(self, images: torch.Tensor, class_embeddings: torch.Tensor):  # type: ignore[override]
        model = self.model
        size = images.shape[-2:]
        dense = model.forward_features(images, text=self.text)
        logits = model.forward_head(dense.features, size)
        text = class_embeddings.to(self.text.dtype)[None]  # (1, K, D), as guidance.embed
        return logits, model.forward_scores(dense, size, text=text)


class TextEncoderForExport(nn.Module):
    """The text encoder behind the learned contexts: ``forward(tokens)`` (K·T, L) → (K, D),
    what :meth:`TextGuidance.embed` computes for those tokens (T = the number of
    ``model.text.templates``, 1 without: the prompts of one class consecutive, as
    :meth:`TextGuidance.prompts` orders them, ensembled in the graph)."""

    def __init__(self, guidance: TextGuidance) -> None:
        super().__init__()
        self.guidance = guidance

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.guidance.encode(tokens, self.guidance.contexts)[0]


def _save(onnx, proto, path: Path, metadata: dict[str, Any]) -> Path:
    write_metadata(proto, metadata)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def _trace(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
           axes: dict, opset: int) -> None:
    with torch.no_grad(), reference_kernels(), warnings.catch_warnings():
        # The tracer warns about every Python-level shape check; the tests run the graph
        # at other sizes and class counts than the example.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)


def export_dynamic_classes(predictor: Predictor, path: str | Path, opset: int = 17,
                           precision: str = "fp32") -> Path:
    """Export the predictor's segmentor with ``class_embeddings`` as an input (see the
    module documentation), stored in ``precision`` (``fp32`` or ``fp16``; the embeddings
    stay a float32 input). The metadata is :func:`~denseclip.tools.export.export_metadata`'s
    plus ``dynamic_classes`` (true), ``class_embedding_dim`` (D), ``token_length`` and
    ``precision``."""
    try:
        onnx = require("onnx", "ONNX export")
    except ImportError as e:
        raise ExportError(str(e)) from None
    guidance = post_model_guidance(predictor)
    stored = export_precision(precision)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = predictor.model
    dtype = torch.float16 if stored == "fp16" else torch.float32
    if stored == "fp16":
        model = copy.deepcopy(model).half()
    with reference_kernels():
        wrapper = SegmentorWithClassInput(model).eval()
    device = next(model.parameters()).device
    crop = [int(c) for c in predictor.cfg.evaluation.crop_size]
    dim = int(guidance.text_encoder.embed_dim)
    images = torch.zeros(1, 3, *crop, device=device, dtype=dtype)
    # 3 example classes: a size no other axis has, so none is mistaken for another
    embeddings = torch.randn(3, dim, device=device)
    image_axes = {0: "batch", 2: "height", 3: "width"}
    axes = {"images": image_axes, "class_embeddings": {0: CLASS_AXIS}, "logits": image_axes,
            "open_scores": {**image_axes, 1: CLASS_AXIS}}
    _trace(wrapper, (images, embeddings), path, ["images", "class_embeddings"],
           ["logits", "open_scores"], axes, opset)
    proto = onnx.load(str(path))
    for value in proto.graph.output:  # the tracer's names for the class axes are its own
        channel = value.type.tensor_type.shape.dim[1]
        channel.ClearField("dim_param")
        if value.name == "logits":
            channel.dim_value = int(model.num_classes)
        else:
            channel.dim_param = CLASS_AXIS
    metadata = {**export_metadata(predictor), "open_class_names": [], "open_texts": [],
                "dynamic_classes": True, "class_embedding_dim": dim,
                "token_length": int(guidance.text_length), "precision": stored}
    return _save(onnx, proto, path, metadata)


def export_text_encoder(predictor: Predictor, path: str | Path, opset: int = 17) -> Path:
    """Export the predictor's text encoder with its learned contexts (fp32): ``tokens``
    (K, L) int64 → ``class_embeddings`` (K, D), see the module documentation. The metadata
    stores ``token_length`` (L), ``sot_token``, ``eot_token``, ``class_embedding_dim`` and
    the config's name."""
    try:
        onnx = require("onnx", "ONNX export")
    except ImportError as e:
        raise ExportError(str(e)) from None
    guidance = post_model_guidance(predictor)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = guidance.tokenize(["a", "b c", "d"])  # (3·T, L): the prompts; any texts do
    wrapper = TextEncoderForExport(guidance).eval()
    _trace(wrapper, (tokens,), path, ["tokens"], ["class_embeddings"],
           {"tokens": {0: CLASS_AXIS}, "class_embeddings": {0: CLASS_AXIS}}, opset)
    proto = onnx.load(str(path))
    length = int(guidance.text_length)
    metadata = {"config": predictor.cfg.name, "token_length": length,
                "sot_token": int(tokens[0, 0]), "eot_token": int(tokens[0].max()),
                "class_embedding_dim": int(guidance.text_encoder.embed_dim),
                "tokenizer": "CLIP BPE (open_clip.tokenize(texts, context_length="
                             f"{length}))",
                "templates": list(guidance.templates),
                "precision": "fp32"}
    return _save(onnx, proto, path, metadata)
