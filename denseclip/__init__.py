"""DenseCLIP: language-guided dense prediction with context-aware prompting.

The public API: :func:`load_config` (presets and YAML files), :func:`build_model`,
:func:`load_checkpoint` (our checkpoints, official releases, OpenAI CLIP, ImageNet
backbones), :class:`Predictor` (images in, predictions out), and :func:`save_pretrained` /
:func:`from_pretrained` (a model as a safetensors directory, or a release by name). The
README's "Code map" says where each concept lives.
"""

from .config import Config, ConfigError, available_presets, load_config
from .inference import Predictor
from .tasks import build_model
from .tasks.pretrained import from_pretrained
from .weights import load_checkpoint, save_pretrained

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "Predictor", "available_presets", "build_model",
           "from_pretrained", "load_checkpoint", "load_config", "save_pretrained",
           "__version__"]
