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
"""

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

__all__ = ["ENV_ALLOW_TORCHSCRIPT", "TEMP_PATTERN", "TEXT_PREFIX", "CheckpointError",
           "ClassMismatchError", "Described", "DiskFullError", "DownloadError", "LoadReport",
           "OfflineError", "SavePretrained", "UntrainedPartsWarning", "WeightsEntry",
           "atomic_write", "convert_state_dict", "describe", "download", "known_names",
           "load_checkpoint", "load_checkpoint_object", "load_text_weights", "read_checkpoint",
           "register", "rename_key", "resolve", "resolve_pretrained", "save_checkpoint",
           "save_pretrained"]
