"""Build the models of each task from a :class:`~denseclip.config.ModelConfig`; derived sizes
are computed here. Which builder a config needs is its task's choice
(:func:`denseclip.tasks.build_model`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..classes import ClassListError, load_classes
from ..config import CLIP_MEAN, CLIP_STD, ConfigError, ModelConfig
from .backbones import build_backbone
from .detection import DETECTORS
from .fpn import FPN
from .guidance import TextGuidance
from .registry import HEADS
from .segmentor import Segmentor, fused_channels
from .text_encoder import build_text_encoder, token_positions

__all__ = ["CLIP_CONTEXT_LENGTH", "build_backbone", "build_detector", "build_guidance",
           "build_segmentor", "fit_text_context"]

DEFAULT_HEAD = ModelConfig.head  # "semantic_fpn"; the detectors have their own heads
#: Positions of CLIP's text position embedding: the most a text context can grow to.
CLIP_CONTEXT_LENGTH = 77

_log = logging.getLogger(__name__)


def _model_classes(cfg: ModelConfig) -> dict[str, str]:
    """``{name: text}`` of ``model.classes``; an unreadable class file is a ConfigError."""
    try:
        return load_classes(cfg.classes)
    except (OSError, ClassListError) as e:
        raise ConfigError(f"model.classes: {e}", "model.classes") from None


def fit_text_context(cfg: ModelConfig, classes: Mapping[str, str] | None = None) -> int:
    """Grow ``cfg.text.context_length`` (in place) when a class text of ``classes``
    (default: ``model.classes``), put into each of ``model.text.templates``, needs more
    positions than the context leaves after the ``n_ctx`` contexts; one log line says so.
    The length never shrinks, so the official 13 stays whenever the texts fit, and a
    saved config (which records the grown length) builds the same model again. Returns
    the context length. Without text guidance, or for the zero-shot segmentor, nothing
    changes."""
    t = cfg.text
    if not cfg.guidance.enabled or cfg.zeroshot:
        return t.context_length
    classes = _model_classes(cfg) if classes is None else classes
    templates = t.templates or ["{}"]
    need, name, prompt = max((token_positions(template.format(text)), name,
                              template.format(text))
                             for name, text in classes.items() for template in templates)
    length = need + t.n_ctx
    if length <= t.context_length:
        return t.context_length
    if length > CLIP_CONTEXT_LENGTH:
        raise ConfigError(
            f"model.classes: class {name!r} ({prompt!r}) needs {need - 2} BPE tokens; with "
            f"model.text.n_ctx={t.n_ctx} contexts the text context holds at most "
            f"{CLIP_CONTEXT_LENGTH - t.n_ctx - 2} (CLIP has {CLIP_CONTEXT_LENGTH} positions)",
            "model.classes")
    _log.warning("model.text.context_length %d -> %d to fit class %r (%r: %d BPE tokens + "
                 "SOT/EOT + %d contexts)", t.context_length, length, name, prompt, need - 2,
                 t.n_ctx)
    t.context_length = length
    return length


def build_guidance(cfg: ModelConfig,
                   classes: list[str] | Mapping[str, str]) -> TextGuidance:
    """The text encoder and guidance module for ``classes`` (names, or ``{name: text to
    embed}``); ``model.text.context_length`` grows first when a text needs it
    (:func:`fit_text_context`)."""
    g, t = cfg.guidance, cfg.text
    fit_text_context(cfg, classes if isinstance(classes, Mapping)
                     else {str(n): str(n) for n in classes})
    return TextGuidance(build_text_encoder(t, cfg.backbone.embed_dim), classes,
                        embed_dim=cfg.backbone.embed_dim, n_ctx=t.n_ctx, prompting=g.prompting,
                        decoder_width=g.decoder_width, decoder_heads=g.decoder_heads,
                        decoder_layers=g.decoder_layers, decoder_dropout=g.decoder_dropout,
                        gamma_init=g.gamma_init, tau=g.tau, templates=t.templates)


def _backbone_and_guidance(cfg: ModelConfig, levels: tuple[int, ...] = (0, 1, 2, 3)
                           ) -> tuple[list[str], nn.Module, TextGuidance | None]:
    """What every task model starts from: its class names, the CLIP backbone and, for
    DenseCLIP (``model.guidance.enabled``), the text guidance of the class texts."""
    classes = load_classes(cfg.classes)
    guided = cfg.guidance.enabled
    if guided and not cfg.backbone.embeddings:
        raise ConfigError("model.guidance.enabled needs model.backbone.embeddings: true")
    backbone = build_backbone(cfg.backbone, levels=levels)
    return list(classes), backbone, build_guidance(cfg, classes) if guided else None


def build_segmentor(cfg: ModelConfig) -> Segmentor:
    """The segmentor (DenseCLIP, or the plain CLIP baseline) of ``cfg``: its backbone
    (``model.backbone.type``), an FPN and the head ``model.head`` (Semantic FPN by default)."""
    if not 0 <= cfg.guidance.score_level < 4:
        raise ConfigError(
            f"model.guidance.score_level must be 0..3, got {cfg.guidance.score_level}"
        )
    head_builder = HEADS.get(cfg.head)  # an unknown name fails before anything is built
    class_names, backbone, guidance = _backbone_and_guidance(cfg)
    num_classes, level = len(class_names), cfg.guidance.score_level
    neck = FPN(fused_channels(backbone, num_classes, guidance is not None, level),
               cfg.neck_channels)
    head = head_builder(cfg.neck_channels, cfg.head_channels, num_classes,
                        dropout=cfg.head_dropout, align_corners=cfg.align_corners)
    return Segmentor(backbone, num_classes, guidance=guidance, score_level=level, neck=neck,
                     head=head, ignore_index=cfg.ignore_index, loss_average=cfg.loss_average,
                     aux_loss_weight=cfg.guidance.aux_loss_weight,
                     align_corners=cfg.align_corners)


def build_detector(cfg: ModelConfig, **options: Any) -> nn.Module:
    """The detector of ``cfg.task`` (``retinanet`` or ``mask_rcnn``, see
    :data:`~.detection.DETECTORS`) for ``cfg.classes``.

    ``options`` override keyword arguments of the detector classes (e.g. Mask R-CNN's
    ``rpn_batch_size_per_image``). The Mask R-CNN box-head width is 4 × ``cfg.head_channels``
    (1024 for the presets' 256)."""
    detector = DETECTORS.get(cfg.task)
    if detector is None:
        raise ConfigError(f"model.task must be one of {tuple(DETECTORS)}, got {cfg.task!r}")
    if cfg.backbone.type == "vit" and cfg.backbone.pos_embed != "interpolate":
        raise ConfigError("a ViT detector needs model.backbone.pos_embed=interpolate: its "
                          "patch grid follows each (non-square) input size")
    if cfg.head != DEFAULT_HEAD:
        raise ConfigError(f"model.head: {cfg.head!r} is a segmentation head; a {cfg.task} "
                          f"detector has its own heads (leave model.head at {DEFAULT_HEAD!r})")
    det = cfg.detection
    if det.seg_loss and not cfg.guidance.enabled:
        raise ConfigError("model.detection.seg_loss needs text guidance "
                          "(model.guidance.enabled: true); turn it off for CLIP baselines")
    class_names, backbone, guidance = _backbone_and_guidance(cfg, detector.IN_LEVELS)
    kwargs: dict[str, Any] = dict(
        score_level=cfg.guidance.score_level, neck_channels=cfg.neck_channels,
        min_size=det.min_size, max_size=det.max_size, size_divisor=det.size_divisor,
        score_thresh=det.score_thresh, detections_per_img=det.detections_per_img,
        seg_loss_weight=det.seg_loss_weight if det.seg_loss else 0.0, train_bn=det.train_bn,
    )
    kwargs.update(image_mean=CLIP_MEAN, image_std=CLIP_STD)  # build_model passes data.mean
    kwargs.update(detector.config_options(cfg))
    kwargs.update(options)
    try:
        return detector(backbone, len(class_names), guidance, **kwargs)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"model: {e}") from None

