"""DenseCLIP: language-guided dense prediction with context-aware prompting.

The public API: :func:`load_config` (presets and YAML files), :func:`build_model`,
:func:`load_checkpoint` (our checkpoints, official releases, OpenAI CLIP) and
:class:`Predictor` (images in, predictions out). The README's "Code map" says where each
concept lives.
"""

import os

# PyTorch's CPU allocator backs tensors of 2 MB and more with transparent huge pages when
# this is set before its first large allocation (Linux; elsewhere it does nothing). A fresh
# multi-hundred-MB activation then costs hundreds of page faults instead of ~10^5: on a
# 2-core machine filling a new 300 MB tensor is 4x faster, a training step of RN50-DenseCLIP
# measurably so. An explicit THP_MEM_ALLOC_ENABLE=0 is respected.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .checkpoint import load_checkpoint  # noqa: E402
from .config import Config, ConfigError, available_presets, load_config  # noqa: E402
from .inference import Predictor  # noqa: E402
from .models import build_model  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "Predictor", "available_presets", "build_model",
           "load_checkpoint", "load_config", "__version__"]
