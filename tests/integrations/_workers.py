"""Rank functions of the diffusers USP tests (module level, so spawned ranks import them).

Each case builds the same seeded tiny model on every rank, runs it once on one process as the
reference and once with USP from ``usp_from_cp_plan``, and returns the relative error.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from core.parallel import enable_usp, init_mesh

from . import _tiny

# (name, build, inputs): image tokens 15 = 3·5 leave a remainder on 2 and 4 ranks; text 7 and 6 too
CASES = {
    "flux": (_tiny.flux, lambda: _tiny.flux_inputs(3, 5, text=7)),
    "wan": (_tiny.wan, lambda: _tiny.wan_inputs(1, 3, 5)),
    "wan-per-token-t": (_tiny.wan, lambda: _tiny.wan_inputs(1, 3, 5, per_token_t=True)),
    "qwen": (_tiny.qwen, lambda: _tiny.qwen_inputs(3, 5, text=6)),
}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def run(cases: list[str], degrees: list[tuple[int, int]]) -> dict:
    """``{"<case> u<U>r<R>": relative error}``, and ``{"<case> image tokens": (total, total % world)}``
    as the USP run split them (so a test can check that a remainder was exercised)."""
    from core.integrations.diffusers import route_attention, usp_from_cp_plan

    results = {}
    for u, r in degrees:
        mesh = init_mesh(heads=_tiny.HEADS, ulysses_degree=u, ring_degree=r)
        for name in cases:
            build, inputs = CASES[name]
            model = build()
            route_attention(model)
            x = inputs()
            with torch.no_grad():
                want = model(**x)[0]
                with enable_usp(model, usp_from_cp_plan(model), mesh) as handle:
                    got = model(**x)[0]
                    layout = handle.state.layout("tokens", name)
            results[f"{name} u{u}r{r}"] = rel_err(got, want)
            results[f"{name} image tokens"] = (layout.total, layout.total % layout.world)
    results["world"] = dist.get_world_size()
    return results


COMPILE = {"wan": (_tiny.wan, lambda h, w: _tiny.wan_inputs(1, h, w)),
           "qwen": (_tiny.qwen, lambda h, w: _tiny.qwen_inputs(h, w))}


def compile_vs_eager(name: str) -> dict:
    """Regional compile of the routed model (its diffusers ``_repeated_blocks``): the error against
    eager at three image sizes, graphs per block class, and whether a later size recompiled."""
    from core.compile import compile_components
    from core.integrations.diffusers import route_attention

    build, inputs = COMPILE[name]
    eager, compiled = build(), build()
    for m in (eager, compiled):
        route_attention(m)
    report = compile_components({"transformer": compiled}, repeated_blocks={}, methods={},
                                options={"dynamic": True, "fullgraph": False})
    out = {"parts": [(p.how, p.target, p.instances) for p in report.parts], "errors": [], "recompiled": "no"}
    with torch.no_grad():
        x = inputs(3, 5)
        out["errors"].append(rel_err(compiled(**x)[0], eager(**x)[0]))
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                for h, w in [(2, 3), (4, 4)]:
                    x = inputs(h, w)
                    out["errors"].append(rel_err(compiled(**x)[0], eager(**x)[0]))
        except RuntimeError as exc:
            out["recompiled"] = str(exc)[-300:]
    out["graphs"] = report.graphs()  # counted from the first call: 1 per block class
    return out


def two_ranks(cases: list[str], degrees: list[tuple[int, int]], compile_per_rank: list[str]) -> dict:
    """The 2-rank USP cases, then each rank compiles one model (local work, no collectives), so the
    compile checks share the job's process start-up and run side by side."""
    results = run(cases, degrees)
    name = compile_per_rank[dist.get_rank()]
    results["compile"] = {name: compile_vs_eager(name)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results["compile"])
    results["compile"] = {k: v for part in gathered for k, v in part.items()}
    return results
