"""Process groups of one sequence-parallel run: ``ulysses × ring (× 2 with CFG parallel) = world``.

Ranks are laid out as ``[cfg half][ring][ulysses]`` (Ulysses lowest, as yunchang's
``set_seq_parallel_pg(use_ulysses_low=True)`` does): ranks ``0 .. sp-1`` run the conditional
branch, ``sp .. 2sp-1`` the unconditional one, and inside a half the Ulysses groups are runs of
consecutive ranks.  Rank ``i`` of a half holds token shard ``i`` of every split sequence.

The degrees are checked before any process group exists, so a bad request fails at once with
the valid choices instead of deep inside an all-to-all.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from core.errors import ParallelError

__all__ = ["Mesh", "init_mesh", "plan_degrees", "valid_ulysses_degrees", "default_timeout"]


def default_timeout() -> timedelta:
    """How long a collective may wait for a peer (``DITKIT_USP_TIMEOUT`` seconds, default 300)."""
    return timedelta(seconds=float(os.environ.get("DITKIT_USP_TIMEOUT", "300")))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


Heads = int | Iterable[int] | Mapping[str, int] | None
"""One head count, several, or component name -> head count (named in errors)."""


def _heads(heads: Heads) -> int | None:
    # Several components (two towers, a bridge, ...) share one mesh: the Ulysses degree must
    # divide every one of them, i.e. their gcd.
    if heads is None or isinstance(heads, int):
        return heads
    values = list(heads.values()) if isinstance(heads, Mapping) else list(heads)
    return math.gcd(*values) if values else None


def _describe_heads(heads: Heads) -> str:
    """``"video_dit 40, audio_dit 12 attention heads"`` (each component's own count)."""
    if isinstance(heads, Mapping):
        return ", ".join(f"{name} {h}" for name, h in heads.items()) + " attention heads"
    if heads is None or isinstance(heads, int):
        return f"{heads} attention heads"
    return "attention heads " + ", ".join(map(str, heads))


def valid_ulysses_degrees(sp_degree: int, heads: Heads) -> list[int]:
    """The Ulysses degrees usable with ``sp_degree`` sequence-parallel ranks and ``heads`` heads."""
    heads = _heads(heads)
    return [d for d in _divisors(sp_degree) if heads is None or heads % d == 0]


def plan_degrees(
    world_size: int,
    heads: Heads = None,
    ulysses_degree: int | None = None,
    ring_degree: int | None = None,
    cfg_parallel: bool = False,
) -> tuple[int, int]:
    """Return ``(ulysses_degree, ring_degree)`` for ``world_size`` ranks, or raise :class:`ParallelError`.

    Unset degrees default to the largest Ulysses degree that divides both the sequence-parallel
    degree and ``heads`` (every count, when several components share the mesh: 40 and 12 heads
    allow at most 4); the ring takes the rest. A requested Ulysses degree that some component's
    heads do not divide is an error naming every component's head count (pass ``heads`` as a
    mapping ``{component: heads}`` for the names).
    """
    named = heads
    heads = _heads(heads)
    cfg = 2 if cfg_parallel else 1
    if world_size < 1 or world_size % cfg:
        raise ParallelError(f"CFG parallel needs an even world size, got {world_size} ranks")
    sp = world_size // cfg
    valid = valid_ulysses_degrees(sp, heads)
    if ulysses_degree is None and ring_degree is None:
        ulysses_degree = max(valid)
        ring_degree = sp // ulysses_degree
    elif ulysses_degree is None:
        if ring_degree < 1 or sp % ring_degree:
            raise ParallelError(
                f"ring degree {ring_degree} does not divide the sequence-parallel degree {sp} "
                f"(world {world_size}{', CFG parallel' if cfg_parallel else ''})"
            )
        ulysses_degree = sp // ring_degree
    elif ring_degree is None:
        if ulysses_degree < 1 or sp % ulysses_degree:
            raise ParallelError(
                f"Ulysses degree {ulysses_degree} does not divide the sequence-parallel degree {sp}; "
                f"valid Ulysses degrees: {valid}"
            )
        ring_degree = sp // ulysses_degree
    if ulysses_degree < 1 or ring_degree < 1 or ulysses_degree * ring_degree * cfg != world_size:
        raise ParallelError(
            f"ulysses_degree {ulysses_degree} × ring_degree {ring_degree}"
            f"{' × 2 (CFG parallel)' if cfg_parallel else ''} != world size {world_size}"
        )
    if heads is not None and heads % ulysses_degree:
        raise ParallelError(
            f"Ulysses degree {ulysses_degree} does not divide the heads of every component "
            f"({_describe_heads(named)}); valid Ulysses degrees for {sp} sequence-parallel ranks: {valid} "
            f"(the ring takes the rest)"
        )
    return ulysses_degree, ring_degree


@dataclass(eq=False)
class Mesh:
    """The process groups of one run. ``sp_*`` is the sequence-parallel group (one CFG half)."""

    world_size: int
    rank: int
    ulysses_degree: int
    ring_degree: int
    cfg_degree: int
    device: torch.device
    backend: str
    sp_group: dist.ProcessGroup | None = field(repr=False)
    ulysses_group: dist.ProcessGroup | None = field(repr=False)
    ring_group: dist.ProcessGroup | None = field(repr=False)
    cfg_group: dist.ProcessGroup | None = field(repr=False)
    owns_process_group: bool = field(default=False, repr=False)

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_degree

    @property
    def cfg_rank(self) -> int:
        """0 on the ranks that run the conditional branch, 1 on the unconditional ones."""
        return self.rank // self.sp_degree

    def close(self) -> None:
        """Destroy the default process group if :func:`init_mesh` created it."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def init_mesh(
    heads: Heads = None,
    ulysses_degree: int | None = None,
    ring_degree: int | None = None,
    cfg_parallel: bool = False,
    *,
    device: torch.device | str | None = None,
    timeout: timedelta | None = None,
) -> Mesh:
    """Join (or create) the default process group and build the USP groups.

    The world comes from an initialised ``torch.distributed`` or from torchrun's environment
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; see
    :func:`core.parallel.launch` for CPU runs). Backend: NCCL on CUDA, gloo on CPU. Every rank must
    call this with the same arguments, in the same order as any other group creation.
    """
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = _env_int("WORLD_SIZE") or 1, _env_int("RANK") or 0
    u, r = plan_degrees(world, heads, ulysses_degree, ring_degree, cfg_parallel)

    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda", _env_int("LOCAL_RANK") or 0)
        else:
            device = torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world > 1:
                raise ParallelError(
                    f"WORLD_SIZE is {world} but MASTER_PORT is not set; start the ranks with torchrun "
                    f"or core.parallel.launch"
                )
            from .launch import free_port

            os.environ["MASTER_PORT"] = str(free_port())  # a lone rank: any free port will do
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=timeout or default_timeout(), **kwargs
        )
        owns = True
    backend = dist.get_backend()

    from yunchang.globals import PROCESS_GROUP, set_seq_parallel_pg

    set_seq_parallel_pg(u, r, rank, world, use_ulysses_low=True)
    ulysses_group, ring_group = PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG

    sp = u * r
    cfg = world // sp
    sp_group = cfg_group = None
    # new_group is collective over the whole world: every rank creates every group, in order.
    for half in range(cfg):
        ranks = list(range(half * sp, (half + 1) * sp))
        group = dist.new_group(ranks)
        if rank in ranks:
            sp_group = group
    for i in range(sp):
        ranks = [half * sp + i for half in range(cfg)]
        group = dist.new_group(ranks)
        if rank in ranks:
            cfg_group = group

    return Mesh(
        world_size=world,
        rank=rank,
        ulysses_degree=u,
        ring_degree=r,
        cfg_degree=cfg,
        device=device,
        backend=backend,
        sp_group=sp_group,
        ulysses_group=ulysses_group,
        ring_group=ring_group,
        cfg_group=cfg_group,
        owns_process_group=owns,
    )
