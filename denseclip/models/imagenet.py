"""ImageNet-pretrained feature pyramids under DenseCLIP.

A *body* (torchvision's ResNet or Swin Transformer, or any timm model that offers
``features_only``) returns four NCHW maps at strides 4, 8, 16 and 32; their channels and
strides are read from the built network, never from preset numbers.
:class:`ImageNetBackbone` puts a randomly initialised CLIP attention pool on the last map,
which maps it into CLIP's joint embedding space (the global and dense embeddings that the
text guidance needs), as the DenseCLIP authors describe for ImageNet backbones.

Each body also knows how the keys of its network's ImageNet file (a ``torchvision.models``
or timm state dict of the *whole* classifier) map onto its own parameters, which keys
belong to the classifier it leaves out, and which parameters it adds:
:meth:`FeatureBody.file_keys`, used by :func:`denseclip.weights.load_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn

from ..config import ConfigError
from ..optional import require
from .clip_resnet import AttentionPool2d

STRIDES = (4, 8, 16, 32)  # the pyramid every dense head here reads
PROBE_SIZE = 128  # side of the dummy input that reveals each level's channels and stride


def _meta_state_shapes(build: Callable[[], nn.Module]) -> dict[str, torch.Size]:
    """Key → shape of the state dict of ``build()``, built on the meta device (no memory,
    no initialisation cost)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in build().state_dict().items()}


class FeatureBody(nn.Module):
    """Base class: ``forward(x)`` returns four NCHW maps at :data:`STRIDES`.

    Subclasses set ``source``, pass the classifier ``net`` they are cut from (or override
    :meth:`_full_keys`, as the timm body does) and implement ``forward``.
    """

    source = ""

    def __init__(self, name: str, net: nn.Module | None = None) -> None:
        super().__init__()
        self.name = name
        self.out_channels: list[int] = []
        self.strides: list[int] = []
        # keys and shapes of the whole classifier ``net`` the body is cut from
        self._full = {} if net is None else {k: v.shape for k, v in net.state_dict().items()}

    def _probe(self) -> None:
        """Run a dummy input once (eval mode, no gradient) to read the channels and strides
        of the four maps; raise :class:`ConfigError` unless the strides are 4–32."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            maps = self(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE))
        self.train(was_training)
        self.out_channels = [m.shape[1] for m in maps]
        self.strides = [PROBE_SIZE // m.shape[-1] for m in maps]
        if tuple(self.strides) != STRIDES:
            raise ConfigError(f"model.backbone: {self.source} {self.name!r} gives feature "
                              f"maps at strides {self.strides}; the dense heads need "
                              f"{list(STRIDES)}")

    def _full_keys(self) -> dict[str, torch.Size]:
        """Keys and shapes of the whole ImageNet classifier's state dict."""
        return self._full

    def _file_name(self, key: str, full: dict[str, torch.Size]) -> str | None:
        """The key of the ImageNet file that holds this body's ``key`` (None: new here)."""
        return key if key in full else None

    def file_keys(self) -> tuple[dict[str, str], set[str]]:
        """``(file key → body key, classifier keys)``: how an ImageNet state dict of the
        whole network maps onto this body, and the file keys the pyramid does not use (the
        classification head, a final norm). Body keys missing from the map are new here."""
        full = self._full_keys()
        mapping = {}
        for key, value in self.state_dict().items():
            name = self._file_name(key, full)
            if name is not None and full[name] == value.shape:
                mapping[name] = key
        return mapping, set(full) - set(mapping)


class TorchvisionResNet(FeatureBody):
    """torchvision's ResNet without its pooling and classifier: stages ``layer1``–``layer4``
    (keys as in torchvision's files)."""

    source = "torchvision"

    def __init__(self, name: str, net: nn.Module, levels: tuple[int, ...] = (0, 1, 2, 3)
                 ) -> None:
        super().__init__(name, net)  # every stage runs on the way to the last: levels unused
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (net.layer1, net.layer2,
                                                              net.layer3, net.layer4)
        self._probe()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            out.append(x)
        return out


