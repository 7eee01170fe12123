"""RetinaNet / Mask R-CNN on CLIP ResNets: architecture against the official key lists and
DESIGN §8, the mmdet-style building blocks, gradients, and a short overfitting run."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou, nms, roi_align

import denseclip
from denseclip.config import ConfigError, DataConfig
from denseclip.data.coco import CocoDetection, build_coco_train_transforms, collate_detection
from denseclip.models.build import build_detector
from denseclip.models.detection import (
    CLIPMaskRCNN,
    CLIPRetinaNet,
    DetectionTransform,
    GridAnchorGenerator,
    MaxIoUMatcher,
    MultiLevelRoIAlign,
    box_seg_loss,
    paste_masks,
    retinanet_anchor_generator,
)
from denseclip.models.detection.transform import scale_factors
from denseclip.models.official import OFFICIAL_DETECTION_RENAMES
from denseclip.tools.flops import count_parameters
from denseclip.utils import keep_ratio_size
from denseclip.weights import rename_key
from tests.helpers.clip import FakeOpenAICLIP

OFFICIAL_KEYS = Path(__file__).parents[1] / "fixtures" / "official_keys"
# preset → params excluding the text encoder (M), DESIGN §8
ZOO = {
    "retinanet_clip_r50_fpn_1x_coco": 37.99,
    "retinanet_denseclip_r50_fpn_1x_coco": 60.45,
    "retinanet_clip_r101_fpn_1x_coco": 56.98,
    "retinanet_denseclip_r101_fpn_1x_coco": 78.00,
    "mask_rcnn_clip_r50_fpn_1x_coco": 44.42,
    "mask_rcnn_denseclip_r50_fpn_1x_coco": 66.69,
    "mask_rcnn_clip_r101_fpn_1x_coco": 63.41,
    "mask_rcnn_denseclip_r101_fpn_1x_coco": 84.24,
}
# ViT-B/16 detectors (no official counterpart): params excluding the text encoder (M), as
# built here; pinned so that a change to the pyramid or heads is noticed.
VIT_ZOO = {
    "retinanet_clip_vit-b_fpn_1x_coco": 99.346,
    "retinanet_denseclip_vit-b_fpn_1x_coco": 103.319,
    "mask_rcnn_clip_vit-b_fpn_1x_coco": 113.577,
    "mask_rcnn_denseclip_vit-b_fpn_1x_coco": 117.550,
}
# few proposals keep Mask R-CNN steps fast on a CPU
FEW_PROPOSALS = dict(rpn_pre_nms_top_n=(200, 100), rpn_post_nms_top_n=(100, 100),
                     box_batch_size_per_image=64)


def tiny(name: str, root: Path, *overrides: str, **options) -> nn.Module:
    cfg = denseclip.load_config(name, [f"model.classes={root / 'classes.txt'}", *overrides])
    if cfg.model.task == "mask_rcnn":
        options = {**FEW_PROPOSALS, **options}
    torch.manual_seed(0)
    return build_detector(cfg.model, **options)


def train_batch(root: Path, masks: bool, indices=(0, 1)):
    ds = CocoDetection(root / "train", root / "annotations" / "instances_train.json",
                       train=True, with_masks=masks,
                       transforms=build_coco_train_transforms(DataConfig(scale=[160, 128],
                                                                         flip_prob=0.0)))
    return collate_detection([ds[i] for i in indices])


def read_official_keys(name: str) -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in (OFFICIAL_KEYS / f"{name}.txt").read_text().splitlines():
        if not line.startswith("#"):
            key, shape, _ = line.split("\t")
            keys[key] = tuple(ast.literal_eval(shape))
    return keys


# ----------------------------------------------------------------------------- architecture
@pytest.mark.parametrize("name", list(ZOO) + list(VIT_ZOO))
def test_parameter_counts_match_design(name):
    with torch.device("meta"):
        model = denseclip.build_model(denseclip.load_config(name))
    params = count_parameters(model)["excluding_text_encoder"] / 1e6
    if name in ZOO:
        assert params == pytest.approx(ZOO[name], abs=0.01)  # the official table's precision
    else:
        assert params == pytest.approx(VIT_ZOO[name], abs=0.001)


@pytest.mark.parametrize("name", list(ZOO))
def test_official_keys_map_name_for_name_with_equal_shapes(name):
    with torch.device("meta"):
        model = denseclip.build_model(denseclip.load_config(name))
    model_sd = model.state_dict()
    official = read_official_keys(name)
    converted = {rename_key(k, OFFICIAL_DETECTION_RENAMES): v for k, v in official.items()}
    assert len(converted) == len(official)  # one-to-one
    assert sorted(converted) == sorted(model_sd)
    for key, shape in converted.items():
        assert tuple(model_sd[key].shape) == shape, key


# Our key → the official key, written independently of the package's rename table.
def to_official(key: str) -> str:
    rules = [
        (r"^guidance\.", ""),
        (r"^neck\.(\w+_convs)\.(\d+)\.", r"neck.\1.\2.conv."),
        (r"^head\.classification_head\.conv\.(\d+)\.0\.", r"bbox_head.cls_convs.\1.conv."),
        (r"^head\.regression_head\.conv\.(\d+)\.0\.", r"bbox_head.reg_convs.\1.conv."),
        (r"^head\.classification_head\.cls_logits\.", "bbox_head.retina_cls."),
        (r"^head\.regression_head\.bbox_reg\.", "bbox_head.retina_reg."),
        (r"^rpn\.head\.conv\.0\.0\.", "rpn_head.rpn_conv."),
        (r"^rpn\.head\.cls_logits\.", "rpn_head.rpn_cls."),
        (r"^rpn\.head\.bbox_pred\.", "rpn_head.rpn_reg."),
        (r"^roi_heads\.box_head\.fc(\d)\.", lambda m: f"roi_head.bbox_head.shared_fcs."
                                                       f"{int(m[1]) - 6}."),
        (r"^roi_heads\.box_predictor\.cls_score\.", "roi_head.bbox_head.fc_cls."),
        (r"^roi_heads\.box_predictor\.bbox_pred\.", "roi_head.bbox_head.fc_reg."),
        (r"^roi_heads\.mask_head\.(\d+)\.0\.", r"roi_head.mask_head.convs.\1.conv."),
        (r"^roi_heads\.mask_predictor\.conv5_mask\.", "roi_head.mask_head.upsample."),
        (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", "roi_head.mask_head.conv_logits."),
    ]
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


@pytest.mark.parametrize("name", ["tiny_retinanet_denseclip", "tiny_mask_rcnn_denseclip"])
def test_official_release_weights_load_into_our_model(shared_coco, name, tmp_path):
    source = tiny(name, shared_coco)
    official = {to_official(k): v for k, v in source.state_dict().items()}
    assert [rename_key(k, OFFICIAL_DETECTION_RENAMES) for k in official] == list(
        source.state_dict().keys())
    torch.save({"meta": {"epoch": 12}, "state_dict": official}, tmp_path / "release.pth")
    target = tiny(name, shared_coco)
    for p in target.parameters():
        p.data.zero_()
    report = denseclip.load_checkpoint(target, tmp_path / "release.pth")
    assert report.format == "official" and report.new == [] and report.ignored == []
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_retinanet_fpn_extras_and_mask_rcnn_p6():
    torch.manual_seed(0)
    cfg = denseclip.load_config("tiny_retinanet_clip").model
    retina = build_detector(cfg)
    feats = [torch.randn(1, c, s, s) for c, s in ((64, 20), (128, 10), (256, 5))]
    outs = retina.neck(feats)
    assert [o.shape[-1] for o in outs] == [20, 10, 5, 3, 2]
    assert retina.neck.fpn_convs[3].in_channels == 256  # P6 reads the C5 input
    torch.testing.assert_close(outs[4], retina.neck.fpn_convs[4](outs[3]))  # no ReLU
    rcnn = build_detector(denseclip.load_config("tiny_mask_rcnn_clip").model)
    outs = rcnn.neck([torch.randn(1, 32, 40, 40)] + feats)
    assert len(outs) == 5
    torch.testing.assert_close(outs[4], outs[3][..., ::2, ::2])
    # DenseCLIP: C5 carries score / tau (K extra channels) into lateral and P6 convs
    dense = build_detector(denseclip.load_config("tiny_retinanet_denseclip").model)
    assert dense.neck.lateral_convs[2].in_channels == 256 + 80
    assert dense.neck.fpn_convs[3].in_channels == 256 + 80


def test_anchors_use_fixed_strides_and_are_not_rounded():
    gen = retinanet_anchor_generator()
    images = ImageList(torch.zeros(1, 3, 800, 1216), [(800, 1216)])
    shapes = [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]
    feats = [torch.zeros(1, 1, h, w) for h, w in shapes]
    (anchors,) = gen(images, feats)
    assert anchors.shape == (sum(h * w for h, w in shapes) * 9, 4)
    assert anchors.dtype == torch.float32
    first = anchors[:9]
    sizes = (first[:, 2] - first[:, 0]) * (first[:, 3] - first[:, 1])
    expected = sorted(32 * 32 * 2 ** (2 * i / 3) for i in range(3)) * 3
    assert sorted(sizes.tolist()) == pytest.approx(sorted(expected), rel=1e-5)
    offset = sum(h * w for h, w in shapes[:3]) * 9
    p6 = anchors[offset:offset + 13 * 19 * 9].reshape(13, 19, 9, 4)
    centre = (p6[1, 1, 0, :2] + p6[1, 1, 0, 2:]) / 2
    assert centre.tolist() == [64.0, 64.0]  # stride 64 exactly (torchvision: 1216 // 19)
    # anchor order within a cell is ratio-major (mmdet and torchvision agree)
    h_over_w = (first[:, 3] - first[:, 1]) / (first[:, 2] - first[:, 0])
    assert h_over_w[::3].tolist() == pytest.approx([0.5, 1.0, 2.0])


def test_valid_masks_follow_each_images_own_padding():
    gen = GridAnchorGenerator([[32.0]], (1.0,), (8,), pad_divisor=32)
    (small, big) = gen.valid_masks([(50, 30), (64, 64)], [(8, 8)], torch.device("cpu"))
    assert small.reshape(8, 8)[:, :4].all() and not small.reshape(8, 8)[:, 4:].any()
    assert big.all()


def test_matcher_uses_mmdets_low_quality_rule():
    # anchor 0 is gt 0's best (IoU .3) but overlaps gt 1 more (.35); gt 1's best is anchor 1
    iou = torch.tensor([[0.30, 0.10, 0.0], [0.35, 0.60, 0.0]])
    assert MaxIoUMatcher(0.5, 0.4, min_pos_iou=0.0)(iou.clone()).tolist() == [0, 1, -1]
    assert MaxIoUMatcher(0.5, 0.4, min_pos_iou=0.31)(iou.clone()).tolist() == [-1, 1, -1]
    assert MaxIoUMatcher(0.5, 0.4)(iou.clone()).tolist() == [-1, 1, -1]


def test_multi_level_roi_align_is_aligned_and_uses_mmdets_levels():
    torch.manual_seed(0)
    feats = {str(i): torch.randn(1, 4, 64 // 2**i, 64 // 2**i) for i in range(4)}
    pooler = MultiLevelRoIAlign(["0", "1", "2", "3"], 7, [4, 8, 16, 32])
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [10.0, 10.0, 122.0, 122.0],
                          [0.0, 0.0, 250.0, 250.0], [0.0, 0.0, 460.0, 460.0]])
    # sqrt(area) / 56: 0.71, 2, 4.5, 8.2 -> levels 0 (clamped), 1, 2, 3
    out = pooler(feats, [boxes], [(256, 256)])
    for row, (level, stride) in enumerate([(0, 4), (1, 8), (2, 16), (3, 32)]):
        rois = torch.cat([torch.zeros(1, 1), boxes[row:row + 1]], dim=1)
        ref = roi_align(feats[str(level)], rois, (7, 7), 1 / stride, 0, aligned=True)
        torch.testing.assert_close(out[row:row + 1], ref)
    assert pooler(feats, [torch.zeros(0, 4)], [(256, 256)]).shape == (0, 4, 7, 7)


def test_box_seg_loss_matches_a_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 10, 12)
    boxes = [torch.tensor([[4.0, 8.0, 13.0, 17.0], [0.0, 0.0, 47.9, 9.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([2, 0]), torch.zeros(0, dtype=torch.long)]
    target = torch.zeros(2, 3, 10, 12)
    counted = torch.zeros(2, 10, 12, dtype=torch.bool)
    target[0, 2, 2:4, 1:3] = 1  # (4/4, 8/4) .. (13/4, 17/4) truncated, end-exclusive
    target[0, 0, 0:2, 0:11] = 1  # 47.9/4 = 11.97 -> 11
    counted[0, 2:4, 1:3] = True
    counted[0, 0:2, 0:11] = True
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    expected = (bce * counted[:, None]).sum() / (3 * counted.sum())
    torch.testing.assert_close(box_seg_loss(logits, boxes, labels, stride=4), expected)
    nothing = box_seg_loss(logits, [torch.zeros(0, 4)] * 2,
                           [torch.zeros(0, dtype=torch.long)] * 2)
    assert float(nothing) == 0.0


def test_box_seg_loss_clamps_to_the_last_row_and_column():
    """Official build_seg_target: coordinates // 4 clamped to W-1 / H-1, then an
    end-exclusive slice: a box reaching the right / bottom edge leaves them out."""
    logits = torch.linspace(-2, 2, 20).reshape(1, 1, 4, 5)
    boxes = [torch.tensor([[4.0, 0.0, 20.0, 16.0]])]  # // 4 -> (1, 0, 5, 4), reaches both edges
    target = torch.zeros(1, 1, 4, 5)
    target[0, 0, 0:3, 1:4] = 1  # x2 5 -> 4, y2 4 -> 3
    counted = target.bool()
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    expected = (bce * counted).sum() / counted.sum()
    torch.testing.assert_close(box_seg_loss(logits, boxes, [torch.tensor([0])]), expected)


def test_transform_rounds_like_mmcv_and_leaves_predictions_alone():
    assert keep_ratio_size(480, 640, (1333, 800)) == (800, 1067)  # torchvision floors: 1066
    t = DetectionTransform(800, 1333, [0.0] * 3, [1.0] * 3).eval()
    images, _ = t([torch.rand(3, 480, 640)])
    assert images.image_sizes == [(800, 1067)] and images.tensors.shape[-2:] == (800, 1088)
    same = torch.rand(3, 800, 1000)
    out, _ = t([same])
    torch.testing.assert_close(out.tensors[0, :, :, :1000], same)
    result = [{"boxes": torch.tensor([[100.0, 200.0, 500.0, 600.0]])}]
    # the heads return original pixels; torchvision's rescale after NMS must not run
    assert t.postprocess(result, [(800, 1067)], [(480, 640)])[0]["boxes"].tolist() == [
        [100.0, 200.0, 500.0, 600.0]]


def test_scale_factors_are_mmdets():
    f = scale_factors([(800, 1067), (50, 50)], [(480, 640), (56, 56)])
    assert f.dtype == torch.float32 and f.shape == (2, 4)
    expected = np.array([[1067 / 640, 800 / 480] * 2, [50 / 56] * 4], dtype=np.float32)
    np.testing.assert_array_equal(f.numpy(), expected)


def test_paste_masks_fills_the_box_in_the_target_image():
    box = torch.tensor([[60.0, 120.0, 300.0, 360.0]])
    mask = paste_masks(torch.ones(1, 1, 28, 28), box, (480, 640))[0, 0] >= 0.5
    ys, xs = torch.nonzero(mask, as_tuple=True)
    assert (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) == (
        60, 120, 300, 360)
    assert paste_masks(torch.ones(0, 1, 28, 28), torch.zeros(0, 4), (5, 5)).shape == (0, 1, 5, 5)


# Two boxes whose IoU is exactly 0.5 in the network input (NMS at 0.5 keeps both) but, in
# float32, just above 0.5 once divided by the scale factor 50/56 (NMS drops the second):
# where NMS runs decides the result, and mmdet runs it on the rescaled boxes.
TIE_BOXES = torch.tensor([[0.0, 0.0, 3.0, 1.0], [1.0, 0.0, 4.0, 1.0]])
TIE_INPUT, TIE_ORIGINAL = [(50, 50)], [(56, 56)]


def test_tie_boxes_cross_the_nms_threshold_only_at_the_original_scale():
    scores = torch.tensor([0.9, 0.8])
    f = scale_factors(TIE_INPUT, TIE_ORIGINAL)[0]
    assert float(box_iou(TIE_BOXES, TIE_BOXES)[0, 1]) == 0.5
    assert float(box_iou(TIE_BOXES / f, TIE_BOXES / f)[0, 1]) > 0.5
    assert nms(TIE_BOXES, scores, 0.5).tolist() == [0, 1]
    assert nms(TIE_BOXES / f, scores, 0.5).tolist() == [0]


def test_retinanet_rescales_boxes_before_nms(shared_coco):
    model = tiny("tiny_retinanet_clip", shared_coco).eval()
    logits = torch.full((1, 2, 3), -9.0)
    # both boxes score for class 0 (NMS shifts class c by c x (max coordinate + 1), which
    # would change the float rounding of the tie)
    logits[0, :, 0] = torch.tensor([2.0, 1.0])
    head = {"cls_logits": [logits], "bbox_regression": [torch.zeros(1, 2, 4)]}
    factors = scale_factors(TIE_INPUT, TIE_ORIGINAL)
    (det,) = model.postprocess_detections(head, [[TIE_BOXES]], TIE_INPUT, factors)
    assert torch.equal(det["boxes"], TIE_BOXES[:1] / factors[0])
    assert det["labels"].tolist() == [0]
    (unscaled,) = model.postprocess_detections(head, [[TIE_BOXES]], TIE_INPUT)
    assert torch.equal(unscaled["boxes"], TIE_BOXES)  # NMS at the input scale keeps both


def test_rcnn_rescales_boxes_before_nms_and_keeps_tiny_boxes(shared_coco):
    heads = tiny("tiny_mask_rcnn_clip", shared_coco).eval().roi_heads
    tiny_box = torch.tensor([[20.0, 20.0, 20.0078125, 30.0]])  # 1/128 px: torchvision drops it
    proposals = [torch.cat([TIE_BOXES, tiny_box])]
    logits = torch.full((3, 4), -5.0)  # background first, then the 3 classes
    logits[:2, 1] = torch.tensor([3.0, 2.0])  # the tie boxes: class 0 (torchvision label 1)
    logits[2, 2] = 1.0  # the tiny box: class 1
    deltas = torch.zeros(3, 16)
    factors = scale_factors(TIE_INPUT, TIE_ORIGINAL)
    boxes, scores, labels = heads.postprocess_detections(logits, deltas, proposals, TIE_INPUT,
                                                         factors)
    expected = torch.cat([TIE_BOXES[:1], tiny_box]) / factors[0]
    assert torch.equal(boxes[0], expected) and labels[0].tolist() == [1, 2]
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(scores[0], torch.stack([probs[0, 1], probs[2, 2]]))


def test_rpn_keeps_proposals_wider_than_zero(shared_coco):
    rpn = tiny("tiny_mask_rcnn_clip", shared_coco).eval().rpn
    proposals = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0005, 9.0],
                               [3.0, 3.0, 3.0, 8.0], [40.0, 40.0, 90.0, 90.0]]])
    objectness = torch.tensor([[2.0], [1.0], [0.5], [0.0]])
    boxes, scores = rpn.filter_proposals(proposals, objectness, [(64, 64)], [4])
    # mmdet's min_bbox_size 0: w > 0 and h > 0 (torchvision: >= 1e-3); clipped to the image
    expected = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0005, 9.0],
                             [40.0, 40.0, 64.0, 64.0]])
    assert torch.equal(boxes[0], expected)
    torch.testing.assert_close(scores[0], torch.sigmoid(torch.tensor([2.0, 1.0, 0.0])))


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    kept: list[int] = []
    for i in order:
        if all(float(box_iou(boxes[i:i + 1], boxes[j:j + 1])[0, 0]) <= thr for j in kept):
            kept.append(i)
    return kept


def reference_retinanet(model, head, anchors, shape, original):
    """mmdet's AnchorHead.get_bboxes (rescale=True) + multiclass_nms, written plainly."""
    h, w = shape
    oh, ow = original
    factor = torch.tensor([w / ow, h / oh] * 2, dtype=torch.float32)
    boxes, scores = [], []
    for logits, deltas, anc in zip(head["cls_logits"], head["bbox_regression"], anchors,
                                   strict=True):
        prob = logits.sigmoid()
        top = prob.max(1).values.topk(min(1000, len(prob))).indices
        decoded = model.box_coder.decode_single(deltas[top], anc[top])
        decoded[:, 0::2] = decoded[:, 0::2].clamp(0, w)
        decoded[:, 1::2] = decoded[:, 1::2].clamp(0, h)
        boxes.append(decoded / factor)
        scores.append(prob[top])
    boxes, scores = torch.cat(boxes), torch.cat(scores)
    out = []
    for cls in range(scores.shape[1]):
        idx = torch.nonzero(scores[:, cls] > 0.05)[:, 0]
        for k in greedy_nms(boxes[idx], scores[idx, cls], 0.5):
            out.append((float(scores[idx[k], cls]), cls, boxes[idx[k]]))
    out.sort(key=lambda r: -r[0])
    return out[:100]


