"""Fresh heap memory with fixed contents while an encoder runs (glibc), so the encoder's output is
the same in every process.

x264's lookahead reads heap memory it never wrote on some inputs (found by running the same frames
under different ``MALLOC_PERTURB_`` values: 3 distinct MP4 files from one tensor; with
``mbtree=0`` or ``bframes=0`` the difference goes away). What such a read sees is whatever an
earlier allocation left there, so the same frames encoded to different bytes across processes, and
now and then within one. glibc's ``mallopt(M_PERTURB, byte)`` fills every block ``malloc`` hands
out with a fixed byte (and freed blocks with another), which makes that read the same everywhere;
:func:`fixed_heap_fill` turns it on for the encoding only (it costs a ``memset`` per allocation)
and restores the process's setting after. Large blocks come from ``mmap`` and are zero already.
Off glibc it does nothing, and identical bytes are not promised there.
"""
from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["fixed_heap_fill", "FILL_BYTE"]

M_PERTURB = -6  # glibc <malloc.h>
FILL_BYTE = 0x5A
_lock = threading.Lock()
_depth = 0


def _mallopt():
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without it, Windows)
        return None


_MALLOPT = _mallopt()


def _process_setting() -> int:
    """glibc's own value, read from ``MALLOC_PERTURB_`` at start-up (0: off)."""
    try:
        return int(os.environ.get("MALLOC_PERTURB_", "0")) & 0xFF
    except ValueError:
        return 0


@contextmanager
def fixed_heap_fill() -> Iterator[bool]:
    """Inside the block, fresh heap blocks hold :data:`FILL_BYTE`; yields whether that is in effect."""
    global _depth
    if _MALLOPT is None:
        yield False
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _MALLOPT(M_PERTURB, FILL_BYTE)
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _MALLOPT(M_PERTURB, _process_setting())
