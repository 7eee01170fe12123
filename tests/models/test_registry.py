"""Backbones and heads registered from outside the package: built from a config, trained one
real step; unknown names and broken builders are reported clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import denseclip
from denseclip.config import BackboneConfig
from denseclip.engine.optim import build_optimizer
from denseclip.models import (
    BACKBONES,
    HEADS,
    Backbone,
    Segmentor,
    build_backbone,
    register_backbone,
    register_head,
)

TOY = ["model.backbone.type=toy", "model.head=toy"]


class ToyBackbone(nn.Module):
    """Four strided convs (strides 4, 8, 16, 32) and, for text guidance, global and dense
    embeddings from 1x1 projections of the last map, as the Backbone protocol asks."""

    # an official checkpoint's "stem.*" keys are this module's "convs.0.*"
    official_renames = [(r"^stem\.", "convs.0.")]

    def __init__(self, widths=(8, 16, 24, 32), embed_dim: int = 32,
                 embeddings: bool = True) -> None:
        super().__init__()
        ins = (3, *widths[:-1])
        strides = (4, 2, 2, 2)
        self.convs = nn.ModuleList(nn.Conv2d(i, o, s, stride=s)
                                   for i, o, s in zip(ins, widths, strides, strict=True))
        self.out_channels = list(widths)
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(widths[-1], embed_dim, 1) if embeddings else None

    def forward(self, images: torch.Tensor):
        features, x = [], images
        for conv in self.convs:
            x = F.relu(conv(x))
            features.append(x)
        if self.proj is None:
            return features, None
        dense = self.proj(x)
        return features, (dense.mean(dim=(2, 3)), dense)


class ToyHead(nn.Module):
    """Neck levels resized to the finest one, summed, and a 1x1 classifier (stride 4)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, *,
                 dropout: float = 0.0, align_corners: bool = False) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, channels, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.classify = nn.Conv2d(channels, num_classes, 1)
        self.align_corners = align_corners

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        x = sum(F.interpolate(self.reduce(f), size=size, mode="bilinear",
                              align_corners=self.align_corners) for f in features)
        return self.classify(self.dropout(x))


@pytest.fixture
def toys():
    """Register the toy backbone and head for one test; unregister afterwards."""
    calls = []

    @register_backbone("toy")
    def build_toy(cfg: BackboneConfig, *, embeddings: bool, levels: tuple[int, ...]):
        calls.append(("backbone", embeddings, levels))
        return ToyBackbone(embed_dim=cfg.embed_dim, embeddings=embeddings)

    @register_head("toy")
    def build_toy_head(in_channels, channels, num_classes, *, dropout, align_corners):
        calls.append(("head", in_channels, channels, num_classes))
        return ToyHead(in_channels, channels, num_classes, dropout=dropout,
                       align_corners=align_corners)

    yield calls
    BACKBONES.unregister("toy")
    HEADS.unregister("toy")


def test_a_registered_backbone_and_head_train_one_step(toys):
    cfg = denseclip.load_config("tiny_denseclip_res", TOY)
    torch.manual_seed(0)
    model = denseclip.build_model(cfg)
    assert isinstance(model, Segmentor)
    assert isinstance(model.backbone, ToyBackbone) and isinstance(model.head, ToyHead)
    assert isinstance(model.backbone, Backbone)
    K = model.num_classes  # 150 ADE20K classes; the neck is model.neck_channels wide
    assert toys == [("backbone", True, (0, 1, 2, 3)), ("head", 32, 32, K)]
    # the score map joins level 3 (stride 32), where the toy's dense embeddings live
    assert model.neck.lateral_convs[3].in_channels == 32 + K
    # the backbone's own official rules come first, under "backbone."
    assert model.official_renames[0] == (r"^backbone\.stem\.", "backbone.convs.0.")

    toy_params = {f"backbone.{n}": p for n, p in model.backbone.named_parameters()}
    toy_params.update({f"head.{n}": p for n, p in model.head.named_parameters()})
    before = {n: p.detach().clone() for n, p in toy_params.items()}
    optimizer = build_optimizer(model, cfg.optim)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=g)
    targets = torch.randint(0, K, (2, 64, 64), generator=g)
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_seg", "loss_aux"}
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    unchanged = [n for n, p in toy_params.items() if torch.equal(p.detach(), before[n])]
    assert unchanged == []

    model.eval()
    with torch.no_grad():
        logits = model(images[:1])
    assert logits.shape == (1, K, 64, 64)


