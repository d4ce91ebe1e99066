"""The reference-parity check: the tiny pipeline against an independent implementation, stage by stage.

A plugin declares ``Conformance.reference``: a callable (or ``"module:attr"``) that computes the
same generation with code that is not the plugin's (diffusers' own pipeline class fed the
plugin's weights, the official repository, golden fixtures), from the same weights and the same
initial noise, and returns what it computed itself: ``{stage: tensor}`` for any of
:data:`core.pipeline.REFERENCE_STAGES`. The kit runs the tiny pipeline traced
(:meth:`core.pipeline.Pipeline.tracing`) at its own call, with guidance on where the model has
CFG, hands the reference the resolved call and the noise the plugin drew, and compares the stages
in the ladder's order:

==================  ===================================================  ============  =========
stage               what                                                 metric        tolerance
==================  ===================================================  ============  =========
``text_embeddings`` the prompt's embeddings as the denoiser receives them  relative      1e-5
``sigmas``          the noise levels of the schedule, with the last 0      max abs Δσ    1e-6
``velocity``        one denoiser forward at the first sigma (conditional)  relative      1e-5
``latents``         the final latents, before decoding                     relative      1e-4
``output``          the decoded output                                     relative      1e-4
==================  ===================================================  ============  =========

"relative" is the kit's metric, ‖got − ref‖ / ‖ref − mean(ref)‖. Why these tolerances (float32
on the CPU, same weights, same noise, so only the order of floating-point operations differs):

- ``sigmas``: both sides compute the schedule in float64 or float32 and keep float32, so they
  differ by a few ulps (≤ 1.2e-7 on [0, 1]; Qwen-Image measured 1.9e-8); 1e-6 is ~10 ulps. A
  schedule that is slightly wrong moves some sigma by far more: a shift 1 % off moves the middle
  ones by ~2e-3, Wan's 0.999 grid in place of 1 by 3.8e-4, a terminal stretch to 0.025 instead
  of 0.02 by 5e-3 (measured).
- ``text_embeddings``, ``velocity``: one forward pass of a few layers; different matmul blocking,
  attention kernels and fused norms give ~1e-7 relative (Qwen-Image's diffusers DiT: 1.3e-7);
  1e-5 leaves ~100× headroom, while a real difference (a dropped template token, a missing
  norm, the timestep off by a factor) is O(1e-2) or more.
- ``latents``, ``output``: the per-step errors add up over the steps and through the decoder,
  which a tiny random VAE amplifies (its gain is far from 1): measured 2.0e-7 and 5.3e-7 on
  Qwen-Image against diffusers, 0 on the diffusers-Flux example. 1e-4 leaves ~200× headroom and
  still catches the subtlest wrong step tried: Qwen-Image's CFG without its per-token rescale
  differs by 1.3e-3 in the latents (13× the tolerance; ``scripts/reference_mutations_qwen.py``),
  a wrong guidance weight or a decoder that skips the VAE's scaling by 0.27 and 0.87 on the
  Flux example (``tests/kit_plugins/flux_mutants.py``).

A plugin may loosen (or tighten) one stage with ``Conformance.reference_tolerances`` (e.g. a
reference in bfloat16, or one whose decoder runs a different but equivalent algorithm), saying
why in a comment. When a stage differs, the check fails and names the **first** stage that
differs (later stages inherit its error), with every stage's error and tolerance in the message
and in ``details["stages"]``. A plugin without a reference is a skip that says "fidelity
unproven" (a failure with ``--strict``); a reference whose package is missing is a skip naming
the package (a failure with ``--strict`` too: fidelity is unproven in that environment).
"""
from __future__ import annotations

import importlib
import math
from typing import Any, Callable

import torch

from ..pipeline import REFERENCE_STAGES
from .common import METRIC, PROMPT, CheckFailed, CheckSkipped, KitOptions, rel_error
from .subject import Subject

__all__ = ["TOLERANCES", "METRICS", "reference_parity", "resolve_reference", "compare_stages"]

