"""Losses shared by the dense tasks."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..runtime import fast_kernels

_ONCE = ("the fast cross-entropy's graph was already run backward (retain_graph is not "
         "supported with kernels=fast)")



def _picked_nll(logp: torch.Tensor, target: torch.Tensor,
                ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row negative log-likelihood of ``target`` in ``logp`` (N, K) (0 where ignored),
    the (N, 1) class index gathered and the valid-row mask."""
    valid = target != ignore_index
    index = target.masked_fill(~valid, 0).unsqueeze(1)
    loss = logp.gather(1, index).squeeze(1).neg_().masked_fill_(~valid, 0.0)
    return loss, index, valid


def _row_gradient(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    """The cross-entropy's gradient w.r.t. the rows, ``(softmax - onehot) · grad``, written
    into the saved log-probabilities (so the graph runs backward once)."""
    if ctx.consumed:
        raise RuntimeError(_ONCE)
    ctx.consumed = True
    logp, index, valid = ctx.saved_tensors
    g = grad.masked_fill(~valid, 0.0).unsqueeze(1)
    return logp.exp_().mul_(g).scatter_add_(1, index, -g)

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
        loss, index, valid = _picked_nll(logp, target, ignore_index)
        ctx.save_for_backward(logp, index, valid)
        ctx.consumed = False
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _row_gradient(ctx, grad), None, None


class UpsampledRowCrossEntropy(torch.autograd.Function):
    """Per-pixel cross-entropy (B·H·W,) of channels-last ``logits`` (B, K, h, w) resized
    bilinearly to (H, W) against ``target`` (B·H·W,): ``F.interpolate`` then
    :class:`RowCrossEntropy`, in one buffer. The resized logits are turned into
    log-probabilities in place (the log-softmax reads a row's values before it writes
    them) and the backward turns those into the gradient in place before the resize's
    backward: one (B, K, H, W) tensor instead of two in the forward and none new in the
    backward. The same values up to floating-point rounding; one backward only."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, size: tuple[int, int],  # type: ignore[override]
                align_corners: bool, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
        up = F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)
        rows = up.permute(0, 2, 3, 1).reshape(-1, up.shape[1])  # a view: up is channels-last
        logp = torch.log_softmax(rows, dim=1, out=rows)
        del up
        loss, index, valid = _picked_nll(logp, target, ignore_index)
        ctx.save_for_backward(logp, index, valid)
        ctx.shapes = (tuple(logits.shape), tuple(size), align_corners)
        ctx.consumed = False
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        rows = _row_gradient(ctx, grad)
        input_size, size, align_corners = ctx.shapes
        (B, K), (H, W) = input_size[:2], size
        grad_up = rows.view(B, H, W, K).permute(0, 3, 1, 2)  # channels-last (B, K, H, W)
        out = torch.ops.aten.upsample_bilinear2d_backward(grad_up, list(size),
                                                          list(input_size), align_corners)
        return out, None, None, None, None


def _reduce(loss: torch.Tensor, target: torch.Tensor, ignore_index: int,
            average: str) -> torch.Tensor:
    if average == "all":
        return loss.mean()
    if average == "valid":
        valid = (target != ignore_index).sum()
        return loss.sum() / valid.clamp(min=1)
    raise ValueError(f"loss average must be 'all' or 'valid', got {average!r}")


def _rows_layout(logits: torch.Tensor) -> bool:
    """Whether ``logits`` (B, K, H, W) are channels-last (and not also plain contiguous)
    where the fast kernels may read them as (B·H·W, K) rows."""
    return fast_kernels() and logits.ndim == 4 and not logits.is_contiguous() \
        and logits.is_contiguous(memory_format=torch.channels_last)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                  average: str = "all") -> torch.Tensor:
    """Pixel-wise cross-entropy of ``logits`` (B, K, H, W) against ``target`` (B, H, W).

    ``average="all"`` divides by every pixel, ignored ones included, as mmseg 0.19 (and so
    the official training) does; ``"valid"`` divides by the non-ignored pixels only.
    """
    logits = logits.float()
    if _rows_layout(logits):
        # Channels-last logits are (B·H·W, K) rows in memory: the class softmax runs along
        # contiguous rows, several times faster than across planes. Same per-pixel loss.
        # Its backward works in the buffer of the log-probabilities (see RowCrossEntropy).
        K = logits.shape[1]
        loss = RowCrossEntropy.apply(logits.permute(0, 2, 3, 1).reshape(-1, K),
                                     target.reshape(-1), ignore_index).view(target.shape)
    else:
        loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    return _reduce(loss, target, ignore_index, average)


def upsampled_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                            ignore_index: int = 255, average: str = "all",
                            align_corners: bool = False) -> torch.Tensor:
    """:func:`cross_entropy` of ``logits`` (B, K, h, w) resized bilinearly to the size of
    ``target`` (B, H, W), as mmseg's decode heads compute their loss. With the fast kernels
    and channels-last logits, in one buffer (:class:`UpsampledRowCrossEntropy`)."""
    logits = logits.float()
    size = (int(target.shape[-2]), int(target.shape[-1]))
    if _rows_layout(logits) and target.ndim == 3:
        if average not in ("all", "valid"):
            raise ValueError(f"loss average must be 'all' or 'valid', got {average!r}")
        loss = UpsampledRowCrossEntropy.apply(logits, size, align_corners, target.reshape(-1),
                                              ignore_index).view(target.shape)
        return _reduce(loss, target, ignore_index, average)
    resized = F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)
    return cross_entropy(resized, target, ignore_index, average)
