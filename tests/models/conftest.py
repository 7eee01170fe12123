"""Shared fixtures of the model tests."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tensors are small: a single intra-op thread avoids synchronisation overhead
    (and slowdowns when other processes share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