TOLERANCES: dict[str, float] = {
    "text_embeddings": 1e-5,
    "sigmas": 1e-6,
    "velocity": 1e-5,
    "latents": 1e-4,
    "output": 1e-4,
}
"""Default tolerance per stage (see the module docstring for why each)."""

METRICS: dict[str, str] = {stage: METRIC for stage in REFERENCE_STAGES} | {"sigmas": "max |Δσ|"}

MEANING: dict[str, str] = {
    "text_embeddings": "prompt encoding",
    "sigmas": "the schedule",
    "velocity": "one denoiser forward at the first sigma",
    "latents": "guidance and sampler steps",
    "output": "decoding",
}


def resolve_reference(spec, strict: bool = False) -> Callable[..., Any] | None:
    """The declared reference as a callable; ``"module:attr"`` is imported here. Raises
    :class:`CheckSkipped` (a third-party package it needs is missing; :class:`CheckFailed` when
    ``strict``) or :class:`CheckFailed` (a reference that names something that does not exist)."""
    ref = spec.conformance.reference
    if ref is None or callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    if not attr:
        raise CheckFailed(f"Conformance.reference of {spec.name!r} is {ref!r}; expected a callable or 'module:attr'")
    try:
        obj = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            raise CheckFailed(f"Conformance.reference of {spec.name!r} names module {module!r}, which does not "
                              f"exist ({exc})") from None
        raise _missing_package(spec, exc, strict) from None
    try:
        return getattr(obj, attr)
    except AttributeError:
        raise CheckFailed(f"Conformance.reference of {spec.name!r}: module {module!r} has no attribute {attr!r}") from None


def _missing_package(spec, exc: ModuleNotFoundError, strict: bool) -> Exception:
    package = (exc.name or str(exc)).split(".")[0]
    message = (f"fidelity unproven here: the reference of {spec.name!r} needs the package {package!r}, which is not "
               f"installed (pip install {package})")
    return CheckFailed(message + "; --strict requires the reference to run") if strict else CheckSkipped(message)


def _leaves(value, where: str = "") -> list[tuple[str, torch.Tensor]]:
    """A stage's tensors with their positions: a tensor, or a tuple/list/dict of them."""
    if isinstance(value, torch.Tensor):
        return [(where, value)]
    if isinstance(value, (tuple, list)):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{where}[{i}]")]
    if isinstance(value, dict):
        return [leaf for k, v in sorted(value.items()) for leaf in _leaves(v, f"{where}[{k!r}]")]
    raise TypeError(f"a stage must be a tensor or a tuple/list/dict of tensors, got {type(value).__name__}")


def _stage_error(stage: str, got, ref) -> tuple[float, str]:
    """(error, reason): the worst error over the stage's tensors; ``inf`` with a reason when the
    structures or shapes differ."""
    try:
        got_leaves, ref_leaves = _leaves(got), _leaves(ref)
    except TypeError as exc:
        return math.inf, str(exc)
    if [w for w, _ in got_leaves] != [w for w, _ in ref_leaves]:
        return math.inf, (f"the plugin recorded {len(got_leaves)} tensor(s) {[w or 'tensor' for w, _ in got_leaves]}, "
                          f"the reference {len(ref_leaves)} {[w or 'tensor' for w, _ in ref_leaves]}")
    worst = 0.0
    for (where, g), (_, r) in zip(got_leaves, ref_leaves):
        if tuple(g.shape) != tuple(r.shape):
            return math.inf, f"shape{where} {tuple(g.shape)} here, {tuple(r.shape)} in the reference"
        g, r = g.detach().cpu().double(), r.detach().cpu().double()
        if stage == "sigmas":
            err = (g - r).abs().max().item() if g.numel() else 0.0
        else:
            err = rel_error(g, r)
        if not math.isfinite(err):
            return math.nan, f"non-finite values{where} (plugin finite: {bool(torch.isfinite(g).all())}, " \
                             f"reference finite: {bool(torch.isfinite(r).all())})"
        worst = max(worst, err)
    return worst, ""


