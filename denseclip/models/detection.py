"""COCO detectors on torchvision: RetinaNet and Mask R-CNN with a CLIP ResNet backbone and,
for DenseCLIP, the text-guided score map concatenated to C5 (DESIGN §5–6, §9).

Layout. The detectors are torchvision's :class:`~torchvision.models.detection.RetinaNet` and
:class:`~torchvision.models.detection.generalized_rcnn.GeneralizedRCNN` (Mask R-CNN: RPN +
RoI heads with a mask branch), with their feature extractor spelled out as three top-level
modules: ``backbone`` (the CLIP ResNet), ``guidance`` (the shared :class:`TextGuidance`, absent
from the CLIP baselines) and ``neck`` (:class:`DetectionFPN`). The state-dict keys therefore
follow the segmentor's (``backbone.*``, ``guidance.*``, ``neck.*``), so OpenAI CLIP weights
load through the same rename table, and official releases map name for name through
:data:`OFFICIAL_DETECTION_RENAMES` with identical shapes (the box and mask predictors keep
mmdet's 80-class layouts; see below).

Calling convention (torchvision's): ``model(images, targets)`` in training mode returns a
dict of losses whose sum is the training loss; ``model(images)`` in eval mode returns one
dict per image with ``boxes`` (x1, y1, x2, y2 in input-image pixels), ``scores``, ``labels``
and, for Mask R-CNN, ``masks`` (N×1×H×W probabilities at the input size). ``images`` are
float 3×H×W tensors in 0..1 (a list, or a 4-D batch); the model normalises them with CLIP's
mean/std, resizes them keep-ratio to (max_size, min_size) and pads the batch to a multiple
of 32. Targets hold ``boxes`` (float N×4, x1y1x2y2 in input pixels), ``labels`` (int64 class
indices **0..K-1**, the position in ``model.classes``; there is no background index) and,
for Mask R-CNN, ``masks`` (uint8 N×H×W). Output labels use the same 0..K-1 indices.

DenseCLIP's auxiliary box-mask loss (``loss_seg_aux``, DESIGN §6) is added in training when
``detection.seg_loss`` is on: the τ-divided score map, upsampled to the C2 (stride 4) size,
against per-class box masks of the transformed, padded targets.

Losses are named ``loss_*`` (RetinaNet: ``loss_cls``, ``loss_bbox``; Mask R-CNN:
``loss_rpn_cls``, ``loss_rpn_bbox``, ``loss_cls``, ``loss_bbox``, ``loss_mask``).

Matching the official (mmdet 2.17) recipe — what is the same:

* FPN: lateral 1×1 and output 3×3 convs with bias, nearest top-down; RetinaNet P6 is a 3×3
  stride-2 conv on the C5 input (2048 + K channels), P7 a 3×3 stride-2 conv on P6 with no
  ReLU between; Mask R-CNN P6 is a 1×1 stride-2 max-pool of P5.
* Anchors: RetinaNet octave base scale 4, 3 scales per octave, ratios 0.5/1/2, strides
  8–128; RPN scale 8, ratios 0.5/1/2, strides 4–64. Anchors are not rounded and use the
  fixed strides (torchvision rounds base anchors and derives strides from the padded image
  and feature sizes, which misplaces P6/P7 anchors when the padded size is not a multiple
  of 64/128). Anchors outside each image's own 32-padded area are ignored in training
  (mmdet's valid flags).
* Assignment: max-IoU with mmdet's low-quality matching (every gt claims its best anchors
  when that IoU is at least ``min_pos_iou``; later gts win ties): RetinaNet 0.5/0.4/0,
  RPN 0.7/0.3/0.3, R-CNN 0.5/0.5/0.5. Samplers: RPN 256 at 0.5 positives, R-CNN 512 at 0.25
  with the gt boxes added as proposals.
* Losses: RetinaNet focal loss (γ 2, α 0.25) + L1 on deltas, both divided by the batch's
  positive count (Σ max(1, positives per image)); RPN BCE + L1; R-CNN cross-entropy + L1
  (deltas scaled by 1/(0.1, 0.1, 0.2, 0.2)), class-specific boxes; mask BCE on 28×28
  targets cropped with aligned RoIAlign and binarised at 0.5.
* RoIAlign: aligned=True, sampling ratio 0 (adaptive), 7×7 boxes / 14×14 masks, levels
  by ``floor(log2(sqrt(wh) / 56))`` over P2–P5 (our :class:`MultiLevelRoIAlign`; torchvision's
  ``MultiScaleRoIAlign`` has no ``aligned`` switch).
* Heads: RetinaNet 4+4 convs; RPN one 3×3 conv; box head two FC 1024; mask head 4 convs,
  2× deconv, 1×1 logits. The box classifier has K+1 outputs in mmdet's order (classes, then
  background); the box regressor and mask logits are class-specific over K classes. A zero
  background row is prepended for torchvision's post-processing, so parameter counts and
  shapes equal the official ones.
* Test: RetinaNet keeps per level the 1000 anchors with the highest class score, then
  class-wise NMS 0.5 over scores > 0.05, at most 100; RPN 1000 per level (2000 in training),
  NMS 0.7 per level, 1000 proposals (train and test); R-CNN score > 0.05, class-wise NMS 0.5,
  at most 100; masks pasted into the original image with bilinear grid sampling (mmdet's
  paste) and thresholded at 0.5 by the evaluation.
* Input: keep-ratio resize with mmcv's rounding (``int(x·s + 0.5)``), CLIP mean/std, pad to
  32. Every BatchNorm trains (``detection.train_bn``); initialisation is the official
  run's: mmcv ``ConvModule`` layers (FPN, RetinaNet head convs, mask-head convs)
  Kaiming-normal fan-out with zero bias, every other layer PyTorch's default, including
  RetinaNet's classifier bias (``detection.focal_prior_init`` switches to the usual prior).

Remaining differences from mmdet 2.17:

* Test-time resizing runs in float on the normalised image inside the model (mmcv resizes
  the uint8 image with OpenCV); bilinear either way, values differ by rounding. (Training
  images are resized as uint8 in the data pipeline, as mmcv does.)
* R-CNN post-processing drops boxes smaller than 0.01 px and runs NMS in the resized image
  before rescaling (mmdet rescales first); RPN drops proposals smaller than 1e-3 px
  (mmdet: zero-size ones).
* Sampling randomness (which anchors/RoIs are drawn) follows torch's generator, so runs
  are not bit-identical to mmdet's.
* Data (see :mod:`denseclip.data.coco`): boxes are clipped to the image; an unknown
  category id is an error (mmdet skips the annotation); polygon parts with fewer than three
  points are dropped (pycocotools would rasterise a two-point "polygon" as a box); the
  training image filter is torchvision's (mmdet also drops images under 32 px).

The auxiliary box-mask loss is computed over the batch as one tensor: Σ BCE over
classes and counted pixels of all images / (K × counted pixels of all images).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.models.detection.rpn import (
    RegionProposalNetwork,
    RPNHead,
    concat_box_prediction_layers,
)
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align, sigmoid_focal_loss

from ..checkpoint import OFFICIAL_SHARED_RENAMES, rename_key
from ..classes import load_class_names
from ..config import ConfigError, ModelConfig
from .fpn import conv_module_init
from .guidance import GuidedModel, TextGuidance

__all__ = [
    "BoxPredictor",
    "CLIPMaskRCNN",
    "CLIPRetinaNet",
    "CLIP_MEAN",
    "CLIP_STD",
    "DETECTION_TASKS",
    "DetectionFPN",
    "DetectionTransform",
    "GridAnchorGenerator",
    "MaskPredictor",
    "MaxIoUMatcher",
    "MultiLevelRoIAlign",
    "OFFICIAL_DETECTION_RENAMES",
    "box_seg_loss",
    "build_detector",
    "convert_official_detection_keys",
    "keep_ratio_size",
    "paste_masks",
    "retinanet_anchor_generator",
    "rpn_anchor_generator",
]

DETECTION_TASKS = ("retinanet", "mask_rcnn")
# CLIP's normalisation in 0..1 units (the detectors take images in 0..1).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Official DenseCLIP detection release key (mmdet 2.17) → ours. First matching rule wins.
OFFICIAL_DETECTION_RENAMES = [
    *OFFICIAL_SHARED_RENAMES,
    # RetinaNet head
    (r"^bbox_head\.cls_convs\.(\d+)\.conv\.", r"head.classification_head.conv.\1.0."),
    (r"^bbox_head\.reg_convs\.(\d+)\.conv\.", r"head.regression_head.conv.\1.0."),
    (r"^bbox_head\.retina_cls\.", "head.classification_head.cls_logits."),
    (r"^bbox_head\.retina_reg\.", "head.regression_head.bbox_reg."),
    # Mask R-CNN: RPN, box head, mask head
    (r"^rpn_head\.rpn_conv\.", "rpn.head.conv.0.0."),
    (r"^rpn_head\.rpn_cls\.", "rpn.head.cls_logits."),
    (r"^rpn_head\.rpn_reg\.", "rpn.head.bbox_pred."),
    (r"^roi_head\.bbox_head\.shared_fcs\.0\.", "roi_heads.box_head.fc6."),
    (r"^roi_head\.bbox_head\.shared_fcs\.1\.", "roi_heads.box_head.fc7."),
    (r"^roi_head\.bbox_head\.fc_cls\.", "roi_heads.box_predictor.cls_score."),
    (r"^roi_head\.bbox_head\.fc_reg\.", "roi_heads.box_predictor.bbox_pred."),
    (r"^roi_head\.mask_head\.convs\.(\d+)\.conv\.", r"roi_heads.mask_head.\1.0."),
    (r"^roi_head\.mask_head\.upsample\.", "roi_heads.mask_predictor.conv5_mask."),
    (r"^roi_head\.mask_head\.conv_logits\.", "roi_heads.mask_predictor.mask_fcn_logits."),
]


def convert_official_detection_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Rename an official detection state dict's keys with :data:`OFFICIAL_DETECTION_RENAMES`
    (the backbone keeps CLIP's names and needs no rule)."""
    return {rename_key(k, OFFICIAL_DETECTION_RENAMES): v for k, v in state_dict.items()}


