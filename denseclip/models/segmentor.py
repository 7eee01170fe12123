"""DenseCLIP semantic segmentor (and the plain CLIP + Semantic FPN baseline)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import fast_kernels
from .fpn import FPN, SemanticFPNHead
from .guidance import DenseFeatures, GuidedModel, TextGuidance
from .losses import upsampled_cross_entropy
from .official import OFFICIAL_SEGMENTATION_RENAMES
from .registry import with_backbone_renames
from .seg_inference import SegInference

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


def fused_channels(backbone: nn.Module, num_classes: int, guided: bool,
                   score_level: int) -> list[int]:
    """Channels of the backbone levels after fusion: ``backbone.out_channels``, with the
    ``num_classes`` score maps added at ``score_level`` when ``guided``."""
    channels = list(backbone.out_channels)
    if guided:
        channels[score_level] += num_classes  # C + K at the level with the score map
    return channels


class Segmentor(SegInference, GuidedModel, nn.Module):
    """Backbone → (text guidance: score map fused into one level) → FPN → decode head.

    Eval mode: ``model(images)`` returns logits (B, K, H, W) at the input resolution;
    ``model.inference(images, out_size)`` runs the test-time inference of its
    ``inference_settings`` (whole image or sliding windows, optionally with the score maps of
    typed class texts) and ``model.aug_inference(image)`` the multi-scale test
    (:class:`~.seg_inference.SegInference`).
    Training mode: ``model(images, targets)`` returns a dict of weighted losses
    (``loss_seg``, and ``loss_aux`` with text guidance) whose sum is the training loss.
    The two halves are :meth:`forward_features` (shared with the detectors) and
    :meth:`forward_head`.

    ``neck`` and ``head`` are built modules (the builder takes the head from
    :data:`~.registry.HEADS`, ``model.head``); left out, they are an :class:`FPN` of
    ``neck_channels`` on the fused levels and a :class:`SemanticFPNHead` of
    ``head_channels``. The head maps the neck's four levels to logits (B, K, H/4, W/4).
    """

    head_description = "decode head"
    official_renames = OFFICIAL_SEGMENTATION_RENAMES

    def __init__(self, backbone: nn.Module, num_classes: int, *,
                 guidance: TextGuidance | None = None, score_level: int = 3,
                 neck: nn.Module | None = None, head: nn.Module | None = None,
                 neck_channels: int = 256, head_channels: int = 256, head_dropout: float = 0.1,
                 ignore_index: int = 255, loss_average: str = "all",
                 aux_loss_weight: float = 0.4, align_corners: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.guidance = guidance
        self.score_level = score_level
        if guidance is not None and guidance.num_classes != num_classes:
            raise ValueError(
                f"{guidance.num_classes} class names for a head of {num_classes} classes"
            )
        if neck is None:
            neck = FPN(fused_channels(backbone, num_classes, guidance is not None, score_level),
                       neck_channels)
        self.neck = neck
        if head is None:
            head = SemanticFPNHead(neck_channels, head_channels, num_classes,
                                   dropout=head_dropout, align_corners=align_corners)
        self.head = head
        self.official_renames = with_backbone_renames(backbone, self.official_renames)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.loss_average = loss_average
        self.aux_loss_weight = aux_loss_weight
        self.align_corners = align_corners

    def upsample(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Bilinear resize of logits or score maps to ``size`` (``model.align_corners``)."""
        return F.interpolate(x, size=tuple(size), mode="bilinear",
                             align_corners=self.align_corners)

    def head_logits(self, features: list[torch.Tensor]) -> torch.Tensor:
        """FPN and decode head on fused backbone levels → logits (B, K, h, w) at stride 4,
        float32 whatever the precision inside. With the fast kernels the eval output is
        contiguous NCHW (a softmax or argmax over classes is several times slower on
        channels_last), while in training it is channels_last: the bilinear resize's
        backward is ~5x faster so, and the loss reads it as rows of classes
        (:func:`.losses.upsampled_cross_entropy`)."""
        logits = self.head(self.neck(features)).float()
        if fast_kernels():
            logits = logits.contiguous(memory_format=torch.channels_last if self.training
                                       else torch.contiguous_format)
        return logits

    def forward_head(self, features: list[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """:meth:`head_logits` resized bilinearly to ``size``: logits (B, K, *size)."""
        return self.upsample(self.head_logits(features), size)

    def forward_scores(self, dense: DenseFeatures, size: Sequence[int], *,
                       text: torch.Tensor | None = None,
                       tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Score maps (B, K', *size) of another class list for the same images (open
        vocabulary), from the CLIP embeddings of :meth:`forward_features`: cosine
        similarities upsampled bilinearly. ``text``/``tokens`` as :class:`TextGuidance`."""
        if self.guidance is None or dense.embeddings is None:
            raise ValueError("this model has no text guidance, so it has no score maps")
        score = self.guidance(*dense.embeddings, text=text, tokens=tokens).score
        return self.upsample(score.float(), size)

    def open_scores(self, dense: DenseFeatures, texts: Sequence[str],
                    size: Sequence[int]) -> torch.Tensor:
        """Score maps (B, K', *size) of the class texts ``texts`` (open vocabulary), with
        the guidance's cached embeddings of them (post-model prompting) or their tokens
        (pre-model prompting); ``ValueError`` without text guidance or for a text too long."""
        if self.guidance is None:
            raise ValueError("this model has no text guidance, so it has no score maps")
        if self.guidance.prompting == "post":
            return self.forward_scores(dense, size, text=self.guidance.embed(texts))
        return self.forward_scores(dense, size, tokens=self.guidance.tokenize(texts))

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None):
        check_images(images)
        dense = self.forward_features(images)
        if targets is None:
            return self.forward_head(dense.features, images.shape[-2:])
        if targets.ndim != 3 or targets.shape[0] != images.shape[0]:
            raise ValueError(f"targets must be (B, H, W) class indices, got {tuple(targets.shape)}")
        targets = targets.long()
        logits = self.head_logits(dense.features)
        losses = {"loss_seg": upsampled_cross_entropy(logits, targets, self.ignore_index,
                                                      self.loss_average, self.align_corners)}
        if dense.guided is not None:
            aux = self.guidance.identity_loss(dense.guided.score, targets, self.ignore_index,
                                              self.loss_average)
            losses["loss_aux"] = self.aux_loss_weight * aux
        return losses
