"""CLIP's ViT with a four-level feature pyramid and optional (global, dense) embeddings.

Attribute names follow OpenAI CLIP's ``visual.*`` keys (plus ``fpn1..fpn4``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import LayerNorm, Transformer, spatial_pos_embed


class CLIPViT(nn.Module):
    """CLIP VisionTransformer for dense prediction (DESIGN §2).

    Spatial tokens after the blocks in ``out_indices`` become four maps at stride
    ``patch_size``, turned into strides patch/4, patch/2, patch, 2·patch by ``fpn1..fpn4``.
    With ``embeddings``, ``ln_post`` and ``proj`` are applied to all final tokens: the class
    token gives the global embedding (B, D) and the spatial tokens the dense one
    (B, D, H/patch, W/patch).

    ``class_embedding_quirk`` reproduces the official code, which adds the class embedding
    a second time onto the class position's embedding (needed for official checkpoints).
    ``levels`` lists the pyramid levels to build (0..3 = strides patch/4 .. 2·patch); the
    others are ``None`` in the output and have no module (RetinaNet reads levels 1–3 only,
    and unused parameters would stall distributed training). ``act`` is the blocks' MLP
    activation (``quick_gelu`` for OpenAI's weights, ``gelu`` for most OpenCLIP ones).
    """

    def __init__(self, *, width: int = 768, layers: int = 12, heads: int = 12,
                 patch_size: int = 16, embed_dim: int = 512, input_resolution: int = 224,
                 out_indices: list[int] = (3, 5, 7, 11), drop_path_rate: float = 0.0,
                 embeddings: bool = True, class_embedding_quirk: bool = True,
                 pos_embed: str = "interpolate", drop_path_mode: str = "token",
                 levels: Sequence[int] = (0, 1, 2, 3), act: str = "quick_gelu") -> None:
        super().__init__()
        if len(out_indices) != 4 or max(out_indices) >= layers:
            raise ValueError(f"out_indices {list(out_indices)} must be 4 blocks of {layers}")
        if not levels or not set(levels) <= {0, 1, 2, 3}:
            raise ValueError(f"pyramid levels {list(levels)} must be a subset of 0..3")
        self.patch_size = patch_size
        self.out_indices = list(out_indices)
        self.class_embedding_quirk = class_embedding_quirk
        self.pos_embed = pos_embed
        grid = input_resolution // patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, drop_path_rate, drop_path_mode, act)
        self.embed_dim = embed_dim
        if embeddings:
            self.ln_post = LayerNorm(width)
            self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))
        else:
            self.ln_post = None
            self.proj = None

        self.fpn1 = nn.Sequential(
            nn.GroupNorm(1, width),
            nn.ConvTranspose2d(width, width, 2, stride=2),
            nn.BatchNorm2d(width),
            nn.GELU(),
            nn.ConvTranspose2d(width, width, 2, stride=2),
        )
        self.fpn2 = nn.Sequential(nn.GroupNorm(1, width), nn.ConvTranspose2d(width, width, 2, 2))
        self.fpn3 = nn.GroupNorm(1, width)
        self.fpn4 = nn.Sequential(nn.GroupNorm(1, width), nn.MaxPool2d(2, 2))
        for level in range(4):
            if level not in levels:
                setattr(self, f"fpn{level + 1}", None)
        self.out_channels = [width] * 4

    def embed_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images → the transformer's input tokens (1+hw, B, C): patch embeddings after the
        class token, plus position embeddings fitted to the (h, w) patch grid, through
        ``ln_pre``. Returns the tokens and (h, w)."""
        x = self.conv1(x)  # (B, C, h, w)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, hw, C)
        cls = self.class_embedding.to(x.dtype).expand(B, 1, C)
        x = torch.cat([cls, x], dim=1)  # (B, 1+hw, C)
        pos = self.positional_embedding.to(x.dtype)
        cls_pos = pos[:1]
        if self.class_embedding_quirk:
            cls_pos = cls_pos + self.class_embedding.to(x.dtype)
        x = x + torch.cat([cls_pos, spatial_pos_embed(pos[1:], (H, W), self.pos_embed)])
        return self.ln_pre(x).transpose(0, 1), (H, W)  # (L, B, C)

    def forward(self, x: torch.Tensor):
        """Returns ``(features, embeddings)`` like :class:`CLIPResNet`."""
        x, (H, W) = self.embed_tokens(x)
        _, B, C = x.shape

        maps = []
        for i, block in enumerate(self.transformer.resblocks):
            x = block(x)
            if i in self.out_indices:
                maps.append(x[1:].permute(1, 2, 0).reshape(B, C, H, W))
        pyramid = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        features = [None if fpn is None else fpn(m) for fpn, m in zip(pyramid, maps, strict=True)]

        embeddings = None
        if self.proj is not None:
            x = self.ln_post(x.transpose(0, 1)) @ self.proj  # (B, 1+hw, D)
            embeddings = (x[:, 0], x[:, 1:].transpose(1, 2).reshape(B, -1, H, W))
        return features, embeddings

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP's image embedding (class token after ln_post and proj)."""
        _, embeddings = self.forward(x)
        if embeddings is None:
            raise RuntimeError("this ViT was built without embeddings (ln_post/proj)")
        return embeddings[0]
