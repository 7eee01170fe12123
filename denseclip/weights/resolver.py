"""What a weights argument means: one function, :func:`resolve`, for every place that takes
one (the commands' checkpoint arguments, ``--load-from``, ``--text-weights``,
``model.pretrained``, :func:`denseclip.from_pretrained`).

A weights argument is a local file, a :func:`~denseclip.weights.pretrained.save_pretrained`
directory, a registered name (``RN50``, a release's preset name), an http(s) URL,
``pretrained`` (the release of the config's preset) or ``none``/``random`` (no weights).
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import tempfile
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..classes import ClassListError, format_classes, load_classes
from ..config import Config, ConfigError, _apply_override, _source, config_from_dict, load_config
from .atomic import atomic_write
from .checkpoint import FORMAT, CheckpointError, read_checkpoint
from .hub import REGISTRY, cache_dir, download, get_entry, known_names, release_for_preset
from .pretrained import CONFIG_NAME, WEIGHTS_NAME

NO_WEIGHTS = ("none", "random")  # arguments that mean "no weights" (random initialisation)
# A missing argument with one of these suffixes, or with a directory part, is a path that
# does not exist, never a registered name to look up.
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
CHECKPOINT_NAME = re.compile(r"^iter_(\d+)\.pth$")  # the trainer's checkpoints in a work dir


def is_url(text: str) -> bool:
    """Whether ``text`` is an http(s) URL (decided on the text alone: a URL is never looked
    up on disk, where a long one would not even be a valid path)."""
    return urllib.parse.urlsplit(text).scheme in ("http", "https")


def _local(path: Path) -> Path | None:
    """``path`` itself when it is a file, its ``model.safetensors`` when it is a saved model
    directory, ``None`` when nothing is there. :func:`os.path.isfile` and friends answer
    False for a text that is no valid path at all (e.g. too long a name) instead of raising."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        if os.path.isfile(path / WEIGHTS_NAME):
            return path / WEIGHTS_NAME
        raise FileNotFoundError(f"{path} is not a file (a directory?); give a checkpoint file")
    return None


def resolve(spec: str | os.PathLike[str] | None, preset: str | None = None, *,
            cache: str | os.PathLike[str] | None = None, progress: bool = True) -> Path | None:
    """A weights argument as a local file, downloading into the cache if needed.

    ``spec`` may be

    * ``None``, ``none`` or ``random``: no weights, returns ``None``;
    * an existing file: returned as is (a path always wins over a registered name);
    * a :func:`~denseclip.weights.pretrained.save_pretrained` directory: its
      ``model.safetensors``;
    * ``pretrained``: the release registered for ``preset`` (:class:`ValueError` names the
      preset when there is none);
    * a registered name (:func:`~denseclip.weights.hub.known_names`, e.g. ``RN50``) or an
      http(s) URL: fetched with :func:`~denseclip.weights.hub.download` (no network when
      already cached; ``DENSECLIP_OFFLINE=1`` forbids it).

    A missing path (a directory part, or a weights suffix such as ``.pth``) raises
    :class:`FileNotFoundError` ``checkpoint ... does not exist``; anything else unknown
    raises :class:`FileNotFoundError` listing the known names. Download problems raise
    :class:`~denseclip.weights.hub.DownloadError` (a :class:`RuntimeError`).
    """
    if spec is None:
        return None
    text = os.fspath(spec)
    if text.lower() in NO_WEIGHTS:
        return None
    if is_url(text):
        return download(text, cache=cache, progress=progress)
    path = Path(text).expanduser()
    found = _local(path)
    if found is not None:
        return found
    if text == "pretrained":
        if preset is None:
            raise ValueError("'pretrained' needs a config preset to choose the weights for")
        entry = release_for_preset(preset)
        if entry is None:
            with_release = sorted(e.preset for e in REGISTRY.values() if e.preset)
            raise ValueError(f"no released weights are registered for preset {preset!r}; "
                             f"presets with released weights: {', '.join(with_release)}")
        return download(entry, cache=cache, progress=progress)
    if get_entry(text) is not None:
        return download(text, cache=cache, progress=progress)
    if len(path.parts) > 1 or path.suffix in WEIGHT_SUFFIXES:
        raise FileNotFoundError(f"checkpoint {text} does not exist")  # a path, not a name
    raise FileNotFoundError(
        f"{text!r} is neither an existing file nor a known weights name; known names: "
        f"{', '.join(known_names())}; or 'pretrained' for the release of the config's preset")


