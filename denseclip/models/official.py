"""Key rename tables of the official DenseCLIP releases (mmseg / mmdet 2.17 checkpoints).

Each table is a list of (regex, replacement) rules, first matching rule wins, from an
official key to this package's. The model classes carry their table as the class
attribute ``official_renames``, which the weight loader reads; :func:`invert_renames`
turns a table around (ours → official), which the optimiser needs because mmcv's
parameter-wise settings match substrings of the *official* names. This module imports
nothing from the package.
"""

from __future__ import annotations

import re

__all__ = [
    "OFFICIAL_DETECTION_RENAMES",
    "OFFICIAL_SEGMENTATION_RENAMES",
    "OFFICIAL_SHARED_RENAMES",
    "invert_renames",
]

# What segmentors and detectors share. The backbone keeps CLIP's own names; mmcv's
# ConvModule nests the FPN convs under ".conv.".
OFFICIAL_SHARED_RENAMES = [
    (r"^contexts$", "guidance.contexts"),
    (r"^gamma$", "guidance.gamma"),
    (r"^text_encoder\.", "guidance.text_encoder."),
    (r"^context_decoder\.", "guidance.context_decoder."),
    (r"^neck\.(lateral|fpn)_convs\.(\d+)\.conv\.", r"neck.\1_convs.\2."),
]

# Segmentation release (mmseg): the decode head is our ``head``.
OFFICIAL_SEGMENTATION_RENAMES = [*OFFICIAL_SHARED_RENAMES, (r"^decode_head\.", "head.")]

# Detection release (mmdet 2.17): RetinaNet and Mask R-CNN heads.
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


# A rule's pattern is "^", then literal text (with "\." for dots) and plain capture groups,
# then an optional "$"; its replacement is literal text and "\N" back-references.
_PATTERN_PART = re.compile(r"\\(.)|(\([^()]*\))|([^\\()^$])")
_REPLACEMENT_PART = re.compile(r"\\(\d)|([^\\]+)")


def _invert_rule(pattern: str, replacement: str) -> tuple[str, str]:
    if not pattern.startswith("^"):
        raise ValueError(f"rename pattern {pattern!r} must start with '^'")
    anchored = pattern.endswith("$")
    body = pattern[1:-1] if anchored else pattern[1:]
    groups: list[str] = []  # capture groups of the pattern, in order
    forward: list[str | int] = []  # literal text, or the index of a group
    for escaped, group, char in _PATTERN_PART.findall(body):
        if group:
            groups.append(group)
            forward.append(len(groups) - 1)
        else:
            forward.append(escaped or char)
    inverse_pattern, order = "^", []  # order: group numbers as they appear in replacement
    for ref, text in _REPLACEMENT_PART.findall(replacement):
        if ref:
            order.append(int(ref) - 1)
            inverse_pattern += groups[int(ref) - 1]
        else:
            inverse_pattern += re.escape(text)
    if sorted(order) != list(range(len(groups))):
        raise ValueError(f"rule {pattern!r} → {replacement!r} does not use each group once")
    inverse_replacement = "".join(
        part if isinstance(part, str) else f"\\{order.index(part) + 1}" for part in forward)
    return inverse_pattern + ("$" if anchored else ""), inverse_replacement


def invert_renames(table: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The rules that map this package's keys back to the official ones (the tests check,
    on every official key list, that the two directions are inverses)."""
    return [_invert_rule(pattern, replacement) for pattern, replacement in table]
