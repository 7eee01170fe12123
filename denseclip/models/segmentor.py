"""DenseCLIP semantic segmentor (and the plain CLIP + Semantic FPN baseline)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .fpn import FPN, SemanticFPNHead
from .guidance import TextGuidance
from .losses import cross_entropy

MIN_INPUT_SIZE = 32  # the coarsest backbone stride


def check_images(images: torch.Tensor) -> None:
    """Raise a clear error unless ``images`` is a float (B, 3, H, W) batch."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(
            f"images must be a batch of shape (B, 3, H, W), got {images.ndim} dimensions "
            f"{tuple(images.shape)}; add a batch dimension with images[None]"
        )
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 (RGB) channels, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(
            f"images must be a normalised floating-point tensor, got {images.dtype}; convert "
            f"uint8 images with (img / 255 - mean) / std"
        )
    if min(images.shape[-2:]) < MIN_INPUT_SIZE:
        raise ValueError(
            f"images of size {tuple(images.shape[-2:])} are smaller than the network stride "
            f"{MIN_INPUT_SIZE}; resize them to at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}"
        )


class Segmentor(nn.Module):
    """Backbone → (text guidance: score map concatenated to one level) → FPN → Semantic
    FPN head.

    Eval mode: ``model(images)`` returns logits (B, K, H, W) at the input resolution.
    Training mode: ``model(images, targets)`` returns a dict of weighted losses
    (``loss_seg``, and ``loss_aux`` with text guidance) whose sum is the training loss.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, guidance: TextGuidance | None = None,
                 score_level: int = 3, neck_channels: int = 256, head_channels: int = 256,
                 head_dropout: float = 0.1, ignore_index: int = 255, loss_average: str = "all",
                 aux_loss_weight: float = 0.4) -> None:
        super().__init__()
        self.backbone = backbone
        self.guidance = guidance
        self.score_level = score_level
        in_channels = list(backbone.out_channels)
        if guidance is not None:
            if guidance.num_classes != num_classes:
                raise ValueError(
                    f"{guidance.num_classes} class names for a head of {num_classes} classes"
                )
            in_channels[score_level] += num_classes  # C + K at the level with the score map
        self.neck = FPN(in_channels, neck_channels)
        self.head = SemanticFPNHead(neck_channels, head_channels, num_classes,
                                    dropout=head_dropout)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.loss_average = loss_average
        self.aux_loss_weight = aux_loss_weight

    @property
    def class_names(self) -> list[str] | None:
        return None if self.guidance is None else self.guidance.class_names

    def set_classes(self, class_names: Sequence[str]) -> None:
        """Replace the class names behind the score maps; the decode head is tied to
        ``num_classes``, so the list must keep that length."""
        if self.guidance is None:
            raise ValueError("this model has no text guidance, so it has no class names")
        if len(class_names) != self.num_classes:
            raise ValueError(
                f"{len(class_names)} class names given, but the decode head predicts "
                f"{self.num_classes} classes"
            )
        self.guidance.set_classes(class_names)

    def encode(self, images: torch.Tensor):
        """Run backbone and guidance; returns (features for the neck, guidance output)."""
        features, embeddings = self.backbone(images)
        out = None
        if self.guidance is not None:
            out = self.guidance(*embeddings)
            level = features[self.score_level]
            score = out.score.to(level.dtype)
            if score.shape[-2:] != level.shape[-2:]:
                raise RuntimeError(
                    f"score map {tuple(score.shape[-2:])} does not match backbone level "
                    f"{self.score_level} {tuple(level.shape[-2:])}"
                )
            features = list(features)
            features[self.score_level] = torch.cat([level, score], dim=1)
        return features, out

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None):
        check_images(images)
        features, guided = self.encode(images)
        logits = self.head(self.neck(features))  # (B, K, H/4, W/4)
        if targets is None:
            return F.interpolate(logits, size=images.shape[-2:], mode="bilinear",
                                 align_corners=False)
        if targets.ndim != 3 or targets.shape[0] != images.shape[0]:
            raise ValueError(f"targets must be (B, H, W) class indices, got {tuple(targets.shape)}")
        targets = targets.long()
        logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear",
                               align_corners=False)
        losses = {"loss_seg": cross_entropy(logits, targets, self.ignore_index, self.loss_average)}
        if guided is not None:
            aux = self.guidance.identity_loss(guided.score, targets, self.ignore_index,
                                              self.loss_average)
            losses["loss_aux"] = self.aux_loss_weight * aux
        return losses
