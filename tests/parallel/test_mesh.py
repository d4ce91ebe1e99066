"""Degree planning and its refusals (single process: no process group is ever created)."""
import pytest
import torch.distributed as dist

from core.errors import ParallelError
from core.parallel import init_mesh, plan_degrees, valid_ulysses_degrees


@pytest.mark.parametrize(
    "world, heads, cfg, expected",
    [(8, 12, False, (4, 2)), (8, 24, False, (8, 1)), (4, 3, False, (1, 4)), (8, 12, True, (4, 1)), (1, 5, False, (1, 1))],
)
def test_default_is_largest_ulysses_degree_dividing_heads(world, heads, cfg, expected):
    assert plan_degrees(world, heads, cfg_parallel=cfg) == expected


def test_explicit_degrees():
    assert plan_degrees(8, 12, ulysses_degree=2) == (2, 4)
    assert plan_degrees(8, 12, ring_degree=8) == (1, 8)
    assert plan_degrees(4, 4, ulysses_degree=1, ring_degree=2, cfg_parallel=True) == (1, 2)


def test_heads_not_divisible_lists_valid_degrees():
    with pytest.raises(ParallelError) as err:
        plan_degrees(4, heads=6, ulysses_degree=4)
    assert "[1, 2]" in str(err.value)  # the valid Ulysses degrees for 4 ranks and 6 heads
    assert valid_ulysses_degrees(4, 6) == [1, 2]


@pytest.mark.parametrize(
    "kwargs",
    [dict(ulysses_degree=3), dict(ring_degree=3), dict(ulysses_degree=2, ring_degree=3), dict(cfg_parallel=True, world=3)],
)
def test_degrees_that_do_not_make_the_world(kwargs):
    world = kwargs.pop("world", 4)
    with pytest.raises(ParallelError):
        plan_degrees(world, 8, **kwargs)


def test_init_mesh_refuses_before_any_work(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_PORT", "1")  # would fail (or hang) if it tried to connect
    with pytest.raises(ParallelError):
        init_mesh(heads=6, ulysses_degree=4)
    assert not dist.is_initialized()
