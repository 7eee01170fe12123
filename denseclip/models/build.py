"""Build models from a :class:`~denseclip.config.Config`; derived sizes are computed here."""

from __future__ import annotations

from torch import nn

from ..classes import load_class_names
from ..config import BackboneConfig, Config, ConfigError, ModelConfig
from .clip_resnet import CLIPResNet
from .clip_vit import CLIPViT
from .guidance import TextGuidance
from .segmentor import Segmentor
from .text_encoder import CLIPTextEncoder


def build_backbone(cfg: BackboneConfig, embeddings: bool | None = None) -> nn.Module:
    """A CLIP visual tower exposing ``out_channels`` and ``embed_dim``."""
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
                       cfg.class_embedding_quirk, cfg.pos_embed)
    raise ConfigError(f"model.backbone.type must be 'resnet' or 'vit', got {cfg.type!r}")


def build_guidance(cfg: ModelConfig, class_names: list[str]) -> TextGuidance:
    """The text encoder and guidance module for ``class_names``."""
    g, t = cfg.guidance, cfg.text
    text_encoder = CLIPTextEncoder(t.context_length, t.vocab_size, t.width, t.layers, t.heads,
                                   cfg.backbone.embed_dim)
    return TextGuidance(text_encoder, class_names, cfg.backbone.embed_dim, t.n_ctx, g.prompting,
                        g.decoder_width, g.decoder_heads, g.decoder_layers, g.decoder_dropout,
                        g.gamma_init, g.tau)


def build_segmentor(cfg: ModelConfig) -> Segmentor:
    class_names = load_class_names(cfg.classes)
    guided = cfg.guidance.enabled
    if guided and not cfg.backbone.embeddings:
        raise ConfigError("model.guidance.enabled needs model.backbone.embeddings: true")
    if not 0 <= cfg.guidance.score_level < 4:
        raise ConfigError(
            f"model.guidance.score_level must be 0..3, got {cfg.guidance.score_level}"
        )
    if cfg.loss_average not in ("all", "valid"):
        raise ConfigError(f"model.loss_average must be 'all' or 'valid', got {cfg.loss_average!r}")
    if cfg.backbone.pos_embed not in ("interpolate", "crop"):
        raise ConfigError(
            f"model.backbone.pos_embed must be 'interpolate' or 'crop', "
            f"got {cfg.backbone.pos_embed!r}"
        )
    backbone = build_backbone(cfg.backbone)
    guidance = build_guidance(cfg, class_names) if guided else None
    return Segmentor(backbone, len(class_names), guidance, cfg.guidance.score_level,
                     cfg.neck_channels, cfg.head_channels, cfg.head_dropout, cfg.ignore_index,
                     cfg.loss_average, cfg.guidance.aux_loss_weight)


def build_model(cfg: Config) -> nn.Module:
    """Build the model described by ``cfg.model`` (and load ``model.pretrained`` if set)."""
    if cfg.model.task == "segmentation":
        model = build_segmentor(cfg.model)
    elif cfg.model.task in ("retinanet", "mask_rcnn"):
        from .detection import build_detector  # imported here: it builds on this module

        model = build_detector(cfg.model)
    else:
        raise ConfigError(f"model.task {cfg.model.task!r} is not supported (segmentation)")
    if cfg.model.pretrained:
        from ..checkpoint import load_checkpoint

        load_checkpoint(model, cfg.model.pretrained)
    return model
