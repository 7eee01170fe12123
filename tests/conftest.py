"""Fixtures shared by the whole suite."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The suite's tensors are small: one intra-op thread avoids synchronisation overhead
    (and large slowdowns when other processes share the two cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
