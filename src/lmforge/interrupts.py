"""A Ctrl-C that cannot be lost between start-up and the training loop.

Python's own SIGINT handler raises KeyboardInterrupt wherever the main thread happens to be. During start-up
that can be inside a library's finaliser or a broad `except`, which prints or swallows it, and the command then
trains on as if nothing had been pressed. (A test saw this: SIGINT right after start-up, and no exit in 120 s.)
`latched()` installs a handler that raises KeyboardInterrupt as Python's does and also records the signal.
The training loop's own handler (`lmforge.train.loop.Stop`) takes the recorded signal over, so a swallowed
interrupt still stops the run at its first step, with a checkpoint and exit status 130.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

pending: int | None = None
"""The signal received while `latched()` was active, or None."""


def _latch(signum: int, frame: FrameType | None) -> None:
    global pending
    pending = signum
    raise KeyboardInterrupt


@contextlib.contextmanager
def latched() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt and is remembered in `pending` until the block ends. Outside the main
    thread (where signal handlers cannot be set) it does nothing."""
    global pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = None
    previous = signal.signal(signal.SIGINT, _latch)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        pending = None