def resolve_pretrained(name_or_dir: str | os.PathLike[str], *,
                       progress: bool = True) -> tuple[Config, Path]:
    """The config and weights file of a :func:`~denseclip.weights.pretrained.save_pretrained`
    directory, or of a registered release's name (its preset's config; the weights
    downloaded into the cache): everything :func:`denseclip.from_pretrained` needs except
    the model itself."""
    path = Path(name_or_dir).expanduser()
    if os.path.isdir(path):
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is not a saved model: {', '.join(missing)} "
                                    f"missing (write one with save_pretrained)")
        return load_config(path / CONFIG_NAME), path / WEIGHTS_NAME  # finds classes.txt
    entry = get_entry(os.fspath(name_or_dir))
    if entry is None or entry.preset is None:
        releases = [n for n in known_names() if REGISTRY[n].preset]
        raise FileNotFoundError(f"{os.fspath(name_or_dir)!r} is neither a saved model "
                                f"directory nor a release name; releases: "
                                f"{', '.join(releases)}")
    return load_config(entry.preset), download(entry, progress=progress)


# ---------------------------------------------------------------------------- self-describing
@dataclass
class Described:
    """A model named by one argument: its weights file, the config they were trained with
    and, where the checkpoint records them, the trained class names."""

    checkpoint: Path
    config: Config
    classes: list[str] | None
    kind: str  # "work dir", "checkpoint" or "saved model"


