"""ditkit's own warnings on the command line: one ``ditkit: warning: ...`` line each.

Python prints a warning with its file, line and source line; a user of ``ditkit`` needs the
message. Warnings of ditkit's own categories (``core.*``: a plugin that failed to load, a compile
cache that cannot be used) are printed as one line, by rank 0 only in a parallel run; every other
warning keeps Python's format.
"""
from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

__all__ = ["warnings_as_lines"]


@contextmanager
def warnings_as_lines() -> Iterator[None]:
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not category.__module__.startswith("core."):
            return previous(message, category, filename, lineno, file, line)
        if os.environ.get("RANK", "0") not in ("", "0"):  # rank 0 speaks for the job
            return None
        print(f"ditkit: warning: {' '.join(str(message).split())}", file=file or sys.stderr)
        return None

    warnings.showwarning = show
    try:
        yield
    finally:
        if warnings.showwarning is show:
            warnings.showwarning = previous
