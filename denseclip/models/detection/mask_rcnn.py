"""Mask R-CNN on a CLIP ResNet: C2–C5 + max-pooled P6, mmdet 2.17's recipe."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import roi_align

from ...config import ConfigError, ModelConfig
from ..fpn import FPN, conv_module_init
from ..guidance import TextGuidance
from .anchors import rpn_anchor_generator
from .base import CLIPDetector, _default_init
from .matcher import MaxIoUMatcher
from .poolers import MultiLevelRoIAlign
from .roi_heads import BoxPredictor, MaskPredictor, RoIHeads
from .rpn import RPN
from .transform import DetectionTransform

__all__ = ["CLIPMaskRCNN"]


class CLIPMaskRCNN(CLIPDetector, GeneralizedRCNN):
    """Mask R-CNN on a CLIP ResNet or ViT (C2–C5 + max-pooled P6), DenseCLIP score map on C5 when
    ``guidance`` is given. See docs/detection.md for the recipe."""

    IN_LEVELS = (0, 1, 2, 3)  # the backbone levels the FPN reads: strides 4 to 32
    TASK = "mask_rcnn"  # the model.task it serves
    WITH_MASKS = True

    @staticmethod
    def config_options(cfg: ModelConfig) -> dict[str, Any]:
        """Keyword arguments of this detector that ``cfg`` sets (besides the shared ones); the
        box-head width is 4 × ``model.head_channels``."""
        det = cfg.detection
        options: dict[str, Any] = {}
        for name in ("rpn_pre_nms_top_n", "rpn_post_nms_top_n"):
            value = getattr(det, name)
            if len(value) != 2:
                raise ConfigError(f"model.detection.{name} must be [training, test], got {value}")
            options[name] = tuple(value)
        options.update(box_batch_size_per_image=det.box_batch_size_per_image,
                       representation_size=4 * cfg.head_channels,
                       head_channels=cfg.head_channels)
        return options

    def __init__(self, backbone: nn.Module, num_classes: int,
                 guidance: TextGuidance | None = None, *, score_level: int = 3,
                 neck_channels: int = 256, head_channels: int = 256,
                 representation_size: int = 1024, min_size: int = 800, max_size: int = 1333,
                 size_divisor: int = 32, image_mean: Sequence[float] = (0.0, 0.0, 0.0),
                 image_std: Sequence[float] = (1.0, 1.0, 1.0),
                 rpn_pre_nms_top_n: tuple[int, int] = (2000, 1000),
                 rpn_post_nms_top_n: tuple[int, int] = (1000, 1000),
                 rpn_batch_size_per_image: int = 256, box_batch_size_per_image: int = 512,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_img: int = 100, seg_loss_weight: float = 0.0,
                 train_bn: bool = True) -> None:
        in_levels = list(self.IN_LEVELS)
        in_channels = [backbone.out_channels[i] for i in in_levels]
        if guidance is not None:
            if score_level not in in_levels:
                raise ValueError("score_level must be 0..3 for Mask R-CNN")
            in_channels[score_level] += num_classes
        neck = FPN(in_channels, neck_channels, "maxpool")
        anchors = rpn_anchor_generator(size_divisor)
        rpn_head = RPNHead(neck_channels, anchors.num_anchors_per_location()[0])
        _default_init(rpn_head)  # plain convs in the official head, init never called
        rpn = RPN(anchors, rpn_head, 0.7, 0.3, rpn_batch_size_per_image, 0.5,
                  {"training": rpn_pre_nms_top_n[0], "testing": rpn_pre_nms_top_n[1]},
                  {"training": rpn_post_nms_top_n[0], "testing": rpn_post_nms_top_n[1]},
                  0.7)
        rpn.proposal_matcher = MaxIoUMatcher(0.7, 0.3, min_pos_iou=0.3)
        names, strides = ["0", "1", "2", "3"], [4, 8, 16, 32]
        mask_head = MaskRCNNHeads(neck_channels, [head_channels] * 4, 1)
        conv_module_init(mask_head)
        roi_heads = RoIHeads(
            MultiLevelRoIAlign(names, 7, strides),
            TwoMLPHead(neck_channels * 7 * 7, representation_size),
            BoxPredictor(representation_size, num_classes),
            0.5, 0.5, box_batch_size_per_image, 0.25, (10.0, 10.0, 5.0, 5.0),
            score_thresh, nms_thresh, detections_per_img,
            mask_roi_pool=MultiLevelRoIAlign(names, 14, strides),
            mask_head=mask_head,
            mask_predictor=MaskPredictor(head_channels, head_channels, num_classes),
        )
        roi_heads.proposal_matcher = MaxIoUMatcher(0.5, 0.5, min_pos_iou=0.5)
        transform = DetectionTransform(min_size, max_size, list(image_mean), list(image_std),
                                       size_divisible=size_divisor)
        super().__init__(backbone, rpn, roi_heads, transform)
        self._setup(backbone, guidance, neck, num_classes, in_levels, score_level,
                    seg_loss_weight, train_bn, with_masks=True)

    def forward_dummy(self, images: Tensor, *, num_proposals: int = 1000,
                      num_mask_rois: int = 100) -> tuple[Tensor, ...]:
        """The network alone, for counting operations (the dummy forward of mmdet's
        two-stage detectors): backbone (+ score map) → FPN → RPN head; then, per image,
        ``num_proposals`` fixed boxes through RoIAlign → box head → box predictor, and the
        first ``num_mask_rois`` of all of them through the mask RoIAlign → mask head →
        mask predictor. ``images`` is a normalised B×3×H×W batch (H, W multiples of the
        size divisor); no transform, anchors, proposal filtering or post-processing.

        The proposals are a deterministic grid of boxes of four sizes (mmdet draws 1000
        random ones); being shape-only arithmetic, they also build on the ``meta`` device.
        They are all pooled from the finest FPN level, as mmdet's random boxes (a few
        pixels wide) are: RoIAlign performs no multiply-adds that a counter records, and
        the heads' cost depends on the number of RoIs only.

        Returns (RPN objectness per level…, RPN deltas per level…, class logits, box
        deltas, mask logits), each in the layout the heads produce."""
        pyramid = self._dummy_features(images)
        objectness, rpn_deltas = self.rpn.head(pyramid)

        h, w = images.shape[-2:]
        cols = math.ceil(math.sqrt(num_proposals))
        rows = math.ceil(num_proposals / cols)
        i = torch.arange(num_proposals, dtype=torch.float32, device=images.device)
        cx = (torch.remainder(i, cols) + 0.5) * (w / cols)
        cy = (torch.div(i, cols, rounding_mode="floor") + 0.5) * (h / rows)
        half = 16.0 * torch.pow(2.0, torch.remainder(i, 4))  # 32, 64, 128 and 256 px
        one = torch.stack([(cx - half).clamp(min=0), (cy - half).clamp(min=0),
                           (cx + half).clamp(max=w), (cy + half).clamp(max=h)], dim=1)
        rois = torch.cat([
            torch.cat([torch.full_like(one[:, :1], b), one], dim=1)
            for b in range(images.shape[0])
        ])

        heads = self.roi_heads
        finest, scale = pyramid[0].float(), 1.0 / heads.box_roi_pool.strides[0]
        box_pool, mask_pool = heads.box_roi_pool, heads.mask_roi_pool
        box_feats = roi_align(finest, rois, box_pool.output_size, scale,
                              box_pool.sampling_ratio, box_pool.aligned)
        class_logits, box_deltas = heads.box_predictor(heads.box_head(box_feats))
        mask_feats = roi_align(finest, rois[:num_mask_rois], mask_pool.output_size, scale,
                               mask_pool.sampling_ratio, mask_pool.aligned)
        mask_logits = heads.mask_predictor(heads.mask_head(mask_feats))
        return (*objectness, *rpn_deltas, class_logits, box_deltas, mask_logits)

    def forward(self, images, targets=None, original_sizes=None):
        """Losses in training; in eval, detections in the pixels of ``original_sizes``
        (one (H, W) per image: the sizes before the caller resized them; None: the input
        sizes), rescaled before NMS and with masks pasted there, as mmdet does."""
        images, targets, original_sizes = self._check_inputs(images, targets, original_sizes)
        image_list, targets = self.transform(images, targets)
        pyramid, score, aux_size = self.extract_features(image_list.tensors)
        features = OrderedDict(zip(["0", "1", "2", "3", "pool"], pyramid, strict=True))
        # torchvision's R-CNN heads reserve label 0 for the background
        rcnn_targets = None
        if targets is not None:
            rcnn_targets = [{**t, "labels": t["labels"] + 1} for t in targets]
        proposals, rpn_losses = self.rpn(image_list, features, rcnn_targets)
        detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes,
                                                rcnn_targets, original_sizes)
        if self.training:
            return {**rpn_losses, **roi_losses, **self._seg_aux_loss(score, aux_size, targets)}
        for det in detections:
            det["labels"] = det["labels"] - 1
        return detections
