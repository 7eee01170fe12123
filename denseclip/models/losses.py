"""Losses shared by the dense tasks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                  average: str = "all") -> torch.Tensor:
    """Pixel-wise cross-entropy of ``logits`` (B, K, H, W) against ``target`` (B, H, W).

    ``average="all"`` divides by every pixel, ignored ones included, as mmseg 0.19 (and so
    the official training) does; ``"valid"`` divides by the non-ignored pixels only.
    """
    loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    if average == "all":
        return loss.mean()
    if average == "valid":
        valid = (target != ignore_index).sum()
        return loss.sum() / valid.clamp(min=1)
    raise ValueError(f"loss average must be 'all' or 'valid', got {average!r}")
