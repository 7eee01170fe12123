"""Extension points: registries of backbones and segmentation heads, and the
:class:`Backbone` protocol every backbone keeps.

A backbone is added by registering a builder under a name, which ``model.backbone.type``
then selects; a segmentation head likewise, selected by ``model.head``::

    from denseclip.models import register_backbone, register_head

    @register_backbone("mynet")
    def build_mynet(cfg: BackboneConfig, *, embeddings: bool, levels: tuple[int, ...]):
        return MyNet(width=cfg.width, embed_dim=cfg.embed_dim, embeddings=embeddings)

    @register_head("myhead")
    def build_myhead(in_channels, channels, num_classes, *, dropout, align_corners):
        return MyHead(in_channels, channels, num_classes, dropout=dropout)

The built-in backbones (``resnet``, ``vit``, ``torchvision``, ``timm``) and head
(``semantic_fpn``) register themselves the same way. This module imports nothing of the
package but the config's error type.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from torch import Tensor, nn

from ..config import ConfigError

__all__ = [
    "BACKBONES", "HEADS", "Backbone", "BackboneBuilder", "HeadBuilder", "Registry",
    "prefixed_renames", "register_backbone", "register_head", "with_backbone_renames",
]

B = TypeVar("B", bound=Callable[..., Any])


@runtime_checkable
class Backbone(Protocol):
    """What the task models need of a visual backbone.

    * ``out_channels``: channels of the four pyramid levels, at strides 4, 8, 16 and 32.
    * ``embed_dim``: D, the width of the (global, dense) embeddings, which must equal the
      text encoder's output width for text guidance.
    * ``forward(images)`` (normalised (B, 3, H, W)) returns ``(features, embeddings)``:
      ``features`` the four maps (a level the model does not read, i.e. outside the
      builder's ``levels``, may be ``None``), and ``embeddings`` the pair ``(global (B, D),
      dense (B, D, h, w))`` or ``None`` when built without ``embeddings``. The dense
      embedding's grid must match the level that receives the score map
      (``model.guidance.score_level``).

    Optional hooks, read where present:

    * ``official_renames``: (regex, replacement) rules from an official checkpoint's
      backbone keys to this module's (relative to the backbone; see
      :mod:`denseclip.models.official` for the rule format). The segmentor and detectors
      put them, under ``backbone.``, before their own table.
    * ``file_keys()``: ``(file key → backbone key, unused file keys)`` for loading an
      ImageNet classifier's state dict (see :class:`~denseclip.models.imagenet.ImageNetBackbone`).
    """

    out_channels: Sequence[int]
    embed_dim: int

    def forward(self, images: Tensor) -> tuple[list[Tensor | None],
                                               tuple[Tensor, Tensor] | None]: ...


#: ``builder(cfg: BackboneConfig, *, embeddings: bool, levels: tuple[int, ...])`` → a
#: :class:`Backbone` (an ``nn.Module``); ``levels`` are the pyramid levels the model reads.
BackboneBuilder = Callable[..., nn.Module]
#: ``builder(in_channels, channels, num_classes, *, dropout, align_corners)`` → a module
#: mapping the neck's four levels (``in_channels`` each, strides 4–32) to logits
#: (B, num_classes, H/4, W/4).
HeadBuilder = Callable[..., nn.Module]


class Registry(Generic[B]):
    """Builders by name. ``key`` is the config key that selects one (for error messages)
    and ``kind`` what is built, e.g. ``Registry("backbone", "model.backbone.type")``."""

    def __init__(self, kind: str, key: str, hint: str = "") -> None:
        self.kind = kind
        self.key = key
        self.hint = hint
        self._builders: dict[str, B] = {}

    def register(self, name: str, builder: B | None = None, *, replace: bool = False):
        """Register ``builder`` under ``name``; without ``builder``, a decorator that does.
        A name already taken raises ``ValueError`` unless ``replace``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")

        def add(fn: B) -> B:
            if not callable(fn):
                raise TypeError(f"the {self.kind} builder {name!r} is not callable: {fn!r}")
            if name in self._builders and not replace and self._builders[name] is not fn:
                raise ValueError(f"a {self.kind} named {name!r} is already registered "
                                 f"(pass replace=True to replace it)")
            self._builders[name] = fn
            return fn

        return add if builder is None else add(builder)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (no error if it is not registered)."""
        self._builders.pop(name, None)

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def get(self, name: str) -> B:
        """The builder of ``name``; :class:`~denseclip.config.ConfigError` naming the config
        key and the registered names otherwise."""
        try:
            return self._builders[name]
        except (KeyError, TypeError):
            hint = f" ({self.hint})" if self.hint else ""
            raise ConfigError(f"{self.key}: unknown {self.kind} {name!r}; registered: "
                              f"{', '.join(self._builders) or 'none'}{hint}") from None


BACKBONES: Registry[BackboneBuilder] = Registry("backbone", "model.backbone.type")
HEADS: Registry[HeadBuilder] = Registry("head", "model.head")


def register_backbone(name: str, *, replace: bool = False):
    """Decorator registering a backbone builder under ``name`` (``model.backbone.type``)."""
    return BACKBONES.register(name, replace=replace)


def register_head(name: str, *, replace: bool = False):
    """Decorator registering a segmentation-head builder under ``name`` (``model.head``)."""
    return HEADS.register(name, replace=replace)


def prefixed_renames(rules: Sequence[tuple[str, str]], prefix: str) -> list[tuple[str, str]]:
    """Rename rules relative to a submodule, put under ``prefix`` (e.g. ``"backbone."``) on
    both sides: ``(r"^stem\\.", "conv1.")`` becomes ``(r"^backbone\\.stem\\.",
    "backbone.conv1.")``. Every pattern must start with ``^``."""
    escaped = prefix.replace(".", r"\.")
    out = []
    for pattern, replacement in rules:
        if not pattern.startswith("^"):
            raise ValueError(f"rename pattern {pattern!r} must start with '^'")
        out.append((f"^{escaped}{pattern[1:]}", f"{prefix}{replacement}"))
    return out


def with_backbone_renames(backbone: nn.Module, table: Sequence[tuple[str, str]]
                          ) -> Sequence[tuple[str, str]]:
    """A task model's official rename ``table`` with the ``backbone``'s own rules (its
    optional ``official_renames``, relative to it) put first under ``backbone.``; the
    table itself when the backbone has none."""
    rules = getattr(backbone, "official_renames", None)
    return [*prefixed_renames(rules, "backbone."), *table] if rules else table
