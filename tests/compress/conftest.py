"""Shared settings of the compression tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The pruning loops run many small tensor operations, which several threads only slow down on a shared
    machine; one thread, restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
