"""Starting N ranks on one machine (CPU + gloo) the way torchrun would, and failing as one.

``launch(fn, nproc)`` spawns ``nproc`` processes with torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` on a free port), runs
``fn(*args, **kwargs)`` in each and returns rank 0's result.  When any rank raises, the others
are killed at once and the error is re-raised here as :class:`RankFailed` (its ``__cause__`` is
the original exception when it pickles); when the run outlives ``timeout`` every rank is killed
and a :class:`ParallelError` says which ranks were still running.  No rank can hang the caller.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
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


def _entry(fn, rank: int, nproc: int, outdir: str, args, kwargs) -> None:
    out = Path(outdir)
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
    if nproc < 1:
        raise ParallelError(f"nproc must be at least 1, got {nproc}")
    ctx = mp.get_context("spawn")
    port = free_port()
    base = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "DITKIT_USP_TIMEOUT": str(int(max(5, timeout))),
        **(env or {}),
    }
    with tempfile.TemporaryDirectory(prefix="ditkit-launch-") as outdir:
        procs = []
        saved = dict(os.environ)
        try:
            for rank in range(nproc):
                os.environ.update(base, RANK=str(rank), LOCAL_RANK=str(rank))
                p = ctx.Process(target=_entry, args=(fn, rank, nproc, outdir, args, kwargs), daemon=True)
                p.start()
                procs.append(p)
        except BaseException:
            _stop(procs)
            raise
        finally:
            os.environ.clear()
            os.environ.update(saved)

        deadline = time.monotonic() + timeout
        try:
            while True:
                codes = [p.exitcode for p in procs]
                if any(c not in (None, 0) for c in codes):
                    _stop(procs)
                    raise _failure(outdir, codes, [p.exitcode for p in procs])
                if all(c == 0 for c in codes):
                    status, result = pickle.loads(Path(outdir, "0.pkl").read_bytes())
                    return result
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


def _failure(outdir: str, first_codes: list, codes: list) -> ParallelError:
    errors = []
    for rank, code in enumerate(codes):
        f = Path(outdir, f"{rank}.pkl")
        if code not in (None, 0) and f.exists():
            _, when, etype, message, tb, original = pickle.loads(f.read_bytes())
            errors.append((when, rank, etype, message, tb, original))
    if not errors:
        failed = {r: c for r, c in enumerate(first_codes) if c not in (None, 0)}
        return ParallelError(f"rank(s) exited without a Python exception (exit codes {failed})")
    # The rank that raised first is the cause; later ones usually fail on its broken connections.
    when, rank, etype, message, tb, original = min(errors)
    err = RankFailed(f"rank {rank} raised {etype}: {message}\n--- rank {rank} traceback ---\n{tb}", rank, etype, tb)
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


def _cli_rank(argv: list[str]) -> int:
    from core.cli import main

    code = main(argv)
    if code:
        # The CLI printed this rank's error; raising makes the launcher stop the other ranks now.
        raise ParallelError(f"`ditkit {' '.join(argv)}` exited with status {code} on rank {os.environ.get('RANK')}")
    return code


def relaunch_cli(nproc: int, argv: list[str], timeout: float | None = None) -> int:
    """``ditkit ... --nproc N``: rerun the same command line on N local ranks with ``--usp``.

    Returns rank 0's exit status; a rank's failure is raised as :class:`RankFailed`
    (``timeout``: ``DITKIT_LAUNCH_TIMEOUT`` seconds, default 3600).
    """
    if timeout is None:
        timeout = float(os.environ.get("DITKIT_LAUNCH_TIMEOUT", "3600"))
    return launch(_cli_rank, nproc, args=(_strip_nproc(list(argv)),), timeout=timeout)
