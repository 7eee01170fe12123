"""CLIP text transformer with learnable context vectors (DESIGN §3).

Tokenisation uses open_clip's CLIP BPE tokenizer (its bundled vocabulary).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from ..config import TextConfig
from ..runtime import fast_kernels
from .layers import LayerNorm, Transformer, causal_mask


@functools.lru_cache(maxsize=1)
def _tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()  # reads the bundled vocabulary once


def tokenize(names: Sequence[str], length: int) -> torch.Tensor:
    """Tokenise class names into (K, length) ids: SOT, BPE tokens, EOT, zero padding.

    A name whose tokens do not fit raises ``ValueError`` naming it and the limit (the
    official code tokenises without truncation, too).
    """
    tok = _tokenizer()
    if len(names) == 0:
        raise ValueError("the class list is empty")
    out = torch.zeros(len(names), length, dtype=torch.long)
    for i, name in enumerate(names):
        ids = [tok.sot_token_id, *tok.encode(name), tok.eot_token_id]
        if len(ids) > length:
            raise ValueError(
                f"class name {name!r} needs {len(ids) - 2} BPE tokens but the text context "
                f"holds at most {length - 2} (text.context_length - text.n_ctx - 2)"
            )
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def token_positions(text: str) -> int:
    """Positions ``text`` takes in the text context: its BPE tokens plus SOT and EOT."""
    return len(_tokenizer().encode(text)) + 2


class CLIPTextEncoder(nn.Module):
    """CLIP's text tower; learnable contexts are inserted right after the SOT token.

    The sequence is ``[SOT, ctx_1..ctx_n, name tokens, EOT, padding]`` of length
    ``context_length``; class-name tokens therefore have ``context_length - n_ctx``
    positions. The feature is read at the EOT position (the largest token id).
    """

    def __init__(self, *, context_length: int = 77, vocab_size: int = 49408, width: int = 512,
                 layers: int = 12, heads: int = 8, embed_dim: int = 512,
                 act: str = "quick_gelu") -> None:
        super().__init__()
        self.context_length = context_length
        self.width = width
        self.embed_dim = embed_dim
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, act=act)
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        # Causal mask: each position sees itself and the positions before it.
        self.register_buffer("attn_mask", causal_mask(context_length), persistent=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def forward(self, tokens: torch.Tensor, contexts: torch.Tensor | None = None) -> torch.Tensor:
        """Embed ``tokens`` (K, T) behind ``contexts`` (B, n_ctx, width).

        Returns (K, D) without contexts, or (B, K, D) with them.

        With the fast kernels (:mod:`denseclip.runtime`) the positions every class shares
        (the start token and the contexts) go through the transformer once per context
        rather than once per class, and positions after the last end token are dropped:
        under the causal mask neither changes what the end tokens see.
        """
        K, T = tokens.shape
        n_ctx = 0 if contexts is None else contexts.shape[1]
        if n_ctx + T > self.context_length:
            raise ValueError(
                f"{T} token positions + {n_ctx} contexts exceed the text context length "
                f"{self.context_length}"
            )
        eot = tokens.argmax(dim=-1)  # (K,)
        # The shared-prefix path reads token values (the start tokens must agree, and the
        # last end token bounds the sequence): not on the meta device, nor inside a
        # torch.compile trace, where data-dependent shapes break the graph.
        shared = fast_kernels() and T > 1 and tokens.device.type != "meta" \
            and not torch.compiler.is_compiling()
        if shared and bool((tokens[:, 0] == tokens[0, 0]).all()):
            x = self._forward_shared_prefix(tokens, contexts, eot)
        else:
            x = self._forward_full(tokens, contexts, eot)
        x = self.ln_final(x) @ self.text_projection
        return x if contexts is None else x.reshape(contexts.shape[0], K, -1)

    def _forward_full(self, tokens: torch.Tensor, contexts: torch.Tensor | None,
                      eot: torch.Tensor) -> torch.Tensor:
        """Every class sequence in full; the (B*K, width) features at the end tokens."""
        K, T = tokens.shape
        x = self.token_embedding(tokens)  # (K, T, W)
        if contexts is not None:
            B, n_ctx, _ = contexts.shape
            x = torch.cat(
                [
                    x[None, :, :1].expand(B, -1, -1, -1),
                    contexts[:, None].expand(-1, K, -1, -1).to(x.dtype),
                    x[None, :, 1:].expand(B, -1, -1, -1),
                ],
                dim=2,
            ).reshape(B * K, n_ctx + T, -1)
            eot = (eot + n_ctx).repeat(B)
        L = x.shape[1]
        x = x + self.positional_embedding[:L].to(x.dtype)
        x = self.transformer(x.transpose(0, 1), self.attn_mask[:L, :L]).transpose(0, 1)
        return x[torch.arange(x.shape[0], device=x.device), eot]

    def _forward_shared_prefix(self, tokens: torch.Tensor, contexts: torch.Tensor | None,
                               eot: torch.Tensor) -> torch.Tensor:
        """As :meth:`_forward_full`, with the shared prefix [start token, contexts] computed
        once per context and each class's tokens up to the last end token."""
        S = int(eot.max())  # suffix positions 1..S of the tokens
        start = self.token_embedding(tokens[:1, :1])  # (1, 1, W)
        if contexts is None:
            prefix = start  # (B=1, P=1, W)
        else:
            B = contexts.shape[0]
            prefix = torch.cat([start.expand(B, -1, -1), contexts.to(start.dtype)], dim=1)
        B, P, _ = prefix.shape
        pos = self.positional_embedding
        prefix = (prefix + pos[:P].to(prefix.dtype)).transpose(0, 1)  # (P, B, W)
        suffix = self.token_embedding(tokens[:, 1:S + 1])  # (K, S, W)
        suffix = suffix + pos[P:P + S].to(suffix.dtype)
        suffix = suffix.transpose(0, 1).repeat(1, B, 1)  # (S, B*K, W), b-major
        prefix_mask = causal_mask(P, device=prefix.device)
        suffix_mask = causal_mask(S, device=prefix.device, prefix=P)
        for block in self.transformer.resblocks:
            prefix, suffix = block.forward_shared_prefix(prefix, suffix, prefix_mask,
                                                         suffix_mask)
        return suffix[(eot - 1).repeat(B), torch.arange(suffix.shape[1], device=suffix.device)]


def build_text_encoder(cfg: TextConfig, embed_dim: int) -> CLIPTextEncoder:
    """The text tower of ``model.text`` projecting to ``embed_dim`` (the visual backbone's
    ``embed_dim``), as the guided models and the zero-shot segmentor use it."""
    return CLIPTextEncoder(context_length=cfg.context_length, vocab_size=cfg.vocab_size,
                           width=cfg.width, layers=cfg.layers, heads=cfg.heads,
                           embed_dim=embed_dim, act=cfg.act)
