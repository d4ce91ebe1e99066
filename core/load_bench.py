"""``ditkit bench NAME --weights DIR --load``: loading an official-layout checkpoint against the disk.

In one run, round-robin over ``--repeats`` rounds, each measurement starting from a cold page
cache (every checkpoint file's cached pages dropped first):

* ``raw``: a sequential read of the same files (one thread, 16 MiB buffer): what the disk gives;
* ``raw into fresh memory``: the same read, in a fresh process, into newly allocated buffers that
  stay alive (as a loaded model's tensors do): the disk plus the cost of giving the process that
  much new memory (page faults), the floor of any loader that ends with the weights resident;
* ``load``: ``core.load(NAME, preset, weights=DIR, device, dtype)`` in a fresh process per run
  (its imports before the clock starts), once per ``--threads`` value.

It reports min/median/max seconds, the load rate against the raw rate (medians), and the load's
peak resident memory above the process's resident memory before it, against the weights' bytes
(the tensors the checkpoint fills, in the dtype they are loaded in). The page cache is dropped
with ``posix_fadvise(POSIX_FADV_DONTNEED)`` per file after ``fdatasync`` (no privileges needed,
no effect on other processes' files), or with ``/proc/sys/vm/drop_caches`` when ``--drop-caches
global`` is given and that file is writable; the report says which ran and the fraction of the
files still cached afterwards (``mincore``), which should be 0.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["run_load_bench", "format_load_bench", "checkpoint_files", "drop_page_cache", "cached_fraction"]

_READ_BUFFER = 16 * 1024 * 1024


def checkpoint_files(spec, root: Path) -> list[Path]:
    """Every file the model's layout reads under ``root`` (shards of an index included), once."""
    from .weights import check_required_paths, open_checkpoint

    if spec.weights is None:
        raise InputError(f"model {spec.name!r} declares no checkpoint layout, so --weights cannot be benchmarked")
    check_required_paths(root, spec.weights)
    files: list[Path] = []
    for wf in spec.weights.files:
        ckpt = open_checkpoint(root, wf)
        for path in ckpt.files if ckpt is not None else []:
            if path not in files:
                files.append(path)
    return files


def cached_fraction(paths: list[Path]) -> float | None:
    """The fraction of the files' pages in the page cache (``mincore`` on a fresh mapping; Linux),
    ``None`` where that cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    resident = total = 0
    for path in paths:
        size = path.stat().st_size
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                pages = (size + page - 1) // page
                vec = ctypes.create_string_buffer(pages)
                if libc.mincore(addr, size, vec) != 0:
                    return None
                resident += sum(b & 1 for b in vec.raw[:pages])
                total += pages
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else 0.0


def drop_page_cache(paths: list[Path], how: str = "fadvise") -> str:
    """Drop the files' cached pages; returns the method that ran."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages (a checkpoint just written) cannot be dropped
            if how == "fadvise":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if how == "global":
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            return "/proc/sys/vm/drop_caches"
        except OSError as exc:
            raise InputError(f"--drop-caches global: /proc/sys/vm/drop_caches is not writable here ({exc}); "
                             f"use the default (posix_fadvise per file)") from None
    return "posix_fadvise(POSIX_FADV_DONTNEED) per file"


def raw_read(paths: list[Path]) -> tuple[float, int]:
    """Seconds and bytes of one sequential read of ``paths`` into a reused buffer."""
    buf = bytearray(_READ_BUFFER)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return time.perf_counter() - start, total


FRESH_CHILD = r"""
import os, sys, time
import torch
start = time.perf_counter()
kept = []
for path in sys.argv[1:]:
    buf = torch.empty(os.path.getsize(path), dtype=torch.uint8)
    view, fd, done = memoryview(buf.numpy()).cast("B"), os.open(path, os.O_RDONLY), 0
    while done < len(view):
        done += os.preadv(fd, [view[done:done + (1 << 30)]], done)
    os.close(fd)
    kept.append(buf)
print("RESULT", time.perf_counter() - start)
"""


