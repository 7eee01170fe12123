"""Mask R-CNN's RoI heads: mmdet's box and mask predictor layouts and losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.ops import roi_align

__all__ = ["BoxPredictor", "MaskPredictor", "RoIHeads"]


class BoxPredictor(nn.Module):
    """mmdet's box predictor layout: ``cls_score`` over K+1 outputs (the K classes, then
    background) and class-specific ``bbox_pred`` over K classes. Returns torchvision's
    layout: logits with background first and deltas with a zero background block."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        logits = self.cls_score(x)
        logits = torch.cat([logits[:, -1:], logits[:, :-1]], dim=1)
        deltas = self.bbox_pred(x)
        return logits, torch.cat([deltas.new_zeros((x.shape[0], 4)), deltas], dim=1)


class MaskPredictor(nn.Module):
    """2× transposed conv + ReLU + 1×1 logits over K classes; a zero background channel is
    prepended (torchvision indexes masks by labels with background 0)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, channels, 2, stride=2)
        self.mask_fcn_logits = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mask_fcn_logits(F.relu(self.conv5_mask(x)))
        return torch.cat([x.new_zeros((x.shape[0], 1, *x.shape[-2:])), x], dim=1)


class RoIHeads(tv_roi_heads.RoIHeads):
    """torchvision's RoI heads with mmdet's losses: L1 box regression and mask targets
    cropped by aligned RoIAlign, binarised at 0.5."""

    mask_size = 28

    def _mask_targets(self, gt_masks: Tensor, boxes: Tensor, matched: Tensor) -> Tensor:
        rois = torch.cat([matched[:, None].to(boxes.dtype), boxes], dim=1)
        cropped = roi_align(gt_masks[:, None].float(), rois.float(),
                            (self.mask_size, self.mask_size), 1.0, 0, True)[:, 0]
        return (cropped >= 0.5).float()

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(
                proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        class_logits, box_regression = class_logits.float(), box_regression.float()
        if not self.training:
            boxes, scores, labels = self.postprocess_detections(class_logits, box_regression,
                                                                proposals, image_shapes)
            result = [{"boxes": b, "labels": lb, "scores": s}
                      for b, s, lb in zip(boxes, scores, labels, strict=True)]
            if self.has_mask():
                mask_feats = self.mask_head(self.mask_roi_pool(features, boxes, image_shapes))
                probs = maskrcnn_inference(self.mask_predictor(mask_feats).float(), labels)
                for r, p in zip(result, probs, strict=True):
                    r["masks"] = p
            return result, {}

        all_labels = torch.cat(labels)
        all_targets = torch.cat(regression_targets)
        loss_cls = F.cross_entropy(class_logits, all_labels)
        pos = torch.where(all_labels > 0)[0]
        deltas = box_regression.reshape(box_regression.shape[0], -1, 4)
        loss_bbox = F.l1_loss(deltas[pos, all_labels[pos]], all_targets[pos],
                              reduction="sum") / max(1, all_labels.numel())
        losses = {"loss_cls": loss_cls, "loss_bbox": loss_bbox}
        if self.has_mask():
            pos_boxes, pos_labels, mask_targets = [], [], []
            for props, lab, m, t in zip(proposals, labels, matched_idxs, targets, strict=True):
                keep = torch.where(lab > 0)[0]
                pos_boxes.append(props[keep])
                pos_labels.append(lab[keep])
                if keep.numel():
                    mask_targets.append(self._mask_targets(t["masks"], props[keep], m[keep]))
            logits = self.mask_predictor(
                self.mask_head(self.mask_roi_pool(features, pos_boxes, image_shapes))).float()
            pos_labels_t = torch.cat(pos_labels)
            if pos_labels_t.numel() == 0:
                losses["loss_mask"] = logits.sum() * 0
            else:
                chosen = logits[torch.arange(pos_labels_t.numel(), device=logits.device),
                                pos_labels_t]
                losses["loss_mask"] = F.binary_cross_entropy_with_logits(
                    chosen, torch.cat(mask_targets))
        return [], losses
