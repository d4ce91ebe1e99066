"""Starting N ranks on one machine (CPU + gloo) the way torchrun would, and failing as one.

``launch(fn, nproc)`` spawns ``nproc`` processes with torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` on a free port), runs
``fn(*args, **kwargs)`` in each and returns rank 0's result. No rank outlives or hangs the job:

* when a rank fails, the others are killed at once and :class:`RankFailed` names the rank that
  failed **first** and how: a Python exception (its ``__cause__`` when it pickles), an exit code,
  or a signal (a rank killed outright is the cause; its peers' connection errors are reported as
  consequences);
* every rank sends a heartbeat each second; a rank silent for ``DITKIT_HEARTBEAT_TIMEOUT``
  seconds (default 60: stopped, swapped out, wedged in C code) ends the job with a
  :class:`ParallelError` naming it. A rank that is alive but waiting on a silent peer is bounded
  by the collective timeout (``DITKIT_USP_TIMEOUT``). So a hang costs at most that long, however
  long the run; ``timeout`` bounds the whole run;
* ranks die with their launcher: each asks the kernel for SIGKILL when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``, Linux) and its heartbeat thread exits when the parent pid changes
  (elsewhere); they ignore Ctrl-C, which the launcher handles by stopping them all;
* the launcher's temporary folder goes with it, and one left by a launcher killed outright is
  removed by the next launch.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

from core.errors import ParallelError, RankFailed

__all__ = ["launch", "relaunch_cli", "RankFailed", "free_port"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HEARTBEAT_SECONDS = 1.0
STARTUP_SECONDS = 120.0
"""Bound on a rank's start (interpreter, imports) before its first heartbeat."""


