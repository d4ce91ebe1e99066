"""Wan through USP on 4 gloo ranks (the kit's usp-parity check covers 2 ranks)."""
import pytest

from core.parallel import launch
from tests import usp_workers

pytestmark = pytest.mark.slow


def test_wan_on_four_ranks_equals_one_process():
    results = launch(usp_workers.wan_four_ranks, 4, timeout=300)
    assert len(results) == 4 and max(results.values()) <= 1e-5, results
