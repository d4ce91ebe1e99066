"""A failed rank is reported once, by the launcher: its peers' lost connections print no C++ stack."""
from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from core.parallel import RankFailed, launch

pytestmark = pytest.mark.slow


def rank0_fails_while_rank1_waits_on_the_store():
    """Rank 0 hosts the rendezvous store and fails; rank 1 is waiting on that store, so it sees the
    connection reset (torch logs that as a C++ warning with a stack trace, unless told not to)."""
    port, rank = int(os.environ["MASTER_PORT"]), int(os.environ["RANK"])
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=30))
    if rank == 0:
        store.wait(["waiting"])
        time.sleep(0.5)
        raise ValueError("boom on rank 0")
    store.set("waiting", "1")
    store.wait(["never"])


def test_a_peers_lost_connection_prints_no_cpp_stack(capfd, monkeypatch):
    monkeypatch.delenv("TORCH_CPP_LOG_LEVEL", raising=False)
    monkeypatch.delenv("DITKIT_DEBUG", raising=False)
    with pytest.raises(RankFailed) as err:
        launch(rank0_fails_while_rank1_waits_on_the_store, 2, timeout=120)
    assert err.value.rank == 0 and str(err.value).startswith("rank 0 raised ValueError: boom on rank 0")
    printed = capfd.readouterr().err  # the ranks write to the launcher's own stderr
    assert "frame #" not in printed and "TCPStore" not in printed, printed[-2000:]