# ------------------------------------------------------------------------------ init
def _default_init(module: nn.Module) -> None:
    """PyTorch's default initialisation of every conv/linear layer in ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            m.reset_parameters()


# ------------------------------------------------------------------------------ neck
class DetectionFPN(nn.Module):
    """FPN over the given backbone levels plus extra levels.

    ``extra="conv_on_input"`` (RetinaNet): two more outputs, a 3×3 stride-2 conv on the last
    *input* map and a 3×3 stride-2 conv on that result, no activation between (stored as
    ``fpn_convs[n]`` and ``fpn_convs[n + 1]``, mmdet's layout). ``extra="maxpool"`` (Mask
    R-CNN): one more output, a 1×1 stride-2 max-pool of the last output. Lateral 1×1 and
    output 3×3 convs have biases; no norm or activation.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256,
                 extra: str = "none") -> None:
        super().__init__()
        if extra not in ("none", "conv_on_input", "maxpool"):
            raise ValueError(f"extra must be none, conv_on_input or maxpool, got {extra!r}")
        self.extra = extra
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels
        )
        if extra == "conv_on_input":
            self.fpn_convs.append(nn.Conv2d(in_channels[-1], out_channels, 3, stride=2, padding=1))
            self.fpn_convs.append(nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1))
        self.num_inputs = len(in_channels)
        conv_module_init(self)

    @property
    def num_outputs(self) -> int:
        return self.num_inputs + {"none": 0, "conv_on_input": 2, "maxpool": 1}[self.extra]

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if len(features) != self.num_inputs:
            raise ValueError(f"expected {self.num_inputs} feature maps, got {len(features)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        n = self.num_inputs
        outs = [self.fpn_convs[i](laterals[i]) for i in range(n)]
        if self.extra == "conv_on_input":
            outs.append(self.fpn_convs[n](features[-1]))
            outs.append(self.fpn_convs[n + 1](outs[-1]))
        elif self.extra == "maxpool":
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return outs


# ------------------------------------------------------------------------------ anchors
class GridAnchorGenerator(AnchorGenerator):
    """Anchors at fixed strides, mmdet style: base anchors of ``sizes[l] × ratios`` centred
    on ``stride · (i, j)`` (ratio = h/w, ratio-major order), not rounded, in float32.

    Unlike torchvision's generator, the stride of each level is given rather than derived
    from image and feature sizes, and :meth:`valid_masks` marks anchors inside each image's
    own padded area (mmdet's valid flags).
    """

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[float],
                 strides: Sequence[int], pad_divisor: int = 32) -> None:
        sizes = tuple(tuple(float(s) for s in level) for level in sizes)
        ratios = tuple(float(r) for r in aspect_ratios)
        if len(sizes) != len(strides):
            raise ValueError(f"{len(sizes)} anchor size levels for {len(strides)} strides")
        super().__init__(sizes, (ratios,) * len(sizes))
        self.strides = tuple(int(s) for s in strides)
        self.pad_divisor = int(pad_divisor)

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32,
                         device: torch.device | None = None) -> Tensor:
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"{len(feature_maps)} feature maps for {len(self.strides)} "
                             "anchor levels")
        device = feature_maps[0].device
        levels = []
        for fmap, stride, sizes, ratios in zip(feature_maps, self.strides, self.sizes,
                                               self.aspect_ratios, strict=True):
            h, w = fmap.shape[-2:]
            base = self.generate_anchors(sizes, ratios, torch.float32, device)
            xs = torch.arange(w, dtype=torch.float32, device=device) * stride
            ys = torch.arange(h, dtype=torch.float32, device=device) * stride
            sy, sx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)
            levels.append((shifts + base[None]).reshape(-1, 4))
        anchors = torch.cat(levels)
        return [anchors for _ in image_list.image_sizes]

    def valid_masks(self, image_sizes: Sequence[tuple[int, int]],
                    grid_sizes: Sequence[Sequence[int]], device: torch.device) -> list[Tensor]:
        """Per image, a bool mask over all anchors: True where the anchor's grid cell lies
        inside the image padded to a multiple of ``pad_divisor``."""
        a = [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios, strict=True)]
        out = []
        for h, w in image_sizes:
            pad_h = math.ceil(h / self.pad_divisor) * self.pad_divisor
            pad_w = math.ceil(w / self.pad_divisor) * self.pad_divisor
            masks = []
            for (gh, gw), stride, n in zip(grid_sizes, self.strides, a, strict=True):
                vh, vw = min(math.ceil(pad_h / stride), gh), min(math.ceil(pad_w / stride), gw)
                m = torch.zeros(gh, gw, dtype=torch.bool, device=device)
                m[:vh, :vw] = True
                masks.append(m.reshape(-1, 1).expand(-1, n).reshape(-1))
            out.append(torch.cat(masks))
        return out


