"""Run the conformance checks on one model and report them (``ditkit check``)."""
from __future__ import annotations

import fnmatch
import json
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field

from .checks import CHECK_IDS, CHECKS, CheckFailed, CheckSkipped, KitOptions
from .quiet import quiet_libraries, recording_deprecations
from .subject import Subject


@dataclass
class CheckResult:
    id: str
    title: str
    status: str  # pass | fail | skip | xfail | xpass | error
    message: str = ""
    seconds: float = 0.0
    details: dict = field(default_factory=dict)
    """What the check measured: errors, tolerance, metric, cases (sizes, degrees, lengths, remainders)."""


class UnknownExpectedFailure(UserWarning):
    """An expected-failure entry names no check."""


def expected_failures(subject: Subject, extra: dict[str, str] | None = None) -> dict[str, str]:
    merged = {**subject.spec.conformance.expected_failures, **(extra or {})}
    for check_id in merged:
        if check_id not in CHECK_IDS:
            warnings.warn(f"expected failure {check_id!r} of {subject.name!r} matches no check (checks: "
                          f"{', '.join(CHECK_IDS)})", UnknownExpectedFailure, stacklevel=2)
    return merged


def selected(pattern: str | None) -> list:
    if not pattern:
        return list(CHECKS)
    return [c for c in CHECKS if pattern in c.id or fnmatch.fnmatch(c.id, pattern)]


def run_one(check, subject: Subject, opts: KitOptions, xfail: dict[str, str], done: dict[str, CheckResult]) -> CheckResult:
    for dep in check.depends:
        if dep in done and done[dep].status not in ("pass", "xpass"):
            return CheckResult(check.id, check.title, "skip", f"depends on {dep}, which did not pass ({done[dep].status})")
    start = time.perf_counter()
    details: dict = {}
    try:
        with quiet_libraries(), recording_deprecations(subject.deprecations):
            details = check.run(subject, opts) or {}
    except CheckSkipped as exc:
        status, message = "skip", str(exc)
    except CheckFailed as exc:
        details = exc.details
        status, message = ("xfail", f"{xfail[check.id]}: {exc}") if check.id in xfail else ("fail", str(exc))
    except Exception as exc:  # a crash inside the plugin is a failure of that check, with its traceback
        text = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
        status, message = ("xfail", f"{xfail[check.id]}: {text}") if check.id in xfail else ("error", text)
    else:
        status, message = ("xpass", f"expected to fail: {xfail[check.id]}") if check.id in xfail else ("pass", "")
    return CheckResult(check.id, check.title, status, message, time.perf_counter() - start, _jsonable(details))


def _jsonable(value):
    """``details`` as plain JSON types (tuples to lists, other objects to their repr)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def summary(details: dict) -> str:
    """One line of numbers for the table: the worst error against its tolerance, the cases, and for
    USP how many cases split a sequence with a remainder and the lengths seen."""
    parts = []
    if "max_error" in details:
        parts.append(f"max err {details['max_error']:.2g} (tol {details['tolerance']:g}) over {len(details['cases'])} cases")
    if "cases_with_remainder" in details:
        lengths = sorted({f"{s['sequence']}={s['total']}" + (f"(r{s['remainder']})" if s["remainder"] else "")
                          for c in details["cases"] for s in c["splits"]})
        parts.append(f"{details['cases_with_remainder']} uneven on {details['world']} ranks; lengths {' '.join(lengths)}")
    if "stages" in details:  # reference-parity: the ladder, each stage's error against its tolerance
        from .reference import ladder_summary

        parts.append(ladder_summary(details["stages"]))
    if "num_inference_steps" in details and "seconds" in details:  # end-to-end
        parts.append("steps " + ", ".join(f"{n} ({details['seconds'][str(n)]:.2f} s)" for n in details["num_inference_steps"]))
    if "graphs_after_first_call" in details:
        parts.append("graphs " + " ".join(f"{k}={n}" for k, n in details["graphs_after_first_call"].items()))
    return "; ".join(parts)


def run_checks(subject: Subject, opts: KitOptions | None = None, pattern: str | None = None,
               xfail: dict[str, str] | None = None, on_result=None) -> list[CheckResult]:
    opts = opts or KitOptions()
    xfail = expected_failures(subject, xfail)
    done: dict[str, CheckResult] = {}
    for check in selected(pattern):
        result = run_one(check, subject, opts, xfail, done)
        done[check.id] = result
        if on_result:
            on_result(result)
    return list(done.values())


def format_table(subject: Subject, results: list[CheckResult]) -> str:
    rows = [("check", "result", "seconds", "detail")]
    for r in results:
        numbers = summary(r.details)
        detail = r.message.strip().splitlines()[0] if r.message.strip() else (numbers or r.title)
        rows.append((r.id, r.status.upper(), f"{r.seconds:.1f}", detail[:240]))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    head = f"ditkit check {subject.spec.name} ({subject.record.distribution})"
    lines = [head] + ["  " + "  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "error", "skip", "xfail", "xpass")}
    lines.append("  " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    lines += [f"  deprecated: {message}" for message in subject.deprecations]
    return "\n".join(lines)


def to_json(subject: Subject, results: list[CheckResult]) -> str:
    from .. import CONTRACT_VERSION, __version__

    return json.dumps({"model": subject.spec.name, "distribution": subject.record.distribution,
                       "ditkit": __version__, "contract": CONTRACT_VERSION,
                       "results": [asdict(r) for r in results], "deprecations": subject.deprecations}, indent=2)


def failed(results: list[CheckResult]) -> bool:
    return any(r.status in ("fail", "error", "xpass") for r in results)
