"""What a weights argument means: one function, :func:`resolve`, for every place that takes
one (the commands' checkpoint arguments, ``--load-from``, ``--text-weights``,
``model.pretrained``, :func:`denseclip.from_pretrained`).

A weights argument is a local file, a :func:`~denseclip.weights.pretrained.save_pretrained`
directory, a registered name (``RN50``, a release's preset name), an http(s) URL,
``pretrained`` (the release of the config's preset) or ``none``/``random`` (no weights).
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

from ..config import Config, load_config
from .hub import REGISTRY, download, get_entry, known_names, release_for_preset
from .pretrained import CONFIG_NAME, WEIGHTS_NAME

NO_WEIGHTS = ("none", "random")  # arguments that mean "no weights" (random initialisation)
# A missing argument with one of these suffixes, or with a directory part, is a path that
# does not exist, never a registered name to look up.
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


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