def retinanet_anchor_generator(pad_divisor: int = 32) -> GridAnchorGenerator:
    """octave_base_scale 4, scales_per_octave 3, ratios 0.5/1/2, strides 8–128."""
    strides = (8, 16, 32, 64, 128)
    sizes = [[4 * s * 2 ** (i / 3) for i in range(3)] for s in strides]
    return GridAnchorGenerator(sizes, (0.5, 1.0, 2.0), strides, pad_divisor)


def rpn_anchor_generator(pad_divisor: int = 32) -> GridAnchorGenerator:
    """Scale 8, ratios 0.5/1/2, strides 4–64."""
    strides = (4, 8, 16, 32, 64)
    return GridAnchorGenerator([[8 * s] for s in strides], (0.5, 1.0, 2.0), strides,
                               pad_divisor)


# ------------------------------------------------------------------------------ matching
class MaxIoUMatcher(det_utils.Matcher):
    """torchvision's matcher with mmdet's ``MaxIoUAssigner`` low-quality rule: each gt whose
    best IoU is at least ``min_pos_iou`` claims every prediction at that IoU (ties
    included), later gts overriding earlier ones. ``min_pos_iou=None`` disables it."""

    def __init__(self, high_threshold: float, low_threshold: float,
                 min_pos_iou: float | None = None) -> None:
        super().__init__(high_threshold, low_threshold, min_pos_iou is not None)
        self.min_pos_iou = min_pos_iou

    def set_low_quality_matches_(self, matches: Tensor, all_matches: Tensor,
                                 match_quality_matrix: Tensor) -> None:
        best = match_quality_matrix.max(dim=1).values  # (G,)
        claim = (match_quality_matrix == best[:, None]) & (best[:, None] >= self.min_pos_iou)
        claimed = claim.any(dim=0)
        if not bool(claimed.any()):
            return
        # index of the last gt claiming each prediction
        last = claim.shape[0] - 1 - claim.flip(0).to(torch.uint8).argmax(dim=0)
        matches[claimed] = last[claimed]