@torch.no_grad()
def test_retinanet_eval_equals_mmdets_rescale_then_nms(shared_coco):
    model = tiny("tiny_retinanet_clip", shared_coco).eval()
    captured = {}
    model.neck.register_forward_hook(lambda m, i, o: captured.update(pyramid=o))
    model.head.register_forward_hook(lambda m, i, o: captured.update(head=o))
    torch.manual_seed(1)
    image = torch.rand(3, 120, 160)  # already at the (160, 128) scale: no resize inside
    original = (300, 400)
    (det,) = model([image], original_sizes=[original])
    pyramid = captured["pyramid"]
    per_level = [p.shape[-2] * p.shape[-1] * 9 for p in pyramid]
    head = {k: list(v[0].split(per_level)) for k, v in captured["head"].items()}
    image_list = ImageList(torch.zeros(1, 3, 128, 160), [(120, 160)])
    (anchors,) = model.anchor_generator(image_list, pyramid)
    ref = reference_retinanet(model, head, list(anchors.split(per_level)), (120, 160),
                              original)
    assert len(ref) == len(det["scores"]) > 0

    def ordered(rows):  # equal scores may come in either order
        return sorted(rows, key=lambda r: (-round(r[0], 5), r[1], *r[2].tolist()))

    got = ordered(list(zip(det["scores"].tolist(), det["labels"].tolist(), det["boxes"],
                           strict=True)))
    ref = ordered(ref)
    torch.testing.assert_close(torch.tensor([r[0] for r in got]), torch.tensor([r[0] for r in ref]))
    assert [r[1] for r in got] == [r[1] for r in ref]
    torch.testing.assert_close(torch.stack([r[2] for r in got]), torch.stack([r[2] for r in ref]))
    assert float(det["boxes"][:, 2].max()) <= 400 + 1e-3


