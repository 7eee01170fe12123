"""A validation set held out of the training split, the same on every run.

With ``data.holdout_fraction`` > 0, the training split (``data.train_split``) is cut in two:
:func:`holdout_count` images of it, drawn by :func:`split_holdout` with NumPy's generator
seeded by the run's ``seed``, form the validation set when ``data.val_split`` names the
training split too; training reads only the others. The draw depends on the item keys (file
names, COCO image ids) sorted, the fraction and the seed alone, so every run, process and
resume cuts the same two disjoint parts.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import TypeVar

import numpy as np

from .io import DatasetError

__all__ = ["holdout_count", "split_holdout"]

K = TypeVar("K", bound=Hashable)


def holdout_count(total: int, fraction: float) -> int:
    """Images held out of ``total``: ``round(fraction · total)``, at least 1 and at most
    ``total - 1`` (training keeps one). Raises :class:`DatasetError` for fewer than 2."""
    if total < 2:
        raise DatasetError(f"a validation holdout needs at least 2 training images, "
                           f"got {total}")
    return min(total - 1, max(1, math.floor(fraction * total + 0.5)))


def split_holdout(keys: Sequence[K], fraction: float, seed: int) -> tuple[list[K], list[K]]:
    """``(kept, held)``: ``keys`` cut into the training part and the :func:`holdout_count`
    held-out keys, each in the order of ``keys``. The draw permutes the keys sorted by
    their text, so it does not depend on the order ``keys`` come in."""
    ordered = sorted(keys, key=lambda k: (str(k), repr(k)))
    count = holdout_count(len(ordered), fraction)
    picked = np.random.default_rng(seed).permutation(len(ordered))[:count]
    held_set = {ordered[i] for i in picked.tolist()}
    return [k for k in keys if k not in held_set], [k for k in keys if k in held_set]
