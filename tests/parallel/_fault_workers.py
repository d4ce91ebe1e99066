"""Rank functions for the fault tests of the launcher (module level, so spawn can import them)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist


def record_pid_and_sleep(folder: str) -> None:
    """Write this rank's pid to ``<folder>/<rank>.pid`` and sleep (the launcher is the one killed)."""
    Path(folder, f"{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    while True:
        time.sleep(0.2)


def stop_rank(bad_rank: int) -> None:
    """``bad_rank`` stops itself (SIGSTOP: its heartbeat thread stops too); the others wait."""
    if int(os.environ["RANK"]) == bad_rank:
        os.kill(os.getpid(), signal.SIGSTOP)
    while True:
        time.sleep(0.2)


def kill_rank_in_collective(bad_rank: int) -> None:
    """Every rank joins gloo; ``bad_rank`` is SIGKILLed while the others wait in an all-reduce."""
    dist.init_process_group("gloo")
    dist.all_reduce(torch.ones(1))
    if dist.get_rank() == bad_rank:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5 if dist.get_rank() != bad_rank else 0)
    dist.all_reduce(torch.ones(1))  # the peer is gone: gloo raises a connection error here
    time.sleep(30)


def tqdm_lock_kind() -> str:
    """The lock tqdm guards a rank's bars with (a multiprocessing one is a named semaphore that
    the resource tracker reports as leaked when the rank leaves through ``os._exit``)."""
    from tqdm.auto import tqdm

    for _ in tqdm(range(2), disable=False):
        pass
    return type(tqdm.get_lock()).__name__
