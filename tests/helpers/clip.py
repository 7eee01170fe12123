"""A small model in OpenAI CLIP's state-dict layout, for loading tests."""

from __future__ import annotations

import torch
from torch import nn

from denseclip.models.clip_resnet import CLIPResNet
from denseclip.models.clip_vit import CLIPViT
from denseclip.models.layers import LayerNorm, Transformer


class FakeOpenAICLIP(nn.Module):
    """A small model with OpenAI CLIP's state-dict layout (``visual.*``, text tower)."""

    def __init__(self, vit: bool) -> None:
        super().__init__()
        if vit:
            self.visual = CLIPViT(width=32, layers=4, heads=2, patch_size=16, embed_dim=32,
                                  input_resolution=224, out_indices=[0, 1, 2, 3])
            for name in ("fpn1", "fpn2", "fpn3", "fpn4"):  # CLIP has no pyramid
                delattr(self.visual, name)
        else:
            self.visual = CLIPResNet([1, 1, 1, 1], width=8, heads=2, embed_dim=32,
                                     input_resolution=224)
        self.transformer = Transformer(32, 2, 2)
        self.token_embedding = nn.Embedding(49408, 32)
        self.positional_embedding = nn.Parameter(torch.randn(77, 32))
        self.ln_final = LayerNorm(32)
        self.text_projection = nn.Parameter(torch.randn(32, 32))
        self.logit_scale = nn.Parameter(torch.tensor(4.6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.logit_scale
