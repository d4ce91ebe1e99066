"""Unified Sequence Parallelism (USP): Ulysses × ring attention across ranks, exact for any length.

A run has one :class:`Mesh` (process groups; :func:`init_mesh`), and per parallel component one
:class:`UspHandle` (:func:`enable_usp`) that splits the sequences its :class:`core.spec.UspAdapter`
declares, routes its ``core.attention`` calls (the engine is xDiT's yunchang; see
:mod:`core.parallel.engine`) and gathers the sequences back.  Sequence lengths that do not
divide by the degree give the single-process result: padding is masked inside the kernel
(:mod:`core.parallel.keymask`).  :func:`launch` runs N CPU ranks like torchrun.

Files: ``mesh`` (groups), ``shards`` (padded shards), ``keymask`` (exact masking), ``engine``
(xDiT/yunchang adaptation), ``router`` (per-site strategies), ``infer`` (which part of an
attention input is this rank's shard, for sites that do not say), ``hooks`` (split/gather points),
``runtime`` (enable/remove per component), ``attach`` (a whole pipeline: ``pipe.parallel``), ``consistency`` (same noise on every rank), ``cfg`` (CFG parallel),
``launch`` (local multi-process runs).
"""
from .attach import UspRuntime, attach_usp, component_heads
from .cfg import cfg_parallel
from .consistency import assert_same_on_ranks, checksum
from .engine import UspEngine, make_engine
from .launch import RankFailed, free_port, launch, relaunch_cli
from .mesh import Mesh, default_timeout, init_mesh, plan_degrees, valid_ulysses_degrees
from .router import UspRouter
from .runtime import UspHandle, enable_usp
from .shards import SequenceState, ShardLayout, gather_tensor, shard_tensor

__all__ = [
    "Mesh",
    "init_mesh",
    "plan_degrees",
    "valid_ulysses_degrees",
    "default_timeout",
    "UspEngine",
    "make_engine",
    "UspRouter",
    "UspHandle",
    "enable_usp",
    "attach_usp",
    "UspRuntime",
    "component_heads",
    "ShardLayout",
    "SequenceState",
    "shard_tensor",
    "gather_tensor",
    "assert_same_on_ranks",
    "checksum",
    "cfg_parallel",
    "launch",
    "relaunch_cli",
    "RankFailed",
    "free_port",
]
