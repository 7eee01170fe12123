"""CLIP's modified ResNet with an attention pool that also returns dense embeddings.

Attribute names follow OpenAI CLIP's ``visual.*`` keys, so its weights load by prefix.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import attention, conv_bn, spatial_pos_embed


class Bottleneck(nn.Module):
    """1×1 → 3×3 → 1×1 bottleneck; stride 2 is a 2×2 average pool after conv2, and the
    downsample branch is avgpool → 1×1 conv → BN (CLIP's anti-aliased variant)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential()
            # "-1" keeps CLIP's key names (downsample.0 = conv, downsample.1 = bn).
            self.downsample.add_module("-1", nn.AvgPool2d(stride))
            self.downsample.add_module("0", nn.Conv2d(inplanes, planes * self.expansion, 1,
                                                      bias=False))
            self.downsample.add_module("1", nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        if self.downsample is not None:
            pool, conv, bn = self.downsample
            identity = conv_bn(conv, bn, pool(x))
        out = self.relu1(conv_bn(self.conv1, self.bn1, x))
        out = self.relu2(conv_bn(self.conv2, self.bn2, out))
        out = conv_bn(self.conv3, self.bn3, self.avgpool(out))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """CLIP's attention pool, evaluated at every position.

    Tokens are [mean of all positions; every position] plus a position embedding whose
    spatial part (stored for a ``grid``×``grid`` map) is fitted to the run-time map. The
    output at the mean token is the global embedding (B, D); the output at each spatial
    position, where that position is the query over all tokens, is the dense embedding
    (B, D, h, w).
    """

    def __init__(self, grid: int, embed_dim: int, heads: int, output_dim: int,
                 pos_embed: str = "interpolate") -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(grid * grid + 1, embed_dim) / embed_dim**0.5
        )
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads
        self.pos_embed = pos_embed

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, C, H, W = x.shape
        tokens = x.flatten(2).permute(0, 2, 1)  # (B, HW, C)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # (B, 1+HW, C)
        pos = self.positional_embedding
        spatial = spatial_pos_embed(pos[1:], (H, W), self.pos_embed)
        tokens = tokens + torch.cat([pos[:1], spatial], dim=0).to(tokens.dtype)

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, heads, L, C/heads)
            return t.reshape(B, t.shape[1], self.heads, -1).transpose(1, 2)

        q = heads(self.q_proj(tokens)) * (C // self.heads) ** -0.5  # scaled first, as CLIP
        k, v = heads(self.k_proj(tokens)), heads(self.v_proj(tokens))
        out = attention(q, k, v, scale=1).transpose(1, 2).reshape(B, -1, C)
        out = self.c_proj(out)  # (B, 1+HW, D)
        global_embed = out[:, 0]
        dense_embed = out[:, 1:].transpose(1, 2).reshape(B, -1, H, W)
        return global_embed, dense_embed


class CLIPResNet(nn.Module):
    """CLIP ModifiedResNet returning four maps (strides 4–32) and, with the attention
    pool, the (global, dense) CLIP embeddings.

    Args:
        layers: bottleneck blocks per stage, e.g. (3, 4, 6, 3) for RN50.
        width: stem width; stage channels are 4·width·2^i.
        heads: attention-pool heads.
        embed_dim: output dimension D of the attention pool.
        input_resolution: image size the stored position grid corresponds to (grid = res/32).
        embeddings: build the attention pool and return its embeddings.
        pos_embed: "interpolate" or "crop" (see :func:`spatial_pos_embed`).
    """

    def __init__(self, layers: list[int], *, width: int = 64, heads: int = 32,
                 embed_dim: int = 1024, input_resolution: int = 224,
                 embeddings: bool = True, pos_embed: str = "interpolate") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        inplanes = width
        stages = []
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            stage = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = [width * 4 * 2**i for i in range(4)]
        self.embed_dim = embed_dim
        self.attnpool = (
            AttentionPool2d(input_resolution // 32, width * 32, heads, embed_dim, pos_embed)
            if embeddings else None
        )

    def forward(self, x: torch.Tensor):
        """Returns ``(features, embeddings)``: four maps and ``(global (B, D), dense
        (B, D, H/32, W/32))``, or ``None`` without the attention pool."""
        x = self.relu1(conv_bn(self.conv1, self.bn1, x))
        x = self.relu2(conv_bn(self.conv2, self.bn2, x))
        x = self.relu3(conv_bn(self.conv3, self.bn3, x))
        x = self.avgpool(x)
        features = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            features.append(x)
        embeddings = self.attnpool(x) if self.attnpool is not None else None
        return features, embeddings