def test_the_toy_backbone_serves_the_plain_baseline_too(toys):
    cfg = denseclip.load_config("tiny_clip_res", ["model.backbone.type=toy"])
    model = denseclip.build_model(cfg)
    assert model.guidance is None and model.backbone.proj is None
    assert toys[0] == ("backbone", False, (0, 1, 2, 3))
    assert model.neck.lateral_convs[3].in_channels == 32  # nothing fused


def test_unknown_backbone_and_head_name_the_key_and_the_registered_names():
    cfg = denseclip.load_config("tiny_denseclip_res", ["model.backbone.type=x"])
    with pytest.raises(denseclip.ConfigError) as info:
        denseclip.build_model(cfg)
    assert str(info.value) == ("model.backbone.type: unknown backbone 'x'; registered: "
                               "resnet, vit, torchvision, timm")
    cfg = denseclip.load_config("tiny_denseclip_res", ["model.head=fcn"])
    with pytest.raises(denseclip.ConfigError) as info:
        denseclip.build_model(cfg)
    assert str(info.value) == "model.head: unknown head 'fcn'; registered: semantic_fpn"


def test_a_segmentation_head_is_refused_by_the_detectors_and_the_zero_shot_model(toys):
    for preset in ("tiny_retinanet_clip", "clip_zeroshot_rn50"):
        cfg = denseclip.load_config(preset, ["model.head=toy"])
        with pytest.raises(denseclip.ConfigError, match="model.head: "):
            denseclip.build_model(cfg)


def test_the_zero_shot_model_lists_its_own_towers(toys):
    cfg = denseclip.load_config("clip_zeroshot_rn50", ["model.backbone.type=toy"])
    with pytest.raises(denseclip.ConfigError) as info:
        denseclip.build_model(cfg)
    assert str(info.value).startswith("model.backbone.type: unknown zero-shot backbone 'toy'; "
                                      "registered: resnet, vit (")


def test_taken_names_and_broken_builders_are_refused(toys):
    with pytest.raises(ValueError, match="a backbone named 'toy' is already registered"):
        register_backbone("toy")(lambda cfg, **kw: ToyBackbone())
    with pytest.raises(ValueError, match="a head named 'semantic_fpn' is already registered"):
        register_head("semantic_fpn")(ToyHead)

    @register_backbone("toy", replace=True)
    def not_a_backbone(cfg, *, embeddings, levels):
        return nn.Linear(2, 2)  # no out_channels, no embed_dim

    with pytest.raises(denseclip.ConfigError, match="returned a Linear, not an nn.Module with "
                                                    "out_channels and embed_dim"):
        build_backbone(BackboneConfig(type="toy"))

    @register_backbone("toy", replace=True)
    def three_levels(cfg, *, embeddings, levels):
        backbone = ToyBackbone()
        backbone.out_channels = backbone.out_channels[:3]
        return backbone

    with pytest.raises(denseclip.ConfigError, match="has 3 levels"):
        build_backbone(BackboneConfig(type="toy"))


@pytest.mark.parametrize("name", ["tiny_denseclip_res", "tiny_denseclip_vit"])
def test_the_clip_towers_keep_the_backbone_protocol(name):
    model = denseclip.build_model(denseclip.load_config(name))
    assert isinstance(model.backbone, Backbone)
    assert len(model.backbone.out_channels) == 4
    assert model.backbone.embed_dim == model.guidance.text_encoder.embed_dim