# ------------------------------------------------------------------------------ RoI pooling
class MultiLevelRoIAlign(nn.Module):
    """RoIAlign over FPN levels with mmdet's level rule
    ``clamp(floor(log2(sqrt(w·h) / finest_scale + 1e-6)), 0, L-1)`` and fixed strides.

    Call signature as torchvision's ``MultiScaleRoIAlign``: ``(features: dict, boxes: list of
    (n_i, 4), image_shapes)`` → (Σn_i, C, *output_size)."""

    def __init__(self, featmap_names: Sequence[str], output_size: int,
                 strides: Sequence[int], sampling_ratio: int = 0, aligned: bool = True,
                 finest_scale: float = 56.0) -> None:
        super().__init__()
        if len(featmap_names) != len(strides):
            raise ValueError("one stride per feature map name is needed")
        self.featmap_names = list(featmap_names)
        self.output_size = (int(output_size), int(output_size))
        self.strides = [int(s) for s in strides]
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.finest_scale = finest_scale

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]] | None = None) -> Tensor:
        feats = [features[name] for name in self.featmap_names]
        # boxes stay float32 (as RoIAlign's autocast rule computes), whatever the features
        rois = torch.cat([
            torch.cat([torch.full_like(b[:, :1], i, dtype=torch.float32), b.float()], dim=1)
            for i, b in enumerate(boxes)
        ])
        channels = feats[0].shape[1]
        if rois.shape[0] == 0:
            return feats[0].new_zeros((0, channels, *self.output_size))
        wh = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
        scale = wh.float().clamp(min=0).sqrt()
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        levels = levels.clamp(0, len(feats) - 1).long()
        parts, where = [], []
        for lvl, (feat, stride) in enumerate(zip(feats, self.strides, strict=True)):
            idx = torch.nonzero(levels == lvl).flatten()
            if idx.numel() == 0:
                continue
            parts.append(roi_align(feat.float(), rois[idx], self.output_size, 1.0 / stride,
                                   self.sampling_ratio, self.aligned))
            where.append(idx)
        out = parts[0].new_zeros((rois.shape[0], channels, *self.output_size))
        for idx, part in zip(where, parts, strict=True):
            out[idx] = part
        return out

    def extra_repr(self) -> str:
        return (f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"strides={self.strides}, sampling_ratio={self.sampling_ratio}, "
                f"aligned={self.aligned}")


