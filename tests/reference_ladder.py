"""Compare the stages a plugin traced with an independent reference's, stage by stage.

The stages are ``core.pipeline.REFERENCE_STAGES`` in order; a stage's value is a tensor or a tuple of
tensors (MOVA's ``latents`` are ``(video, audio)``). A tolerance is ``("abs", t)``: ``max|a − b| ≤ t``,
or ``("rel", t)``: ``max|a − b| ≤ t · max|b|`` (each tuple element against its own scale).
"""
from __future__ import annotations

import torch

from core.pipeline import REFERENCE_STAGES


def _pairs(a, b):
    if isinstance(b, (tuple, list)):
        assert isinstance(a, (tuple, list)) and len(a) == len(b), (type(a), type(b))
        return list(zip(a, b))
    return [(a, b)]


def stage_error(traced, ref, kind: str) -> float:
    """The stage's error in the tolerance's unit (absolute, or relative to the reference's max)."""
    worst = 0.0
    for a, b in _pairs(traced, ref):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        if a.shape != b.shape:
            return float("inf")
        err = (a - b).abs().max().item() if a.numel() else 0.0
        if kind == "rel":
            scale = b.abs().max().item()
            assert scale > 0, "a relative tolerance needs a non-zero reference"
            err /= scale
        worst = max(worst, err)
    return worst


def ladder(traced: dict, ref: dict, tolerances: dict) -> list[tuple[str, float, float, bool]]:
    """``(stage, error, tolerance, passed)`` for every stage the reference returned, in ladder order."""
    rows = []
    for stage in REFERENCE_STAGES:
        if stage in ref:
            kind, tol = tolerances[stage]
            err = stage_error(traced[stage], ref[stage], kind)
            rows.append((stage, err, tol, err <= tol))
    return rows


def first_failure(rows) -> str | None:
    return next((stage for stage, _, _, ok in rows if not ok), None)


def table(rows) -> str:
    return "\n".join(f"  {stage:16s} error {err:.2e}  tolerance {tol:.0e}  {'ok' if ok else 'FAIL'}"
                     for stage, err, tol, ok in rows)
