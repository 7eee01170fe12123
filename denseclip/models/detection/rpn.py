"""Region proposal network with mmdet's L1 box loss, assigner and anchor valid flags."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.ops import boxes as box_ops

from .nms import batched_nms

__all__ = ["RPN"]


class RPN(RegionProposalNetwork):
    """torchvision's RPN with L1 box loss, mmdet's assigner and anchor valid flags, and
    mmdet's proposal filter (:meth:`filter_proposals`)."""

    min_bbox_size = 0.0  # mmdet's rpn test/train ``min_bbox_size``: keep w, h > this

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos))[0]
        neg = torch.where(torch.cat(neg))[0]
        sampled = torch.cat([pos, neg])
        labels = torch.cat(labels)
        regression_targets = torch.cat(regression_targets)
        loss_bbox = F.l1_loss(pred_bbox_deltas[pos], regression_targets[pos],
                              reduction="sum") / max(1, sampled.numel())
        loss_cls = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled],
                                                      labels[sampled])
        return loss_cls, loss_bbox

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        """mmdet 2.17's ``RPNHead._get_bboxes_single``: per level the ``pre_nms_top_n``
        highest scores; boxes clipped to the input image; only boxes wider and taller than
        ``min_bbox_size`` = 0 px kept (torchvision keeps ≥ 1e-3 px); NMS per level; the
        ``post_nms_top_n`` best. Returns per image (boxes, sigmoid scores)."""
        num_images = proposals.shape[0]
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat([torch.full((n,), i, dtype=torch.int64, device=proposals.device)
                            for i, n in enumerate(num_anchors_per_level)])
        top = self._get_top_n_idx(objectness, num_anchors_per_level)
        rows = torch.arange(num_images, device=proposals.device)[:, None]
        scores_all = torch.sigmoid(objectness[rows, top])
        boxes_all, levels_all = proposals[rows, top], levels[top]
        final_boxes, final_scores = [], []
        for boxes, scores, lvl, shape in zip(boxes_all, scores_all, levels_all, image_shapes,
                                             strict=True):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            wh = boxes[:, 2:] - boxes[:, :2]
            keep = (wh > self.min_bbox_size).all(dim=1)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = batched_nms(boxes, scores, lvl, self.nms_thresh)
            keep = keep[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores

    def _assign(self, anchors, targets, valid):
        labels, matched_boxes = [], []
        for anc, t, ok in zip(anchors, targets, valid, strict=True):
            gt = t["boxes"]
            lab = torch.full((anc.shape[0],), -1.0, device=anc.device)  # -1: not sampled
            boxes = torch.zeros_like(anc)
            if gt.numel() == 0:
                lab[ok] = 0.0
            else:
                m = self.proposal_matcher(box_ops.box_iou(gt, anc[ok]))
                sub = (m >= 0).float()
                sub[m == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1.0
                lab[ok] = sub
                boxes[ok] = gt[m.clamp(min=0)].float()
            labels.append(lab)
            matched_boxes.append(boxes)
        return labels, matched_boxes

    def forward(self, images: ImageList, features: dict[str, Tensor],
                targets: list[dict[str, Tensor]] | None = None):
        feats = list(features.values())
        objectness, deltas = self.head(feats)
        anchors = self.anchor_generator(images, feats)
        num_images = len(anchors)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        objectness, deltas = objectness.float(), deltas.float()
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(num_images, -1, 4)
        boxes, _ = self.filter_proposals(proposals, objectness, images.image_sizes, per_level)
        losses: dict[str, Tensor] = {}
        if self.training:
            valid = self.anchor_generator.valid_masks(
                images.image_sizes, [f.shape[-2:] for f in feats], feats[0].device)
            labels, matched = self._assign(anchors, targets, valid)
            regression_targets = self.box_coder.encode(matched, anchors)
            loss_cls, loss_bbox = self.compute_loss(objectness, deltas, labels,
                                                    regression_targets)
            losses = {"loss_rpn_cls": loss_cls, "loss_rpn_bbox": loss_bbox}
        return boxes, losses