# ------------------------------------------------------------------------------ transform
def keep_ratio_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: factor ``min(max_size/long, min_size/short)``, sizes
    rounded half up."""
    factor = min(max_size / max(height, width), min_size / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def paste_masks(masks: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Paste M×M mask probabilities (N×1×M×M) into an image of ``size`` at ``boxes`` (N×4)
    by bilinear sampling at pixel centres (mmdet's paste); zero outside the boxes."""
    h, w = int(size[0]), int(size[1])
    n = masks.shape[0]
    out = torch.zeros((n, 1, h, w), dtype=torch.float32, device=masks.device)
    if n == 0 or h == 0 or w == 0:
        return out
    ys = torch.arange(h, dtype=torch.float32, device=masks.device) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=masks.device) + 0.5
    boxes = boxes.float()
    chunk = max(1, (1 << 24) // (h * w))
    for start in range(0, n, chunk):
        b = boxes[start:start + chunk]
        x0, y0, x1, y1 = b.unbind(1)
        gy = (ys[None] - y0[:, None]) / (y1 - y0).clamp(min=1e-6)[:, None] * 2 - 1
        gx = (xs[None] - x0[:, None]) / (x1 - x0).clamp(min=1e-6)[:, None] * 2 - 1
        grid = torch.stack([gx[:, None, :].expand(-1, h, -1), gy[:, :, None].expand(-1, -1, w)],
                           dim=3)
        out[start:start + chunk] = F.grid_sample(masks[start:start + chunk].float(), grid,
                                                 align_corners=False)
    return out


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's detector transform (normalise, resize, pad to a multiple) with mmcv's
    resize rounding, no work when the image already has the target size (the training
    pipeline resizes in the data loader), and mmdet's mask paste in :meth:`postprocess`."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        h, w = image.shape[-2:]
        size = keep_ratio_size(h, w, self.min_size[-1], self.max_size)
        if size == (h, w):
            return image, target
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is None:
            return image, target
        target = dict(target)
        ratio = torch.tensor([size[1] / w, size[0] / h] * 2, device=image.device)
        target["boxes"] = target["boxes"] * ratio.to(target["boxes"].dtype)
        if "masks" in target:
            masks = target["masks"]
            if masks.shape[0] == 0:
                target["masks"] = masks.new_zeros((0, *size))
            else:
                target["masks"] = F.interpolate(masks[:, None].float(), size=size,
                                                mode="nearest")[:, 0].to(masks.dtype)
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training:
            return result
        for pred, (h, w), (oh, ow) in zip(result, image_shapes, original_image_sizes,
                                          strict=True):
            ratio = torch.tensor([ow / w, oh / h] * 2, device=pred["boxes"].device)
            pred["boxes"] = pred["boxes"] * ratio.to(pred["boxes"].dtype)
            if "masks" in pred:
                pred["masks"] = paste_masks(pred["masks"], pred["boxes"], (oh, ow))
        return result


# ------------------------------------------------------------------------------ losses
def box_seg_loss(score_logits: Tensor, boxes: Sequence[Tensor], labels: Sequence[Tensor],
                 stride: int = 4) -> Tensor:
    """DenseCLIP's auxiliary box-mask loss (DESIGN §6).

    ``score_logits`` (B, K, H, W) is the τ-divided score map at ``stride``; per image and
    class the target is 1 inside that class's boxes (coordinates divided by ``stride``,
    truncated, clamped, end-exclusive); pixels inside any box are the ones counted. Returns
    Σ BCE(sigmoid(score), target) over classes and counted pixels / (K × counted pixels)."""
    b, k, h, w = score_logits.shape
    target = score_logits.new_zeros((b, k, h, w), dtype=torch.float32)
    counted = torch.zeros((b, 1, h, w), dtype=torch.bool, device=score_logits.device)
    ys = torch.arange(h, device=score_logits.device)
    xs = torch.arange(w, device=score_logits.device)
    for i, (bx, lb) in enumerate(zip(boxes, labels, strict=True)):
        if bx.numel() == 0:
            continue
        q = torch.div(bx.detach(), stride).trunc().long()
        x1, x2 = q[:, 0].clamp(0, w), q[:, 2].clamp(0, w)
        y1, y2 = q[:, 1].clamp(0, h), q[:, 3].clamp(0, h)
        inside = ((ys[None, :, None] >= y1[:, None, None]) & (ys[None, :, None] < y2[:, None, None])
                  & (xs[None, None, :] >= x1[:, None, None])
                  & (xs[None, None, :] < x2[:, None, None]))  # (n, H, W)
        target[i].index_add_(0, lb.long(), inside.float())
        counted[i, 0] = inside.any(dim=0)
    target.clamp_(max=1.0)
    loss = F.binary_cross_entropy_with_logits(score_logits.float(), target, reduction="none")
    mask = counted.float()
    return (loss * mask).sum() / (k * mask.sum()).clamp(min=1.0)


# ------------------------------------------------------------------------------ shared part
class _CLIPDetector(GuidedModel):
    """Mixin of both detectors: CLIP feature extraction (the shared :class:`GuidedModel`
    fusion, with score / τ), DenseCLIP's seg loss, input checks and the BatchNorm mode."""

    neck: DetectionFPN
    fuse_logits = True
    head_description = "detection head"

    def _setup(self, backbone: nn.Module, guidance: TextGuidance | None, neck: DetectionFPN,
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

    def extract_features(self, x: Tensor) -> tuple[list[Tensor], Tensor | None, Tensor]:
        """:meth:`forward_features` (score map / τ fused into ``score_level``) → FPN.
        Returns (pyramid, score map (B, K, h, w) or None, C2)."""
        dense = self.forward_features(x)
        pyramid = self.neck([dense.features[i] for i in self.in_levels])
        score = None if dense.guided is None else dense.guided.score
        return pyramid, score, dense.features[0]

    def _seg_aux_loss(self, score: Tensor | None, c2: Tensor,
                      targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        if score is None or self.seg_loss_weight == 0:
            return {}
        logits = F.interpolate(score / self.guidance.tau, size=c2.shape[-2:], mode="bilinear",
                               align_corners=False)
        loss = box_seg_loss(logits, [t["boxes"] for t in targets],
                            [t["labels"] for t in targets], stride=4)  # C2 is at stride 4
        return {"loss_seg_aux": self.seg_loss_weight * loss}

    def _check_inputs(self, images, targets):
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
        return list(images), targets, sizes


# ------------------------------------------------------------------------------ RetinaNet
class CLIPRetinaNet(_CLIPDetector, RetinaNet):
    """RetinaNet on a CLIP ResNet (C3–C5 + P6 on the C5 input + P7), DenseCLIP score map
    on C5 when ``guidance`` is given. See the module docstring for the recipe."""

    def __init__(self, backbone: nn.Module, num_classes: int,
                 guidance: TextGuidance | None = None, *, score_level: int = 3,
                 neck_channels: int = 256, min_size: int = 800, max_size: int = 1333,
                 size_divisor: int = 32, image_mean: Sequence[float] = (0.0, 0.0, 0.0),
                 image_std: Sequence[float] = (1.0, 1.0, 1.0), score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 100,
                 topk_candidates: int = 1000, seg_loss_weight: float = 0.0,
                 focal_prior_init: bool = False, train_bn: bool = True) -> None:
        in_levels = [1, 2, 3]
        in_channels = [backbone.out_channels[i] for i in in_levels]
        if guidance is not None:
            if score_level not in in_levels:
                raise ValueError(f"score_level must be one of {in_levels} (C3–C5) for RetinaNet")
            in_channels[in_levels.index(score_level)] += num_classes
        neck = DetectionFPN(in_channels, neck_channels, "conv_on_input")
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

    def postprocess_detections(self, head_outputs, anchors, image_shapes):
        """mmdet 2.17: per level keep the ``topk_candidates`` anchors with the highest
        class score, decode; then class-wise NMS over (anchor, class) scores above the
        threshold, at most ``detections_per_img``."""
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
            anchor_idx, labels = torch.nonzero(scores > self.score_thresh, as_tuple=True)
            boxes, scores = boxes[anchor_idx], scores[anchor_idx, labels]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)
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

    def forward(self, images, targets=None):
        images, targets, original_sizes = self._check_inputs(images, targets)
        image_list, targets = self.transform(images, targets)
        pyramid, score, c2 = self.extract_features(image_list.tensors)
        head_outputs = self.head(pyramid)
        anchors = self.anchor_generator(image_list, pyramid)
        if self.training:
            valid = self.anchor_generator.valid_masks(
                image_list.image_sizes, [p.shape[-2:] for p in pyramid], pyramid[0].device)
            losses = self.compute_loss(targets, head_outputs, anchors, valid)
            losses.update(self._seg_aux_loss(score, c2, targets))
            return losses
        per_level = [p.shape[-2] * p.shape[-1] * self.anchor_generator.num_anchors_per_location()[0]
                     for p in pyramid]
        split = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        detections = self.postprocess_detections(split, split_anchors, image_list.image_sizes)
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)


# ------------------------------------------------------------------------------ Mask R-CNN
class _RPN(RegionProposalNetwork):
    """torchvision's RPN with L1 box loss, mmdet's assigner and anchor valid flags."""

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


class _RoIHeads(RoIHeads):
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


class CLIPMaskRCNN(_CLIPDetector, GeneralizedRCNN):
    """Mask R-CNN on a CLIP ResNet (C2–C5 + max-pooled P6), DenseCLIP score map on C5 when
    ``guidance`` is given. See the module docstring for the recipe."""

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
        in_levels = [0, 1, 2, 3]
        in_channels = [backbone.out_channels[i] for i in in_levels]
        if guidance is not None:
            if score_level not in in_levels:
                raise ValueError("score_level must be 0..3 for Mask R-CNN")
            in_channels[score_level] += num_classes
        neck = DetectionFPN(in_channels, neck_channels, "maxpool")
        anchors = rpn_anchor_generator(size_divisor)
        rpn_head = RPNHead(neck_channels, anchors.num_anchors_per_location()[0])
        _default_init(rpn_head)  # plain convs in the official head, init never called
        rpn = _RPN(anchors, rpn_head, 0.7, 0.3, rpn_batch_size_per_image, 0.5,
                   {"training": rpn_pre_nms_top_n[0], "testing": rpn_pre_nms_top_n[1]},
                   {"training": rpn_post_nms_top_n[0], "testing": rpn_post_nms_top_n[1]},
                   0.7)
        rpn.proposal_matcher = MaxIoUMatcher(0.7, 0.3, min_pos_iou=0.3)
        names, strides = ["0", "1", "2", "3"], [4, 8, 16, 32]
        mask_head = MaskRCNNHeads(neck_channels, [head_channels] * 4, 1)
        conv_module_init(mask_head)
        roi_heads = _RoIHeads(
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

    def forward(self, images, targets=None):
        images, targets, original_sizes = self._check_inputs(images, targets)
        image_list, targets = self.transform(images, targets)
        pyramid, score, c2 = self.extract_features(image_list.tensors)
        features = OrderedDict(zip(["0", "1", "2", "3", "pool"], pyramid, strict=True))
        # torchvision's R-CNN heads reserve label 0 for the background
        rcnn_targets = None
        if targets is not None:
            rcnn_targets = [{**t, "labels": t["labels"] + 1} for t in targets]
        proposals, rpn_losses = self.rpn(image_list, features, rcnn_targets)
        detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes,
                                                rcnn_targets)
        if self.training:
            return {**rpn_losses, **roi_losses, **self._seg_aux_loss(score, c2, targets)}
        for det in detections:
            det["labels"] = det["labels"] - 1
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)


