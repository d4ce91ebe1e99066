"""Weights sharded across ranks: ``core.load(..., use_usp=True, shard_weights=True)``.

Under USP every rank would hold a full copy of the DiT. With sharded weights each rank keeps 1/N
of the parameters of every component that declares repeated blocks (PyTorch's FSDP2,
``torch.distributed.fsdp.fully_shard``, over all ranks): each declared block instance is one
FSDP unit and the component itself a last one for the parameters outside the blocks (patch
embedding, time embedding, head). Just before a block runs its unit all-gathers the block's
parameters, and right after it the gathered copy is freed (``reshard_after_forward=True``, the
root included), so at most the root's parameters and one block are whole at any time. Gathering
concatenates the shards, so the output is bit-identical to the unsharded model's.

This is inference: the pipeline runs under ``torch.inference_mode``, no gradient is kept and
nothing is reduced. Blocks stay the units regional compile knows (one graph per block class: the
FSDP hooks run outside the compiled ``forward``).

Composition with block offload (``core.load(..., shard_weights=True, offload="block")``): FSDP2
offloads the *shard* itself. With ``shards_on_host=True`` every block unit is sharded with
``CPUOffloadPolicy`` (pinned on CUDA), which keeps each rank's 1/N of the block in host memory and
copies it to the device just before the all-gather; the component's own parameters (the root
unit) stay on the device, as block offload keeps everything but the blocks. A block both sharded
and offloaded therefore moves 1/N of itself per call instead of all of it, and
:mod:`core.offload` leaves these components alone (it offloads the others).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from core.errors import ParallelError

__all__ = ["ShardedComponent", "WeightShards", "shard_pipeline", "shard_component", "sharded_components",
           "parameter_bytes", "local_bytes"]


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters, whole (a sharded parameter counts its global size)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def local_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters held by this rank: the local shard (with FSDP's padding
    to equal shards) of a sharded parameter, the whole of any other."""
    from torch.distributed.tensor import DTensor

    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        t = p._local_tensor if isinstance(p, DTensor) else p
        storage = t.untyped_storage()
        if storage._cdata in seen:
            continue
        seen.add(storage._cdata)
        total += storage.nbytes() if isinstance(p, DTensor) else t.numel() * t.element_size()
    return total


@dataclass
class ShardedComponent:
    name: str
    blocks: dict[str, int]
    """Block class -> instances sharded (one FSDP unit each)."""
    total_bytes: int
    rank_bytes: int
    """This rank's parameter bytes after sharding."""
    shards_on_host: bool = False
    """The blocks' shards wait in host memory (``offload="block"``)."""


@dataclass
class WeightShards:
    """What :func:`shard_pipeline` did; ``pipe.parallel.weight_shards``."""

    world: int
    components: dict[str, ShardedComponent] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"ranks": self.world, "components": {k: asdict(v) for k, v in self.components.items()}}

    def __str__(self) -> str:
        parts = [f"{c.name} {_gb(c.rank_bytes)} of {_gb(c.total_bytes)} ({sum(c.blocks.values())} blocks"
                 + (", their shards in host memory)" if c.shards_on_host else ")") for c in self.components.values()]
        return f"weights sharded over {self.world} ranks, parameters on this rank: " + "; ".join(parts)


def _gb(n: int) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"


def _device_mesh(mesh):
    from torch.distributed.device_mesh import DeviceMesh

    if not dist.is_initialized():
        raise ParallelError("shard_weights needs the process group of a USP run (core.load(..., use_usp=True))")
    return DeviceMesh.from_group(dist.group.WORLD, mesh.device.type)


def shard_component(name: str, module: nn.Module, block_classes: list[str], device_mesh, *,
                    shards_on_host: bool = False) -> ShardedComponent:
    """``fully_shard`` every instance of each block class, then ``module`` itself (the root unit
    for the remaining parameters); all reshard right after their forward. ``shards_on_host``: the
    blocks' shards live in host memory (``CPUOffloadPolicy``, pinned on CUDA), the root's on the device."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    from core.compile import _block_classes

    total = parameter_bytes(module)
    on_device = OffloadPolicy()
    blocks = CPUOffloadPolicy(pin_memory=device_mesh.device_type == "cuda") if shards_on_host else on_device
    counts = {}
    for cls_name in block_classes:
        _, instances = _block_classes(name, module, cls_name)
        for block in instances:
            fully_shard(block, mesh=device_mesh, reshard_after_forward=True, offload_policy=blocks)
        counts[cls_name] = len(instances)
    fully_shard(module, mesh=device_mesh, reshard_after_forward=True, offload_policy=on_device)
    return ShardedComponent(name, counts, total, local_bytes(module), shards_on_host)


def sharded_components(pipe) -> dict[str, list[str]]:
    """The components :func:`shard_pipeline` shards, with their repeated block classes (declared
    in the spec, or a ``_repeated_blocks`` class attribute)."""
    from core.compile import repeated_block_names

    spec = getattr(pipe, "spec", None)
    declared = dict(spec.repeated_blocks) if spec is not None else {}
    return {name: blocks for name, module in pipe.components().items()
            if (blocks := repeated_block_names(module, declared.get(name, ())))}


def shard_pipeline(pipe, *, shards_on_host: bool = False) -> WeightShards:
    """Shard every component of ``pipe`` that has repeated blocks over the ranks of its USP mesh;
    sets and returns ``pipe.parallel.weight_shards``. ``shards_on_host`` (``offload="block"``):
    each block's shard waits in host memory until its all-gather."""
    if pipe.parallel is None:
        raise ParallelError("shard_weights needs use_usp=True (the weights are sharded over the USP ranks)")
    spec = pipe.spec
    targets = sharded_components(pipe)
    if not targets:
        raise ParallelError(f"model {spec.name if spec else type(pipe).__name__!r} has no component with repeated "
                            f"blocks: shard_weights shards each declared repeated block")
    device_mesh = _device_mesh(pipe.parallel.mesh)
    shards = WeightShards(pipe.parallel.mesh.world_size)
    components = pipe.components()
    for name, blocks in targets.items():
        shards.components[name] = shard_component(name, components[name], blocks, device_mesh,
                                                  shards_on_host=shards_on_host)
    pipe.parallel.weight_shards = shards
    return shards
