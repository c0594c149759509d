"""Checks every test gets for free."""

import pytest
import torch


@pytest.fixture(autouse=True)
def autograd_stays_on():
    """Library calls and in-process CLI runs must not leave autograd switched off for the caller: a leaked
    `torch.set_grad_enabled(False)` silently breaks every training step that follows it."""
    yield
    leaked = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not leaked, "this test left autograd disabled for the rest of the process"
