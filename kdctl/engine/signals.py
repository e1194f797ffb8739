"""Stopping a training run cleanly: while it trains, SIGTERM and SIGINT only ask it to stop."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable


@contextlib.contextmanager
def deferred_stop(on_signal: Callable[[str], None]):
    """While inside, SIGTERM and SIGINT only call ``on_signal(name)`` (the loop then finishes the
    step, saves ``last`` and returns). A signal often arrives twice (Ctrl-C reaches torchrun and
    its workers, and torchrun forwards it again), so only a third one meets the handlers from
    before (the CLI's stop at once, removing the file being written; every checkpoint write is
    atomic either way). Outside the main thread (where signal handlers cannot live) it does
    nothing."""
    old: dict = {}
    count = 0

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    def handle(signum, frame) -> None:
        nonlocal count
        on_signal(signal.Signals(signum).name)
        count += 1
        if count >= 2:
            restore()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, handle)
    try:
        yield
    finally:
        restore()
