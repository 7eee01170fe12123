"""A model as a self-contained directory: ``model.safetensors`` (the weights, a format that
holds data only, so loading it never executes code), ``config.yaml`` (the resolved config),
``classes.txt`` and a ``README.md`` model card.

:func:`save_pretrained` writes one (also ``model.save_pretrained(DIR)`` through the
:class:`SavePretrained` mixin of the task models); :func:`denseclip.from_pretrained` reads
one back. This module imports no model code, so the models can use it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from ..classes import BUNDLED, format_classes, load_classes
from ..config import Config, save_config
from ..utils import unwrap_model
from .atomic import atomic_write

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
CLASSES_NAME = "classes.txt"
CARD_NAME = "README.md"
LICENCE = ("MIT for the code (denseclip). The weights carry the terms of the weights they were "
           "trained from: OpenAI CLIP (MIT), the official DenseCLIP releases (MIT), "
           "torchvision / timm ImageNet weights (their own licences).")


def _read_metrics(metrics: Mapping[str, Any] | str | Path | None) -> dict[str, float]:
    """The headline numbers of ``metrics`` (a dict, or a ``metrics.json`` written by
    ``denseclip test``): every top-level number."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        path = Path(metrics)
        try:
            metrics = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read metrics: {e}") from None
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def model_card(cfg: Config, class_names: list[str], metrics: dict[str, float]) -> str:
    """The ``README.md`` of a saved model: preset, task, backbone, classes, training data,
    metrics and licence."""
    m = cfg.model
    backbone = m.backbone.name or m.backbone.type
    kind = ("zero-shot (CLIP weights only)" if m.zeroshot else
            "DenseCLIP" if m.guidance.enabled else "baseline without text guidance")
    shown = ", ".join(class_names[:30]) + (f", … ({len(class_names)} in all)"
                                           if len(class_names) > 30 else "")
    lines = [
        f"# {cfg.name}", "",
        f"A denseclip {m.task} model ({kind}) on a {backbone} backbone.", "",
        f"- **Preset / config:** `{cfg.name}`, resolved in `{CONFIG_NAME}`",
        f"- **Classes ({len(class_names)}):** {shown} (`{CLASSES_NAME}`)",
        f"- **Training data:** {cfg.data.dataset} (`{cfg.data.root}`, split "
        f"`{cfg.data.train_split}`)",
        f"- **Licence:** {LICENCE}", "",
    ]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in metrics.items()]
        lines.append("")
    lines += ["## Use", "", "```python", "import denseclip",
              "model = denseclip.from_pretrained(\"path/to/this/directory\")", "```", "",
              "or `denseclip predict DIR/config.yaml DIR photo.jpg --out out/`.", ""]
    return "\n".join(lines)


def model_classes(model: nn.Module, cfg: Config) -> dict[str, str]:
    """``{name: text embedded}`` of ``model``'s classes (its ``class_names`` and
    ``class_texts``), else of ``cfg.model.classes``."""
    names = getattr(model, "class_names", None)
    if not names:
        return load_classes(cfg.model.classes)
    texts = getattr(model, "class_texts", None) or names
    return dict(zip(map(str, names), map(str, texts), strict=True))


def class_texts_meta(model: nn.Module) -> dict[str, dict[str, str]]:
    """What a training checkpoint records of the texts ``model`` embeds for its classes:
    ``{"class_texts": {name: text}}`` when some text differs from its name, else nothing
    (read back by :func:`denseclip.weights.resolver.describe`)."""
    names = getattr(model, "class_names", None)
    texts = getattr(model, "class_texts", None)
    if not names or not texts or list(names) == list(texts):
        return {}
    return {"class_texts": dict(zip(map(str, names), map(str, texts), strict=True))}


def save_pretrained(model: nn.Module, directory: str | Path, cfg: Config | None = None,
                    metrics: Mapping[str, Any] | str | Path | None = None) -> Path:
    """Write ``model`` into ``directory``: ``model.safetensors``, ``config.yaml``,
    ``classes.txt`` (``name: text`` where the text the model embeds differs from the
    name) and a ``README.md`` model card (with ``metrics``: a dict or a
    ``metrics.json`` of ``denseclip test``). ``cfg`` defaults to the config the model was
    built from (:func:`~denseclip.build_model` records it as ``model.config``). Each file
    is written atomically. Returns the directory."""
    model = unwrap_model(model)
    cfg = cfg if cfg is not None else getattr(model, "config", None)
    if not isinstance(cfg, Config):
        raise ValueError("save_pretrained needs the model's config: build the model with "
                         "denseclip.build_model, or pass cfg")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    texts = model_classes(model, cfg)
    class_names = list(texts)
    bundled = cfg.model.classes in BUNDLED and load_classes(cfg.model.classes) == texts
    classes = cfg.model.classes if bundled else CLASSES_NAME
    saved = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None,
                                                               classes=classes))
    # clones: safetensors refuses tensors that share memory
    state = {k: v.detach().to("cpu", copy=True).contiguous()
             for k, v in model.state_dict().items()}
    card = model_card(cfg, class_names, _read_metrics(metrics))
    writers = {
        WEIGHTS_NAME: lambda p: save_file(state, str(p), metadata={"format": "denseclip",
                                                                   "preset": cfg.name}),
        CONFIG_NAME: lambda p: save_config(saved, p),
        CLASSES_NAME: lambda p: p.write_text(format_classes(texts), encoding="utf-8"),
        CARD_NAME: lambda p: p.write_text(card, encoding="utf-8"),
    }
    for name, write in writers.items():  # each file whole or not at all; a full disk: one line
        atomic_write(directory / name, write, by_name=True)
    return directory


class SavePretrained:
    """Mixin: ``model.save_pretrained(DIR, metrics=None)`` (see :func:`save_pretrained`)."""

    def save_pretrained(self, directory: str | Path,
                        metrics: Mapping[str, Any] | str | Path | None = None) -> Path:
        return save_pretrained(self, directory, metrics=metrics)  # type: ignore[arg-type]
