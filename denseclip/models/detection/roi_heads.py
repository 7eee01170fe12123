"""Mask R-CNN's RoI heads: mmdet's box and mask predictor layouts and losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align

from .nms import batched_nms
from .transform import paste_masks, scale_factors

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

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes,
                               factors=None):
        """mmdet 2.17 (``BBoxHead.get_bboxes`` with ``rescale=True``, then
        ``multiclass_nms``): softmax scores, class-specific boxes decoded and clipped to the
        input image, divided by the image's scale factor (``factors``, B×4 from
        :func:`.transform.scale_factors`; None: no rescale) into original pixels; then per
        (RoI, class) scores above the threshold, class-wise NMS, at most
        ``detections_per_img``. No box-size filter (mmdet has none here). Labels are
        1..K (0 is torchvision's background)."""
        per_image = [p.shape[0] for p in proposals]
        all_boxes = self.box_coder.decode(box_regression, proposals).split(per_image)
        all_scores = F.softmax(class_logits, -1).split(per_image)
        out_boxes, out_scores, out_labels = [], [], []
        for i, (boxes, scores, shape) in enumerate(zip(all_boxes, all_scores, image_shapes,
                                                       strict=True)):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)[:, 1:]  # drop background
            if factors is not None:
                boxes = boxes / factors[i].to(boxes)
            scores = scores[:, 1:]
            roi_idx, cls_idx = torch.nonzero(scores > self.score_thresh, as_tuple=True)
            boxes, scores, labels = boxes[roi_idx, cls_idx], scores[roi_idx, cls_idx], cls_idx + 1
            keep = batched_nms(boxes, scores, cls_idx, self.nms_thresh)  # 0-based, as mmdet
            keep = keep[: self.detections_per_img]
            out_boxes.append(boxes[keep])
            out_scores.append(scores[keep])
            out_labels.append(labels[keep])
        return out_boxes, out_scores, out_labels

    def _predict_masks(self, features, boxes, labels, image_shapes, factors, original_sizes):
        """mmdet's ``simple_test_mask`` + ``get_seg_masks`` (``rescale=True``): RoIs are the
        detections mapped back into the input (× scale factor); the M×M probabilities of
        each detection's class are pasted into the original image at RoI / scale factor."""
        rois = [b * f.to(b) for b, f in zip(boxes, factors, strict=True)]
        mask_feats = self.mask_head(self.mask_roi_pool(features, rois, image_shapes))
        probs = maskrcnn_inference(self.mask_predictor(mask_feats).float(), labels)
        return [paste_masks(p, r / f.to(r), size)
                for p, r, f, size in zip(probs, rois, factors, original_sizes, strict=True)]

    def forward(self, features, proposals, image_shapes, targets=None, original_sizes=None):
        """Losses in training; in eval, detections (boxes, 1..K labels, scores, masks
        N×1×H×W probabilities) in the pixels of ``original_sizes`` (None: the input
        sizes)."""
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(
                proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        class_logits, box_regression = class_logits.float(), box_regression.float()
        if not self.training:
            original_sizes = image_shapes if original_sizes is None else original_sizes
            factors = scale_factors(image_shapes, original_sizes, class_logits.device)
            boxes, scores, labels = self.postprocess_detections(
                class_logits, box_regression, proposals, image_shapes, factors)
            result = [{"boxes": b, "labels": lb, "scores": s}
                      for b, s, lb in zip(boxes, scores, labels, strict=True)]
            if self.has_mask():
                masks = self._predict_masks(features, boxes, labels, image_shapes, factors,
                                            original_sizes)
                for r, m in zip(result, masks, strict=True):
                    r["masks"] = m
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