def raw_read_fresh(paths: list[Path]) -> float:
    """Seconds to read ``paths`` into newly allocated memory that stays alive, in a fresh process."""
    res = subprocess.run([sys.executable, "-c", FRESH_CHILD, *map(str, paths)], capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")]
    if res.returncode != 0 or not lines:
        raise InputError(f"reading {paths[0]} into fresh memory failed: {res.stderr.strip()[-300:]}")
    return float(lines[-1].split()[1])


CHILD = r"""
import json, os, sys, threading, time
import torch
import core
from core.registry import get_registry

name, preset, weights, device, dtype, threads = sys.argv[1:7]
os.environ["DITKIT_LOAD_THREADS"] = threads
spec = get_registry().model(name).spec
__import__(getattr(spec.pipeline, "__module__", "core"))  # the plugin's imports before the baseline

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out

base = status()
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident size
    hwm = "VmHWM since /proc/self/clear_refs"
except OSError:
    hwm = "VmHWM of the whole process (clear_refs not writable)"
peaks = {"RssAnon": 0, "RssFile": 0}
done = threading.Event()

def sample():
    while not done.wait(0.01):
        s = status()
        for k in peaks:
            peaks[k] = max(peaks[k], s.get(k, 0))

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
start = time.perf_counter()
pipe = core.load(name, preset=preset or None, weights=weights, device=device or None, dtype=dtype or None)
seconds = time.perf_counter() - start
done.set(); sampler.join()
end = status()
loaded = 0
for wf in {w.component for w in spec.weights.files}:
    module = getattr(pipe, wf)
    seen = set()
    for t in module.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            loaded += t.numel() * t.element_size()
print("RESULT" + json.dumps({"seconds": seconds, "base_rss": base["VmRSS"], "peak_rss": end["VmHWM"], "end_rss": end["VmRSS"],
      "peak_rss_anon": peaks["RssAnon"] - base.get("RssAnon", 0), "peak_rss_file": peaks["RssFile"] - base.get("RssFile", 0),
      "hwm": hwm, "loaded_bytes": loaded, "stats": pipe.load_stats.as_dict() if pipe.load_stats else None,
      "dtype": str(pipe.dtype).removeprefix("torch."), "device": str(pipe.device)}))
"""


def _load_once(name, preset, weights, device, dtype, threads: int) -> dict:
    env = dict(os.environ)
    # the child imports what this process imports (plugins on sys.path included)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), *(p for p in sys.path if p)])
    res = subprocess.run([sys.executable, "-c", CHILD, name, preset or "", str(weights), device or "", dtype or "",
                          str(threads)], capture_output=True, text=True, env=env)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise InputError(f"loading {name!r} from {weights} failed: {tail}")
    return json.loads(lines[-1][len("RESULT"):])


def _summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def run_load_bench(name: str, weights, *, preset: str | None = None, device: str | None = None,
                   dtype: str | None = None, threads: tuple[int, ...] = (1, 4), repeats: int = 3,
                   drop_caches: str = "fadvise", progress: bool | None = None) -> dict[str, Any]:
    """Measure loading ``name`` from ``weights`` against a raw read of the same files (see the
    module docstring); returns the JSON-ready report."""
    from tqdm.auto import tqdm

    from .environment import environment
    from .loading import default_device
    from .registry import get_registry

    if not isinstance(repeats, int) or repeats < 1:
        raise InputError(f"--repeats must be a positive integer, got {repeats!r}")
    if not threads or any(not isinstance(t, int) or t < 1 for t in threads):
        raise InputError(f"--threads must list positive integers, got {threads!r}")
    if drop_caches not in ("fadvise", "global"):
        raise InputError(f"--drop-caches must be 'fadvise' or 'global', got {drop_caches!r}")
    spec = get_registry().model(name).spec
    root = Path(weights)
    files = checkpoint_files(spec, root)
    file_bytes = sum(p.stat().st_size for p in files)
    raw_s, fresh_s, loads, cached, method = [], [], {t: [] for t in threads}, [], None
    steps = [("raw", None), ("fresh", None)] + [("load", t) for t in threads]
    bar = tqdm(total=repeats * len(steps), desc=f"load bench {spec.name}", disable=None if progress is None else not progress)
    for _ in range(repeats):
        for kind, t in steps:
            method = drop_page_cache(files, drop_caches)
            cached.append(cached_fraction(files))
            if kind == "raw":
                raw_s.append(raw_read(files)[0])
            elif kind == "fresh":
                fresh_s.append(raw_read_fresh(files))
            else:
                loads[t].append(_load_once(spec.name, preset, root, device, dtype, t))
            bar.update()
    bar.close()
    raw = _summary(raw_s)
    raw_rate = file_bytes / raw["median"]
    fresh = _summary(fresh_s)
    fresh_rate = file_bytes / fresh["median"]
    results = []
    for t, runs in loads.items():
        secs = _summary([r["seconds"] for r in runs])
        peak = max(r["peak_rss"] - r["base_rss"] for r in runs)
        loaded = runs[0]["loaded_bytes"]
        results.append({
            "threads": t, "seconds": secs, "rate_GBps": file_bytes / secs["median"] / 1e9,
            "rate_vs_raw": (file_bytes / secs["median"]) / raw_rate,
            "rate_vs_raw_into_fresh_memory": (file_bytes / secs["median"]) / fresh_rate,
            "peak_rss_increase_bytes": peak, "peak_rss_vs_weights": peak / loaded,
            "peak_rss_anon_increase_bytes": max(r["peak_rss_anon"] for r in runs),
            "peak_rss_file_increase_bytes": max(r["peak_rss_file"] for r in runs),
            "base_rss_bytes": runs[0]["base_rss"], "loaded_bytes": loaded, "hwm": runs[0]["hwm"],
            "reader": runs[0]["stats"], "runs_s": [round(r["seconds"], 4) for r in runs],
        })
    dev = default_device() if device is None else device
    import torch

    return {
        "model": spec.name, "preset": preset or spec.default_preset, "weights": str(root),
        "device": str(dev), "dtype": loads[threads[0]][0]["dtype"], "files": [str(p) for p in files],
        "file_bytes": file_bytes, "repeats": repeats, "cache_drop": method,
        "cached_after_drop_max": max((c for c in cached if c is not None), default=None),
        "raw_read": {"seconds": raw, "rate_GBps": raw_rate / 1e9, "runs_s": [round(s, 4) for s in raw_s]},
        "raw_read_into_fresh_memory": {"seconds": fresh, "rate_GBps": fresh_rate / 1e9,
                                       "runs_s": [round(s, 4) for s in fresh_s]},
        "load": results, "environment": environment(torch.device(dev)),
    }


def format_load_bench(report: dict) -> str:
    gb = 1e9
    raw = report["raw_read"]
    lines = [f"ditkit bench {report['model']} --load [{report['preset']}] {report['dtype']} on {report['device']}: "
             f"{len(report['files'])} files, {report['file_bytes'] / gb:.3f} GB; page cache dropped by "
             f"{report['cache_drop']} (at most {100 * (report['cached_after_drop_max'] or 0):.1f}% still cached); "
             f"{report['repeats']} rounds",
             f"  raw sequential read  {raw['seconds']['median']:.2f} s (min {raw['seconds']['min']:.2f}, max "
             f"{raw['seconds']['max']:.2f})  {raw['rate_GBps']:.2f} GB/s"]
    fresh = report["raw_read_into_fresh_memory"]
    lines.append(f"  raw read into fresh memory  {fresh['seconds']['median']:.2f} s (min {fresh['seconds']['min']:.2f}, "
                 f"max {fresh['seconds']['max']:.2f})  {fresh['rate_GBps']:.2f} GB/s")
    for r in report["load"]:
        s = r["seconds"]
        lines.append(f"  load, {r['threads']} thread(s)  {s['median']:.2f} s (min {s['min']:.2f}, max {s['max']:.2f})  "
                     f"{r['rate_GBps']:.2f} GB/s = {r['rate_vs_raw']:.2f}x raw, {r['rate_vs_raw_into_fresh_memory']:.2f}x raw into "
                     f"fresh memory; peak RSS +{r['peak_rss_increase_bytes'] / gb:.3f} GB "
                     f"= {r['peak_rss_vs_weights']:.2f}x the weights ({r['loaded_bytes'] / gb:.3f} GB)")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    """The ``--load`` options of ``ditkit bench``."""
    parser.add_argument("--weights", default=None, metavar="DIR", help="with --load: a checkpoint in the official layout")
    parser.add_argument("--load", action="store_true", help="time loading --weights against a raw read of its files")
    parser.add_argument("--threads", default="1,4", help="with --load: reader thread counts to compare (default 1,4)")
    parser.add_argument("--repeats", type=int, default=3, help="with --load: rounds, each from a cold page cache")
    parser.add_argument("--drop-caches", default="fadvise", choices=("fadvise", "global"),
                        help="with --load: per-file posix_fadvise (default) or /proc/sys/vm/drop_caches")


def main(args) -> int:
    if not args.load:
        raise InputError("--weights is read by --load (ditkit bench NAME --weights DIR --load); the step "
                         "benchmark builds random weights")
    if not args.weights:
        raise InputError("--load needs --weights DIR (a checkpoint in the model's official layout)")
    try:
        threads = tuple(int(t) for t in args.threads.split(",") if t.strip())
    except ValueError:
        raise InputError(f"--threads must be comma-separated integers, got {args.threads!r}") from None
    report = run_load_bench(args.model, args.weights, preset=args.preset, device=args.device, dtype=args.dtype,
                            threads=threads, repeats=args.repeats, drop_caches=args.drop_caches,
                            progress=False if args.no_progress else None)
    print(format_load_bench(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