def test_batchnorm_modes_and_focal_prior(shared_coco):
    model = tiny("tiny_retinanet_clip", shared_coco).train()
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bn.training and bn.weight.requires_grad for bn in bns)  # official: BN trains
    frozen = tiny("tiny_retinanet_clip", shared_coco, "model.detection.train_bn=false").train()
    bns = [m for m in frozen.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not any(bn.training or bn.weight.requires_grad for bn in bns)
    assert frozen.neck.training
    bias = model.head.classification_head.cls_logits.bias
    assert float(bias.detach().abs().max()) < 1.0  # PyTorch default init, no prior
    prior = tiny("tiny_retinanet_clip", shared_coco, "model.detection.focal_prior_init=true")
    bias = prior.head.classification_head.cls_logits.bias
    torch.testing.assert_close(bias, torch.full_like(bias, -math.log(99)))


def test_builder_rejects_inconsistent_configs(shared_coco):
    with pytest.raises(ConfigError, match="seg_loss needs text guidance"):
        tiny("tiny_retinanet_clip", shared_coco, "model.detection.seg_loss=true")
    with pytest.raises(ConfigError, match="head_channels"):
        tiny("tiny_retinanet_denseclip", shared_coco, "model.head_channels=64")
    with pytest.raises(ConfigError, match="pos_embed=interpolate"):
        tiny("tiny_retinanet_denseclip_vit", shared_coco, "model.backbone.pos_embed=crop")
    model = tiny("tiny_mask_rcnn_denseclip", shared_coco)
    assert isinstance(model, CLIPMaskRCNN) and model.num_classes == 3
    assert model.class_names == ["square", "circle", "triangle"]
    assert model.roi_heads.box_head.fc6.out_features == 4 * 32


def test_inputs_are_checked(shared_coco):
    model = tiny("tiny_retinanet_denseclip", shared_coco).train()
    img = torch.rand(3, 64, 64)
    box = {"boxes": torch.tensor([[1.0, 1.0, 30.0, 30.0]]), "labels": torch.tensor([0])}
    with pytest.raises(TypeError, match="float images"):
        model([(img * 255).byte()], [box])
    with pytest.raises(ValueError, match="class indices 0..2"):
        model([img], [{**box, "labels": torch.tensor([3])}])
    with pytest.raises(ValueError, match="needs targets"):
        model([img])
    with pytest.raises(ValueError, match="positive width"):
        model([img], [{**box, "boxes": torch.tensor([[5.0, 5.0, 5.0, 9.0]])}])
    model.eval()
    with pytest.raises(ValueError, match="1 images but 2 original sizes"):
        model([img], original_sizes=[(64, 64), (32, 32)])
    with pytest.raises(ValueError, match="positive"):
        model([img], original_sizes=[(0, 64)])


def test_crop_mode_refuses_inputs_beyond_1344(shared_coco):
    model = tiny("tiny_retinanet_clip", shared_coco, "model.backbone.embeddings=true",
                 "model.backbone.input_resolution=1344").eval()
    with torch.no_grad():
        model([torch.rand(3, 100, 200)])  # resized to 667x1333, padded to 672x1344: fits
    big = tiny("tiny_retinanet_denseclip", shared_coco, "model.backbone.input_resolution=1344",
               "model.detection.min_size=1400", "model.detection.max_size=1400").eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"44x44 position grid.*crop mode"):
        big([torch.rand(3, 64, 64)])


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", ["tiny_retinanet_denseclip", "tiny_mask_rcnn_denseclip",
                                  "tiny_mask_rcnn_clip", "tiny_retinanet_denseclip_vit",
                                  "tiny_mask_rcnn_denseclip_vit",
                                  "tiny_retinanet_denseclip_r18-in1k",
                                  "tiny_mask_rcnn_denseclip_swin"])
