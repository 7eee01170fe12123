"""Small operations shared across the package: mmcv's keep-ratio rounding, bilinear
resizing of maps and of position-embedding grids, and unwrapping a distributed model.

This module imports nothing from the package, so every layer (data, models, weights,
evaluation, inference) can use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["keep_ratio_size", "resize", "resize_grid", "unwrap_model"]


def keep_ratio_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """The ``(new_h, new_w)`` of mmcv's keep-ratio rescale (``mmcv.rescale_size``).

    ``scale`` is a pair of edge bounds in either order: the longer image edge may not exceed
    the larger bound nor the shorter edge the smaller one, and the tighter of the two
    decides; sizes are rounded half up::

        factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
        new_w, new_h = int(w * factor + 0.5), int(h * factor + 0.5)
    """
    if len(scale) != 2:
        raise ValueError(f"scale must be a pair of edge bounds, got {scale!r}")
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {(height, width)}")
    long_bound, short_bound = max(scale), min(scale)
    factor = min(long_bound / max(height, width), short_bound / min(height, width))
    return int(height * float(factor) + 0.5), int(width * float(factor) + 0.5)


def resize(x: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of a (B, C, h, w) tensor to ``size``; no work at the same size."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def resize_grid(pos: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize a square (n*n, C) position-embedding grid to ``size`` → (h*w, C).

    The stored grid side is a constant of the weights, read as a plain int so that tracing
    (ONNX export) does not record it; while tracing, the resize always runs, since a
    traced same-size shortcut would freeze the example's grid into the graph (resizing to
    the same size is exact without corner alignment)."""
    cells = int(pos.shape[0])
    n = math.isqrt(cells)
    if n * n != cells:
        raise ValueError(f"position embedding of {cells} cells is not a square grid")
    if (n, n) == tuple(size) and not torch.jit.is_tracing():
        return pos
    grid = pos.reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    return grid.reshape(pos.shape[1], -1).transpose(0, 1)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` (or similar ``.module``) wrapper."""
    return model.module if isinstance(getattr(model, "module", None), nn.Module) else model


def model_device(model: object) -> torch.device:
    """Where ``model``'s first parameter lives: the CPU for a model without any, or for a
    plain callable."""
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return torch.device("cpu") if first is None else first.device
