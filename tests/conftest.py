"""Checks every test gets for free, and the fixtures that find shared files."""

from pathlib import Path

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


def repo_root() -> Path:
    """The folder holding pyproject.toml, searched upward: no test counts its own depth, so tests can move."""
    here = Path(__file__).resolve()
    for folder in here.parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    raise RuntimeError(f"no pyproject.toml above {here}; run the tests from a checkout of lmforge")


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """nanoGPT's tiny Shakespeare (input.txt, 1.1 MB) in the data folder shared beside the repository,
    `../shared/data/tinyshakespeare/`; a test that needs it skips where it is absent."""
    path = repo_root().parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"tiny Shakespeare not found at {path}: put nanoGPT's input.txt there to run this test")
    return path
