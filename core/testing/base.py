"""Base test class a plugin's own suite subclasses (pytest)."""
from __future__ import annotations

import warnings

import pytest

from ..contract import ContractDeprecationWarning

from .checks import CHECKS, KitOptions
from .runner import expected_failures, run_one
from .subject import Subject

_subjects: dict[tuple, Subject] = {}


class PluginConformance:
    """Subclass and set ``model_name`` (or override the ``ditkit_subject`` fixture).

    ``plugin`` (``"module"`` / ``"module:attr"``) registers a plugin that is not installed through
    an entry point. ``expected_failures`` maps check ids to reasons; such checks are reported as
    xfail. Options: ``--ditkit-max-examples`` (Hypothesis examples per shape check),
    ``--ditkit-usp-world`` (ranks for the USP check) and ``--ditkit-strict`` (``reference-parity``
    fails when fidelity is unproven), from the kit's pytest plugin; ``strict = True`` on the
    subclass makes that model strict whatever the command line says.
    """

    model_name: str | None = None
    plugin: str | None = None
    expected_failures: dict[str, str] = {}
    strict: bool = False

    @pytest.fixture
    def ditkit_subject(self) -> Subject:
        if not self.model_name:
            raise NotImplementedError("override me: set model_name (the registered model to check) on the subclass")
        key = (type(self), self.model_name, self.plugin)
        if key not in _subjects:
            _subjects[key] = Subject(self.model_name, plugin=self.plugin)
        return _subjects[key]

    @pytest.fixture
    def ditkit_options(self, request) -> KitOptions:
        return self.kit_options(request.config)

    def kit_options(self, config) -> KitOptions:
        """The kit's options from the pytest command line (and ``strict`` from the class)."""
        get = config.getoption
        try:
            return KitOptions(max_examples=get("ditkit_max_examples"), usp_world=get("ditkit_usp_world"),
                              strict=self.strict or get("ditkit_strict"))
        except ValueError:  # the kit's pytest plugin is not active
            return KitOptions(strict=self.strict)

    def _run(self, check_id: str, subject: Subject, opts: KitOptions) -> None:
        done = subject.__dict__.setdefault("_results", {})  # earlier checks' results, for dependencies
        check = next(c for c in CHECKS if c.id == check_id)
        reported = len(subject.deprecations)
        result = run_one(check, subject, opts, expected_failures(subject, self.expected_failures), done)
        done[check_id] = result
        for message in subject.deprecations[reported:]:  # pytest's warnings summary shows each once
            warnings.warn(message, ContractDeprecationWarning, stacklevel=2)
        if result.status == "skip":
            pytest.skip(result.message)
        if result.status == "xfail":
            pytest.xfail(result.message)
        if result.status in ("fail", "error", "xpass"):
            pytest.fail(f"[{check_id}] {result.message}", pytrace=False)


def _make_test(check_id: str):
    def test(self, ditkit_subject, ditkit_options):
        self._run(check_id, ditkit_subject, ditkit_options)

    test.__name__ = "test_" + check_id.replace("-", "_")
    test.__doc__ = next(c.title for c in CHECKS if c.id == check_id)
    return test


for _check in CHECKS:
    setattr(PluginConformance, "test_" + _check.id.replace("-", "_"), _make_test(_check.id))
