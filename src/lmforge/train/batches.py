"""`Endless`: an epoch loader as one infinite, resumable iterator, the form `train_loop` takes batches in."""

from __future__ import annotations

from typing import Any


class Endless:
    """An epoch loader (iterate again for the next epoch) as one infinite iterator with the loader's state.

    The loop asks for batches by step, not by epoch; the loader keeps its position, so `state_dict()` after
    any batch resumes at the next one (across epoch boundaries too)."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.iterator = loader, None

    def __iter__(self) -> Endless:
        return self

    def __next__(self):
        for _ in range(2):  # at most one epoch boundary per batch
            if self.iterator is None:
                self.iterator = iter(self.loader)
            try:
                return next(self.iterator)
            except StopIteration:
                self.iterator = None
        raise RuntimeError("the training data yields no batch; use more data or a smaller batch")

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self.iterator = None
