"""Building blocks shared by the CLIP towers and the context decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import fast_kernels
from ..utils import resize_grid


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (as CLIP does) and cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias,
                            self.eps).type(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


#: The MLP activations of CLIP releases: OpenAI's use QuickGELU, most OpenCLIP ones
#: (e.g. the LAION-2B ViTs) the exact GELU.
ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


class DropPath(nn.Module):
    """Stochastic depth on sequence-first (L, B, C) tokens; identity at eval time or with
    p = 0. ``mode="token"`` draws one keep/drop per token position for the whole batch
    (the official ViT: timm's ``drop_path`` masks dim 0, which is L here); ``"sample"``
    draws one per image (the usual stochastic depth)."""

    def __init__(self, p: float = 0.0, mode: str = "token") -> None:
        super().__init__()
        if mode not in ("token", "sample"):
            raise ValueError(f"drop-path mode must be 'token' or 'sample', got {mode!r}")
        self.p = p
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        dim = 0 if self.mode == "token" else 1
        shape = [1] * x.ndim
        shape[dim] = x.shape[dim]
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention over (..., L, d) tensors: the one implementation used
    by the CLIP towers, the attention pool and the context decoder.

    The scores are scaled by ``scale`` (default ``d ** -0.5``) after the product; a caller
    whose queries are already scaled (CLIP's attention pool scales them first) passes
    ``scale=1``. ``mask`` is added to the scores. With the fast kernels this is PyTorch's
    fused ``F.scaled_dot_product_attention`` (softmax accumulated in fp32, no L×L matrix
    kept for backward); with the reference kernels (:mod:`denseclip.runtime`) it is written
    with explicit matrix products, which ``torch.utils.flop_counter`` counts and ONNX
    exports as plain MatMul/Softmax.
    """
    if fast_kernels():
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = q @ k.transpose(-2, -1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if scale != 1:
        scores = scores * scale
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1) @ v


def causal_mask(length: int, device: torch.device | None = None,
                prefix: int = 0) -> torch.Tensor:
    """Additive mask (length, prefix + length): each of ``length`` queries sees all
    ``prefix`` leading keys, itself and the keys before it (0), not the later ones (-inf)."""
    mask = torch.full((length, prefix + length), float("-inf"), device=device)
    return mask.triu_(prefix + 1)


def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x))``. At inference (BatchNorm in eval mode, no autograd) with the fast
    kernels, one convolution whose weight and bias have the BatchNorm folded in: the same
    function up to rounding, one pass over the activations fewer. The folded weights are
    cached until any of the tensors they come from changes (version counters)."""
    if bn.training or torch.is_grad_enabled() or not fast_kernels() or bn.running_var is None:
        if bn.training:
            bn.__dict__.pop("_folded", None)  # training changes the statistics anyway
        return bn(conv(x))
    if torch.compiler.is_compiling():  # traced into the graph, where the compiler folds it
        return conv._conv_forward(x, *_fold(conv, bn))
    tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    key = tuple((t.data_ptr(), t._version) if t is not None else None for t in tensors)
    cache = getattr(bn, "_folded", None)
    if cache is None or cache[0] != key:
        cache = (key, *_fold(conv, bn))
        bn._folded = cache
    return conv._conv_forward(x, cache[1], cache[2])


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of ``conv`` followed by eval-mode ``bn``, as one convolution."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = -bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    weight = conv.weight * scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype)
    return weight, bias.to(conv.weight.dtype)


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter layout
    (``in_proj_weight``, ``in_proj_bias``, ``out_proj``), sequence-first (L, B, C)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        L, B, C = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        # (L, B, C) -> (B * heads, L, C / heads), nn.MultiheadAttention's head order
        q, k, v = (t.reshape(L, B * self.heads, -1).transpose(0, 1) for t in (q, k, v))
        out = attention(q, k, v, mask)  # (B * heads, L, d)
        out = out.transpose(0, 1).reshape(L, B, C)
        return self.out_proj(out)

    def forward_shared_prefix(self, prefix: torch.Tensor, suffix: torch.Tensor,
                              prefix_mask: torch.Tensor, suffix_mask: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over sequences that share their first positions: ``prefix`` (P, B, C)
        holds them once per context b, ``suffix`` (S, B*K, C) the rest of K sequences per b.
        Prefix queries see ``prefix_mask`` (P, P) of the prefix; suffix queries see the
        whole prefix of their b and ``suffix_mask`` (S, P + S). The same function as
        :meth:`forward` on the B*K full sequences, with the prefix computed once."""
        P, B, C = prefix.shape
        S, BK, _ = suffix.shape
        K, h = BK // B, self.heads
        qp, kp, vp = F.linear(prefix, self.in_proj_weight, self.in_proj_bias) \
            .reshape(P, B, 3, h, -1).permute(2, 1, 3, 0, 4)  # 3 x (B, h, P, d)
        qs, ks, vs = F.linear(suffix, self.in_proj_weight, self.in_proj_bias) \
            .reshape(S, B, K, 3, h, -1).permute(3, 1, 2, 4, 0, 5)  # 3 x (B, K, h, S, d)
        out_p = attention(qp, kp, vp, prefix_mask)  # (B, h, P, d)
        k = torch.cat([kp[:, None].expand(-1, K, -1, -1, -1), ks], dim=3)
        v = torch.cat([vp[:, None].expand(-1, K, -1, -1, -1), vs], dim=3)
        out_s = attention(qs, k, v, suffix_mask)  # (B, K, h, S, d)
        out_p = out_p.permute(2, 0, 1, 3).reshape(P, B, C)
        out_s = out_s.permute(3, 0, 1, 2, 4).reshape(S, BK, C)
        return self.out_proj(out_p), self.out_proj(out_s)


