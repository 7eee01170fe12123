"""Build models from a :class:`~denseclip.config.Config`; derived sizes are computed here."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..checkpoint import load_checkpoint
from ..classes import load_class_names
from ..config import CLIP_MEAN, CLIP_STD, BackboneConfig, Config, ConfigError, ModelConfig
from .clip_resnet import CLIPResNet
from .clip_vit import CLIPViT
from .detection import DETECTION_TASKS, CLIPMaskRCNN, CLIPRetinaNet
from .guidance import TextGuidance
from .imagenet import ImageNetBackbone, TimmBody, torchvision_body
from .segmentor import Segmentor
from .text_encoder import CLIPTextEncoder
from .zeroshot import build_zeroshot_segmentor


def build_backbone(cfg: BackboneConfig, embeddings: bool | None = None,
                   levels: tuple[int, ...] = (0, 1, 2, 3)) -> nn.Module:
    """The visual backbone exposing ``out_channels`` and ``embed_dim``: a CLIP tower, or an
    ImageNet pyramid (torchvision / timm) under a new attention pool. ``levels`` are the
    pyramid levels the model reads (a CLIP ViT builds only those; the others compute every
    stage on the way to the last anyway)."""
    embeddings = cfg.embeddings if embeddings is None else embeddings
    if cfg.type == "resnet":
        if len(cfg.layers) != 4:
            raise ConfigError(f"model.backbone.layers: a ResNet needs 4 stages, got {cfg.layers}")
        return CLIPResNet(cfg.layers, cfg.width, cfg.heads, cfg.embed_dim,
                          cfg.input_resolution, embeddings, cfg.pos_embed)
    if cfg.type == "vit":
        if len(cfg.layers) != 1:
            raise ConfigError(f"model.backbone.layers: a ViT takes [depth], got {cfg.layers}")
        return CLIPViT(cfg.width, cfg.layers[0], cfg.heads, cfg.patch_size, cfg.embed_dim,
                       cfg.input_resolution, cfg.out_indices, cfg.drop_path_rate, embeddings,
                       cfg.class_embedding_quirk, cfg.pos_embed, cfg.drop_path_mode, levels,
                       cfg.act)
    if cfg.type in ("torchvision", "timm"):
        if not cfg.name:
            raise ConfigError(f"model.backbone.name: a {cfg.type} backbone needs the model's "
                              f"name (e.g. resnet50, swin_t)")
        body = (torchvision_body(cfg.name, cfg.kwargs, levels) if cfg.type == "torchvision"
                else TimmBody(cfg.name, cfg.kwargs, cfg.feature_indices))
        return ImageNetBackbone(body, cfg.embed_dim, cfg.heads, cfg.input_resolution,
                                embeddings, cfg.pos_embed)
    raise ConfigError(f"model.backbone.type must be one of resnet, vit, torchvision, timm; "
                      f"got {cfg.type!r}")


def build_guidance(cfg: ModelConfig, class_names: list[str]) -> TextGuidance:
    """The text encoder and guidance module for ``class_names``."""
    g, t = cfg.guidance, cfg.text
    text_encoder = CLIPTextEncoder(t.context_length, t.vocab_size, t.width, t.layers, t.heads,
                                   cfg.backbone.embed_dim, t.act)
    return TextGuidance(text_encoder, class_names, cfg.backbone.embed_dim, t.n_ctx, g.prompting,
                        g.decoder_width, g.decoder_heads, g.decoder_layers, g.decoder_dropout,
                        g.gamma_init, g.tau)


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
    """The Semantic FPN segmentor (DenseCLIP, or the plain CLIP baseline) of ``cfg``."""
    if not 0 <= cfg.guidance.score_level < 4:
        raise ConfigError(
            f"model.guidance.score_level must be 0..3, got {cfg.guidance.score_level}"
        )
    class_names, backbone, guidance = _backbone_and_guidance(cfg)
    return Segmentor(backbone, len(class_names), guidance, cfg.guidance.score_level,
                     cfg.neck_channels, cfg.head_channels, cfg.head_dropout, cfg.ignore_index,
                     cfg.loss_average, cfg.guidance.aux_loss_weight, cfg.align_corners)


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
