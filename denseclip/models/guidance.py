"""Language guidance shared by every dense task: prompts, context decoder, score maps.

Nothing here knows about segmentation or detection: a task passes the visual encoder's
(global, dense) embeddings in and gets text embeddings and pixel-text score maps back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import fast_kernels, fp32_region
from ..weights.pretrained import SavePretrained
from .layers import attention
from .losses import upsampled_cross_entropy
from .text_encoder import CLIPTextEncoder, tokenize


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v projections and a biased output
    projection followed by dropout (batch-first)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        B, N, C = q.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, heads, L, C/heads)
            return t.reshape(B, t.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = heads(self.q_proj(q)), heads(self.k_proj(kv)), heads(self.v_proj(kv))
        x = attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm transformer decoder layer: self-attention, cross-attention, MLP."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = Attention(dim, heads, dropout)
        self.cross_attn = Attention(dim, heads, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * 4), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * 4, dim)
        )

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.self_attn(y, y)
        x = x + self.cross_attn(self.norm2(x), memory)
        return x + self.dropout(self.mlp(self.norm3(x)))


def _init_decoder_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ContextDecoder(nn.Module):
    """Post-model prompting: text embeddings (B, K, D) attend to the visual context
    (B, N, D); returns the update (B, K, D) that is added with weight gamma (DESIGN §4)."""

    def __init__(self, embed_dim: int, *, width: int = 256, heads: int = 4, layers: int = 3,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.memory_proj = nn.Sequential(
            nn.LayerNorm(embed_dim), nn.Linear(embed_dim, width), nn.LayerNorm(width)
        )
        self.text_proj = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, width))
        self.decoder = nn.ModuleList(DecoderLayer(width, heads, dropout) for _ in range(layers))
        self.out_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim))
        _init_decoder_weights(self)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        memory = self.memory_proj(visual)
        x = self.text_proj(text)
        for layer in self.decoder:
            x = layer(x, memory)
        return self.out_proj(x)


class PromptGenerator(nn.Module):
    """Pre-model prompting (paper §3.3): learnable queries attend to the visual context
    (B, N, D) and become image-specific context vectors (B, n_ctx, text_width)."""

    def __init__(self, embed_dim: int, text_width: int, n_ctx: int, *, width: int = 256,
                 heads: int = 4, layers: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.empty(1, n_ctx, width))
        self.memory_proj = nn.Sequential(
            nn.LayerNorm(embed_dim), nn.Linear(embed_dim, width), nn.LayerNorm(width)
        )
        self.decoder = nn.ModuleList(DecoderLayer(width, heads, dropout) for _ in range(layers))
        self.out_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, text_width))
        _init_decoder_weights(self)
        nn.init.trunc_normal_(self.queries, std=0.02)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        memory = self.memory_proj(visual)
        x = self.queries.expand(visual.shape[0], -1, -1)
        for layer in self.decoder:
            x = layer(x, memory)
        return self.out_proj(x)


@dataclass
class GuidanceOutput:
    text: torch.Tensor  # (B, K, D) image-conditioned text embeddings
    score: torch.Tensor  # (B, K, h, w) cosine pixel-text similarities, no temperature


def ensemble(text: torch.Tensor, size: int) -> torch.Tensor:
    """Prompt-template ensemble: (B, K·size, D) embeddings, ``size`` consecutive ones per
    class, → (B, K, D). The direction is CLIP's zero-shot recipe (normalise, mean,
    normalise); the length is the members' mean length, so the context decoder and
    ``gamma`` meet embeddings of the scale the model trains with (one template gives its
    embedding back). Computed in float32, returned in the input's dtype."""
    B, n, D = text.shape
    x = text.float().reshape(B, n // size, size, D)
    length = x.norm(dim=-1, keepdim=True)
    direction = F.normalize((x / length).mean(dim=2), dim=-1)
    return (direction * length.mean(dim=2)).to(text.dtype)


class TextGuidance(nn.Module):
    """Pixel-text matching with context-aware prompting.

    The classes are names (each embedded as itself) or ``{name: text to embed}``: the
    names are what results show, the texts what the text encoder reads. With
    ``templates`` (e.g. ``["a photo of a {}."]``) each text is put into every template and
    the class embedding is their :func:`ensemble`.

    ``prompting="post"`` (official default): class-text embeddings behind learnable
    contexts, computed once per class list, are refined by the :class:`ContextDecoder`
    against the visual context and added with a learnable per-channel ``gamma``.
    ``prompting="pre"``: a :class:`PromptGenerator` turns the visual context into
    per-image contexts for the text encoder.

    The text encoder's weights are CLIP's, so it is not re-initialised. It trains with the
    rest of the model unless ``optim.freeze_text_encoder`` is set (the presets give it a
    learning-rate multiplier of 0, as the official runs do); frozen or not, gradients flow
    through it to the contexts.

    ``embed_dim`` (D, the visual embeddings' width) defaults to the text encoder's; given,
    it must equal it.
    """

    def __init__(self, text_encoder: CLIPTextEncoder,
                 class_names: Sequence[str] | Mapping[str, str], *,
                 embed_dim: int | None = None, n_ctx: int = 8, prompting: str = "post",
                 decoder_width: int = 256, decoder_heads: int = 4, decoder_layers: int = 3,
                 decoder_dropout: float = 0.1, gamma_init: float = 1e-4,
                 tau: float = 0.07, templates: Sequence[str] = ()) -> None:
        super().__init__()
        if prompting not in ("post", "pre"):
            raise ValueError(f"prompting must be 'post' or 'pre', got {prompting!r}")
        bad = [t for t in templates if str(t).count("{}") != 1]
        if bad:
            raise ValueError(f"prompt template {bad[0]!r} must hold exactly one {{}}")
        self.templates: tuple[str, ...] = tuple(str(t) for t in templates)
        embed_dim = text_encoder.embed_dim if embed_dim is None else embed_dim
        if text_encoder.embed_dim != embed_dim:
            raise ValueError(
                f"text embedding dim {text_encoder.embed_dim} != visual embedding dim {embed_dim}"
            )
        self.prompting = prompting
        self.tau = tau
        self.n_ctx = n_ctx
        self.text_encoder = text_encoder
        decoder = dict(width=decoder_width, heads=decoder_heads, layers=decoder_layers,
                       dropout=decoder_dropout)
        if prompting == "post":
            self.contexts = nn.Parameter(torch.empty(1, n_ctx, text_encoder.width))
            nn.init.trunc_normal_(self.contexts)  # std 1, cut at ±2
            self.gamma = nn.Parameter(torch.full((embed_dim,), gamma_init))
            self.context_decoder = ContextDecoder(embed_dim, **decoder)
        else:
            self.prompt_generator = PromptGenerator(
                embed_dim, text_encoder.width, n_ctx, **decoder
            )
        self.class_names: list[str] = []
        self.class_texts: list[str] = []  # what the text encoder embeds for each class
        self._text_cache: tuple | None = None  # (key, (1, K, D) embeddings)
        self._open_cache: tuple | None = None  # (key, (1, K', D)) of the last texts embedded
        self._open_tokens: tuple | None = None  # ((texts, device), (K', T)) of the last texts
        self.set_classes(class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def set_classes(self, classes: Sequence[str] | Mapping[str, str]) -> None:
        """Change the class list the score maps are computed for: names (each embedded as
        itself) or a mapping ``{name: text to embed}``. A text too long for the context
        raises ``ValueError`` naming it."""
        if isinstance(classes, Mapping):
            names = [str(n) for n in classes]
            texts = [str(t) for t in classes.values()]
        else:
            names = [str(n) for n in classes]
            texts = names
        tokens = tokenize(self.prompts(texts), self.text_length)
        device = self.text_encoder.token_embedding.weight.device
        self.register_buffer("tokens", tokens.to(device), persistent=False)
        self.class_names = names
        self.class_texts = texts

    def prompts(self, texts: Sequence[str]) -> list[str]:
        """What the text encoder reads for class ``texts``: each text, or each put into
        every template (all of one class's prompts together)."""
        if not self.templates:
            return [str(t) for t in texts]
        return [template.format(text) for text in texts for template in self.templates]

    def encode(self, tokens: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
        """Class embeddings (B, K, D) from the tokens of :meth:`prompts` (K·templates, T)
        behind ``contexts`` (B, n_ctx, width): the text encoder's output, ensembled over
        the templates when there are any."""
        text = self.text_encoder(tokens, contexts)
        return ensemble(text, len(self.templates)) if self.templates else text

    @property
    def text_length(self) -> int:
        """Token positions of a class text (SOT and EOT included): the text context less
        the learned contexts (``text.context_length - text.n_ctx``)."""
        return self.text_encoder.context_length - self.n_ctx

    def clear_cache(self) -> None:
        """Forget cached text embeddings, of the class list and of the last other texts
        embedded (the next inference recomputes them)."""
        self._text_cache = None
        self._open_cache = None

    def cache_key(self, texts: Sequence[str], device: torch.device) -> tuple:
        """What inference-time text embeddings of ``texts`` depend on: the texts, templates, device,
        autocast dtype, kernel choice (:mod:`denseclip.runtime`), and the identity and
        version of the contexts and every text-encoder weight (any in-place update, e.g. an
        optimiser step or ``load_state_dict``, bumps a tensor's version counter)."""
        try:
            autocast = (torch.get_autocast_dtype(device.type)
                        if torch.is_autocast_enabled(device.type) else None)
        except RuntimeError:  # a device type without autocast (e.g. meta)
            autocast = None
        contexts = getattr(self, "contexts", None)
        own = () if contexts is None else (contexts.data_ptr(), contexts._version)
        weights = tuple((p.data_ptr(), p._version) for p in self.text_encoder.parameters())
        return (tuple(texts), self.templates, device, autocast, fast_kernels(), own, weights)

    def text_embeddings(self) -> torch.Tensor:
        """Text embeddings (1, K, D) of the class texts behind the learned contexts
        (post-model prompting; they do not depend on the image).

        Without autograd (inference) the result is cached and reused across images and
        sliding windows until :meth:`cache_key` changes."""
        if torch.is_grad_enabled():
            return self.encode(self.tokens, self.contexts)
        key = self.cache_key(self.class_texts, self.tokens.device)
        if self._text_cache is None or self._text_cache[0] != key:
            self._text_cache = (key, self.encode(self.tokens, self.contexts))
        return self._text_cache[1]

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokens (K'·templates, :attr:`text_length`) of other class texts (open
        vocabulary, put into the templates), on the text encoder's device; a text too long
        raises ``ValueError`` naming it and the limit. The last list's tokens are kept."""
        texts = tuple(str(t) for t in texts)
        device = self.text_encoder.token_embedding.weight.device
        if self._open_tokens is None or self._open_tokens[0] != (texts, device):
            tokens = tokenize(self.prompts(texts), self.text_length).to(device)
            self._open_tokens = ((texts, device), tokens)
        return self._open_tokens[1]

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings (1, K', D) of other class texts (open vocabulary) behind the
        learned contexts, for post-model prompting (pre-model prompting embeds text per
        image: score with :meth:`tokenize`'s tokens instead).

        Computed without autograd; the embeddings of the last text list are cached and
        reused for every image and window until :meth:`cache_key` changes or
        :meth:`clear_cache` is called."""
        if self.prompting != "post":
            raise ValueError("pre-model prompting computes text per image: it has no "
                             "image-independent text embeddings")
        tokens = self.tokenize(texts)
        key = self.cache_key(texts, tokens.device)
        if self._open_cache is None or self._open_cache[0] != key:
            with torch.no_grad():
                self._open_cache = (key, self.encode(tokens, self.contexts))
        return self._open_cache[1]

    def forward(self, global_embed: torch.Tensor, dense_embed: torch.Tensor,
                text: torch.Tensor | None = None,
                tokens: torch.Tensor | None = None) -> GuidanceOutput:
        """``global_embed`` (B, D) and ``dense_embed`` (B, D, h, w) → text and score maps.

        By default the scores are for this module's class list. Another list (open
        vocabulary) is scored with the same weights by passing its precomputed post-model
        embeddings ``text`` (1, K', D) or its ``tokens`` (K'·templates, T) from
        :meth:`tokenize`."""
        B = dense_embed.shape[0]
        # Visual context: [global; every position] → (B, 1+hw, D).
        visual = torch.cat([global_embed[:, :, None], dense_embed.flatten(2)], dim=2)
        visual = visual.transpose(1, 2)
        if self.prompting == "post":
            if text is None:
                text = (self.text_embeddings() if tokens is None
                        else self.encode(tokens, self.contexts))
            text = text.to(visual.dtype).expand(B, -1, -1)  # (B, K, D)
            text = text + self.gamma * self.context_decoder(text, visual)
        else:
            if text is not None:
                raise ValueError("pre-model prompting computes text per image: pass tokens")
            tokens = self.tokens if tokens is None else tokens
            text = self.encode(tokens, self.prompt_generator(visual))
        with fp32_region(dense_embed.device):  # the cosine in fp32 under autocast
            score = torch.einsum("bchw,bkc->bkhw", F.normalize(dense_embed.float(), dim=1),
                                 F.normalize(text.float(), dim=2))
        return GuidanceOutput(text=text, score=score)

    def identity_loss(self, score: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                      average: str = "all") -> torch.Tensor:
        """Cross-entropy of score/τ, resized bilinearly to the label size (the official
        "identity head"), unweighted."""
        # channels_last with the fast kernels, for speed (see Segmentor.forward_head)
        fmt = torch.channels_last if fast_kernels() else torch.contiguous_format
        logits = (score.float() / self.tau).contiguous(memory_format=fmt)
        return upsampled_cross_entropy(logits, target, ignore_index, average)


# ------------------------------------------------------------------------------ fusion
def fuse(features: Sequence[torch.Tensor], score: torch.Tensor, level: int) -> list[torch.Tensor]:
    """DenseCLIP's fusion step: the score map (B, K, h, w) is concatenated to backbone level
    ``level`` (B, C, h, w), which then has C + K channels; the other levels are unchanged."""
    features = list(features)
    target = features[level]
    if score.shape[-2:] != target.shape[-2:]:
        raise RuntimeError(
            f"score map {tuple(score.shape[-2:])} does not match backbone level {level} "
            f"{tuple(target.shape[-2:])}"
        )
    features[level] = torch.cat([target, score.to(target.dtype)], dim=1)
    return features


@dataclass
class DenseFeatures:
    """What a DenseCLIP model's feature extractor produces for an image batch."""

    features: list[torch.Tensor]  # backbone levels, the score map fused into one of them
    embeddings: tuple[torch.Tensor, torch.Tensor] | None  # CLIP (global (B, D), dense (B, D, h, w))
    guided: GuidanceOutput | None  # text embeddings and score maps of the model's classes


class GuidedModel(SavePretrained):
    """The part every DenseCLIP task model shares (mixed into ``nn.Module`` subclasses that
    set ``backbone``, ``guidance``, ``score_level`` and ``num_classes``): backbone → text
    guidance → fusion, and the class names behind the score maps.

    Segmentation fuses the cosine score map; the detectors fuse score / τ
    (``fuse_logits = True``), as the official models do.
    """

    backbone: nn.Module
    guidance: TextGuidance | None
    score_level: int
    num_classes: int
    fuse_logits: bool = False
    head_description = "head"  # what predicts the classes, for error messages

    @property
    def class_names(self) -> list[str] | None:
        return None if self.guidance is None else self.guidance.class_names

    @property
    def class_texts(self) -> list[str] | None:
        """What the text encoder embeds for each class (the names, unless given texts)."""
        return None if self.guidance is None else self.guidance.class_texts

    def set_classes(self, class_names: Sequence[str] | Mapping[str, str]) -> None:
        """Replace the classes behind the score maps: names, or ``{name: text to embed}``;
        the heads are tied to ``num_classes``, so the list must keep that length."""
        if self.guidance is None:
            raise ValueError("this model has no text guidance, so it has no class names")
        if len(class_names) != self.num_classes:
            raise ValueError(
                f"{len(class_names)} class names given, but the {self.head_description} "
                f"predicts {self.num_classes} classes"
            )
        self.guidance.set_classes(class_names)

    def forward_features(self, images: torch.Tensor,
                         text: torch.Tensor | None = None) -> DenseFeatures:
        """Backbone levels with the score map of the model's classes fused into
        ``score_level`` (no fusion without guidance). ``text`` (1, K, D) replaces the
        class-name embeddings (e.g. constants baked into an exported graph)."""
        features, embeddings = self.backbone(images)
        features = list(features)
        guided = None
        if self.guidance is not None:
            guided = self.guidance(*embeddings, text=text)
            score = guided.score / self.guidance.tau if self.fuse_logits else guided.score
            features = fuse(features, score, self.score_level)
        return DenseFeatures(features, embeddings, guided)
