"""DenseCLIP: language-guided dense prediction with context-aware prompting.

The public API: :func:`load_config` (presets and YAML files), :func:`build_model`,
:func:`load_checkpoint` (our checkpoints, official releases, OpenAI CLIP, ImageNet
backbones), :class:`Predictor` (images in, predictions out), and :func:`save_pretrained` /
:func:`from_pretrained` (a model as a safetensors directory, or a release by name). The
README's "Code map" says where each concept lives.

``import denseclip`` is cheap: the configuration API loads at once, every name that needs
PyTorch loads from its module on first use (:pep:`562`), so the command line starts without
importing torch where a command does not need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import Config, ConfigError, available_presets, load_config
from .optional import lazy_exports

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and readers
    from .inference import Predictor
    from .tasks import build_model
    from .tasks.pretrained import from_pretrained
    from .weights import load_checkpoint, save_pretrained

__version__ = "0.1.0"

# name → the module it is loaded from on first use
_LAZY = {
    "Predictor": ".inference",
    "build_model": ".tasks",
    "from_pretrained": ".tasks.pretrained",
    "load_checkpoint": ".weights",
    "save_pretrained": ".weights",
}

__all__ = ["Config", "ConfigError", "Predictor", "available_presets", "build_model",
           "from_pretrained", "load_checkpoint", "load_config", "save_pretrained",
           "__version__"]


# each name of _LAZY loads from its module on first use (PEP 562)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
