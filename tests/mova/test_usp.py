"""MOVA under USP on gloo ranks equals one process: both towers and the bridge split, the audio
length leaving a remainder, the bridge's gathered keys/values, CFG parallel.

Four ranks and compile + USP take minutes on two CPU cores, over this suite's CI budget; they
run by hand with ``python -m tests.mova.by_hand`` (and ``ditkit check mova-360p --usp 4``)."""
import pytest

from core.parallel import launch
from tests.mova import usp_workers

pytestmark = pytest.mark.slow


def _check(results: dict) -> None:
    for key, value in results.items():
        if key.endswith("padded"):
            # the audio tower, and the bridge's audio table, had a remainder on this layout
            assert value["audio_dit.tokens"] and value["dual_tower_bridge.audio"], (key, value)
        else:
            video_err, audio_err = value
            assert video_err <= 1e-5 and audio_err <= 1e-5, (key, value)


def test_two_ranks_ulysses_ring_and_cfg_parallel():
    results = launch(usp_workers.degrees, 2, args=([(2, 1, False), (1, 2, False), (1, 1, True)],), timeout=300)
    assert len(results) == 5
    _check(results)
