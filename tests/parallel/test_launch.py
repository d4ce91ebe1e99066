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


# -- faults: the rank that died first, silent ranks, ranks that die with their launcher ---------

import importlib  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

from tests.conftest import ROOT, subprocess_env  # noqa: E402

from . import _fault_workers  # noqa: E402


def test_a_rank_killed_midway_is_named_with_its_signal_not_a_survivor():
    with pytest.raises(RankFailed) as err:
        launch(_fault_workers.kill_rank_in_collective, 2, args=(0,), timeout=60)
    assert err.value.rank == 0 and "SIGKILL" in str(err.value)
    assert str(err.value).startswith("rank 0 was killed by SIGKILL")


def test_a_stopped_rank_ends_the_job_at_the_heartbeat_bound(monkeypatch):
    monkeypatch.setenv("DITKIT_HEARTBEAT_TIMEOUT", "3")
    start = time.monotonic()
    with pytest.raises(ParallelError, match=r"rank\(s\) \[1\] stopped answering") as err:
        launch(_fault_workers.stop_rank, 2, args=(1,), timeout=120)
    assert "DITKIT_HEARTBEAT_TIMEOUT" in str(err.value) and time.monotonic() - start < 100


@pytest.mark.parametrize("argv, culprit", [(["--steps", "0"], "--steps"), (["--height", "33"], "height"),
                                           (["--preset", "nope"], "nope")])
def test_nproc_validates_in_the_launcher_before_spawning(argv, culprit, capsys, tmp_path, monkeypatch):
    from core.cli import main
    launch_module = importlib.import_module("core.parallel.launch")  # the package exports a function of that name
    spawned = []
    monkeypatch.setattr(launch_module, "launch", lambda *a, **k: spawned.append(a))
    code = main(["run", "wan", "--nproc", "2", "--out", str(tmp_path / "v.mp4"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and spawned == [] and err.count("\n") == 1 and culprit in err


_LAUNCHER = textwrap.dedent(
    """
    import importlib, sys
    L = importlib.import_module("core.parallel.launch")
    from tests.parallel import _fault_workers
    folder = sys.argv[1]
    L.relaunch_cli = lambda nproc, argv, timeout=None, entry=None: L.launch(_fault_workers.record_pid_and_sleep, nproc, args=(folder,), timeout=300)
    from core.cli import main
    sys.exit(main(["run", "wan", "--nproc", "2", "--out", folder + "/v.mp4"]))
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_ranks_die_with_their_launcher_and_the_folder_goes(tmp_path):
    """``ditkit run --nproc 2``'s launcher killed (SIGKILL), stopped (SIGTERM: exit 143) or
    interrupted (Ctrl-C to the process group: exit 130): no rank survives it."""
    from core.parallel.launch import _remove_stale_dirs

    runs = []
    for how in ("SIGKILL", "SIGTERM", "SIGINT"):
        folder = tmp_path / how
        folder.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(folder)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=ROOT, start_new_session=True)
        runs.append((how, folder, proc))
    try:
        deadline = time.monotonic() + 120
        for how, folder, proc in runs:
            while len(list(folder.glob("*.pid"))) < 2:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()[-2000:] if proc.poll() else how
                time.sleep(0.2)
        pids = {how: [int(p.read_text()) for p in folder.glob("*.pid")] for how, folder, _ in runs}
        for how, folder, proc in runs:
            if how == "SIGINT":
                os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
            else:
                proc.send_signal(getattr(signal, how))
        results = {how: proc.communicate(timeout=60) and (proc.returncode, proc.stderr) for how, _, proc in runs}
        end = time.monotonic() + 10
        while any(_alive(pid) for ranks in pids.values() for pid in ranks) and time.monotonic() < end:
            time.sleep(0.1)
        assert not [(how, pid) for how, ranks in pids.items() for pid in ranks if _alive(pid)]
        assert results["SIGTERM"][0] == 143 and results["SIGINT"][0] == 130
        for how, folder, proc in runs:
            assert not folder.joinpath("v.mp4").exists()
        launcher_dirs = lambda pid: list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"ditkit-launch-{pid}-*"))
        assert launcher_dirs(runs[1][2].pid) == [] and launcher_dirs(runs[2][2].pid) == []
        assert launcher_dirs(runs[0][2].pid), "a launcher killed outright cannot clean up"
        _remove_stale_dirs()  # what the next launch does first
        assert launcher_dirs(runs[0][2].pid) == []
    finally:
        for _, _, proc in runs:
            if proc.poll() is None:
                proc.kill()


def test_ranks_hold_no_named_semaphore_so_no_leak_warning_is_printed():
    assert launch(_fault_workers.tqdm_lock_kind, 1, timeout=60) == "RLock"
