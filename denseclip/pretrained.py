"""``denseclip.from_pretrained``: a ready model from a :func:`~denseclip.saving.save_pretrained`
directory or from a registered release's name (:mod:`denseclip.hub`), e.g.
``denseclip.from_pretrained("denseclip_fpn_res50_512x512_80k")``."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .checkpoint import load_checkpoint
from .config import load_config
from .hub import get_entry, known_names, resolve_weights
from .saving import CONFIG_NAME, WEIGHTS_NAME
from .tasks import build_model


def from_pretrained(name_or_dir: str | Path, *, progress: bool = True) -> nn.Module:
    """A model in eval mode, with its weights, from a :func:`save_pretrained` directory or
    a registered release's name (downloaded into the cache and built with its preset; see
    ``denseclip download --list``). The model's config is ``model.config``."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is not a saved model: {', '.join(missing)} "
                                    f"missing (write one with save_pretrained)")
        cfg = load_config(path / CONFIG_NAME)  # finds classes.txt next to it
        weights = path / WEIGHTS_NAME
    else:
        entry = get_entry(str(name_or_dir))
        if entry is None or entry.preset is None:
            raise FileNotFoundError(
                f"{name_or_dir!r} is neither a saved model directory nor a release name; "
                f"releases: {', '.join(n for n in known_names() if get_entry(n).preset)}")
        cfg = load_config(entry.preset)
        weights = resolve_weights(entry.name, progress=progress)
    model = build_model(cfg)
    load_checkpoint(model, weights)
    return model.eval()
