"""Host memory of this process over an interval, from ``/proc/self/status`` (Linux).

``RssAnon`` is the anonymous memory the process owns (heap, tensors it allocated): what must fit
in RAM. ``RssFile`` is file pages it has mapped and touched, such as a memory-mapped checkpoint's:
they belong to the page cache, are clean, and the kernel drops them under pressure, so a model
larger than RAM can be read through them. The offload proofs bound the first and report the second.
"""
from __future__ import annotations

import threading
import time

__all__ = ["status_kib", "HostMemoryPeak"]


def status_kib(*fields: str) -> dict[str, int]:
    """``{field: KiB}`` from ``/proc/self/status`` (``RssAnon``, ``RssFile``, ``VmRSS``, ``VmHWM``...)."""
    wanted = set(fields) or {"RssAnon", "RssFile", "VmRSS", "VmHWM"}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in wanted:
                out[key] = int(rest.split()[0])
    return out


class HostMemoryPeak:
    """Peak ``RssAnon`` and ``RssFile`` above their values at ``start()``, sampled by a thread
    every ``interval`` seconds and by every :meth:`sample` call (call it where the peak is, e.g.
    in a forward hook, so a short-lived peak cannot fall between two samples)::

        with HostMemoryPeak() as peak:
            pipe(...)
        peak.anon_bytes, peak.file_bytes
    """

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.base_anon = self.base_file = 0
        self.max_anon = self.max_file = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def sample(self) -> None:
        now = status_kib("RssAnon", "RssFile")
        with self._lock:
            self.max_anon = max(self.max_anon, now.get("RssAnon", 0))
            self.max_file = max(self.max_file, now.get("RssFile", 0))

    def start(self) -> "HostMemoryPeak":
        now = status_kib("RssAnon", "RssFile")
        self.base_anon, self.base_file = now.get("RssAnon", 0), now.get("RssFile", 0)
        self.max_anon, self.max_file = self.base_anon, self.base_file
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ditkit-rss", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def __enter__(self) -> "HostMemoryPeak":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def anon_bytes(self) -> int:
        """Peak anonymous memory above the start."""
        return (self.max_anon - self.base_anon) * 1024

    @property
    def file_bytes(self) -> int:
        """Peak mapped file pages above the start."""
        return (self.max_file - self.base_file) * 1024
