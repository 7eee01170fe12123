"""What both detectors share: CLIP feature extraction into the FPN, DenseCLIP's
auxiliary loss, input checks, the BatchNorm mode and the official key table."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..fpn import FPN
from ..guidance import GuidedModel, TextGuidance
from ..official import OFFICIAL_DETECTION_RENAMES
from ..registry import with_backbone_renames
from .losses import box_seg_loss

__all__ = ["CLIPDetector"]


def _default_init(module: nn.Module) -> None:
    """PyTorch's default initialisation of every conv/linear layer in ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            m.reset_parameters()


class CLIPDetector(GuidedModel):
    """Mixin of both detectors: CLIP feature extraction (the shared :class:`GuidedModel`
    fusion, with score / τ), DenseCLIP's seg loss, input checks and the BatchNorm mode."""

    neck: FPN
    fuse_logits = True
    head_description = "detection head"
    official_renames = OFFICIAL_DETECTION_RENAMES

    def _setup(self, backbone: nn.Module, guidance: TextGuidance | None, neck: FPN,
               num_classes: int, in_levels: Sequence[int], score_level: int,
               seg_loss_weight: float, train_bn: bool, with_masks: bool) -> None:
        self.guidance = guidance
        self.neck = neck
        self.num_classes = num_classes
        self.in_levels = list(in_levels)
        self.score_level = score_level
        self.seg_loss_weight = seg_loss_weight if guidance is not None else 0.0
        self.train_bn = train_bn
        self.with_masks = with_masks
        self.official_renames = with_backbone_renames(backbone, self.official_renames)
        if not train_bn:
            for m in backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)  # type: ignore[misc]
        if mode and not self.train_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def _dummy_features(self, images: Tensor) -> list[Tensor]:
        """FPN levels of a ``forward_dummy`` input, after checking its shape."""
        divisor = self.transform.size_divisible
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2] % divisor \
                or images.shape[-1] % divisor:
            raise ValueError(f"forward_dummy takes a B×3×H×W batch with H and W multiples of "
                             f"{divisor}, got shape {tuple(images.shape)}")
        return self.extract_features(images)[0]

    def extract_features(self, x: Tensor) -> tuple[list[Tensor], Tensor | None,
                                                   tuple[int, int]]:
        """:meth:`forward_features` (score map / τ fused into ``score_level``) → FPN.
        Returns (pyramid, score map (B, K, h, w) or None, the stride-4 size (H/4, W/4) of
        the padded batch, where the auxiliary loss is computed)."""
        dense = self.forward_features(x)
        pyramid = self.neck([dense.features[i] for i in self.in_levels])
        score = None if dense.guided is None else dense.guided.score
        return pyramid, score, (x.shape[-2] // 4, x.shape[-1] // 4)

    def _seg_aux_loss(self, score: Tensor | None, size: tuple[int, int],
                      targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        if score is None or self.seg_loss_weight == 0:
            return {}
        logits = F.interpolate(score / self.guidance.tau, size=size, mode="bilinear",
                               align_corners=False)
        loss = box_seg_loss(logits, [t["boxes"] for t in targets],
                            [t["labels"] for t in targets], stride=4)
        return {"loss_seg_aux": self.seg_loss_weight * loss}

    def _check_inputs(self, images, targets, original_sizes=None):
        """The images as a list, the targets, and the (H, W) to map predictions to:
        ``original_sizes`` when given (the images were resized before the model, as the
        test pipeline and the predictor do), else the input sizes."""
        if isinstance(images, Tensor):
            if images.ndim != 4:
                raise ValueError("images must be a list of 3×H×W tensors or a B×3×H×W batch, "
                                 f"got shape {tuple(images.shape)}")
            images = list(images)
        if not isinstance(images, (list, tuple)) or not images:
            raise TypeError("images must be a non-empty list of 3×H×W float tensors")
        for i, img in enumerate(images):
            if not isinstance(img, Tensor) or img.ndim != 3 or img.shape[0] != 3:
                shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
                raise ValueError(f"image {i} must be a 3×H×W tensor, got {shape}")
            if not img.is_floating_point():
                raise TypeError(f"image {i} has dtype {img.dtype}; detectors take float images "
                                "in 0..1 (convert uint8 with img / 255)")
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets (a dict per image)")
            if len(targets) != len(images):
                raise ValueError(f"{len(images)} images but {len(targets)} targets")
            for i, (img, t) in enumerate(zip(images, targets, strict=True)):
                boxes, labels = t.get("boxes"), t.get("labels")
                if boxes is None or labels is None:
                    raise ValueError(f"target {i} needs 'boxes' and 'labels'")
                if boxes.ndim != 2 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
                    raise ValueError(f"target {i}: boxes must be a float N×4 tensor, got "
                                     f"{boxes.dtype} {tuple(boxes.shape)}")
                if labels.shape != boxes.shape[:1]:
                    raise ValueError(f"target {i}: {labels.shape[0]} labels for "
                                     f"{boxes.shape[0]} boxes")
                if labels.numel() and (int(labels.min()) < 0
                                       or int(labels.max()) >= self.num_classes):
                    raise ValueError(f"target {i}: labels must be class indices 0.."
                                     f"{self.num_classes - 1}, got {labels.tolist()}")
                if boxes.numel() and bool((boxes[:, 2:] <= boxes[:, :2]).any()):
                    raise ValueError(f"target {i}: boxes need positive width and height")
                if self.with_masks:
                    masks = t.get("masks")
                    if masks is None or masks.shape != (boxes.shape[0], *img.shape[-2:]):
                        got = None if masks is None else tuple(masks.shape)
                        raise ValueError(f"target {i}: masks must be N×H×W "
                                         f"{(boxes.shape[0], *img.shape[-2:])}, got {got}")
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        if original_sizes is not None:
            if len(original_sizes) != len(images):
                raise ValueError(f"{len(images)} images but {len(original_sizes)} original sizes")
            checked = []
            for i, size in enumerate(original_sizes):
                if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
                    raise ValueError(f"original size {i} must be a positive (H, W), got {size}")
                checked.append((int(size[0]), int(size[1])))
            sizes = checked
        return list(images), targets, sizes
