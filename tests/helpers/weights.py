"""Weights that make numerical comparisons meaningful."""

from __future__ import annotations

import torch
from torch import nn


def randomise_batchnorm(module: nn.Module, seed: int = 1) -> None:
    """Non-trivial BatchNorm statistics and affine parameters. Fresh ones are the identity
    (and open_clip zero-initialises some ``bn3``), which would make a comparison through
    them, or folding them into a convolution, trivially exact."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
