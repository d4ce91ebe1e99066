"""The USP parity check: the tiny pipeline on N gloo ranks against one process."""
from __future__ import annotations

import torch

from .checks import PROMPT, CheckFailed, KitOptions, rel_error
from .subject import Subject


def degree_pairs(world: int) -> list[tuple[int, int]]:
    """Pure Ulysses and pure ring, plus a mixed layout when the world allows one."""
    pairs = [(world, 1), (1, world)]
    for u in range(2, world):
        if world % u == 0:
            pairs.append((u, world // u))
            break
    return pairs


def drawn_calls(subject: Subject, opts: KitOptions) -> list[dict]:
    """Sizes drawn by Hypothesis from the declared constraints (collected first, then run in one
    multi-process job, since every rank must run the same cases), plus the uneven-length case."""
    from hypothesis import HealthCheck, given, settings

    from .checks import _size_strategy

    calls: list[dict] = []

    @settings(max_examples=opts.max_examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(_size_strategy(subject))
    def collect(sizes):
        if sizes not in calls:
            calls.append(sizes)

    collect()
    if subject.spec.conformance.uneven_call is not None:
        calls.append(dict(subject.spec.conformance.uneven_call))
    return calls


def _rank_worker(name: str, plugin: str | None, calls: list[dict], pairs: list[tuple[int, int]], cfg_parallel: bool) -> dict:
    subject = Subject(name, plugin=plugin)
    reference = subject.build()
    errors = {}
    for u, r in pairs:
        pipe = subject.build(use_usp=True, ulysses_degree=u, ring_degree=r, cfg_parallel=cfg_parallel)
        for call in calls:
            args = subject.call_args(**call)
            ref = reference(PROMPT, **args).tensor()
            got = pipe(PROMPT, **args).tensor()
            errors[f"ulysses={u} ring={r} {call}"] = rel_error(got, ref)
        pipe.parallel.remove()
    return errors


def usp_parity(subject: Subject, opts: KitOptions) -> None:
    from ..parallel import launch

    calls = drawn_calls(subject, opts)
    pairs = degree_pairs(opts.usp_world)
    errors = launch(_rank_worker, opts.usp_world, args=(subject.name, subject.plugin, calls, pairs, False),
                    timeout=opts.timeout)
    rtol = subject.spec.conformance.usp_rtol
    bad = {k: v for k, v in errors.items() if not v <= rtol}
    if bad:
        raise CheckFailed(
            f"USP output on {opts.usp_world} ranks should equal the single-process output within relative error "
            f"{rtol:g}; it differs for " + "; ".join(f"{k}: {v:.3g}" for k, v in bad.items())
        )
