"""The built-in backbones (``model.backbone.type``: ``resnet``, ``vit``, ``torchvision``,
``timm``), registered in :data:`~.registry.BACKBONES`, and :func:`build_backbone`."""

from __future__ import annotations

from torch import nn

from ..config import BackboneConfig, ConfigError
from .clip_resnet import CLIPResNet
from .clip_vit import CLIPViT
from .imagenet import ImageNetBackbone, TimmBody, torchvision_body
from .registry import BACKBONES, Backbone, Registry, register_backbone

__all__ = ["build_backbone", "resnet_layers", "vit_depth"]

ALL_LEVELS = (0, 1, 2, 3)


def resnet_layers(cfg: BackboneConfig) -> list[int]:
    """``model.backbone.layers`` of a CLIP ResNet: blocks in each of its 4 stages."""
    if len(cfg.layers) != 4:
        raise ConfigError(f"model.backbone.layers: a ResNet needs 4 stages, got {cfg.layers}")
    return list(cfg.layers)


def vit_depth(cfg: BackboneConfig) -> int:
    """The depth of a CLIP ViT: ``model.backbone.layers`` is ``[depth]``."""
    if len(cfg.layers) != 1:
        raise ConfigError(f"model.backbone.layers: a ViT takes [depth], got {cfg.layers}")
    return cfg.layers[0]


@register_backbone("resnet")
def _clip_resnet(cfg: BackboneConfig, *, embeddings: bool,
                 levels: tuple[int, ...] = ALL_LEVELS) -> CLIPResNet:
    """CLIP's ModifiedResNet (every stage runs on the way to the last: ``levels`` unused)."""
    return CLIPResNet(resnet_layers(cfg), width=cfg.width, heads=cfg.heads,
                      embed_dim=cfg.embed_dim, input_resolution=cfg.input_resolution,
                      embeddings=embeddings, pos_embed=cfg.pos_embed)


@register_backbone("vit")
def _clip_vit(cfg: BackboneConfig, *, embeddings: bool,
              levels: tuple[int, ...] = ALL_LEVELS) -> CLIPViT:
    """CLIP's ViT with the pyramid modules of ``levels`` only."""
    return CLIPViT(width=cfg.width, layers=vit_depth(cfg), heads=cfg.heads,
                   patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                   input_resolution=cfg.input_resolution, out_indices=cfg.out_indices,
                   drop_path_rate=cfg.drop_path_rate, embeddings=embeddings,
                   class_embedding_quirk=not cfg.cls_embed_once, pos_embed=cfg.pos_embed,
                   drop_path_mode=cfg.drop_path_mode, levels=levels, act=cfg.act)


def _imagenet(cfg: BackboneConfig, body: nn.Module, embeddings: bool) -> ImageNetBackbone:
    return ImageNetBackbone(body, embed_dim=cfg.embed_dim, heads=cfg.heads,
                            input_resolution=cfg.input_resolution, embeddings=embeddings,
                            pos_embed=cfg.pos_embed)


def _model_name(cfg: BackboneConfig) -> str:
    if not cfg.name:
        raise ConfigError(f"model.backbone.name: a {cfg.type} backbone needs the model's "
                          f"name (e.g. resnet50, swin_t)")
    return cfg.name


@register_backbone("torchvision")
def _torchvision(cfg: BackboneConfig, *, embeddings: bool,
                 levels: tuple[int, ...] = ALL_LEVELS) -> ImageNetBackbone:
    """A torchvision ResNet or Swin pyramid under a new attention pool."""
    return _imagenet(cfg, torchvision_body(_model_name(cfg), cfg.kwargs, levels), embeddings)


@register_backbone("timm")
def _timm(cfg: BackboneConfig, *, embeddings: bool,
          levels: tuple[int, ...] = ALL_LEVELS) -> ImageNetBackbone:
    """A timm ``features_only`` pyramid under a new attention pool."""
    body = TimmBody(_model_name(cfg), cfg.kwargs, cfg.feature_indices)
    return _imagenet(cfg, body, embeddings)


def build_backbone(cfg: BackboneConfig, embeddings: bool | None = None,
                   levels: tuple[int, ...] = ALL_LEVELS, *,
                   registry: Registry = BACKBONES) -> nn.Module:
    """The visual backbone registered as ``cfg.type`` (see :mod:`.registry`), exposing
    ``out_channels`` and ``embed_dim`` (:class:`~.registry.Backbone`). ``embeddings``
    defaults to ``cfg.embeddings``; ``levels`` are the pyramid levels the model reads (a
    CLIP ViT builds only those; the others compute every stage on the way to the last
    anyway). ``registry`` picks another family of builders under the same config key (the
    zero-shot towers)."""
    builder = registry.get(cfg.type)
    embeddings = cfg.embeddings if embeddings is None else embeddings
    backbone = builder(cfg, embeddings=embeddings, levels=tuple(levels))
    if not isinstance(backbone, nn.Module) or not isinstance(backbone, Backbone):
        raise ConfigError(f"model.backbone.type: the {registry.kind} builder {cfg.type!r} "
                          f"returned a {type(backbone).__name__}, not an nn.Module with "
                          f"out_channels and embed_dim (denseclip.models.Backbone)")
    if registry is BACKBONES and len(backbone.out_channels) != 4:
        raise ConfigError(f"model.backbone.type: backbone {cfg.type!r} has "
                          f"{len(backbone.out_channels)} levels (out_channels "
                          f"{list(backbone.out_channels)}); the dense heads read 4, at "
                          f"strides 4, 8, 16 and 32")
    return backbone
