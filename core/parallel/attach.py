"""USP for a whole pipeline: what ``core.load(..., use_usp=True)`` attaches as ``pipe.parallel``."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Sequence

import torch

from core.errors import ParallelError

from .cfg import cfg_parallel
from .consistency import assert_same_on_ranks
from .engine import make_engine
from .mesh import Mesh, init_mesh
from .runtime import UspHandle, enable_usp
from .shards import ShardLayout

__all__ = ["UspRuntime", "attach_usp", "component_heads"]


def component_heads(adapter, component, config: Mapping | None = None) -> int:
    """The adapter's head count: ``heads`` itself, or that key of ``config``, of the component
    (an attribute) or of ``component.config`` (a mapping or an object)."""
    if isinstance(adapter.heads, int):
        return adapter.heads
    key = adapter.heads
    sources = [config, component, getattr(component, "config", None)]
    for source in sources:
        if source is None:
            continue
        value = source.get(key) if isinstance(source, Mapping) else getattr(source, key, None)
        if isinstance(value, int):
            return value
    raise ParallelError(
        f"USP adapter of {adapter.component!r} reads its head count from {key!r}, which neither the preset "
        f"config, the component nor its .config holds as an int"
    )


class UspRuntime:
    """The USP state of one pipeline: its :class:`Mesh` and one :class:`UspHandle` per component."""

    def __init__(self, mesh: Mesh, handles: dict[str, UspHandle]):
        self.mesh, self.handles = mesh, handles
        self.weight_shards = None  # core.parallel.weight_shards.WeightShards with shard_weights=True

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the rank that reports and writes outputs)."""
        return self.mesh.rank == 0

    def check_same(self, x: torch.Tensor, what: str = "noise") -> None:
        """:class:`ParallelError` ("ranks diverged") unless ``x`` is bit-identical on every rank."""
        assert_same_on_ranks(x, None, what)

    def run_branches(self, fn: Callable[[str], torch.Tensor], branches: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{branch: fn(branch)}``; with CFG parallel, "cond" and "uncond" run on different rank halves."""
        if self.mesh.cfg_degree == 2 and tuple(branches) == ("cond", "uncond"):
            cond, uncond = cfg_parallel(self.mesh, lambda: fn("cond"), lambda: fn("uncond"))
            return {"cond": cond, "uncond": uncond}
        return {b: fn(b) for b in branches}

    def splits(self) -> list[dict]:
        """Every sequence split so far, per component: its full length and how it was sharded
        (:meth:`ShardLayout.describe`); what the conformance kit reports and checks for remainders."""
        world = self.mesh.sp_degree
        rows = []
        for name, handle in sorted(self.handles.items()):
            for sequence, totals in sorted(handle.state.seen.items()):
                for total in sorted(totals):
                    rows.append({"component": name, "sequence": sequence,
                                 **ShardLayout(total, world, self.mesh.sp_rank).describe()})
        return rows

    def clear_splits(self) -> None:
        """Forget what :meth:`splits` recorded."""
        for handle in self.handles.values():
            handle.state.seen.clear()

    def remove(self) -> None:
        """Undo every component's hooks (the process group stays; ``mesh.close()`` ends it)."""
        for handle in self.handles.values():
            handle.remove()
        self.handles = {}

    def __repr__(self) -> str:
        m = self.mesh
        return (f"UspRuntime(world={m.world_size}, ulysses={m.ulysses_degree}, ring={m.ring_degree}, "
                f"cfg={m.cfg_degree}, components={sorted(self.handles)})")


def attach_usp(
    pipe,
    *,
    ulysses_degree: int | None = None,
    ring_degree: int | None = None,
    cfg_parallel: bool = False,
    config: Mapping | None = None,
    mesh: Mesh | None = None,
) -> UspRuntime:
    """Make ``pipe`` run sequence-parallel per its spec's USP adapters; sets and returns ``pipe.parallel``.

    Creates the mesh (``torchrun`` environment; see :func:`init_mesh`) unless one is given; on
    CUDA each rank's components move to ``cuda:LOCAL_RANK``. ``config`` is the preset config
    (for adapters that name their head count by config key).
    """
    spec = getattr(pipe, "spec", None)
    adapters = list(spec.usp) if spec is not None else []
    if not adapters:
        name = spec.name if spec is not None else type(pipe).__name__
        raise ParallelError(f"model {name!r} declares no USP adapter (capabilities.usp is False)")
    components = {}
    for adapter in adapters:
        component = getattr(pipe, adapter.component, None)
        if not isinstance(component, torch.nn.Module):
            raise ParallelError(
                f"USP adapter names component {adapter.component!r}, which the {type(pipe).__name__} "
                f"pipeline does not have (components: {sorted(pipe.components())})"
            )
        components[adapter.component] = (adapter, component, component_heads(adapter, component, config))
    if mesh is None:
        mesh = init_mesh(
            heads={name: h for name, (_, _, h) in components.items()},
            ulysses_degree=ulysses_degree,
            ring_degree=ring_degree,
            cfg_parallel=cfg_parallel,
        )
    if mesh.device.type == "cuda" and pipe.device != mesh.device:
        pipe.to(mesh.device)
    engine = make_engine(mesh)
    handles: dict[str, UspHandle] = {}
    try:
        for name, (adapter, component, heads) in components.items():
            handles[name] = enable_usp(component, adapter, mesh, heads=heads, engine=engine)
    except BaseException:
        for h in handles.values():
            h.remove()
        raise
    pipe.parallel = UspRuntime(mesh, handles)
    return pipe.parallel