# ------------------------------------------------------------------------------ builder
def build_detector(cfg: ModelConfig, **options: Any) -> nn.Module:
    """The ``cfg.task`` detector (``retinanet`` or ``mask_rcnn``) for ``cfg.classes``.

    ``options`` override keyword arguments of the detector classes (e.g. Mask R-CNN's
    ``rpn_batch_size_per_image``). The Mask R-CNN box-head width is 4 × ``cfg.head_channels``
    (1024 for the presets' 256)."""
    from .build import build_backbone, build_guidance

    if cfg.task not in DETECTION_TASKS:
        raise ConfigError(f"model.task must be one of {DETECTION_TASKS}, got {cfg.task!r}")
    if cfg.backbone.type != "resnet":
        raise ConfigError("detection supports CLIP ResNet backbones only "
                          f"(model.backbone.type=resnet), got {cfg.backbone.type!r}")
    class_names = load_class_names(cfg.classes)
    guided = cfg.guidance.enabled
    if guided and not cfg.backbone.embeddings:
        raise ConfigError("model.guidance.enabled needs model.backbone.embeddings: true")
    det = cfg.detection
    if det.seg_loss and not guided:
        raise ConfigError("model.detection.seg_loss needs text guidance "
                          "(model.guidance.enabled: true); turn it off for CLIP baselines")
    backbone = build_backbone(cfg.backbone)
    guidance = build_guidance(cfg, class_names) if guided else None
    common: dict[str, Any] = dict(
        score_level=cfg.guidance.score_level, neck_channels=cfg.neck_channels,
        min_size=det.min_size, max_size=det.max_size, size_divisor=det.size_divisor,
        score_thresh=det.score_thresh, detections_per_img=det.detections_per_img,
        seg_loss_weight=det.seg_loss_weight if det.seg_loss else 0.0, train_bn=det.train_bn,
    )
    common.update(image_mean=CLIP_MEAN, image_std=CLIP_STD)
    common.update(options)
    try:
        if cfg.task == "retinanet":
            if cfg.head_channels != cfg.neck_channels:
                raise ConfigError("RetinaNet head convs keep the FPN width: set "
                                  "model.head_channels equal to model.neck_channels")
            return CLIPRetinaNet(backbone, len(class_names), guidance,
                                 focal_prior_init=det.focal_prior_init, **common)
        for name in ("rpn_pre_nms_top_n", "rpn_post_nms_top_n"):
            value = getattr(det, name)
            if len(value) != 2:
                raise ConfigError(f"model.detection.{name} must be [training, test], got {value}")
            common.setdefault(name, tuple(value))
        common.setdefault("box_batch_size_per_image", det.box_batch_size_per_image)
        common.setdefault("representation_size", 4 * cfg.head_channels)
        return CLIPMaskRCNN(backbone, len(class_names), guidance,
                            head_channels=cfg.head_channels, **common)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"model: {e}") from None
