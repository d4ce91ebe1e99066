"""What the conformance kit's checks share (the check modules import it; none imports a check):
the prompt, the outcomes, the options, the error metric, the compiled tiny pipeline and the drawn
sizes."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .subject import Subject

PROMPT = "a lighthouse on a cliff at dusk"


class CheckFailed(AssertionError):
    """A conformance check found the plugin wrong; ``details`` holds what was measured."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


class CheckSkipped(Exception):
    """A check that does not apply to this model (the message says why)."""


@dataclass
class KitOptions:
    max_examples: int = 3
    """Sizes Hypothesis draws per shape check (the declared corner cases come on top)."""
    usp_world: int = 2
    timeout: float = 240.0
    seed: int = 0
    """Hypothesis seed: draws are random across the declared ranges, yet the same on every run and rank."""
    strict: bool = False
    """``reference-parity`` fails, rather than skips, when fidelity is unproven (no reference, or its
    package missing): ``ditkit check --strict``, ``pytest --ditkit-strict``."""


METRIC = "‖got − ref‖ / ‖ref − mean(ref)‖"


def fail(message: str, details: dict | None = None) -> None:
    raise CheckFailed(message, details)


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got − ref‖ / ‖ref − mean(ref)‖: relative to the reference's spread, so a constant offset
    (a mid-grey image from a tiny random model) cannot hide a difference."""
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / (ref - ref.mean()).norm().clamp_min(1e-30)).item()


def compiled_pipeline(subject: Subject):
    """The compiled tiny pipeline, after one warm-up call; the graphs dynamo holds right after
    that first call are kept for :func:`check_no_recompile`."""
    if "compiled" not in subject._pipes:
        pipe = subject.build()
        torch._dynamo.reset()
        pipe.compile_pipeline()
        pipe(PROMPT, **subject.call_args(guidance_scale=3.0 if subject.spec.capabilities.cfg else None))
        subject._pipes["compiled"] = pipe
        subject._pipes["first_call_graphs"] = graphs(pipe)
    return subject._pipes["compiled"]


def graphs(pipe) -> dict[str, int]:
    return pipe.compile_report.graphs()


def _size_strategy(subject: Subject):
    from hypothesis import strategies as st

    sizes = subject.spec.conformance.sizes
    return st.fixed_dictionaries({k: st.sampled_from(r.values()) for k, r in sizes.items()})


def drawn_sizes(subject: Subject, opts: KitOptions) -> list[dict]:
    """Sizes for the shape checks: a non-square corner (first value of one declared range, last of
    the others) and ``opts.max_examples`` Hypothesis draws over every declared range independently
    (seeded, so every run and every rank draws the same)."""
    from hypothesis import HealthCheck, given, seed, settings

    ranges = subject.spec.conformance.sizes
    corner = {k: (r.values()[0] if i == 0 else r.values()[-1]) for i, (k, r) in enumerate(ranges.items())}
    calls: list[dict] = [corner] if ranges else []

    @seed(opts.seed)
    @settings(max_examples=max(1, opts.max_examples), deadline=None, database=None,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(_size_strategy(subject))
    def collect(sizes):
        if sizes not in calls and len(calls) <= opts.max_examples:
            calls.append(sizes)

    collect()
    return calls
