"""Losses shared by the dense tasks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..runtime import fast_kernels


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                  average: str = "all") -> torch.Tensor:
    """Pixel-wise cross-entropy of ``logits`` (B, K, H, W) against ``target`` (B, H, W).

    ``average="all"`` divides by every pixel, ignored ones included, as mmseg 0.19 (and so
    the official training) does; ``"valid"`` divides by the non-ignored pixels only.
    """
    logits = logits.float()
    if fast_kernels() and logits.ndim == 4 and not logits.is_contiguous() \
            and logits.is_contiguous(memory_format=torch.channels_last):
        # Channels-last logits are (B·H·W, K) rows in memory: the class softmax runs along
        # contiguous rows, several times faster than across planes. Same per-pixel loss.
        K = logits.shape[1]
        loss = F.cross_entropy(logits.permute(0, 2, 3, 1).reshape(-1, K), target.reshape(-1),
                               ignore_index=ignore_index, reduction="none").view(target.shape)
    else:
        loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    if average == "all":
        return loss.mean()
    if average == "valid":
        valid = (target != ignore_index).sum()
        return loss.sum() / valid.clamp(min=1)
    raise ValueError(f"loss average must be 'all' or 'valid', got {average!r}")