def training_checkpoints(work_dir: str | os.PathLike[str]) -> list[Path]:
    """The ``iter_N.pth`` files of ``work_dir``, oldest (smallest N) first."""
    found = [(int(m[1]), p) for p in Path(work_dir).glob("iter_*.pth")
             if (m := CHECKPOINT_NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def newest_checkpoint(work_dir: str | os.PathLike[str]) -> Path | None:
    """The ``iter_N.pth`` in ``work_dir`` with the largest N, if any."""
    found = training_checkpoints(work_dir)
    return found[-1] if found else None


def describe(spec: str | os.PathLike[str], overrides: Iterable[str] = ()) -> Described | None:
    """What a model argument that describes itself means, or ``None`` when ``spec`` is not
    one (a preset name or a YAML file, which need weights next to them).

    Self-describing are: a work dir of ``denseclip train`` (its ``config.yaml`` and newest
    ``iter_N.pth``), one of our training checkpoints (an existing file other than YAML:
    the resolved config it stores under ``config``) and a
    :func:`~denseclip.weights.pretrained.save_pretrained` directory (``config.yaml`` and
    ``model.safetensors``). ``overrides`` (``section.key=value``) apply to that config.
    The trained class names stored in a training checkpoint (``classes``) come with it,
    so a moved or deleted data folder does not matter. An existing directory or file that
    is none of these raises :class:`FileNotFoundError` / :class:`CheckpointError` saying
    what is missing."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    overrides = list(overrides)
    if os.path.isdir(path):
        config_file = path / CONFIG_NAME
        if (path / WEIGHTS_NAME).is_file() and config_file.is_file():
            return Described(path / WEIGHTS_NAME, load_config(config_file, overrides), None,
                             "saved model")
        checkpoint = newest_checkpoint(path)
        if checkpoint is None or not config_file.is_file():
            missing = " and ".join(n for n, ok in ((CONFIG_NAME, config_file.is_file()),
                                                   ("a checkpoint iter_N.pth",
                                                    checkpoint is not None)) if not ok)
            raise FileNotFoundError(
                f"{path} is a directory but neither a work dir of `denseclip train` "
                f"(config.yaml and iter_N.pth) nor a saved model (config.yaml and "
                f"model.safetensors): {missing} missing")
        cfg = load_config(config_file, overrides)
        payload = read_checkpoint(checkpoint)
        classes = _stored_classes(payload, checkpoint)
        return Described(checkpoint, with_classes(cfg, classes, _stored_texts(payload, classes)),
                         classes, "work dir")
    if not os.path.isfile(path) or path.suffix in (".yaml", ".yml"):
        return None
    payload = read_checkpoint(path)
    ours = isinstance(payload, dict) and payload.get("format") == FORMAT
    stored = payload.get("config") if ours else None
    if not isinstance(stored, dict):
        raise CheckpointError(
            f"{path} does not describe itself (it stores no config: not a checkpoint of "
            f"`denseclip train`); name its config first: PRESET {path}")
    classes = _stored_classes(payload, path)
    return Described(path, with_classes(_config_of(stored, path, overrides), classes,
                                        _stored_texts(payload, classes)),
                     classes, "checkpoint")


def _stored_classes(payload: object, path: Path) -> list[str] | None:
    classes = payload.get("classes") if isinstance(payload, dict) else None
    if classes is None:
        return None
    if not isinstance(classes, list) or not classes or not all(
            isinstance(c, str) and c.strip() for c in classes):
        raise CheckpointError(f"{path}: 'classes' is not a list of class names")
    return classes


def _stored_texts(payload: object, classes: list[str] | None) -> list[str] | None:
    """The texts a training checkpoint's model embedded for its classes (``class_texts``:
    ``{name: text}``), in the order of ``classes``; ``None`` when it records none (the
    names themselves) or they do not belong to these classes."""
    texts = payload.get("class_texts") if isinstance(payload, dict) else None
    if classes is None or not isinstance(texts, dict) or list(texts) != classes:
        return None
    if not all(isinstance(t, str) and t.strip() for t in texts.values()):
        return None
    return [texts[name] for name in classes]


def _config_of(stored: dict, path: Path, overrides: list[str]) -> Config:
    """The config a checkpoint stores, with ``overrides`` applied."""
    data = copy.deepcopy(stored)
    for override in overrides:
        _apply_override(data, override)
    try:
        return config_from_dict(data, str(path))
    except ConfigError as e:
        where = _source(path, overrides, e.key)
        message = str(e).removeprefix(f"{path}: ")
        raise ConfigError(f"{where}: {message}", e.key) from None


def with_classes(cfg: Config, classes: list[str] | None,
                 texts: list[str] | None = None) -> Config:
    """``cfg`` with ``model.classes`` naming ``classes`` (a training checkpoint's class
    names) and ``texts`` (what its text encoder embedded for them; default: the names):
    kept when it already lists them, else a class file of them written once into the
    cache (``$DENSECLIP_CACHE/classes``, keyed by their content)."""
    if classes is None:
        return cfg
    wanted = dict(zip(classes, texts or classes, strict=True))
    try:
        if load_classes(cfg.model.classes) == wanted:
            return cfg
    except (OSError, ValueError):
        pass  # e.g. the training data's classes.txt is gone: the checkpoint's names serve
    cfg.model.classes = str(_classes_file(wanted))
    return cfg


def _classes_file(classes: dict[str, str]) -> Path:
    try:
        text = format_classes(classes)
    except ClassListError as e:
        raise CheckpointError(f"{e}; give model.classes=FILE") from None
    name = f"classes-{hashlib.sha256(text.encode()).hexdigest()[:16]}.txt"
    for folder in (cache_dir() / "classes", None):
        try:
            if folder is None:
                folder = Path(tempfile.mkdtemp(prefix="denseclip-classes-"))
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            if not (path.is_file() and path.read_text(encoding="utf-8") == text):
                atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"),
                             by_name=True)
            return path
        except (OSError, RuntimeError):  # e.g. a read-only cache, a full disk
            continue
    raise CheckpointError("cannot write the checkpoint's class names to a class file")
