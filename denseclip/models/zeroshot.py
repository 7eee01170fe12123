"""Zero-shot segmentation from CLIP's own weights, with no training (MaskCLIP).

Zhou et al., "Extract Free Dense Labels from CLIP" (ECCV 2022): CLIP's last attention
layer pools the image into one embedding, but its *value path* applied at every position,
without the query/key attention, already gives dense embeddings in the text space.

* ResNet: the attention pool's ``v_proj`` then ``c_proj`` on every position of the
  stride-32 map (no position embedding, no query/key; the pool's ``q_proj``, ``k_proj``
  and ``positional_embedding`` are not used, and loading OpenAI's file reports them as
  ignored).
* ViT: every block but the last runs as usual; at the last block each patch token takes
  the value path ``ln_1`` → value rows of ``in_proj`` → ``out_proj`` in place of the
  attention, keeps the block's residual and its MLP branch (``x + v``, then
  ``+ mlp(ln_2(·))``), and goes through ``ln_post`` and ``proj``. This is the official
  MaskCLIP code (its ViT encoder layer with ``return_qkv``, the backbone's final norm and
  the head's ``proj``); the class token only matters through the earlier blocks.

Class embeddings follow CLIP's zero-shot recipe: every class text is put into each of
:data:`PROMPT_TEMPLATES`, the embeddings are normalised, averaged per class and
normalised again. Logits are the cosine similarity × :data:`LOGIT_SCALE` (CLIP's trained
logit scale), upsampled bilinearly to the input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..classes import BUNDLED, as_class_dict, read_classes
from ..config import BackboneConfig, ConfigError, ModelConfig
from ..runtime import fast_kernels, fp32_region
from ..weights.pretrained import SavePretrained
from .backbones import build_backbone, resnet_layers, vit_depth
from .clip_resnet import CLIPResNet
from .clip_vit import CLIPViT
from .guidance import DenseFeatures
from .registry import Registry
from .seg_inference import SegInference
from .segmentor import check_images
from .text_encoder import CLIPTextEncoder, build_text_encoder, tokenize

__all__ = ["LOGIT_SCALE", "PROMPT_TEMPLATES", "ZEROSHOT_BACKBONES", "NotTrainableError",
           "PromptEnsemble", "ZeroShotResNet", "ZeroShotSegmentor", "ZeroShotViT",
           "build_zeroshot_segmentor"]

#: The prompt ensemble: 16 of CLIP's 80 ImageNet templates (photo-style ones, with and
#: without "the"), plus MaskCLIP's five scene templates.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a photo of the {}.",
    "a bad photo of a {}.", "a bad photo of the {}.",
    "a photo of a large {}.", "a photo of the large {}.",
    "a photo of a small {}.", "a photo of the small {}.",
    "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a dark photo of the {}.",
    "a cropped photo of the {}.", "a blurry photo of a {}.",
    "a low resolution photo of the {}.", "a good photo of the {}.",
    "there is a {} in the scene.", "there is the {} in the scene.",
    "this is a {} in the scene.", "this is the {} in the scene.",
    "this is one {} in the scene.",
)
#: CLIP's logit scale (exp(4.6052) in OpenAI's weights): logits = 100 × cosine.
LOGIT_SCALE = 100.0
_CHUNK = 1024  # template sequences per text-encoder call
_CACHED_LISTS = 8  # class lists whose embeddings are kept (least recently used dropped)


class NotTrainableError(RuntimeError):
    """The zero-shot model was asked to train."""


def _not_trainable() -> NotTrainableError:
    return NotTrainableError(
        "the zero-shot CLIP segmentor (model.zeroshot: true) has nothing to train: it "
        "segments with CLIP's own weights. Evaluate it with `denseclip test` or run it with "
        "`denseclip predict`/`demo` and OpenAI's RN50.pt / ViT-B-16.pt; to train, pick a "
        "DenseCLIP preset (e.g. denseclip_fpn_res50_512x512_80k)")


# --------------------------------------------------------------------------- visual side
class AttentionValues(nn.Module):
    """The value path of CLIP's attention pool: ``c_proj(v_proj(x))`` at every position,
    (B, C, h, w) → (B, D, h, w). Named so that its weights are the pool's ``v_proj`` and
    ``c_proj`` keys."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, hw, C)
        out = self.c_proj(self.v_proj(tokens))  # (B, hw, D)
        return out.transpose(1, 2).reshape(B, -1, H, W)


