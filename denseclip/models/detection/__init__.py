"""COCO detectors on torchvision: RetinaNet and Mask R-CNN on a CLIP ResNet and, for
DenseCLIP, the text-guided score map concatenated to C5 (DESIGN §5–6, §9). The recipe
(mmdet 2.17's) and the remaining differences are in docs/detection.md.

Calling convention (torchvision's): ``model(images, targets)`` in training mode returns a
dict of ``loss_*`` tensors whose sum is the training loss; ``model(images)`` in eval mode
returns one dict per image with ``boxes`` (x1, y1, x2, y2), ``scores``, ``labels`` and, for
Mask R-CNN, ``masks`` (N×1×H×W probabilities), in the pixels of the original images:
``model(images, original_sizes=[(H, W), ...])`` when the caller resized them (the COCO
test pipeline and the predictor resize the uint8 image with OpenCV, as mmdet), else the
input sizes; boxes are rescaled before NMS, as mmdet does. ``images`` are float 3×H×W
tensors in 0..1 (a list, or a 4-D batch); the model normalises them with CLIP's mean/std,
resizes them keep-ratio to (max_size, min_size) unless they already have that size, and
pads the batch to a multiple of 32. Targets hold ``boxes`` (float N×4, x1y1x2y2 in input
pixels), ``labels`` (int64 class indices 0..K-1, the position in ``model.classes``; no
background index) and, for Mask R-CNN, ``masks`` (uint8 N×H×W). Output labels use the
same 0..K-1 indices. The builder is :func:`denseclip.models.build.build_detector`;
:data:`DETECTORS` maps ``model.task`` to the class.
"""

from .anchors import GridAnchorGenerator, retinanet_anchor_generator, rpn_anchor_generator
from .base import CLIPDetector
from .losses import box_seg_loss
from .mask_rcnn import CLIPMaskRCNN
from .matcher import MaxIoUMatcher
from .nms import batched_nms
from .poolers import MultiLevelRoIAlign
from .retinanet import CLIPRetinaNet
from .roi_heads import BoxPredictor, MaskPredictor
from .transform import DetectionTransform, paste_masks, scale_factors

# model.task → its detector class
DETECTORS = {cls.TASK: cls for cls in (CLIPRetinaNet, CLIPMaskRCNN)}

__all__ = [
    "BoxPredictor",
    "CLIPDetector",
    "CLIPMaskRCNN",
    "CLIPRetinaNet",
    "DETECTORS",
    "DetectionTransform",
    "GridAnchorGenerator",
    "MaskPredictor",
    "MaxIoUMatcher",
    "MultiLevelRoIAlign",
    "batched_nms",
    "box_seg_loss",
    "paste_masks",
    "retinanet_anchor_generator",
    "rpn_anchor_generator",
    "scale_factors",
]
