"""Helpers shared by the inference tests."""

import numpy as np


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A reproducible (h, w, 3) uint8 noise image."""
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