def test_every_trainable_parameter_gets_a_gradient(shared_coco, name):
    model = tiny(name, shared_coco).train()
    batch = train_batch(shared_coco, isinstance(model, CLIPMaskRCNN))
    losses = model(batch["image"], batch["target"])
    expected = {"loss_cls", "loss_bbox"}
    if isinstance(model, CLIPMaskRCNN):
        expected |= {"loss_rpn_cls", "loss_rpn_bbox", "loss_mask"}
    if "denseclip" in name:
        expected.add("loss_seg_aux")
    assert set(losses) == expected
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    if model.guidance is not None:
        assert all(p.grad is not None for p in model.guidance.text_encoder.parameters())
        assert model.guidance.contexts.grad is not None


@pytest.mark.parametrize("name", ["tiny_retinanet_denseclip", "tiny_mask_rcnn_denseclip",
                                  "tiny_retinanet_denseclip_vit",
                                  "tiny_mask_rcnn_denseclip_vit",
                                  "tiny_retinanet_denseclip_r18-in1k",
                                  "tiny_mask_rcnn_denseclip_swin"])
def test_training_overfits_two_images(shared_coco, name):
    model = tiny(name, shared_coco).train()
    batch = train_batch(shared_coco, isinstance(model, CLIPMaskRCNN))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    history = []
    for _ in range(12):
        losses = model(batch["image"], batch["target"])
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        history.append(loss.item())
    assert all(math.isfinite(v) for v in history)
    assert sum(history[-3:]) / 3 < 0.5 * sum(history[:3]) / 3

    model.eval()
    with torch.no_grad():
        out = model([batch["image"][0], torch.rand(3, 90, 70)])
    assert len(out) == 2
    for det, size in zip(out, [batch["image"][0].shape[-2:], (90, 70)], strict=True):
        assert det["labels"].dtype == torch.int64
        assert bool(((det["labels"] >= 0) & (det["labels"] < 3)).all())
        assert bool((det["scores"] > 0.05).all()) and len(det["scores"]) <= 100
        if len(det["boxes"]):
            assert float(det["boxes"][:, 2].max()) <= size[1] + 1e-3
            assert float(det["boxes"][:, 3].max()) <= size[0] + 1e-3
        if isinstance(model, CLIPMaskRCNN):
            assert det["masks"].shape == (len(det["boxes"]), 1, *size)


