"""Optional dependencies, imported here and nowhere else.

The core package (models, segmentation training and inference) needs only its required
dependencies. These features need an extra, and load it on first use through
:func:`require`, which says what to install when it is missing:

=================  ===============================  ==============================
module             used for                         install
=================  ===============================  ==============================
``pycocotools``    COCO masks, data and evaluation  ``pip install 'denseclip[coco]'``
``onnx``           ONNX export                      ``pip install 'denseclip[export]'``
``onnxruntime``    int8 inference                   ``pip install 'denseclip[export]'``
``matplotlib``     figures of results               ``pip install 'denseclip[plot]'``
``timm``           timm backbones                   ``pip install timm``
``mlflow``         ``log.backends: [mlflow]``       ``pip install 'denseclip[mlflow]'``
``wandb``          ``log.backends: [wandb]``        ``pip install 'denseclip[wandb]'``
=================  ===============================  ==============================
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

__all__ = ["lazy_exports", "require"]

EXTRAS = {"pycocotools": "coco", "onnx": "export", "onnxruntime": "export", "matplotlib": "plot",
          "mlflow": "mlflow", "wandb": "wandb"}


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


def lazy_exports(package: str, lazy: Mapping[str, str], namespace: dict[str, Any]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` (:pep:`562`) that load each name of
    ``lazy`` (name → module, relative to ``package``) on first use and keep it in the
    package's ``namespace``, so importing the package does not import what they need."""

    def __getattr__(name: str) -> Any:  # noqa: N807 - the module-level hook's name
        if name not in lazy:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(lazy[name], package), name)
        namespace[name] = value  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:  # noqa: N807
        return sorted({*namespace, *lazy})

    return __getattr__, __dir__
