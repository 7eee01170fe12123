"""Evaluation engine: segmentation metrics and test-time inference (whole, sliding window, TTA)."""
