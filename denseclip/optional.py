"""Optional dependencies, imported here and nowhere else.

The core package (models, segmentation training and inference) needs only its required
dependencies. These features need an extra, and load it on first use through
:func:`require`, which says what to install when it is missing:

=================  ===============================  ==============================
module             used for                         install
=================  ===============================  ==============================
``pycocotools``    COCO masks, data and evaluation  ``pip install 'denseclip[coco]'``
``onnx``           ONNX export                      ``pip install 'denseclip[export]'``
``matplotlib``     figures of results               ``pip install 'denseclip[plot]'``
``timm``           timm backbones                   ``pip install timm``
``mlflow``         ``log.backends: [mlflow]``       ``pip install 'denseclip[mlflow]'``
``wandb``          ``log.backends: [wandb]``        ``pip install 'denseclip[wandb]'``
=================  ===============================  ==============================
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]

EXTRAS = {"pycocotools": "coco", "onnx": "export", "matplotlib": "plot", "mlflow": "mlflow",
          "wandb": "wandb"}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (e.g. ``"pycocotools.mask"``); if its distribution is missing,
    raise ``ImportError`` naming ``purpose`` and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        extra = EXTRAS.get(top)
        hint = f"pip install 'denseclip[{extra}]'" if extra else f"pip install {top}"
        raise ImportError(f"{top} is needed for {purpose}: {hint}") from e
