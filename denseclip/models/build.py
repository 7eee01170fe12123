"""Build models from a :class:`~denseclip.config.Config`; derived sizes are computed here."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..checkpoint import load_checkpoint
from ..classes import load_class_names
from ..config import CLIP_MEAN, CLIP_STD, Config, ConfigError, ModelConfig
from .backbones import build_backbone
from .detection import DETECTION_TASKS, CLIPMaskRCNN, CLIPRetinaNet
from .fpn import FPN
from .guidance import TextGuidance
from .registry import HEADS
from .segmentor import Segmentor, fused_channels
from .text_encoder import build_text_encoder
from .zeroshot import build_zeroshot_segmentor

__all__ = ["build_backbone", "build_detector", "build_guidance", "build_model", "build_segmentor"]

DEFAULT_HEAD = ModelConfig.head  # "semantic_fpn"; the detectors have their own heads


def build_guidance(cfg: ModelConfig, class_names: list[str]) -> TextGuidance:
    """The text encoder and guidance module for ``class_names``."""
    g, t = cfg.guidance, cfg.text
    return TextGuidance(build_text_encoder(t, cfg.backbone.embed_dim), class_names,
                        embed_dim=cfg.backbone.embed_dim, n_ctx=t.n_ctx, prompting=g.prompting,
                        decoder_width=g.decoder_width, decoder_heads=g.decoder_heads,
                        decoder_layers=g.decoder_layers, decoder_dropout=g.decoder_dropout,
                        gamma_init=g.gamma_init, tau=g.tau)


def _backbone_and_guidance(cfg: ModelConfig, levels: tuple[int, ...] = (0, 1, 2, 3)
                           ) -> tuple[list[str], nn.Module, TextGuidance | None]:
    """What every task model starts from: its class names, the CLIP backbone and, for
    DenseCLIP (``model.guidance.enabled``), the text guidance."""
    class_names = load_class_names(cfg.classes)
    guided = cfg.guidance.enabled
    if guided and not cfg.backbone.embeddings:
        raise ConfigError("model.guidance.enabled needs model.backbone.embeddings: true")
    backbone = build_backbone(cfg.backbone, levels=levels)
    return class_names, backbone, build_guidance(cfg, class_names) if guided else None


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
    """The ``cfg.task`` detector (``retinanet`` or ``mask_rcnn``) for ``cfg.classes``.

    ``options`` override keyword arguments of the detector classes (e.g. Mask R-CNN's
    ``rpn_batch_size_per_image``). The Mask R-CNN box-head width is 4 × ``cfg.head_channels``
    (1024 for the presets' 256)."""
    if cfg.task not in DETECTION_TASKS:
        raise ConfigError(f"model.task must be one of {DETECTION_TASKS}, got {cfg.task!r}")
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
    detector = CLIPRetinaNet if cfg.task == "retinanet" else CLIPMaskRCNN
    class_names, backbone, guidance = _backbone_and_guidance(cfg, detector.IN_LEVELS)
    common: dict[str, Any] = dict(
        score_level=cfg.guidance.score_level, neck_channels=cfg.neck_channels,
        min_size=det.min_size, max_size=det.max_size, size_divisor=det.size_divisor,
        score_thresh=det.score_thresh, detections_per_img=det.detections_per_img,
        seg_loss_weight=det.seg_loss_weight if det.seg_loss else 0.0, train_bn=det.train_bn,
    )
    common.update(image_mean=CLIP_MEAN, image_std=CLIP_STD)  # build_model passes data.mean
    common.update(options)
    try:
        if cfg.task == "retinanet":
            if cfg.head_channels != cfg.neck_channels:
                raise ConfigError("RetinaNet head convs keep the FPN width: set "
                                  "model.head_channels equal to model.neck_channels")
            return CLIPRetinaNet(backbone, len(class_names), guidance,
                                 focal_prior_init=det.focal_prior_init, **common)
        for name in ("rpn_pre_nms_top_n", "rpn_post_nms_top_n"):
            value = getattr(det, name)
            if len(value) != 2:
                raise ConfigError(f"model.detection.{name} must be [training, test], got {value}")
            common.setdefault(name, tuple(value))
        common.setdefault("box_batch_size_per_image", det.box_batch_size_per_image)
        common.setdefault("representation_size", 4 * cfg.head_channels)
        return CLIPMaskRCNN(backbone, len(class_names), guidance,
                            head_channels=cfg.head_channels, **common)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"model: {e}") from None


def build_model(cfg: Config) -> nn.Module:
    """Build the model described by ``cfg.model`` (and load ``model.pretrained`` if set)."""
    # model.task is one of the choices of config.Task (checked when the config loads)
    if cfg.model.zeroshot:
        model = build_zeroshot_segmentor(cfg.model)
    elif cfg.model.task == "segmentation":
        model = build_segmentor(cfg.model)
    else:
        # the detector normalises its uint8 input itself, with the data config's statistics
        model = build_detector(cfg.model, image_mean=tuple(cfg.data.mean),
                               image_std=tuple(cfg.data.std))
    if cfg.model.pretrained:
        load_checkpoint(model, cfg.model.pretrained)
    model.config = cfg  # what save_pretrained writes next to the weights
    return model