def _die_with_parent(parent: int) -> None:
    """SIGKILL this rank when the launcher dies (Linux), else exit from the heartbeat thread."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os._exit(1)


def _heartbeat(path: Path, parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)
        try:
            path.touch()
        except OSError:  # the launcher removed its folder: it is gone or finishing
            os._exit(1)
        time.sleep(HEARTBEAT_SECONDS)


def _no_named_semaphores() -> None:
    """tqdm guards its bars with a multiprocessing lock (a named semaphore); a rank leaves through
    ``os._exit``, so the resource tracker would report it as leaked ("There appear to be N leaked
    semaphore objects") after every run. A rank's bars are its own: a thread lock is enough."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


def _entry(fn, rank: int, nproc: int, outdir: str, args, kwargs, parent: int | None = None) -> None:
    out = Path(outdir)
    if parent is not None:
        _die_with_parent(parent)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the launcher handles it
        (out / f"{rank}.alive").touch()  # the first beat before any work: from here the bound is the heartbeat's
        threading.Thread(target=_heartbeat, args=(out / f"{rank}.alive", parent), daemon=True).start()
        _no_named_semaphores()
    try:
        result = fn(*args, **(kwargs or {}))
        payload = pickle.dumps(("ok", result))
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        try:
            original = pickle.dumps(exc)
            pickle.loads(original)
        except Exception:
            original = None
        payload = pickle.dumps(("error", time.time(), type(exc).__name__, str(exc), traceback.format_exc(), original))
        (out / f"{rank}.tmp").write_bytes(payload)
        os.replace(out / f"{rank}.tmp", out / f"{rank}.pkl")
        os._exit(1)  # skip interpreter teardown: it may block on process groups whose peers are gone
    (out / f"{rank}.tmp").write_bytes(payload)
    os.replace(out / f"{rank}.tmp", out / f"{rank}.pkl")
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()  # no rank leaves while a peer may still be reading from it
            dist.destroy_process_group()
    finally:
        os._exit(0)


_DIR_PREFIX = "ditkit-launch-"


def _remove_stale_dirs() -> None:
    """Remove launch folders (``ditkit-launch-<pid>-*``) whose launcher is gone (killed outright)."""
    root = Path(tempfile.gettempdir())
    for entry in root.glob(f"{_DIR_PREFIX}*-*"):
        pid = entry.name[len(_DIR_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            pass


def _heartbeat_timeout() -> float:
    raw = os.environ.get("DITKIT_HEARTBEAT_TIMEOUT", "60")
    try:
        value = float(raw)
    except ValueError:
        raise ParallelError(f"DITKIT_HEARTBEAT_TIMEOUT={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ParallelError(f"DITKIT_HEARTBEAT_TIMEOUT must be > 0 seconds, got {raw!r}")
    return value


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + 3
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1)


def launch(
    fn: Callable[..., Any],
    nproc: int,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> Any:
    """Run ``fn(*args, **kwargs)`` on ``nproc`` local ranks; return rank 0's result.

    ``fn`` must be importable (a module-level function) and is expected to call
    :func:`core.parallel.init_mesh`, which picks the environment up. ``env`` adds variables
    (``OMP_NUM_THREADS`` defaults to 1, ``DITKIT_USP_TIMEOUT`` to ``timeout``).
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise ParallelError(f"nproc must be a positive integer, got {nproc!r}")
    silent_limit = _heartbeat_timeout()
    _remove_stale_dirs()
    ctx = mp.get_context("spawn")
    port = free_port()
    base = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "DITKIT_USP_TIMEOUT": str(int(max(5, timeout))),
        # a peer of a failed rank logs its lost connection as a C++ warning with a stack trace; the
        # launcher names the failed rank itself, so only C++ errors show (DITKIT_DEBUG=1: all)
        **({} if "TORCH_CPP_LOG_LEVEL" in os.environ or os.environ.get("DITKIT_DEBUG") else {"TORCH_CPP_LOG_LEVEL": "ERROR"}),
        **(env or {}),
    }
    with tempfile.TemporaryDirectory(prefix=f"{_DIR_PREFIX}{os.getpid()}-") as outdir:
        procs = []
        saved = dict(os.environ)
        started = time.monotonic()
        try:
            for rank in range(nproc):
                os.environ.update(base, RANK=str(rank), LOCAL_RANK=str(rank))
                p = ctx.Process(target=_entry, args=(fn, rank, nproc, outdir, args, kwargs, os.getpid()), daemon=True)
                p.start()
                procs.append(p)
        except BaseException:
            _stop(procs)
            raise
        finally:
            os.environ.clear()
            os.environ.update(saved)

        deadline = time.monotonic() + timeout
        died: dict[int, float] = {}  # rank -> when its non-zero exit was first seen
        try:
            while True:
                codes = [p.exitcode for p in procs]
                now = time.time()
                for rank, c in enumerate(codes):
                    if c not in (None, 0):
                        died.setdefault(rank, now)
                if died:
                    time.sleep(0.2)  # let the peers' consequences land, so the report can tell them apart
                    codes = [p.exitcode for p in procs]
                    for rank, c in enumerate(codes):
                        if c not in (None, 0):
                            died.setdefault(rank, time.time())
                    _stop(procs)
                    raise _failure(outdir, codes, died)
                if all(c == 0 for c in codes):
                    status, result = pickle.loads(Path(outdir, "0.pkl").read_bytes())
                    return result
                silent = _silent_ranks(outdir, codes, started, silent_limit)
                if silent:
                    _stop(procs)
                    raise ParallelError(
                        f"rank(s) {silent} stopped answering: no heartbeat for {silent_limit:g} s "
                        f"(stopped, swapped out or stuck in native code; DITKIT_HEARTBEAT_TIMEOUT sets the bound); "
                        f"every rank was killed"
                    )
                if time.monotonic() > deadline:
                    running = [i for i, c in enumerate(codes) if c is None]
                    _stop(procs)
                    raise ParallelError(
                        f"parallel run of {getattr(fn, '__qualname__', fn)!r} on {nproc} ranks timed out after "
                        f"{timeout:g} s; ranks still running (killed): {running}"
                    )
                time.sleep(0.05)
        finally:
            _stop(procs)


def _silent_ranks(outdir: str, codes: list, started: float, limit: float) -> list[int]:
    """Running ranks whose heartbeat file is older than ``limit`` seconds (before a rank's first
    beat, the launch time counts against the startup bound)."""
    now_wall, silent = time.time(), []
    for rank, code in enumerate(codes):
        if code is not None:
            continue
        try:
            age = now_wall - os.stat(Path(outdir, f"{rank}.alive")).st_mtime
        except FileNotFoundError:
            # not started yet: interpreter start and imports (torch) get the larger of the bound and
            # STARTUP_SECONDS, since several ranks importing at once on a busy machine take a while
            age = time.monotonic() - started
            if age <= max(limit, STARTUP_SECONDS):
                continue
        if age > limit:
            silent.append(rank)
    return silent


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name} (exit {code})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code} without a Python exception"


def _failure(outdir: str, codes: list, died: dict[int, float]) -> ParallelError:
    errors = {}
    for rank in died:
        f = Path(outdir, f"{rank}.pkl")
        if f.exists():
            _, when, etype, message, tb, original = pickle.loads(f.read_bytes())
            errors[rank] = (when, etype, message, tb, original)
    # A rank that died without a Python exception (a signal, os._exit) is the cause: its peers'
    # exceptions are what its lost connections did to them. Otherwise the first to raise is.
    silent = sorted((died[r], r) for r in died if r not in errors)
    if silent:
        _, rank = silent[0]
        how = _how(codes[rank] if codes[rank] is not None else 1)
        after = [f"rank {r} {errors[r][1]}: {errors[r][2].splitlines()[0] if errors[r][2] else ''}"[:200] for r in sorted(errors)]
        also = f"; as a consequence {'; '.join(after)}" if after else ""
        return RankFailed(f"rank {rank} {how}{also}", rank, f"signal {-codes[rank]}" if (codes[rank] or 0) < 0 else "exit", "")
    rank = min(errors, key=lambda r: (errors[r][0], r))
    when, etype, message, tb, original = errors[rank]
    others = [r for r in sorted(errors) if r != rank]
    also = f" (then rank(s) {others} failed as a consequence)" if others else ""
    err = RankFailed(f"rank {rank} raised {etype}: {message}{also}\n--- rank {rank} traceback ---\n{tb}", rank, etype, tb)
    if original is not None:
        try:
            err.__cause__ = pickle.loads(original)
        except Exception:
            pass
    return err


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out if "--usp" in out else [*out, "--usp"]


def relaunch_cli(nproc: int, argv: list[str], timeout: float | None = None, *,
                 entry: Callable[[list[str]], int]) -> int:
    """``ditkit ... --nproc N``: rerun the same command line on N local ranks with ``--usp``.

    ``entry(argv)`` runs the command line on each rank and raises its errors (the CLI passes its
    own ``main`` in that mode; the launcher never imports the CLI). Returns rank 0's exit status;
    a rank's failure is raised as :class:`RankFailed` (``timeout``: ``DITKIT_LAUNCH_TIMEOUT``
    seconds, default 3600; a silent rank ends the job after ``DITKIT_HEARTBEAT_TIMEOUT`` seconds,
    default 60).
    """
    if timeout is None:
        raw = os.environ.get("DITKIT_LAUNCH_TIMEOUT", "3600")
        try:
            timeout = float(raw)
        except ValueError:
            raise ParallelError(f"DITKIT_LAUNCH_TIMEOUT={raw!r} is not a number of seconds") from None
    return launch(entry, nproc, args=(_strip_nproc(list(argv)),), timeout=timeout)
