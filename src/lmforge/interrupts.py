"""A Ctrl-C that cannot be lost between start-up and the training loop.

Python's own SIGINT handler raises KeyboardInterrupt wherever the main thread happens to be. During start-up
that can be inside a library's finaliser or a broad `except`, which prints or swallows it, and the command then
trains on as if nothing had been pressed. (A test saw this: SIGINT right after start-up, and no exit in 120 s.)
`latched()` installs a handler that raises KeyboardInterrupt as Python's does and also records the signal.
The training loop's own handler (`lmforge.train.loop.Stop`) takes the recorded signal over, so a swallowed
interrupt still stops the run at its first step, with a checkpoint and exit status 130.

When the interrupt lands inside a finaliser or a weakref callback (CI caught one in importlib's module-lock
callback), Python cannot raise it and prints "Exception ignored in ..." with a traceback instead. The signal is
recorded all the same, so while the latch is on, `sys.unraisablehook` drops exactly those KeyboardInterrupts
and passes every other unraisable exception to the hook that was there before.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

pending: int | None = None
"""The signal received while `latched()` was active, or None."""


def _latch(signum: int, frame: FrameType | None) -> None:
    global pending
    pending = signum
    raise KeyboardInterrupt


def _quiet_latched_interrupts(previous: Callable[[Any], object]) -> Callable[[Any], None]:
    def hook(unraisable: Any) -> None:  # sys.UnraisableHookArgs
        if pending is not None and isinstance(unraisable.exc_value, KeyboardInterrupt):
            return  # recorded in `pending`; the loop stops on it
        previous(unraisable)

    return hook


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
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_latched_interrupts(previous_hook)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook
        pending = None