@torch.no_grad()
def test_mask_rcnn_maps_detections_and_masks_to_the_original_sizes(shared_coco):
    model = tiny("tiny_mask_rcnn_denseclip", shared_coco).eval()
    torch.manual_seed(2)
    images = [torch.rand(3, 120, 160), torch.rand(3, 128, 96)]  # at the (160, 128) scale
    plain = model(images)
    same = model(images, original_sizes=[(120, 160), (128, 96)])
    for a, b in zip(plain, same, strict=True):
        for key in ("boxes", "scores", "labels", "masks"):
            assert torch.equal(a[key], b[key]), key
    originals = [(240, 320), (100, 75)]
    out = model(images, original_sizes=originals)
    assert sum(len(d["boxes"]) for d in out) > 0
    for det, (oh, ow) in zip(out, originals, strict=True):
        assert det["masks"].shape == (len(det["boxes"]), 1, oh, ow)
        if len(det["boxes"]):
            assert float(det["boxes"][:, 2].max()) <= ow + 1e-3
            assert float(det["boxes"][:, 3].max()) <= oh + 1e-3


def test_retinanet_is_torchvisions_class(shared_coco):
    model = tiny("tiny_retinanet_denseclip", shared_coco)
    assert isinstance(model, CLIPRetinaNet) and isinstance(model, RetinaNet)


