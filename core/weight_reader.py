"""Reading checkpoint tensors at disk speed, straight into the tensors that will hold them.

:mod:`core.weights` checks a checkpoint against a module and says which file bytes fill which
parameter (a :class:`TensorSource`: file, byte offset, dtype, shape); this module moves the bytes.

* No second copy: a tensor whose target lives on the CPU in the file's dtype is read with
  ``os.preadv`` directly into the target's memory. Otherwise the bytes go through a small staging
  buffer per reading thread (pinned on CUDA) and ``copy_`` casts them once, straight into the
  target's dtype and device. No file is memory-mapped, so the checkpoint's pages sit in the page
  cache and never count as this process's resident memory (a mapped file's touched pages do).
* Threaded: tensors are read by ``threads`` workers (``os.preadv`` and ``copy_`` release the GIL);
  ``DITKIT_LOAD_THREADS`` sets the default.
* Counted: :class:`LoadStats` records the bytes read and the tensors cast, which the tests use to
  prove that each byte is read once and each tensor cast once.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["TensorSource", "LoadStats", "fill", "default_threads", "SAFETENSORS_DTYPES", "STAGING_BYTES"]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
"""safetensors' dtype codes this reader handles (others load through safetensors itself)."""

STAGING_BYTES = 64 * 1024 * 1024
"""Per-thread staging buffer: a tensor larger than this is read and cast in pieces."""

_MAX_READ = 1 << 30  # one preadv call reads at most this much (Linux caps a read near 2 GiB)


@dataclass(frozen=True)
class TensorSource:
    """Where one tensor's bytes lie: ``nbytes`` contiguous bytes at ``offset`` in ``path``, in
    ``dtype`` (row-major, little-endian), of ``shape``."""

    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class LoadStats:
    """What :func:`fill` did, summed over calls (thread-safe)."""

    bytes_read: int = 0
    tensors: int = 0
    cast: int = 0
    """Tensors whose dtype changed on the way (each exactly once)."""
    staged_bytes: int = 0
    """Bytes that went through a staging buffer (a cast, or a target that is not CPU memory)."""
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, read: int = 0, tensors: int = 0, cast: int = 0, staged: int = 0) -> None:
        with self._lock:
            self.bytes_read += read
            self.tensors += tensors
            self.cast += cast
            self.staged_bytes += staged

    def as_dict(self) -> dict:
        return {"bytes_read": self.bytes_read, "tensors": self.tensors, "cast": self.cast,
                "staged_bytes": self.staged_bytes, "seconds": round(self.seconds, 4)}


def default_threads() -> int:
    """``DITKIT_LOAD_THREADS``, else 4 (bounded by the CPU count): enough to keep a fast disk busy;
    one thread is used for small loads."""
    value = os.environ.get("DITKIT_LOAD_THREADS")
    if value:
        return max(1, int(value))
    return max(1, min(4, os.cpu_count() or 1))


def _bytes_view(t: torch.Tensor):
    """A writable buffer over a contiguous CPU tensor's bytes."""
    return t.detach().reshape(-1).view(torch.uint8).numpy()


def _pread_into(fd: int, buffer, offset: int, path: Path) -> int:
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + _MAX_READ]], offset + done)
        if n <= 0:
            raise OSError(f"{path}: unexpected end of file at byte {offset + done} (truncated while loading?)")
        done += n
    return done


class _Staging:
    """One thread's staging buffers: two, used in turn, so that on CUDA the next piece is read
    while the previous one is still being copied to the device (an event guards each buffer)."""

    def __init__(self, nbytes: int, pin: bool):
        self.nbytes = nbytes
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.events: list = [None, None]
        self.turn = 0

    def take(self) -> torch.Tensor:
        self.turn ^= 1
        event = self.events[self.turn]
        if event is not None:
            event.synchronize()
            self.events[self.turn] = None
        return self.buffers[self.turn]

    def submitted(self, device: torch.device) -> None:
        if device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self.events[self.turn] = event

    def drain(self) -> None:
        for event in self.events:
            if event is not None:
                event.synchronize()
        self.events = [None, None]


