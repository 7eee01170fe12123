"""DenseCLIP: language-guided dense prediction with context-aware prompting."""

from .config import Config, ConfigError, available_presets, load_config
from .models import build_model

__version__ = "0.1.0"


def load_checkpoint(model, path, **kwargs):
    """Load weights into ``model``; see :func:`denseclip.checkpoint.load_checkpoint`."""
    from .checkpoint import load_checkpoint as _load

    return _load(model, path, **kwargs)


def __getattr__(name: str):
    if name == "Predictor":  # imported on first use: it pulls in PIL and the data pipeline
        from .predict import Predictor

        return Predictor
    raise AttributeError(f"module 'denseclip' has no attribute {name!r}")


__all__ = ["Config", "ConfigError", "Predictor", "available_presets", "build_model",
           "load_checkpoint", "load_config", "__version__"]
