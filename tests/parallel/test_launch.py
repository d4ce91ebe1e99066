"""A failing or hanging rank ends the whole run, with its error, within bounded time."""
import time

import pytest

from core.errors import ParallelError
from core.parallel import RankFailed, launch

from . import _workers

pytestmark = pytest.mark.slow


def test_a_rank_that_raises_stops_every_rank():
    start = time.monotonic()
    with pytest.raises(RankFailed) as err:
        launch(_workers.fail_on_rank, 2, args=(1,), timeout=60)
    assert time.monotonic() - start < 45
    assert err.value.rank == 1 and err.value.error_type == "ValueError"
    assert isinstance(err.value.__cause__, ValueError)
    assert "boom on rank 1" in str(err.value)


def test_a_hanging_run_is_killed_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(ParallelError, match="timed out"):
        launch(_workers.sleep_forever, 2, timeout=2)
    assert time.monotonic() - start < 20


def test_cli_relaunch_adds_usp_and_drops_nproc():
    from core.parallel.launch import _strip_nproc

    assert _strip_nproc(["run", "wan", "--nproc", "4", "--steps", "2"]) == ["run", "wan", "--steps", "2", "--usp"]
    assert _strip_nproc(["run", "wan", "--nproc=2", "--usp"]) == ["run", "wan", "--usp"]
