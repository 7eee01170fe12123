"""RetinaNet on a CLIP ResNet: C3–C5 + P6 on the C5 input + P7, mmdet 2.17's recipe."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import boxes as box_ops
from torchvision.ops import sigmoid_focal_loss

from ...config import ConfigError, ModelConfig
from ..fpn import FPN, conv_module_init
from ..guidance import TextGuidance
from .anchors import retinanet_anchor_generator
from .base import CLIPDetector, _default_init
from .matcher import MaxIoUMatcher
from .nms import batched_nms
from .transform import DetectionTransform, scale_factors

__all__ = ["CLIPRetinaNet"]


class CLIPRetinaNet(CLIPDetector, RetinaNet):
    """RetinaNet on a CLIP ResNet or ViT (C3–C5 + P6 on the C5 input + P7), DenseCLIP score map
    on C5 when ``guidance`` is given. See docs/detection.md for the recipe."""

    IN_LEVELS = (1, 2, 3)  # the backbone levels the FPN reads: strides 8, 16, 32
    TASK = "retinanet"  # the model.task it serves
    WITH_MASKS = False

    @staticmethod
    def config_options(cfg: ModelConfig) -> dict[str, Any]:
        """Keyword arguments of this detector that ``cfg`` sets (besides the shared ones)."""
        if cfg.head_channels != cfg.neck_channels:
            raise ConfigError("RetinaNet head convs keep the FPN width: set "
                              "model.head_channels equal to model.neck_channels")
        return {"focal_prior_init": cfg.detection.focal_prior_init}

    def __init__(self, backbone: nn.Module, num_classes: int,
                 guidance: TextGuidance | None = None, *, score_level: int = 3,
                 neck_channels: int = 256, min_size: int = 800, max_size: int = 1333,
                 size_divisor: int = 32, image_mean: Sequence[float] = (0.0, 0.0, 0.0),
                 image_std: Sequence[float] = (1.0, 1.0, 1.0), score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 100,
                 topk_candidates: int = 1000, seg_loss_weight: float = 0.0,
                 focal_prior_init: bool = False, train_bn: bool = True) -> None:
        in_levels = list(self.IN_LEVELS)
        in_channels = [backbone.out_channels[i] for i in in_levels]
        if guidance is not None:
            if score_level not in in_levels:
                raise ValueError(f"score_level must be one of {in_levels} (C3–C5) for RetinaNet")
            in_channels[in_levels.index(score_level)] += num_classes
        neck = FPN(in_channels, neck_channels, "conv_on_input")
        anchors = retinanet_anchor_generator(size_divisor)
        head = RetinaNetHead(neck_channels, anchors.num_anchors_per_location()[0], num_classes)
        if not focal_prior_init:
            # official state: head convs as mmcv ConvModules, the two predictors PyTorch's
            # default (the detector's own init is never called)
            conv_module_init(head.classification_head.conv)
            conv_module_init(head.regression_head.conv)
            _default_init(head.classification_head.cls_logits)
            _default_init(head.regression_head.bbox_reg)
        super().__init__(backbone, num_classes, anchor_generator=anchors, head=head,
                         proposal_matcher=MaxIoUMatcher(0.5, 0.4, min_pos_iou=0.0),
                         score_thresh=score_thresh, nms_thresh=nms_thresh,
                         detections_per_img=detections_per_img, topk_candidates=topk_candidates)
        self.transform = DetectionTransform(min_size, max_size, list(image_mean),
                                            list(image_std), size_divisible=size_divisor)
        self._setup(backbone, guidance, neck, num_classes, in_levels, score_level,
                    seg_loss_weight, train_bn, with_masks=False)

    def compute_loss(self, targets, head_outputs, anchors, valid=None):
        """Focal loss (α 0.25, γ 2) and L1 on deltas over valid anchors, both divided by
        Σ_images max(1, positives) (mmdet's normaliser)."""
        cls_logits = head_outputs["cls_logits"].float()
        deltas = head_outputs["bbox_regression"].float()
        ignore = self.proposal_matcher.BETWEEN_THRESHOLDS
        cls_losses, box_losses, num_pos = [], [], 0
        for i, (t, anc) in enumerate(zip(targets, anchors, strict=True)):
            ok = valid[i] if valid is not None else torch.ones_like(anc[:, 0], dtype=torch.bool)
            matched = torch.full((anc.shape[0],), ignore, dtype=torch.long, device=anc.device)
            if t["boxes"].numel() == 0:
                matched[ok] = self.proposal_matcher.BELOW_LOW_THRESHOLD
            else:
                matched[ok] = self.proposal_matcher(box_ops.box_iou(t["boxes"], anc[ok]))
            fg = matched >= 0
            num_pos += max(1, int(fg.sum()))
            gt_cls = torch.zeros_like(cls_logits[i])
            gt_cls[fg, t["labels"][matched[fg]]] = 1.0
            keep = matched != ignore
            cls_losses.append(sigmoid_focal_loss(cls_logits[i][keep], gt_cls[keep],
                                                 alpha=0.25, gamma=2.0, reduction="sum"))
            target_deltas = self.box_coder.encode_single(t["boxes"][matched[fg]].float(), anc[fg])
            box_losses.append(F.l1_loss(deltas[i][fg], target_deltas, reduction="sum"))
        return {"loss_cls": torch.stack(cls_losses).sum() / num_pos,
                "loss_bbox": torch.stack(box_losses).sum() / num_pos}

    def postprocess_detections(self, head_outputs, anchors, image_shapes, factors=None):
        """mmdet 2.17 (``AnchorHead.get_bboxes``, ``rescale=True``): per level keep the
        ``topk_candidates`` anchors with the highest class score, decode and clip to the
        input image; divide by the image's scale factor (``factors``, B×4 from
        :func:`.transform.scale_factors`; None: no rescale) into original pixels; then
        class-wise NMS over (anchor, class) scores above the threshold, at most
        ``detections_per_img``."""
        results = []
        for index, shape in enumerate(image_shapes):
            boxes_all, scores_all = [], []
            for logits, deltas, anc in zip(head_outputs["cls_logits"],
                                           head_outputs["bbox_regression"], anchors[index],
                                           strict=True):
                scores = torch.sigmoid(logits[index].float())
                deltas = deltas[index].float()
                if 0 < self.topk_candidates < scores.shape[0]:
                    top = scores.max(dim=1).values.topk(self.topk_candidates).indices
                    scores, deltas, anc = scores[top], deltas[top], anc[top]
                boxes = self.box_coder.decode_single(deltas, anc)
                boxes_all.append(box_ops.clip_boxes_to_image(boxes, shape))
                scores_all.append(scores)
            boxes, scores = torch.cat(boxes_all), torch.cat(scores_all)
            if factors is not None:
                boxes = boxes / factors[index].to(boxes)
            anchor_idx, labels = torch.nonzero(scores > self.score_thresh, as_tuple=True)
            boxes, scores = boxes[anchor_idx], scores[anchor_idx, labels]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)
            keep = keep[: self.detections_per_img]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results

    def forward_dummy(self, images: Tensor) -> dict[str, Tensor]:
        """The network alone, for counting operations: backbone (+ score map) → FPN →
        head on a normalised B×3×H×W batch (H, W multiples of the size divisor), with no
        transform, anchors or post-processing. Returns the head's ``cls_logits``
        (B, N, K) and ``bbox_regression`` (B, N, 4) over all anchors of all levels."""
        pyramid = self._dummy_features(images)
        return self.head(pyramid)

    def forward(self, images, targets=None, original_sizes=None):
        """Losses in training; in eval, detections in the pixels of ``original_sizes``
        (one (H, W) per image: the sizes before the caller resized them; None: the input
        sizes), rescaled before NMS as mmdet does."""
        images, targets, original_sizes = self._check_inputs(images, targets, original_sizes)
        image_list, targets = self.transform(images, targets)
        pyramid, score, aux_size = self.extract_features(image_list.tensors)
        head_outputs = self.head(pyramid)
        anchors = self.anchor_generator(image_list, pyramid)
        if self.training:
            valid = self.anchor_generator.valid_masks(
                image_list.image_sizes, [p.shape[-2:] for p in pyramid], pyramid[0].device)
            losses = self.compute_loss(targets, head_outputs, anchors, valid)
            losses.update(self._seg_aux_loss(score, aux_size, targets))
            return losses
        per_level = [p.shape[-2] * p.shape[-1] * self.anchor_generator.num_anchors_per_location()[0]
                     for p in pyramid]
        split = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        factors = scale_factors(image_list.image_sizes, original_sizes, pyramid[0].device)
        return self.postprocess_detections(split, split_anchors, image_list.image_sizes, factors)