def compare_stages(trace: dict, ref: dict, tolerances: dict[str, float]) -> list[dict]:
    """One row per stage of the ladder, in order: error, tolerance, metric and status
    (``match``, ``differs`` or ``not compared`` with the reason)."""
    rows = []
    for stage in REFERENCE_STAGES:
        row: dict[str, Any] = {"stage": stage, "metric": METRICS[stage], "tolerance": tolerances[stage]}
        if stage not in ref:
            row.update(status="not compared", reason="the reference does not return it")
        elif stage not in trace:
            row.update(status="not compared", reason="the plugin does not record it (Pipeline.trace)")
        else:
            err, reason = _stage_error(stage, trace[stage], ref[stage])
            row["error"] = err if math.isfinite(err) else repr(err)
            row["status"] = "match" if err <= tolerances[stage] else "differs"
            if reason:
                row["reason"] = reason
        rows.append(row)
    return rows


def _row_text(row: dict) -> str:
    if row["status"] == "not compared":
        return f"{row['stage']} -"
    err = row["error"]
    sign = "≤" if row["status"] == "match" else ">"
    return f"{row['stage']} {err:.2g}{sign}{row['tolerance']:g}" if isinstance(err, float) else \
        f"{row['stage']} {err}>{row['tolerance']:g}"


def ladder_summary(rows: list[dict]) -> str:
    """``text_embeddings 3e-08≤1e-05, sigmas 0≤1e-06, ...``: one line for the table."""
    return ", ".join(_row_text(r) for r in rows)


def _plain(value) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def reference_parity(subject: Subject, opts: KitOptions) -> dict:
    spec = subject.spec
    reference = resolve_reference(spec, opts.strict)
    if reference is None:
        message = (f"fidelity unproven: {spec.name!r} declares no Conformance.reference (an independent "
                   f"implementation of the same generation; see CONTRIBUTING.md)")
        if opts.strict:
            raise CheckFailed(message + "; --strict requires one")
        raise CheckSkipped(message)
    tolerances = {**TOLERANCES, **spec.conformance.reference_tolerances}

    pipe = subject.pipe()
    kwargs = subject.call_args(guidance_scale=3.0 if spec.capabilities.cfg else None)
    with pipe.tracing() as trace:
        pipe(PROMPT, **kwargs)
    if "noise" not in trace:
        raise CheckFailed(f"{spec.name!r} recorded no initial noise: draw it with Pipeline.noise() (or record it "
                          f"with self.trace('noise', x)) so the reference can start from the same noise")
    call = pipe.resolve(prompt=PROMPT, **{k: v for k, v in kwargs.items() if k != "progress"})
    try:
        with torch.no_grad():
            ref = reference(pipe, dict(call), trace["noise"])
    except ModuleNotFoundError as exc:
        raise _missing_package(spec, exc, opts.strict) from None
    if not isinstance(ref, dict):
        raise CheckFailed(f"the reference of {spec.name!r} returned {type(ref).__name__}; expected a dict "
                          f"{{stage: tensor}} with stages from {list(REFERENCE_STAGES)}")
    extra = sorted(set(ref) - set(REFERENCE_STAGES))
    if extra:
        raise CheckFailed(f"the reference of {spec.name!r} returned unknown stage(s) {extra}; stages are "
                          f"{list(REFERENCE_STAGES)}")

    rows = compare_stages(trace, ref, tolerances)
    differs = [r for r in rows if r["status"] == "differs"]
    details = {
        "stages": rows,
        "first_difference": differs[0]["stage"] if differs else None,
        "call": {k: v for k, v in call.items() if _plain(v)},
        "compared": [r["stage"] for r in rows if r["status"] != "not compared"],
    }
    if differs:
        first = differs[0]
        why = f" ({first['reason']})" if first.get("reason") else ""
        err = first["error"] if isinstance(first["error"], str) else format(first["error"], ".3g")
        raise CheckFailed(
            f"first stage that differs from the reference: {first['stage']} ({MEANING[first['stage']]}): {err} > "
            f"{first['tolerance']:g}{why}; ladder: {ladder_summary(rows)}", details)
    if "output" not in details["compared"]:
        raise CheckFailed(f"the reference of {spec.name!r} returned no 'output': the ladder must end at the decoded "
                          f"output (it returned {sorted(ref)})", details)
    return details