class TorchvisionSwin(FeatureBody):
    """torchvision's Swin Transformer: the patch embedding and four stages of ``features``
    (keys as in torchvision's files); each stage's output passes a new LayerNorm (the
    ``norms``, as dense-prediction Swin backbones do) and becomes NCHW. The classifier's
    final ``norm`` and ``head`` are not used. Levels outside ``levels`` (those the model
    does not read) get no norm, so that every parameter receives a gradient."""

    source = "torchvision"

    def __init__(self, name: str, net: nn.Module, levels: tuple[int, ...] = (0, 1, 2, 3)
                 ) -> None:
        super().__init__(name, net)
        self.features = net.features
        widths = [self.features[i][-1].norm1.normalized_shape[0] for i in (1, 3, 5, 7)]
        self.norms = nn.ModuleList(nn.LayerNorm(c) if i in levels else nn.Identity()
                                   for i, c in enumerate(widths))
        self._probe()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, stage in enumerate(self.features):
            x = stage(x)  # NHWC
            if i % 2 == 1:
                out.append(self.norms[i // 2](x).permute(0, 3, 1, 2))
        return out


TORCHVISION_BODIES: dict[str, type[FeatureBody]] = {
    "ResNet": TorchvisionResNet, "SwinTransformer": TorchvisionSwin,
}


def torchvision_body(name: str, kwargs: dict[str, Any],
                     levels: tuple[int, ...] = (0, 1, 2, 3)) -> FeatureBody:
    """The body of ``torchvision.models.<name>(**kwargs)`` (weights are loaded later, from a
    file: the builder is called without downloading anything); ``levels`` are the pyramid
    levels the model reads."""
    build = getattr(torchvision.models, name, None)
    if not callable(build):
        raise ConfigError(f"model.backbone.name: torchvision.models has no builder {name!r} "
                          f"(e.g. resnet18, resnet50, resnet101, swin_t, swin_s)")
    try:
        net = build(**kwargs)
    except TypeError as e:
        raise ConfigError(f"model.backbone: torchvision.models.{name}(**{kwargs}): {e}") from None
    body = TORCHVISION_BODIES.get(type(net).__name__)
    if body is None:
        raise ConfigError(
            f"model.backbone: torchvision.models.{name} builds a {type(net).__name__}; the "
            f"torchvision backbones are {', '.join(TORCHVISION_BODIES)} (use type: timm for "
            f"other networks)")
    return body(name, net, levels)


class TimmBody(FeatureBody):
    """Any timm model created with ``features_only``: the maps at ``indices`` (the last one
    at each stride 4–32 unless given), NHWC outputs (Swin, ...) turned NCHW."""

    source = "timm"

    def __init__(self, name: str, kwargs: dict[str, Any], indices: list[int]) -> None:
        super().__init__(name)
        timm = _import_timm()
        self.kwargs = dict(kwargs)

        def create(**extra: Any) -> nn.Module:
            try:
                return timm.create_model(name, pretrained=False, features_only=True,
                                         **self.kwargs, **extra)
            except (RuntimeError, TypeError, ValueError) as e:
                raise ConfigError(f"model.backbone: timm model {name!r} with features_only: "
                                  f"{e}") from None

        net = create(**({"out_indices": tuple(indices)} if indices else {}))
        if not indices:
            wanted = _pick_indices(net.feature_info, name)
            if wanted != list(range(len(net.feature_info))) or len(wanted) != 4:
                net = create(out_indices=tuple(wanted))
        self.net = net
        fmt = getattr(net, "output_fmt", "NCHW")
        self.nhwc = getattr(fmt, "value", fmt) == "NHWC"
        # feature_info, not a dummy input: some timm models only take their own image size
        self.out_channels = list(net.feature_info.channels())
        self.strides = list(net.feature_info.reduction())
        if len(self.strides) != 4 or tuple(self.strides) != STRIDES:
            raise ConfigError(f"model.backbone: timm model {name!r} gives feature maps at "
                              f"strides {self.strides}; the dense heads need {list(STRIDES)}")

    def _full_keys(self) -> dict[str, torch.Size]:
        timm = _import_timm()
        return _meta_state_shapes(lambda: timm.create_model(self.name, pretrained=False,
                                                            **self.kwargs))

    def _file_name(self, key: str, full: dict[str, torch.Size]) -> str | None:
        key = key.removeprefix("net.")
        # timm's feature wrappers flatten top-level sequences (stages.0 → stages_0) or keep
        # the model under "model."
        candidates = [key, key.removeprefix("model.")]
        head, _, rest = key.partition(".")
        if "_" in head:
            stem, _, index = head.rpartition("_")
            candidates.append(f"{stem}.{index}.{rest}")
        return next((c for c in candidates if c in full), None)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.net(x)
        return [m.permute(0, 3, 1, 2) for m in maps] if self.nhwc else list(maps)


def _import_timm():
    return require("timm", "model.backbone.type: timm")


def _pick_indices(info: Any, name: str) -> list[int]:
    """The last feature index at each stride of :data:`STRIDES` in timm's feature_info."""
    reductions = info.reduction()
    picked = []
    for stride in STRIDES:
        at = [i for i, r in enumerate(reductions) if r == stride]
        if not at:
            raise ConfigError(f"model.backbone: timm model {name!r} has features at strides "
                              f"{reductions}, none at {stride}; the dense heads need "
                              f"{list(STRIDES)} (set model.backbone.feature_indices)")
        picked.append(at[-1])
    return picked


def clip_attention_pool_init(pool: AttentionPool2d) -> None:
    """CLIP's initialisation of a new attention pool: projections ~ N(0, C^-1/2)."""
    std = pool.c_proj.in_features ** -0.5
    for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
        nn.init.normal_(proj.weight, std=std)


class ImageNetBackbone(nn.Module):
    """An ImageNet feature pyramid (``body``) with a new attention pool on its last map.

    Returns ``(features, embeddings)`` as the CLIP towers do: four maps (channels
    ``out_channels``, strides 4–32) and ``(global (B, D), dense (B, D, H/32, W/32))`` from
    the pool, or ``None`` without ``embeddings``.

    Args:
        body: the feature pyramid.
        embed_dim: D, the text encoder's embedding width.
        heads: attention-pool heads (they must divide the last map's channels).
        input_resolution: image size of the pool's stored position grid (grid = res / 32).
        embeddings: build the attention pool.
        pos_embed: "interpolate" or "crop" (see :func:`~.layers.spatial_pos_embed`).
    """

    def __init__(self, body: FeatureBody, *, embed_dim: int = 1024, heads: int = 32,
                 input_resolution: int = 512, embeddings: bool = True,
                 pos_embed: str = "interpolate") -> None:
        super().__init__()
        self.body = body
        self.out_channels = list(body.out_channels)
        self.embed_dim = embed_dim
        self.attnpool = None
        if embeddings:
            channels = self.out_channels[-1]
            if channels % heads:
                raise ConfigError(f"model.backbone.heads: {heads} heads do not divide the "
                                  f"last feature map's {channels} channels")
            self.attnpool = AttentionPool2d(input_resolution // 32, channels, heads, embed_dim,
                                            pos_embed)
            clip_attention_pool_init(self.attnpool)

    def file_keys(self) -> tuple[dict[str, str], set[str]]:
        """(ImageNet file key → model key under ``backbone.``, unused classifier keys)."""
        mapping, unused = self.body.file_keys()
        return {k: f"body.{v}" for k, v in mapping.items()}, unused

    def forward(self, x: torch.Tensor):
        features = self.body(x)
        embeddings = self.attnpool(features[-1]) if self.attnpool is not None else None
        return features, embeddings
