"""Losses shared by the dense tasks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..runtime import fast_kernels


class RowCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of ``rows`` (N, K) against ``target`` (N,), 0 at
    ``ignore_index``: ``F.cross_entropy(..., reduction="none")`` with a leaner backward.

    PyTorch's backward fills a zero (N, K) gradient, scatters the target entries into it and
    runs the log-softmax backward into a second new (N, K) tensor. Here the gradient
    ``softmax(rows)·g - onehot·g`` is computed in place in the saved log-probabilities
    (``exp_``, ``mul_``, ``scatter_add_``): no new (N, K) tensor. For the 512×512 ×
    150-class maps of segmentation training these are 315 MB each,
    and fresh memory is slow to touch. The same values up to floating-point rounding; the
    graph can be run backward once (the saved buffer is consumed)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, target: torch.Tensor,  # type: ignore[override]
                ignore_index: int) -> torch.Tensor:
        logp = torch.log_softmax(rows, dim=1)
        valid = target != ignore_index
        index = target.masked_fill(~valid, 0).unsqueeze(1)
        loss = logp.gather(1, index).squeeze(1).neg_().masked_fill_(~valid, 0.0)
        ctx.save_for_backward(logp, index, valid)
        ctx.consumed = False
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        if ctx.consumed:
            raise RuntimeError("the fast cross-entropy's graph was already run backward "
                               "(retain_graph is not supported with kernels=fast)")
        ctx.consumed = True
        logp, index, valid = ctx.saved_tensors
        g = grad.masked_fill(~valid, 0.0).unsqueeze(1)
        out = logp.exp_().mul_(g)
        return out.scatter_add_(1, index, -g), None, None


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
        # Its backward works in the buffer of the log-probabilities (see RowCrossEntropy).
        K = logits.shape[1]
        loss = RowCrossEntropy.apply(logits.permute(0, 2, 3, 1).reshape(-1, K),
                                     target.reshape(-1), ignore_index).view(target.shape)
    else:
        loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    if average == "all":
        return loss.mean()
    if average == "valid":
        valid = (target != ignore_index).sum()
        return loss.sum() / valid.clamp(min=1)
    raise ValueError(f"loss average must be 'all' or 'valid', got {average!r}")
