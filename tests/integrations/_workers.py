"""Rank functions of the diffusers bridge tests (module level, so spawned ranks import them).

:func:`bridge_job` is the one 2-rank job of the suite: every case of :data:`_tiny.CASES` runs once
on one process as the reference and once with USP from ``usp_from_cp_plan`` (Ulysses, then ring);
then each rank compiles half of the classes (local work, no collectives) so the compile checks
share the job's process start-up and run side by side.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from core.parallel import enable_usp, init_mesh

from . import _tiny


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _outputs(out) -> list[torch.Tensor]:
    return [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]


def usp_errors(cases: list[str], degrees: list[tuple[int, int]]) -> dict:
    """``{case: {"u<U>r<R>": worst relative error over the outputs, "splits": [(total, total % world)]}}``:
    the splits are every length the sequence was split at (several for Helios, which splits inside
    each sub-module), so a test can check that each one left a remainder."""
    from core.integrations.diffusers import route_attention, usp_from_cp_plan

    _tiny.register_sd3_plan()
    results: dict = {name: {"splits": []} for name in cases}
    for u, r in degrees:
        mesh = init_mesh(heads=_tiny.HEADS, ulysses_degree=u, ring_degree=r)
        for name in cases:
            case = {**_tiny.CASES, **_tiny.REGISTERED}[name]
            model = case.build()
            route_attention(model)
            x = case.inputs(0)
            try:  # a case that raises (on every rank alike) fails its own test, not the job
                with torch.no_grad():
                    want = _outputs(model(**x))
                    with enable_usp(model, usp_from_cp_plan(model), mesh) as handle:
                        got = _outputs(model(**x))
                        totals = sorted(handle.state.seen.get("tokens", ()))
            except Exception as exc:  # noqa: BLE001 - reported to the test
                results[name][f"u{u}r{r}"] = f"{type(exc).__name__}: {str(exc)[:400]}"
                continue
            results[name][f"u{u}r{r}"] = max(rel_err(g, w) for g, w in zip(got, want))
            results[name]["splits"] = [(t, t % mesh.sp_degree) for t in totals]
    return results


def compile_vs_eager(name: str, backend: str = "inductor") -> dict:
    """Regional compile of the routed model (its diffusers ``_repeated_blocks``) with ``backend``:
    the error against eager at three sizes, graphs per block class, and whether a later size
    recompiled."""
    from core.compile import compile_components
    from core.integrations.diffusers import route_attention

    case = _tiny.CASES[name]
    eager, compiled = case.build(), case.build()
    for m in (eager, compiled):
        route_attention(m)
    report = compile_components({"transformer": compiled}, repeated_blocks={}, methods={},
                                options={"dynamic": True, "fullgraph": False, "backend": backend})
    out = {"parts": sorted(p.target for p in report.parts), "errors": [], "recompiled": "no"}

    def err(size):
        x = case.inputs(size)
        return max(rel_err(c, e) for c, e in zip(_outputs(compiled(**x)), _outputs(eager(**x))))

    with torch.no_grad():
        out["errors"].append(err(0))
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                out["errors"] += [err(1), err(2)]
        except RuntimeError as exc:
            out["recompiled"] = str(exc)[-300:]
    out["graphs"] = report.graphs()  # counted from the first call: 1 per block class
    return out


def infer_cases() -> dict:
    """What :func:`core.parallel.infer.infer_layouts` makes of hand-made tensors (shard of 4 tokens):
    ``{case: (split, prefix)}`` or ``"ParallelError"``."""
    from core.errors import ParallelError
    from core.parallel.infer import infer_layouts

    shard, rank = 4, dist.get_rank()
    same = torch.Generator().manual_seed(0)  # the same draws on every rank
    whole, prefix = torch.randn(1, 6, 2, 3, generator=same), torch.randn(1, 3, 2, 3, generator=same)
    mine = torch.randn(1, shard, 2, 3, generator=torch.Generator().manual_seed(10 + rank))
    tensors = {"whole": whole, "shard": mine, "joint": torch.cat([prefix, mine], 1), "short whole": whole[:, :2],
               "shard first": torch.cat([mine, prefix], 1)}
    out = {}
    for name, t in tensors.items():
        try:
            layout = infer_layouts({"t": t}, shard, None, name)["t"]
            out[name] = (layout.split, layout.prefix)
        except ParallelError:
            out[name] = "ParallelError"
    # a mask cannot follow split keys: the router refuses it rather than dropping it
    from core.parallel import SequenceState, UspRouter, make_engine
    from core.spec import AttentionSite, SequenceGather, SequenceSplit, UspAdapter

    mesh = init_mesh(heads=_tiny.HEADS, ulysses_degree=2, ring_degree=1)
    state = SequenceState(2, rank)
    state.record("tokens", 2 * shard - 1, "test")
    adapter = UspAdapter(component="t", heads=2, splits=[SequenceSplit(module="")], gathers=[SequenceGather(module="")],
                         sites={"dispatch": AttentionSite(strategy="infer")})
    router = UspRouter(adapter, mesh, state, make_engine(mesh))
    try:
        router(mine, mine, mine, site="dispatch", mask=torch.ones(1, 1, 1, shard, dtype=torch.bool), scale=None)
        out["masked split keys"] = "ran"
    except ParallelError:
        out["masked split keys"] = "ParallelError"
    return out


def router_paths() -> dict:
    """Which path the router's ``infer`` strategy takes for each layout of queries and keys
    (hand-made tensors, a shard of 4 of 7 tokens): ``{layout: (paths taken, ran locally)}``. Every
    path gives the exact result, so parity cannot tell them apart: a router that all-gathered the
    keys of every call would pass every USP test while running nothing sequence-parallel."""
    from core.parallel import SequenceState, UspRouter, make_engine
    from core.spec import AttentionSite, SequenceGather, SequenceSplit, UspAdapter

    shard, rank = 4, dist.get_rank()
    same = torch.Generator().manual_seed(0)  # the same draws on every rank
    whole, prefix = torch.randn(1, 6, 2, 3, generator=same), torch.randn(1, 3, 2, 3, generator=same)
    mine = torch.randn(1, shard, 2, 3, generator=torch.Generator().manual_seed(10 + rank))
    mesh = init_mesh(heads=_tiny.HEADS, ulysses_degree=2, ring_degree=1)
    state = SequenceState(2, rank)
    state.record("tokens", 2 * shard - 1, "test")
    adapter = UspAdapter(component="t", heads=2, splits=[SequenceSplit(module="")], gathers=[SequenceGather(module="")],
                         sites={"dispatch": AttentionSite(strategy="infer")})
    taken: list[str] = []
    engine = make_engine(mesh)

    def spied(name, fn):
        def call(*args):
            taken.append(name)
            return fn(*args)
        return call

    router = UspRouter(adapter, mesh, state, spied("engine", engine))
    router._joint = spied("joint", router._joint)
    router._gather_tail = spied("gathered keys", router._gather_tail)
    joint = torch.cat([prefix, mine], 1)
    out = {}
    for name, (q, kv) in {"split q, split k": (mine, mine), "joint": (joint, joint),
                          "whole q, split k": (whole, mine), "split q, whole k": (mine, whole)}.items():
        taken.clear()
        result = router(q, kv, kv, site="dispatch", mask=None, scale=None)
        out[name] = (tuple(taken), result is None)
    return out


def bridge_job(cases: list[str], degrees: list[tuple[int, int]], compile_cases: list[tuple[str, str]]) -> dict:
    """The USP cases on all ranks, then rank ``i`` compiles ``compile_cases[i::world]`` (``(case,
    backend)`` pairs); rank 0 returns everything."""
    results = {"usp": usp_errors(cases, degrees), "infer": infer_cases(), "router_paths": router_paths(),
               "world": dist.get_world_size()}
    mine = {}
    for name, backend in compile_cases[dist.get_rank()::dist.get_world_size()]:
        try:
            mine[name] = {**compile_vs_eager(name, backend), "backend": backend}
        except Exception as exc:  # noqa: BLE001 - reported to the test
            mine[name] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}", "backend": backend}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    results["compile"] = {k: v for part in gathered for k, v in part.items()}
    return results