class ZeroShotResNet(CLIPResNet):
    """CLIP's ModifiedResNet whose attention pool keeps only its value path:
    ``forward(images)`` → dense embeddings (B, D, H/32, W/32)."""

    def __init__(self, layers: Sequence[int], *, width: int = 64, embed_dim: int = 1024) -> None:
        super().__init__(list(layers), width=width, embed_dim=embed_dim, embeddings=False)
        self.attnpool = AttentionValues(width * 32, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        _, dense = super().forward(x)  # the trunk, then the pool's value path on its output
        return dense


class ZeroShotViT(CLIPViT):
    """CLIP's ViT with MaskCLIP's last block (see the module documentation):
    ``forward(images)`` → dense embeddings (B, D, H/patch, W/patch). No pyramid modules."""

    def __init__(self, *, width: int = 768, layers: int = 12, heads: int = 12,
                 patch_size: int = 16, embed_dim: int = 512, input_resolution: int = 224,
                 class_embedding_quirk: bool = False, pos_embed: str = "interpolate",
                 act: str = "quick_gelu") -> None:
        super().__init__(width=width, layers=layers, heads=heads, patch_size=patch_size,
                         embed_dim=embed_dim, input_resolution=input_resolution,
                         out_indices=[layers - 1] * 4, embeddings=True,
                         class_embedding_quirk=class_embedding_quirk, pos_embed=pos_embed,
                         levels=(3,), act=act)
        self.fpn4 = None  # dense prediction here needs no pyramid

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x, (H, W) = self.embed_tokens(x)  # (1+hw, B, C)
        _, B, C = x.shape
        *blocks, last = self.transformer.resblocks
        for block in blocks:
            x = block(x)
        x = x[1:]  # the value path does not mix tokens: the patch tokens suffice
        v = F.linear(last.ln_1(x), last.attn.in_proj_weight[2 * C:],
                     last.attn.in_proj_bias[2 * C:])
        x = x + last.attn.out_proj(v)
        x = x + last.mlp(last.ln_2(x))
        x = self.ln_post(x) @ self.proj  # (hw, B, D)
        return x.permute(1, 2, 0).reshape(B, -1, H, W)


# --------------------------------------------------------------------------- text side
class PromptEnsemble(nn.Module):
    """CLIP's text tower and the prompt-ensemble embedding of class texts.

    ``embeddings(texts)`` → (K, D) float32: each text in every template, encoded,
    normalised, averaged per text and normalised again. Results are cached per text list
    (the last few used) until the device, kernel choice (:mod:`denseclip.runtime`) or any
    text-encoder weight (its version counter) changes; they are computed in fp32 without
    autograd.
    """

    def __init__(self, text_encoder: CLIPTextEncoder,
                 templates: Sequence[str] = PROMPT_TEMPLATES) -> None:
        super().__init__()
        if not templates or any(t.count("{}") != 1 for t in templates):
            raise ValueError(f"prompt templates must each hold one '{{}}', got {templates!r}")
        self.text_encoder = text_encoder
        self.templates = tuple(templates)
        self._cache: dict[tuple[str, ...], tuple[tuple, torch.Tensor]] = {}

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokens (K·T, context_length) of every text in every template (text-major);
        ``ValueError`` naming the text and template that do not fit."""
        length = self.text_encoder.context_length
        sentences = [t.format(text) for text in texts for t in self.templates]
        try:
            return tokenize(sentences, length)
        except ValueError as e:
            for text in texts:
                for t in self.templates:
                    try:
                        tokenize([t.format(text)], length)
                    except ValueError:
                        raise ValueError(
                            f"class text {text!r} in the prompt {t!r} does not fit the text "
                            f"context of {length} tokens (model.text.context_length; CLIP "
                            f"holds 77)") from None
            raise ValueError(str(e)) from None

    def clear_cache(self, texts: Sequence[str] | None = None) -> None:
        """Forget the cached embeddings of ``texts`` (all of them with ``None``)."""
        if texts is None:
            self._cache.clear()
        else:
            self._cache.pop(tuple(texts), None)

    def cache_key(self, device: torch.device) -> tuple:
        """What the embeddings depend on besides the texts: device, kernels and weights."""
        weights = tuple((p.data_ptr(), p._version) for p in self.text_encoder.parameters())
        return (device, fast_kernels(), weights)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """The ensemble embeddings of ``texts`` as a batch of one (1, K, D) (cached)."""
        return self.embeddings(texts)[None]

    def embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised prompt-ensemble embeddings (K, D) of ``texts`` (cached)."""
        texts = tuple(texts)
        device = self.text_encoder.token_embedding.weight.device
        key = self.cache_key(device)
        hit = self._cache.pop(texts, None)
        if hit is None or hit[0] != key:
            hit = (key, self._encode(texts, device))
        self._cache[texts] = hit  # now the most recently used
        while len(self._cache) > _CACHED_LISTS:
            self._cache.pop(next(iter(self._cache)))
        return hit[1]

    @torch.no_grad()
    def _encode(self, texts: tuple[str, ...], device: torch.device) -> torch.Tensor:
        tokens = self.tokenize(texts).to(device)
        with fp32_region(device):
            out = torch.cat([self.text_encoder(chunk).float()
                             for chunk in tokens.split(_CHUNK)])
        out = F.normalize(out, dim=-1).reshape(len(texts), len(self.templates), -1)
        return F.normalize(out.mean(dim=1), dim=-1)


# --------------------------------------------------------------------------- the model
class ZeroShotSegmentor(SegInference, SavePretrained, nn.Module):
    """CLIP's dense embeddings (MaskCLIP) scored against prompt-ensembled class texts.

    ``model(images)`` (normalised float (B, 3, H, W)) → logits (B, K, H, W):
    ``logit_scale`` × cosine similarity, upsampled bilinearly; ``model.inference`` and
    ``model.aug_inference`` run the test-time inference, as the trained segmentor's
    (:class:`~.seg_inference.SegInference`). ``backbone`` is a
    :class:`ZeroShotResNet` or :class:`ZeroShotViT` and ``guidance`` the
    :class:`PromptEnsemble` around CLIP's text tower, under OpenAI's key names
    (``visual.*`` → ``backbone.*``, the text tower → ``guidance.text_encoder.*``), so an
    OpenAI CLIP file loads strictly with :func:`~denseclip.weights.load_checkpoint`.

    The model is always in eval mode: ``train()`` and a forward with targets raise
    :class:`NotTrainableError`.
    """

    def __init__(self, backbone: ZeroShotResNet | ZeroShotViT, text_encoder: CLIPTextEncoder,
                 classes: Any, *, templates: Sequence[str] = PROMPT_TEMPLATES,
                 logit_scale: float = LOGIT_SCALE, align_corners: bool = False) -> None:
        super().__init__()
        if text_encoder.embed_dim != backbone.embed_dim:
            raise ValueError(f"text embedding dim {text_encoder.embed_dim} != visual "
                             f"embedding dim {backbone.embed_dim}")
        self.backbone = backbone
        self.guidance = PromptEnsemble(text_encoder, templates)
        self.logit_scale = float(logit_scale)
        self.align_corners = align_corners
        self.class_names: list[str] = []
        self.class_texts: list[str] = []
        self.set_classes(classes)
        super().train(False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def set_classes(self, classes: Any) -> None:
        """Replace the class list (names, a ``{name: text to embed}`` mapping or a
        comma-separated string); any length, as there is no head tied to it."""
        mapping = as_class_dict(classes)
        self.guidance.tokenize(list(mapping.values()))  # fail now on a text too long
        self.class_names = list(mapping)
        self.class_texts = list(mapping.values())

    def open_scores(self, dense: DenseFeatures, texts: Sequence[str],
                    size: Sequence[int]) -> torch.Tensor:
        """Cosine score maps (B, K', *size) of other class texts (open vocabulary), from
        their cached ensemble embeddings."""
        return self.score_maps(dense.features[0], self.guidance.embeddings(texts), size)

    def class_embeddings(self) -> torch.Tensor:
        """Normalised prompt-ensemble embeddings (K, D) of the class list (cached)."""
        return self.guidance.embeddings(self.class_texts)

    def train(self, mode: bool = True) -> ZeroShotSegmentor:
        if mode:
            raise _not_trainable()
        return super().train(False)

    def forward_features(self, images: torch.Tensor) -> DenseFeatures:
        """Normalised float32 dense embeddings (B, D, h, w), as ``features[0]``."""
        dense = self.backbone(images)
        with fp32_region(dense.device):
            dense = F.normalize(dense.float(), dim=1)
        return DenseFeatures([dense], None, None)

    def score_maps(self, dense: torch.Tensor, text: torch.Tensor,
                   size: Sequence[int]) -> torch.Tensor:
        """Cosine similarities (B, K, *size) of normalised ``dense`` (B, D, h, w) and
        ``text`` (K, D), upsampled bilinearly (``align_corners`` as configured)."""
        with fp32_region(dense.device):
            score = torch.einsum("bdhw,kd->bkhw", dense.float(), text.float()).contiguous()
            return F.interpolate(score, size=tuple(int(s) for s in size), mode="bilinear",
                                 align_corners=self.align_corners)

    def forward_head(self, features: list[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """Logits (B, K, *size) of the class list from :meth:`forward_features`."""
        return self.logit_scale * self.score_maps(features[0], self.class_embeddings(), size)

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is not None or self.training:
            raise _not_trainable()
        check_images(images)
        return self.forward_head(self.forward_features(images).features, images.shape[-2:])


#: The zero-shot towers by ``model.backbone.type``: CLIP's own ResNet and ViT only, built
#: by :func:`~.backbones.build_backbone` from this registry.
ZEROSHOT_BACKBONES: Registry = Registry(
    "zero-shot backbone", "model.backbone.type",
    hint="model.zeroshot needs CLIP's own image tower, model.backbone.type resnet or vit")


@ZEROSHOT_BACKBONES.register("resnet")
def _zeroshot_resnet(cfg: BackboneConfig, *, embeddings: bool,
                     levels: tuple[int, ...]) -> ZeroShotResNet:
    return ZeroShotResNet(resnet_layers(cfg), width=cfg.width, embed_dim=cfg.embed_dim)


@ZEROSHOT_BACKBONES.register("vit")
def _zeroshot_vit(cfg: BackboneConfig, *, embeddings: bool,
                  levels: tuple[int, ...]) -> ZeroShotViT:
    return ZeroShotViT(width=cfg.width, layers=vit_depth(cfg), heads=cfg.heads,
                       patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                       input_resolution=cfg.input_resolution,
                       class_embedding_quirk=not cfg.cls_embed_once, pos_embed=cfg.pos_embed,
                       act=cfg.act)


def build_zeroshot_segmentor(cfg: ModelConfig) -> ZeroShotSegmentor:
    """The zero-shot segmentor of ``cfg`` (``model.zeroshot: true``): the CLIP tower of
    ``model.backbone`` (``resnet`` or ``vit``, from :data:`ZEROSHOT_BACKBONES`), the text
    tower of ``model.text``, the classes of ``model.classes`` (their texts, where the
    class file gives them) and the prompt ensemble ``model.text.templates`` (empty:
    :data:`PROMPT_TEMPLATES`)."""
    if cfg.head != ModelConfig.head:
        raise ConfigError(f"model.head: the zero-shot segmentor has no head to choose, got "
                          f"{cfg.head!r}")
    backbone = build_backbone(cfg.backbone, registry=ZEROSHOT_BACKBONES)
    text_encoder = build_text_encoder(cfg.text, cfg.backbone.embed_dim)
    classes = read_classes(BUNDLED.get(cfg.classes, cfg.classes))
    try:
        return ZeroShotSegmentor(backbone, text_encoder, classes,
                                 templates=cfg.text.templates or PROMPT_TEMPLATES,
                                 align_corners=cfg.align_corners)
    except ValueError as e:
        raise ConfigError(f"model.classes {cfg.classes!r}: {e}") from None