def _direct(target: torch.Tensor) -> bool:
    """Read straight into ``target``: CPU memory, contiguous (no staging, no cast)."""
    return target.device.type == "cpu" and target.is_contiguous()


def _copy_into(target: torch.Tensor, source: torch.Tensor, stats: LoadStats) -> None:
    """The one place bytes from the file become ``target``'s values: cast (once) and move."""
    target.copy_(source, non_blocking=target.device.type == "cuda")


def _read_one(target: torch.Tensor, src: TensorSource, fd: int, staging_for, stats: LoadStats) -> None:
    if tuple(target.shape) != src.shape:
        raise ValueError(f"{src.path}: tensor at byte {src.offset} has shape {list(src.shape)}, "
                         f"its target {list(target.shape)}")
    same = target.dtype == src.dtype
    if same and _direct(target):
        stats.add(read=_pread_into(fd, _bytes_view(target), src.offset, src.path), tensors=1)
        return
    staging = staging_for()
    flat = target.detach().reshape(-1) if target.is_contiguous() else None
    item = src.dtype.itemsize
    per_piece = max(1, staging.nbytes // item)
    if flat is None and src.numel > per_piece:  # a strided target: one piece, in a buffer of its own
        per_piece = src.numel
    done = 0
    while done < src.numel:
        n = min(per_piece, src.numel - done)
        buf = staging.take() if n * item <= staging.nbytes else torch.empty(n * item, dtype=torch.uint8)
        piece = buf[: n * item]
        _pread_into(fd, _bytes_view(piece), src.offset + done * item, src.path)
        values = piece.view(src.dtype)
        if flat is not None:
            _copy_into(flat[done:done + n], values, stats)
        else:
            _copy_into(target, values.view(src.shape), stats)
        staging.submitted(target.device)
        done += n
    stats.add(read=src.nbytes, tensors=1, cast=0 if same else 1, staged=src.nbytes)


def fill(pairs: list[tuple[torch.Tensor, TensorSource]], *, threads: int | None = None,
         stats: LoadStats | None = None, staging_bytes: int = STAGING_BYTES) -> LoadStats:
    """Fill each target tensor from its source, in file order, with ``threads`` readers.

    Targets may live on any device (the meta device too: then nothing is copied, which lets a
    test follow the staged path without the memory). Each target is filled once even when it is
    listed twice (tied parameters share one tensor)."""
    import time

    stats = stats if stats is not None else LoadStats()
    start = time.perf_counter()
    seen: set[int] = set()
    work = []
    for target, src in sorted(pairs, key=lambda p: (str(p[1].path), p[1].offset)):
        if id(target) in seen:
            continue
        seen.add(id(target))
        work.append((target, src))
    if not work:
        return stats
    threads = threads or default_threads()
    total = sum(src.nbytes for _, src in work)
    if total < 4 * staging_bytes:
        threads = 1  # small loads: a thread pool costs more than it gains
    fds: dict[Path, int] = {}
    local = threading.local()
    pin = any(t.device.type == "cuda" for t, _ in work) and torch.cuda.is_available()
    stagings: list[_Staging] = []
    lock = threading.Lock()

    def staging_for() -> _Staging:
        if getattr(local, "staging", None) is None:
            local.staging = _Staging(staging_bytes, pin)
            with lock:
                stagings.append(local.staging)
        return local.staging

    def run(item):
        target, src = item
        _read_one(target, src, fds[src.path], staging_for, stats)

    try:
        for _, src in work:
            if src.path not in fds:
                fds[src.path] = os.open(src.path, os.O_RDONLY)
        with torch.no_grad():
            if threads == 1:
                for item in work:
                    run(item)
            else:
                with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ditkit-load") as pool:
                    for _ in pool.map(run, work):
                        pass
            for staging in stagings:
                staging.drain()
    finally:
        for fd in fds.values():
            os.close(fd)
    stats.seconds += time.perf_counter() - start
    return stats
