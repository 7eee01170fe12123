"""Feature pyramid neck (segmentor and detectors) and the Semantic FPN decode head
(DESIGN §5)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import conv_bn
from .registry import register_head


def conv_module_init(module: nn.Module) -> None:
    """The initialisation mmcv's ``ConvModule`` applies when it is constructed (so also in
    the official models, whose own ``init_weights`` the training script never calls):
    Kaiming normal (fan-out, ReLU) for every conv, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class FPN(nn.Module):
    """Lateral 1×1 convs, top-down nearest upsample-and-add, 3×3 output convs (all with
    bias; no norm or activation): one output per input level, plus ``extra`` levels.

    ``extra="none"`` (the segmentor): no more outputs. ``extra="conv_on_input"``
    (RetinaNet): two more, a 3×3 stride-2 conv on the last *input* map and a 3×3 stride-2
    conv on that result, no activation between (stored as ``fpn_convs[n]`` and
    ``fpn_convs[n + 1]``, mmdet's layout). ``extra="maxpool"`` (Mask R-CNN): one more, a
    1×1 stride-2 max-pool of the last output.
    """

    EXTRA_OUTPUTS = {"none": 0, "conv_on_input": 2, "maxpool": 1}

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256,
                 extra: str = "none") -> None:
        super().__init__()
        if extra not in self.EXTRA_OUTPUTS:
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
        conv_module_init(self)  # the official convs are mmcv ConvModules

    @property
    def num_outputs(self) -> int:
        return self.num_inputs + self.EXTRA_OUTPUTS[self.extra]

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != self.num_inputs:
            raise ValueError(f"FPN expected {self.num_inputs} feature maps, got {len(features)}")
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


class ConvBNReLU(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(conv_bn(self.conv, self.bn, x))


@register_head("semantic_fpn")
class SemanticFPNHead(nn.Module):
    """Semantic FPN: per level, [3×3 conv, BN, ReLU, (2× bilinear upsample)] until the
    finest stride, summed, then dropout and a 1×1 classifier. Logits at stride 4. Every
    bilinear resize uses ``align_corners`` (mmseg's decode-head setting). Registered as
    the head ``semantic_fpn`` (``model.head``, the default)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, *,
                 strides: tuple[int, ...] = (4, 8, 16, 32), dropout: float = 0.1,
                 align_corners: bool = False) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            steps = max(1, int(math.log2(stride) - math.log2(strides[0])))
            layers: list[nn.Module] = []
            for k in range(steps):
                layers.append(ConvBNReLU(in_channels if k == 0 else channels, channels))
                if stride != strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear",
                                              align_corners=align_corners))
            self.scale_heads.append(nn.Sequential(*layers))
        conv_module_init(self.scale_heads)  # ConvModules; the classifier keeps torch's init
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.num_classes = num_classes

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](features[0])
        for head, x in zip(self.scale_heads[1:], features[1:], strict=True):
            out = out + F.interpolate(head(x), size=out.shape[-2:], mode="bilinear",
                                      align_corners=self.align_corners)
        return self.conv_seg(self.dropout(out))