class ResidualAttentionBlock(nn.Module):
    """CLIP's pre-norm transformer block (MLP with ``act``, one of :data:`ACTIVATIONS`),
    with optional drop-path."""

    def __init__(self, width: int, heads: int, drop_path: float = 0.0,
                 drop_path_mode: str = "token", act: str = "quick_gelu") -> None:
        super().__init__()
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        if act not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {act!r}")
        self.mlp.add_module("gelu", ACTIVATIONS[act]())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))
        self.ln_2 = LayerNorm(width)
        self.drop_path = DropPath(drop_path, drop_path_mode)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.ln_1(x), mask))
        return x + self.drop_path(self.mlp(self.ln_2(x)))

    def forward_shared_prefix(self, prefix: torch.Tensor, suffix: torch.Tensor,
                              prefix_mask: torch.Tensor, suffix_mask: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` on sequences with a shared prefix (see
        :meth:`MultiheadAttention.forward_shared_prefix`)."""
        a_p, a_s = self.attn.forward_shared_prefix(self.ln_1(prefix), self.ln_1(suffix),
                                                   prefix_mask, suffix_mask)
        prefix, suffix = prefix + self.drop_path(a_p), suffix + self.drop_path(a_s)
        return (prefix + self.drop_path(self.mlp(self.ln_2(prefix))),
                suffix + self.drop_path(self.mlp(self.ln_2(suffix))))


class Transformer(nn.Module):
    """A stack of residual attention blocks over (L, B, C) tokens."""

    def __init__(self, width: int, layers: int, heads: int, drop_path_rate: float = 0.0,
                 drop_path_mode: str = "token", act: str = "quick_gelu") -> None:
        super().__init__()
        # Drop-path rate grows linearly with depth (as torch.linspace(0, rate, layers)).
        rates = [drop_path_rate * i / max(layers - 1, 1) for i in range(layers)]
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, rate, drop_path_mode, act) for rate in rates
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


def spatial_pos_embed(pos: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Fit the stored spatial position grid (n*n, C) to a run-time (h, w) grid.

    ``interpolate`` resizes bilinearly (segmentation); ``crop`` keeps the top-left h×w
    cells (official detection), which cannot serve grids larger than the stored one.
    """
    if mode == "interpolate":
        return resize_grid(pos, size)
    if mode == "crop":
        n = int(round(pos.shape[0] ** 0.5))
        h, w = size
        if h > n or w > n:
            raise ValueError(
                f"input needs a {h}x{w} position grid but only {n}x{n} is stored "
                f"(crop mode): use smaller images or backbone.pos_embed=interpolate"
            )
        return pos.reshape(n, n, -1)[:h, :w].reshape(h * w, -1)
    raise ValueError(f"unknown position-embedding mode {mode!r} (interpolate or crop)")