def test_proposal_counts_come_from_the_config(shared_coco):
    cfg = denseclip.load_config("tiny_mask_rcnn_denseclip",
                      [f"model.classes={shared_coco / 'classes.txt'}",
                       "model.detection.rpn_post_nms_top_n=[50,30]",
                       "model.detection.box_batch_size_per_image=32"])
    model = build_detector(cfg.model)
    assert model.rpn._post_nms_top_n == {"training": 50, "testing": 30}
    assert model.rpn._pre_nms_top_n == {"training": 200, "testing": 100}
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 32
    with pytest.raises(ConfigError, match="rpn_pre_nms_top_n"):
        build_detector(denseclip.load_config("tiny_mask_rcnn_denseclip", [
            f"model.classes={shared_coco / 'classes.txt'}",
            "model.detection.rpn_pre_nms_top_n=[5]"]).model)


def test_vit_detector_loads_openai_clip_and_follows_non_square_inputs(shared_coco, tmp_path):
    """``--load-from ViT-B-16.pt`` for a ViT detector: CLIP's towers load (the position
    grid resized to the config's), the pyramid, neck and heads start new, and at run time
    the grid follows each padded input's patch grid, square or not."""
    torch.manual_seed(3)
    clip = FakeOpenAICLIP(vit=True)
    torch.save(clip.state_dict(), tmp_path / "ViT-tiny.pt")
    model = tiny("tiny_retinanet_denseclip_vit", shared_coco)
    assert model.backbone.fpn1 is None  # RetinaNet reads strides 8-32 only
    report = denseclip.load_checkpoint(model, tmp_path / "ViT-tiny.pt")
    assert report.format == "openai"
    sd = model.state_dict()
    torch.testing.assert_close(sd["backbone.conv1.weight"],
                               clip.state_dict()["visual.conv1.weight"])
    assert ("backbone.positional_embedding", (197, 32), (17, 32)) in report.resized
    assert not any(k.startswith("backbone.fpn1") for k in sd)
    assert all(re.match(r"(guidance\.(contexts|gamma|context_decoder)|neck|head|"
                        r"backbone\.fpn[234])", k) or k.endswith("num_batches_tracked")
               for k in report.new)
    model.eval()
    x = torch.randn(1, 3, 128, 160)  # 8 x 10 patches from a stored 4 x 4 grid
    with torch.no_grad():
        features, (global_embed, dense_embed) = model.backbone(x)
        detections = model([torch.rand(3, 100, 140)])
    assert features[0] is None
    assert [tuple(f.shape[-2:]) for f in features[1:]] == [(16, 20), (8, 10), (4, 5)]
    assert global_embed.shape == (1, 32) and dense_embed.shape == (1, 32, 8, 10)
    assert detections[0]["boxes"].shape[1] == 4
