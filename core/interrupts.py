"""Telling the user's Ctrl-C from a ``KeyboardInterrupt`` that code raised itself.

A plugin that raises ``KeyboardInterrupt`` while it is imported is a broken plugin, to be reported
with its name; a Ctrl-C during that import is the user stopping the command. Both arrive as the
same exception, so :func:`watch_sigint` notes whether a SIGINT really came in.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["SigintWatch", "watch_sigint"]


class SigintWatch:
    """``received`` is True once a SIGINT arrived inside the :func:`watch_sigint` block."""

    received: bool = False

    def is_users(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the user's Ctrl-C (re-raise it) rather than code's own ``KeyboardInterrupt``."""
        return isinstance(exc, KeyboardInterrupt) and self.received


@contextmanager
def watch_sigint() -> Iterator[SigintWatch]:
    """Record SIGINTs during the block and pass each on to the handler in place (the default one
    raises ``KeyboardInterrupt`` as usual). Off the main thread, or where SIGINT is ignored or not
    handled by Python, no ``KeyboardInterrupt`` can come from a signal: every one is code's."""
    watch = SigintWatch()
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield watch
        return

    def on_sigint(signum, frame):
        watch.received = True
        previous(signum, frame)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield watch
    finally:
        signal.signal(signal.SIGINT, previous)
