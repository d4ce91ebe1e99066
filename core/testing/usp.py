"""The USP parity check: the tiny pipeline on N gloo ranks against one process.

Every case reports what ran: the degrees, the call, the measured error and, per split sequence,
its full length and how it was sharded (per-rank real tokens, remainder, pad tokens). The check
fails when no case split a sequence with a remainder: exactness for uneven lengths is the claim,
so it must be exercised, not assumed.
"""
from __future__ import annotations

import time

from .common import METRIC, PROMPT, CheckFailed, KitOptions, rel_error
from .quiet import quiet_libraries
from .subject import Subject


def degree_pairs(world: int) -> list[tuple[int, int]]:
    """Pure Ulysses and pure ring, plus a mixed layout when the world allows one."""
    pairs = [(world, 1), (1, world)]
    for u in range(2, world):
        if world % u == 0:
            pairs.append((u, world // u))
            break
    return pairs


def layouts(world: int, cfg: bool) -> list[tuple[int, int, bool]]:
    """``(ulysses, ring, cfg_parallel)`` cases: :func:`degree_pairs`, plus CFG-parallel on two
    halves of the world (Ulysses over each half) when the model has CFG and the world is ≥ 4."""
    cases = [(u, r, False) for u, r in degree_pairs(world)]
    if cfg and world >= 4 and world % 2 == 0:
        cases.append((world // 2, 1, True))
    return cases


def drawn_calls(subject: Subject, opts: KitOptions) -> list[dict]:
    """Sizes drawn from the declared constraints (collected first, then run in one multi-process
    job, since every rank must run the same cases), plus the declared uneven-length case."""
    from .common import drawn_sizes

    calls = drawn_sizes(subject, opts)
    if subject.spec.conformance.uneven_call is not None:
        calls.append(dict(subject.spec.conformance.uneven_call))
    return calls


def _rank_worker(name: str, plugin: str | None, calls: list[dict], cases: list[tuple[int, int, bool]]) -> list[dict]:
    subject = Subject(name, plugin=plugin)  # imports the plugin, and so the libraries it uses
    with quiet_libraries():  # this rank's process: the same third-party switches as the kit's own
        return _rank_rows(subject, calls, cases)


def _rank_rows(subject: Subject, calls: list[dict], cases: list[tuple[int, int, bool]]) -> list[dict]:
    import torch.distributed as dist

    reference = subject.build()
    rows = []
    for u, r, cfg in cases:
        pipe = subject.build(use_usp=True, ulysses_degree=u, ring_degree=r, cfg_parallel=cfg)
        for call in calls:
            args = subject.call_args(**call)
            if cfg:
                args.setdefault(subject.argument("guidance_scale") or "guidance_scale", 3.0)
            ref = reference(PROMPT, **args).tensor()
            pipe.parallel.clear_splits()
            start = time.perf_counter()
            got = pipe(PROMPT, **args).tensor()
            seconds = time.perf_counter() - start
            rows.append({"ulysses": u, "ring": r, "cfg_parallel": cfg, "ranks": dist.get_world_size(),
                         "call": {k: v for k, v in call.items() if _plain(v)}, "error": rel_error(got, ref),
                         "seconds": round(seconds, 3), "splits": pipe.parallel.splits()})
        pipe.parallel.remove()
    return rows


def _plain(value) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def usp_parity(subject: Subject, opts: KitOptions) -> dict:
    from ..parallel import launch

    calls = drawn_calls(subject, opts)
    cases = layouts(opts.usp_world, subject.spec.capabilities.cfg)
    rows = launch(_rank_worker, opts.usp_world, args=(subject.name, subject.plugin, calls, cases), timeout=opts.timeout)
    rtol = subject.spec.conformance.usp_rtol
    uneven = [row for row in rows if any(s["remainder"] for s in row["splits"])]
    details = {"metric": METRIC, "tolerance": rtol, "world": opts.usp_world,
               "max_error": max(row["error"] for row in rows), "cases": rows, "cases_with_remainder": len(uneven)}
    bad = [row for row in rows if not row["error"] <= rtol]
    if bad:
        raise CheckFailed(
            f"USP output on {opts.usp_world} ranks should equal the single-process output within relative error "
            f"{rtol:g}; it differs for " + "; ".join(f"{_case(row)}: {row['error']:.3g}" for row in bad), details
        )
    if not uneven:
        lengths = sorted({(s["component"], s["sequence"], s["total"]) for row in rows for s in row["splits"]})
        raise CheckFailed(
            f"no USP case split a sequence whose length leaves a remainder on {opts.usp_world} ranks (lengths seen: "
            f"{lengths or 'none: nothing was split'}); declare Conformance.uneven_call with such a length, or an "
            f"expected failure of usp-parity saying why the model cannot produce one", details
        )
    return details


def _case(row: dict) -> str:
    lengths = ", ".join(f"{s['component']}.{s['sequence']}={s['total']} (per rank {s['per_rank']})" for s in row["splits"])
    layout = f"ulysses={row['ulysses']} ring={row['ring']}" + (" cfg-parallel" if row["cfg_parallel"] else "")
    return f"{layout} {row['call']} [{lengths}]"
