"""Weights in and out, in one place that imports no model code (the models import it):

* :mod:`.resolver`: :func:`resolve`, what any weights argument means (file, saved directory,
  registered name, URL, ``pretrained``, ``none``), and :func:`describe`, a model named by
  one argument (a work dir, a training checkpoint, a saved model: weights, config, classes);
* :mod:`.provenance`: which parts a load or a training run left untrained, as one warning;
* :mod:`.hub`: the registry of published weights and the download cache;
* :mod:`.checkpoint`: reading every checkpoint format safely and converting it to this
  package's keys (:mod:`.torchscript` reads OpenAI's archives without running them);
* :mod:`.pretrained`: :func:`save_pretrained` (a safetensors directory with config and card);
* :mod:`.atomic`: :func:`atomic_write`, the one way files are written.

Building a model from weights (:func:`denseclip.from_pretrained`) lives with the tasks.

Importing the package is cheap: each name loads from its module on first use (:pep:`562`),
so :mod:`.hub` (no PyTorch) serves ``denseclip download`` without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..optional import lazy_exports

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and readers
    from .atomic import TEMP_PATTERN, DiskFullError, atomic_write
    from .checkpoint import (
        ENV_ALLOW_TORCHSCRIPT,
        TEXT_PREFIX,
        CheckpointError,
        ClassMismatchError,
        LoadReport,
        convert_state_dict,
        load_checkpoint,
        load_checkpoint_object,
        load_text_weights,
        read_checkpoint,
        rename_key,
        save_checkpoint,
    )
    from .hub import DownloadError, OfflineError, WeightsEntry, download, known_names, register
    from .pretrained import SavePretrained, save_pretrained
    from .provenance import UntrainedPartsWarning
    from .resolver import Described, describe, resolve, resolve_pretrained

# module → the names it exports here
_SOURCES = {
    ".atomic": ("TEMP_PATTERN", "DiskFullError", "atomic_write"),
    ".checkpoint": ("ENV_ALLOW_TORCHSCRIPT", "TEXT_PREFIX", "CheckpointError",
                    "ClassMismatchError", "LoadReport",
                    "convert_state_dict", "load_checkpoint", "load_checkpoint_object",
                    "load_text_weights", "read_checkpoint", "rename_key", "save_checkpoint"),
    ".hub": ("DownloadError", "OfflineError", "WeightsEntry", "download", "known_names",
             "register"),
    ".pretrained": ("SavePretrained", "save_pretrained"),
    ".provenance": ("UntrainedPartsWarning",),
    ".resolver": ("Described", "describe", "resolve", "resolve_pretrained"),
}
_LAZY = {name: module for module, names in _SOURCES.items() for name in names}

__all__ = ["ENV_ALLOW_TORCHSCRIPT", "TEMP_PATTERN", "TEXT_PREFIX", "CheckpointError",
           "ClassMismatchError", "Described", "DiskFullError", "DownloadError", "LoadReport",
           "OfflineError", "SavePretrained", "UntrainedPartsWarning", "WeightsEntry",
           "atomic_write", "convert_state_dict", "describe", "download", "known_names",
           "load_checkpoint", "load_checkpoint_object", "load_text_weights", "read_checkpoint",
           "register", "rename_key", "resolve", "resolve_pretrained", "save_checkpoint",
           "save_pretrained"]


# each name of _LAZY loads from its module on first use (PEP 562)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
